import pytest
import torch
from torch import nn

from lorakit import TargetError, find_targets
from lorakit.targets import matches, parse_layers


@pytest.mark.parametrize("pattern,path,hit", [
    ("query", "encoder.layer.0.attention.self.query", True),
    ("self.query", "encoder.layer.0.attention.self.query", True),
    ("query", "encoder.layer.0.attention.self.myquery", False),  # whole segments only
    ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query", True),
    ("layer.*.output.dense", "encoder.layer.3.output.dense", True),
    ("layer.*.output.dense", "encoder.layer.3.attention.output.dense", False),
    ("re:.*\\.(query|value)$", "encoder.layer.3.attention.self.value", True),
    ("re:.*\\.(query|value)$", "encoder.layer.3.attention.self.key", False),
])
def test_matches(pattern, path, hit):
    assert matches(pattern, path) is hit


def test_presets_skip_head_and_pick_kinds(tiny):
    assert find_targets(tiny, ["all-linear"]) == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert find_targets(tiny, ["all-conv"]) == ["conv1", "conv2"]


def test_layer_ranges(tiny):
    assert parse_layers("0-1, 5") == {0, 1, 5}
    assert find_targets(tiny, ["all-linear"], layers="1-2") == ["blocks.1.0", "blocks.2.0"]
    assert find_targets(tiny, ["re:blocks\\..*"], layers=[0]) == ["blocks.0.0"]


def test_exclude(tiny):
    assert find_targets(tiny, ["all-linear", "head"], exclude=["blocks.1.0"]) == ["blocks.0.0", "blocks.2.0", "head"]


def test_errors_name_the_pattern(tiny):
    with pytest.raises(TargetError, match="'nope' matches no module"):
        find_targets(tiny, ["head", "nope"])
    with pytest.raises(TargetError, match="'blocks.0' matches only modules lorakit cannot adapt: blocks.0 \\(Seq"):
        find_targets(tiny, ["blocks.0"])
    with pytest.raises(TargetError, match="invalid regular expression"):
        find_targets(tiny, ["re:("])
    with pytest.raises(TargetError, match="select no module"):
        find_targets(tiny, ["head"], layers="0")
    with pytest.raises(TargetError, match="'0-x'"):
        parse_layers("0-x")


@pytest.mark.parametrize("pattern,path,hit", [
    ("**.dense", "encoder.layer.3.attention.output.dense", True),
    ("layer.[12].*.dense", "encoder.layer.1.output.dense", True),
    ("layer.[12].*.dense", "encoder.layer.3.output.dense", False),
    ("lay?r.0.*", "encoder.layer.0.output", True),
])
def test_glob_segments(pattern, path, hit):
    assert matches(pattern, path) is hit


class TinyEncoder(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` blocks (each with an ``nn.MultiheadAttention``) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # x: (N, T, 8) → (N, T, 3)


def test_all_linear_skips_multihead_attention_out_proj_and_every_adapter_trains():
    from lorakit import inject, lora_layers
    from tests.conftest import randomize_b

    torch.manual_seed(0)
    model = TinyEncoder().train()
    assert find_targets(model, ["all-linear"]) == [f"encoder.layers.{i}.{n}" for i in (0, 1)
                                                   for n in ("linear1", "linear2")]
    inject(model, ["all-linear"], rank=2, seed=0)
    randomize_b(model)
    model(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
    adapters = [(path, f) for path, layer in lora_layers(model) for f in layer.lora.values()]
    assert len(adapters) == 4
    for path, f in adapters:  # an adapter whose forward never runs would have no gradient at all
        for p in (f.A, f.B):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, path


def test_explicit_multihead_attention_out_proj_target_is_refused_naming_the_path():
    from lorakit import inject

    model = TinyEncoder()
    with pytest.raises(TargetError, match=r"encoder\.layers\.0\.self_attn\.out_proj.*MultiheadAttention"):
        find_targets(model, ["self_attn.out_proj"])
    with pytest.raises(TargetError, match=r"encoder\.layers\.1\.self_attn\.out_proj"):
        find_targets(model, ["linear1", "re:.*\\.out_proj"])
    keys = list(model.state_dict())
    with pytest.raises(TargetError, match="out_proj"):
        inject(model, ["linear1", "encoder.layers.1.self_attn.out_proj"], rank=2)
    assert list(model.state_dict()) == keys  # refused before any change
    # Excluded, it is no longer selected and nothing is refused.
    assert find_targets(model, ["re:.*\\.(linear2|out_proj)"], exclude=["self_attn.out_proj"]) == [
        "encoder.layers.0.linear2", "encoder.layers.1.linear2"]
    bare = nn.MultiheadAttention(8, 2)
    with pytest.raises(TargetError, match="'out_proj'.*MultiheadAttention"):
        find_targets(bare, ["out_proj"])


def _tiny_transformers(kind: str) -> nn.Module:
    """A randomly initialised one-layer transformers model (no download): ``bert``, ``bert-cls``, ``roberta-cls``
    or ``gpt2-lm``."""
    import transformers as tf

    torch.manual_seed(0)
    enc = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=30,
               max_position_embeddings=40)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(**enc))
    if kind == "bert-cls":
        return tf.BertForSequenceClassification(tf.BertConfig(**enc))
    if kind == "roberta-cls":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**enc))
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=30, n_positions=20))


def _peft_all_linear(model: nn.Module, task_type: str | None = None) -> set[str]:
    """Module paths PEFT's ``get_peft_model`` puts a LoRA layer on for ``target_modules="all-linear"``."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear", task_type=task_type))
    prefix = "base_model.model."
    return {p[len(prefix):] for p, m in wrapped.named_modules() if isinstance(m, PeftLoraLayer)}


ENCODER = {f"{a}.encoder.layer.0.{m}" for a in ("bert", "roberta") for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # transformers/PEFT deprecations
@pytest.mark.parametrize("kind,expected", [
    # A headless encoder has no output head: its pooler is an ordinary layer (PEFT adapts it too).
    ("bert", {p[len("bert."):] for p in ENCODER if p.startswith("bert.")} | {"pooler.dense"}),
    # A classification head (a linear, or a block of linears as in RoBERTa) is left alone, as PEFT does for
    # task_type="SEQ_CLS"; the pooler under it is not the head.
    ("bert-cls", {p for p in ENCODER if p.startswith("bert.")} | {"bert.pooler.dense"}),
    ("roberta-cls", {p for p in ENCODER if p.startswith("roberta.")}),
    # A language model's output embedding (lm_head) is the head.
    ("gpt2-lm", {f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}),
])
def test_all_linear_output_head_of_transformers_models_matches_peft(kind, expected):
    model = _tiny_transformers(kind)
    got = set(find_targets(model, ["all-linear"]))
    assert got == expected
    assert got == _peft_all_linear(model, "SEQ_CLS" if kind.endswith("-cls") else None)


def test_adapters_on_transformer_encoder_feed_forward_run_in_eval_mode():
    from lorakit import inject
    from tests.conftest import randomize_b

    torch.manual_seed(0)
    model = TinyEncoder().eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    inject(model, ["all-linear"], rank=2, seed=0)
    randomize_b(model)
    with torch.no_grad():
        evaluated = model(x)
        model.train()  # dropout is 0: train mode computes the same function, on the slow path
        trained = model(x)
    assert torch.allclose(evaluated, trained, atol=1e-5)


def test_adapters_in_a_transformer_encoder_run_with_a_padding_mask_in_eval_mode():
    from lorakit import inject
    from tests.conftest import randomize_b

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    model = nn.Sequential(enc)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    inject(model, ["linear1", "linear2"], rank=2, seed=0)
    randomize_b(model)
    with torch.no_grad():
        evaluated = enc(x, src_key_padding_mask=mask)
        enc.train()
        trained = enc(x, src_key_padding_mask=mask)
    assert torch.allclose(evaluated[0], trained[0], atol=1e-5)
    assert torch.allclose(evaluated[1, :3], trained[1, :3], atol=1e-5)
