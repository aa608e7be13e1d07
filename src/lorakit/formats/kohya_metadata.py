"""kohya sd-scripts' training metadata (``ss_*``, ``sshs_*``, ``modelspec.*``): checked reading, hashes, a summary.

kohya writes every value as a Python ``str()``: integers (``"8"``), floats (``"0.0001"``, ``"1e-05"``), booleans
(``"True"``), ``"None"`` for an unset option, ``"Dynamic"`` for a rank or alpha that differs per module (resized
files), a resolution as ``"(512, 512)"`` or ``"512,512"``, and JSON texts for ``ss_tag_frequency`` (dataset folder
→ tag → count), ``ss_network_args`` (the ``--network_args`` key/value pairs, ``conv_dim`` / ``conv_alpha``...) and
a few dataset descriptions. Those values come from an untrusted file, so :func:`parse` reads the keys it knows
through :mod:`lorakit.formats.checked` (numbers and JSON alike, with size and depth limits) and names each key whose
value has the wrong type; keys it does not know stay plain strings. The adapter keeps the raw strings as its
metadata either way, so a file read and written again carries every ``ss_*`` key unchanged.

:func:`addnet_hashes` gives ``sshs_model_hash`` / ``sshs_legacy_hash``, the hashes kohya precalculates for
sd-webui-additional-networks (``precalculate_safetensors_hashes`` in its ``library/train_util.py``).
:func:`model_hashes` gives ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` of the base model.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from lorakit.errors import FileFormatError
from lorakit.formats import checked
from lorakit.formats.checked import Int, Map, Num, Obj, Schema, Str

#: ``ss_network_dim`` / ``ss_network_alpha`` of a file whose ranks or alphas differ per module (kohya's word).
DYNAMIC = "Dynamic"
#: Deepest JSON nesting accepted in an ``ss_*`` JSON value (kohya's nest 2 or 3 levels).
MAX_JSON_DEPTH = 4
#: Largest ``ss_*`` JSON text accepted (tag frequencies of big datasets run to a few MB).
MAX_JSON_BYTES = 16_000_000
#: Byte range of kohya's legacy hash: 64 KiB from 1 MiB into the file (A1111's old model hash).
LEGACY_SPAN = (0x100000, 0x110000)


class _Scalar(Schema):
    """A JSON string, number, boolean or null (the values of ``ss_network_args``)."""

    def problems(self, value, where: str) -> list[str]:
        if value is None or isinstance(value, (str, int, float, bool)):
            return []
        return self._wrong(value, where, "a string, number, boolean or null")


_SCALAR = _Scalar()
#: JSON-valued keys and the schema of their parsed value.
JSON_KEYS: dict[str, Schema] = {
    "ss_tag_frequency": Map(Map(Int(0))),
    "ss_network_args": Map(_SCALAR),
    "ss_dataset_dirs": Map(Obj(optional={"n_repeats": Int(0), "img_count": Int(0)})),
    "ss_reg_dataset_dirs": Map(Obj(optional={"n_repeats": Int(0), "img_count": Int(0)})),
    "ss_bucket_info": checked.Any_(),
    "ss_datasets": checked.List(),
}
#: Integer keys (``"None"`` allowed: kohya's unset option).
INT_KEYS = frozenset("""
    ss_steps ss_epoch ss_num_train_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs ss_max_train_steps
    ss_batch_size_per_device ss_total_batch_size ss_gradient_accumulation_steps ss_lr_warmup_steps ss_seed
    ss_clip_skip ss_max_token_length ss_keep_tokens ss_min_bucket_reso ss_max_bucket_reso ss_session_id
    """.split())
#: Float keys (``"None"`` allowed).
FLOAT_KEYS = frozenset("""
    ss_learning_rate ss_text_encoder_lr ss_unet_lr ss_training_started_at ss_training_finished_at ss_noise_offset
    ss_min_snr_gamma ss_max_grad_norm ss_caption_dropout_rate ss_caption_tag_dropout_rate ss_adaptive_noise_scale
    ss_multires_noise_discount ss_prior_loss_weight
    """.split())
#: Boolean keys (``"True"`` / ``"False"``).
BOOL_KEYS = frozenset("""
    ss_v2 ss_v_parameterization ss_full_fp16 ss_cache_latents ss_enable_bucket ss_shuffle_caption ss_color_aug
    ss_flip_aug ss_random_crop ss_gradient_checkpointing ss_bucket_no_upscale
    """.split())
_RESOLUTION = re.compile(r"\(?\s*(\d{1,6})\s*(?:,\s*(\d{1,6})\s*)?\)?")


def parse(metadata: Mapping[str, str], source: object = "<memory>") -> dict[str, Any]:
    """The ``ss_*`` keys of ``metadata`` with typed values (see the module docstring); other keys as given.

    ``ss_network_dim`` is an int or :data:`DYNAMIC`, ``ss_network_alpha`` a float or :data:`DYNAMIC`,
    ``ss_resolution`` a (width, height) pair, a ``"None"`` number ``None``.

    Raises:
        FileFormatError: naming every key whose value has the wrong type, and why.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in metadata.items():
        try:
            out[key] = _value(key, raw, source)
        except _Bad as e:
            problems.append(f"metadata {key!r}: {e}")
    if problems:
        raise FileFormatError(source, "bad kohya training metadata: " + checked.problems_text(problems))
    return out


def problems(metadata: Mapping[str, str], source: object = "<memory>") -> list[str]:
    """What :func:`parse` would refuse, as messages (empty when the metadata is well typed)."""
    try:
        parse(metadata, source)
    except FileFormatError as e:
        return [e.reason]
    return []


class _Bad(ValueError):
    """One value of the wrong type (turned into a message naming its key)."""


def _value(key: str, raw: str, source: object) -> Any:
    if not isinstance(raw, str):  # safetensors metadata is strings; a caller's dict may not be
        raise _Bad(f"expected a string, got {type(raw).__name__}")
    if key in JSON_KEYS:
        try:
            return checked.load(raw, JSON_KEYS[key], source, f"metadata {key!r}", max_bytes=MAX_JSON_BYTES,
                                max_depth=MAX_JSON_DEPTH)
        except FileFormatError as e:
            raise _Bad(e.reason.removeprefix(f"metadata {key!r}: ")) from None
    if key == "ss_network_dim":
        return raw if raw == DYNAMIC else _number(raw, Int(1), f"an integer >= 1 or {DYNAMIC!r}", source)
    if key == "ss_network_alpha":
        return raw if raw == DYNAMIC else float(_number(raw, Num(), f"a number or {DYNAMIC!r}", source))
    if key in INT_KEYS:
        return None if raw == "None" else _number(raw, Int(), "an integer or 'None'", source)
    if key in FLOAT_KEYS:
        return None if raw == "None" else float(_number(raw, Num(), "a number or 'None'", source))
    if key in BOOL_KEYS:
        if raw not in ("True", "False"):
            raise _Bad(f"expected 'True' or 'False', got {raw[:40]!r}")
        return raw == "True"
    if key == "ss_resolution":
        m = _RESOLUTION.fullmatch(raw.strip())
        if m is None:
            raise _Bad(f"expected a resolution like '(512, 512)' or '512,512' or '512', got {raw[:40]!r}")
        width = int(m.group(1))
        return width, int(m.group(2) or width)
    return raw


def _number(raw: str, schema: Schema, expected: str, source: object) -> int | float:
    """``raw`` read as a JSON number (Python's ``str()`` of an int or float is one) and checked by ``schema``."""
    try:
        value = checked.parse(raw, source, "value", max_bytes=64, max_depth=0)
    except FileFormatError:
        raise _Bad(f"expected {expected}, got {raw[:40]!r}") from None
    if schema.problems(value, "value"):
        raise _Bad(f"expected {expected}, got {raw[:40]!r}")
    return value


# ------------------------------------------------------------------------------------------------------- summary
def summary(metadata: Mapping[str, str], source: object = "<memory>", top: int = 10) -> dict[str, Any]:
    """The training facts ``lorakit inspect`` shows, from a file's metadata ({} when it has no ``ss_*`` key).

    Returns:
        ``network_module``, ``dim``, ``alpha``, ``network_args``, ``base_model`` (``ss_sd_model_name``),
        ``base_model_version``, ``model_hash`` (``ss_new_sd_model_hash``), ``resolution``, ``steps``, ``epoch``,
        ``num_train_images``, ``learning_rate``, ``comment`` and ``tag_frequency``: the ``top`` most frequent
        tags over all dataset folders, as ``[tag, count]`` pairs (most frequent first, then by tag); absent keys
        are left out.

    Raises:
        FileFormatError: see :func:`parse`.
    """
    if not any(k.startswith("ss_") for k in metadata):
        return {}
    typed = parse(metadata, source)
    names = {"network_module": "ss_network_module", "dim": "ss_network_dim", "alpha": "ss_network_alpha",
             "network_args": "ss_network_args", "base_model": "ss_sd_model_name",
             "base_model_version": "ss_base_model_version", "model_hash": "ss_new_sd_model_hash",
             "resolution": "ss_resolution", "steps": "ss_steps", "epoch": "ss_epoch",
             "num_train_images": "ss_num_train_images", "learning_rate": "ss_learning_rate",
             "comment": "ss_training_comment"}
    out = {name: typed[key] for name, key in names.items() if key in typed}
    if "resolution" in out:
        out["resolution"] = list(out["resolution"])
    if "ss_tag_frequency" in typed:
        counts: dict[str, int] = {}
        for tags in typed["ss_tag_frequency"].values():
            for tag, n in tags.items():
                counts[tag] = counts.get(tag, 0) + n
        out["tag_frequency"] = [[t, n] for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    return out


# -------------------------------------------------------------------------------------------------------- hashes
def addnet_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a kohya file holding ``tensors`` and ``metadata``.

    As kohya computes them: the file is serialised in memory with only the ``ss_*`` metadata (so user metadata
    edited later does not change the hashes); the model hash is the sha256 of its data section (everything after
    the header: the tensor bytes), the legacy hash the first 8 hex digits of the sha256 of bytes
    ``0x100000..0x110000`` of the whole serialisation (empty for a file under 1 MiB: ``e3b0c442``).
    """
    from safetensors.torch import save

    data = save({k: t.detach().cpu().contiguous() for k, t in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_SPAN[0]:LEGACY_SPAN[1]]).hexdigest()[:8]
    return model, legacy


#: Weight files of a diffusers component folder, by preference (the first present is hashed).
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def model_weight_files(model: str | os.PathLike, components: Iterable[str]) -> list[Path]:
    """The files whose bytes :func:`model_hashes` reads: ``model`` itself if it is a file, else the weight file of
    each of ``components`` (``unet``, ``text_encoder``...) in that order, where present (sharded weights: every
    ``.safetensors`` shard, in name order)."""
    root = Path(model)
    if root.is_file():
        return [root]
    files: list[Path] = []
    for comp in components:
        folder = root / comp
        for name in WEIGHT_NAMES:
            if (folder / name).is_file():
                files.append(folder / name)
                break
        else:  # sharded weights (``*-00001-of-00002.safetensors``), in name order
            files.extend(sorted(folder.glob("*.safetensors")))
    return files


def model_hashes(files: Iterable[Path], chunk: int = 1 << 20) -> tuple[str, str]:
    """``(ss_sd_model_hash, ss_new_sd_model_hash)`` of the bytes of ``files`` read as one stream.

    For one checkpoint file these are kohya's (``train_util.model_hash``: 8 hex digits of the sha256 of 64 KiB
    from 1 MiB in, A1111's old hash; ``calculate_sha256``: the file's sha256). kohya gives a diffusers folder no
    hash (its functions answer ``"IsADirectory"``); lorakit hashes the component weight files of
    :func:`model_weight_files` concatenated in that order, with the same two rules.
    """
    full = hashlib.sha256()
    legacy = hashlib.sha256()
    at = 0
    lo, hi = LEGACY_SPAN
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                full.update(block)
                start, end = max(lo - at, 0), min(hi - at, len(block))
                if start < end:
                    legacy.update(block[start:end])
                at += len(block)
    return legacy.hexdigest()[:8], full.hexdigest()
