"""Causal language modelling with any transformers causal LM; fixed-length token blocks; metric eval loss.

``tiny-llama`` and ``tiny-gpt2`` build small random models from a config with a byte-level vocabulary (for tests);
any other name is a local folder or hub id read with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.data import read_lines, read_rt_polarity, read_sst2, subset
from lorakit.train.device import device_of, to_device

#: Byte-level vocabulary of the tiny models: 256 bytes.
BYTE_VOCAB = 256


def _tiny(name: str, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "tiny-llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256))
    return GPT2LMHeadModel(GPT2Config(vocab_size=BYTE_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=10, eos_token_id=10, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def _texts(cfg: TrainConfig) -> list[str]:
    d = cfg.data.dataset
    if d == "text-file":
        return read_lines(cfg.data.path)  # type: ignore[arg-type]
    if d == "sst2":
        return [t for t, _ in read_sst2("train")]
    if d == "rt-polarity":
        return [t for t, _ in read_rt_polarity("train")]
    raise ConfigError(f"config field 'data.dataset': task causal-lm reads 'text-file', 'sst2' or 'rt-polarity', "
                      f"got {d!r}")


def build(cfg: TrainConfig):
    from lorakit.train.tasks import Task

    if cfg.model.name in ("tiny-llama", "tiny-gpt2"):
        model = _tiny(cfg.model.name, cfg.run.seed)
        encode = lambda text: list(text.encode("utf-8"))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model.name)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for line in _texts(cfg):
        stream += encode(line + "\n")
    block = cfg.data.max_length
    blocks = [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]
    if len(blocks) < 2:
        raise ConfigError(f"config field 'data': the text gives {len(blocks)} block(s) of data.max_length={block} "
                          "tokens; need at least 2")
    n_eval = cfg.data.eval_rows or max(1, len(blocks) // 10)
    eval_set, train_all = blocks[:n_eval], blocks[n_eval:]
    train_set = [train_all[i] for i in subset(len(train_all), cfg.data.train_rows, cfg.run.seed)]

    def collate(batch: list[list[int]]) -> dict[str, Tensor]:
        """input_ids: (N, T)."""
        return {"input_ids": torch.tensor(batch, dtype=torch.long)}

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = m(input_ids=batch["input_ids"]).logits[:, :-1].float()  # (N, T-1, V)
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    def evaluate(m: nn.Module, rows: Sequence[list[int]], batch_size: int = 32) -> dict[str, float]:
        total, n = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(list(rows[start:start + batch_size])), device_of(m))
            total += loss(m, batch).item() * len(batch["input_ids"])
            n += len(batch["input_ids"])
        mean = total / max(n, 1)
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}

    return Task(model, train_set, eval_set, collate, loss, evaluate, "eval_loss", False, cfg.model.name)
