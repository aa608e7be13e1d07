"""Sentence classification with a transformers encoder (MiniLM-L6 by default) on SST-2 or rt-polarity.

Metric: accuracy. Batches are padded only to their longest sentence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.data import read_rt_polarity, read_sst2, subset
from lorakit.train.device import device_of, to_device
from lorakit.train.tasks import Task

#: Example: (token ids without padding, label).
Example = tuple[list[int], int]


def _model_and_tokenizer(cfg: TrainConfig):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    from lorakit.models.hub import minilm_source

    name = cfg.model.name
    if name == "tiny-bert":  # random weights, MiniLM's tokenizer: for tests
        tok = AutoTokenizer.from_pretrained(minilm_source())
        torch.manual_seed(cfg.run.seed)
        conf = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, num_labels=cfg.model.num_labels,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(conf), tok, name
    source = minilm_source() if name == "minilm" else name
    tok = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(cfg.run.seed)  # the fresh classifier head
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=cfg.model.num_labels)
    return model, tok, "sentence-transformers/all-MiniLM-L6-v2" if name == "minilm" else name


def _rows(cfg: TrainConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    if cfg.data.dataset == "sst2":
        return read_sst2("train"), read_sst2("dev")
    if cfg.data.dataset == "rt-polarity":
        return read_rt_polarity("train"), read_rt_polarity("dev")
    raise ConfigError(f"config field 'data.dataset': task text-classification reads 'sst2' or 'rt-polarity', "
                      f"got {cfg.data.dataset!r}")


def build(cfg: TrainConfig) -> Task:
    model, tok, base = _model_and_tokenizer(cfg)
    train_rows, eval_rows = _rows(cfg)
    train_rows = [train_rows[i] for i in subset(len(train_rows), cfg.data.train_rows, cfg.run.seed)]
    eval_rows = eval_rows[:cfg.data.eval_rows] if cfg.data.eval_rows else eval_rows
    max_len, pad = cfg.data.max_length, tok.pad_token_id or 0

    def encode(rows: list[tuple[str, int]]) -> list[Example]:
        ids = tok([t for t, _ in rows], truncation=True, max_length=max_len)["input_ids"]
        return [(i, y) for i, (_, y) in zip(ids, rows)]

    def collate(batch: list[Example]) -> dict[str, Tensor]:
        """Pad to the longest example: input_ids, attention_mask (N, T); labels (N,)."""
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for n, (seq, _) in enumerate(batch):
            ids[n, :len(seq)] = torch.tensor(seq)
            mask[n, :len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, C)
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    def evaluate(m: nn.Module, rows: Sequence[Example], batch_size: int = 128) -> dict[str, float]:
        correct, total, loss_sum = 0, 0, 0.0
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(list(rows[start:start + batch_size])), device_of(m))
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
        return {"accuracy": correct / max(total, 1), "eval_loss": loss_sum / max(total, 1)}

    def predict(m: nn.Module, texts: list[str]) -> list[int]:
        batch = to_device(collate([(ids, 0) for ids, _ in encode([(t, 0) for t in texts])]), device_of(m))
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).tolist()

    train_set = encode(train_rows)
    return Task(model, train_set, encode(eval_rows), collate, loss, evaluate, "accuracy", True, base, predict,
                lengths=[len(ids) for ids, _ in train_set])
