"""Real MiniLM-L6 adapter: split by layer blocks, attach only the top three layers, compare with run-time strengths."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.ops import (
    attach_parts,
    attach_split,
    bake_strengths,
    block_strengths,
    join,
    load_split,
    save_split,
    set_block_strengths,
    set_part_strengths,
    split,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(minilm_source):
    """(base model, batch, adapter trained for three steps on queries, values, FFN inputs and the head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_source, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_source)
    batch = tok(["a gripping, beautifully acted film", "a dull and lifeless mess", "i loved it"], padding=True,
                return_tensors="pt")
    base = copy.deepcopy(model)
    lk.inject(model, ["query", "value", "intermediate.dense"], rank=4, alpha=8, train=["classifier"], seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([1, 0, 1])
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    adapter = lk.extract(model, base_model="minilm")
    return base, batch, adapter


def test_top_three_layers_part_equals_other_blocks_at_strength_zero(trained, tmp_path):
    base, batch, adapter = trained
    assert list(adapter.overrides) == ["classifier.weight", "classifier.bias"]
    s = split(adapter, "block", family="bert")
    assert s.names == ["L00", "L01", "L02", "L03", "L04", "L05", "HEAD"]
    save_split(s, tmp_path / "pkg")

    partial = copy.deepcopy(base)
    attach_parts(partial, tmp_path / "pkg", names=["L03", "L04", "L05", "HEAD"])
    assert all(".layer.3." in p or ".layer.4." in p or ".layer.5." in p for p, _ in lk.lora_layers(partial))

    full = copy.deepcopy(base)
    lk.attach(full, join(load_split(tmp_path / "pkg")))
    changed = set_block_strengths(full, {"L00": 0, "L01": 0, "L02": 0}, family="bert")
    assert changed == 9
    strengths = block_strengths(full, family="bert")
    assert strengths == {"L00": 0, "L01": 0, "L02": 0, "L03": 1, "L04": 1, "L05": 1}

    with torch.no_grad():
        got = partial(**batch).logits
        want = full(**batch).logits
        everything = copy.deepcopy(base)
        lk.attach(everything, adapter)
        all_on = everything(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, all_on, atol=1e-5)  # the lower blocks did matter

    # baking the same strengths into the data gives the same model again, with factors untouched
    baked = bake_strengths(adapter, {"L00": 0, "L01": 0, "L02": 0}, family="bert")
    assert all(torch.equal(baked[p].A, adapter[p].A) for p in adapter.paths)
    again = copy.deepcopy(base)
    lk.attach(again, baked)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, want, rtol=1e-6, atol=1e-6)


def test_rank_band_parts_switch_at_run_time(trained, tmp_path):
    base, batch, adapter = trained
    save_split(split(adapter, "rank", bands=[2, 2]), tmp_path / "bands")
    model = copy.deepcopy(base)
    assert attach_split(model, tmp_path / "bands") == ["band0", "band1"]
    reference = copy.deepcopy(base)
    lk.attach(reference, adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
        set_part_strengths(model, {"band1": 0.0})
        top = model(**batch).logits
    first = copy.deepcopy(base)
    from lorakit.ops import load_parts

    lk.attach(first, load_parts(tmp_path / "bands", names=["band0"]))
    with torch.no_grad():
        torch.testing.assert_close(top, first(**batch).logits, rtol=1e-6, atol=1e-6)
