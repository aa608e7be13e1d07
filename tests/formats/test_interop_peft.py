"""PEFT interop against the real ``peft`` library, on the real MiniLM-L6 weights."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.formats import detect, peft

pytest.importorskip("peft")


def _fresh(source: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)  # a head different from the trained one: the override must bring it over
    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).eval()


def _train(model, batch, params, steps: int = 2) -> None:
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-2)
    labels = torch.tensor([1, 0, 1])
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_lorakit_adapter_loads_in_peft(minilm, minilm_source, tmp_path):
    from peft import PeftModel

    model, batch = minilm
    lk.inject(model, ["query", "value", "word_embeddings"], rank=8, alpha=24.0, ranks={"value": 4},
              alphas={"value": 3.0}, train=["classifier"], seed=0)
    _train(model, batch, model.parameters())
    adapter = lk.extract(model)
    assert all(float(m.B.abs().max()) > 0 for m in adapter.modules.values())
    with torch.no_grad():
        expected = model(**batch).logits

    detect.write(adapter, tmp_path / "peft", "peft")
    config = json.loads((tmp_path / "peft" / peft.CONFIG_NAME).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 24 and config["modules_to_save"] == ["classifier"]
    assert set(config["rank_pattern"].values()) == {4} and set(config["alpha_pattern"].values()) == {3}

    loaded = PeftModel.from_pretrained(_fresh(minilm_source), tmp_path / "peft").eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_lorakit(minilm, minilm_source, tmp_path, dora):
    from peft import LoraConfig, get_peft_model

    model, batch = minilm
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["query", "key", "output.dense"],
                        rank_pattern={"key": 2}, alpha_pattern={"key": 5}, modules_to_save=["classifier"],
                        use_dora=dora, use_rslora=not dora, lora_dropout=0.0, init_lora_weights="gaussian")
    pm = get_peft_model(model, config)
    _train(pm, batch, pm.parameters())
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path / "trained")

    adapter = detect.read_any(tmp_path / "trained")
    assert detect.detect(tmp_path / "trained") == "peft"
    key = next(p for p in adapter.modules if p.endswith("attention.self.key"))
    assert (adapter[key].rank, adapter[key].alpha, adapter[key].rslora) == (2, 5.0, not dora)
    assert (adapter[key].magnitude is not None) == dora
    assert set(adapter.overrides) == {"classifier.weight", "classifier.bias"}

    fresh = _fresh(minilm_source)
    lk.attach(fresh, adapter)
    with torch.no_grad():
        got = fresh(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gpt2_conv1d_both_ways(tmp_path):
    """transformers' Conv1D (weights stored (in, out)): PEFT's fan_in_fan_out ↔ lorakit's ``linear_t`` kind."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)).eval()

    ids = torch.tensor([[1, 5, 7, 2, 9]])
    pm = get_peft_model(base(), LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj", "wte"],
                                           init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)
        expected = pm(ids).logits
    pm.save_pretrained(tmp_path / "gpt2")
    adapter = detect.read_any(tmp_path / "gpt2")
    assert adapter["transformer.h.0.attn.c_attn"].kind == "linear_t"
    assert adapter["transformer.wte"].kind == "embedding"
    ours = base()
    lk.attach(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)

    detect.write(adapter, tmp_path / "again", "peft")
    back = PeftModel.from_pretrained(base(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=0)
