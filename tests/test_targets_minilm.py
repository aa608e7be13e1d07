"""``all-linear`` on the real MiniLM-L6 selects the modules PEFT's ``all-linear`` does."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from lorakit import find_targets

pytestmark = pytest.mark.slow


def _peft_paths(model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {p for p, m in model.named_modules() if isinstance(m, PeftLoraLayer)}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # a transformers deprecation inside PEFT
def test_all_linear_on_headless_minilm_equals_peft(minilm_source):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    base = AutoModel.from_pretrained(minilm_source)  # BertModel: no output head, as bench/perf.py loads it
    ours = set(find_targets(base, ["all-linear"]))
    assert "pooler.dense" in ours and len(ours) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output; pooler
    injected = inject_adapter_in_model(LoraConfig(r=2, target_modules="all-linear"), copy.deepcopy(base))
    assert ours == _peft_paths(injected)
    # bench/perf.py races lorakit against get_peft_model on this model: both sides adapt the same modules.
    wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear"))
    assert {f"base_model.model.{p}" for p in ours} == _peft_paths(wrapped)
