"""Malformed adapter files for the fuzz tests: valid seed files of every dialect, mutated with a fixed seed.

A *target* is one kind of input (native file, PEFT directory, kohya file, diffusers file, split package). Its seeds
are the files lorakit itself writes (and the same files stripped of lorakit's hints, as other tools write them).
A *variant* is a seed with one to three mutations: JSON field type swaps, deletions, huge / negative / zero / NaN
numbers, 10⁵-deep nesting, unicode, truncation, a corrupted header length, data_offsets tweaks, dtype swaps,
extra / missing tensors and shape changes. :func:`campaign` reads every variant through the public readers and
counts clean refusals (:class:`LorakitError`) and raw exceptions (anything else, and any warning a reader emits),
naming where each raw one came from.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import LorakitError
from lorakit.formats import diffusers, kohya, native, peft

TARGETS = ("native", "peft", "kohya", "diffusers", "manifest")
#: Reports of the campaigns run in this session, printed in pytest's terminal summary (tests/formats/conftest.py).
REPORTS: list = []

# Placeholders swapped for raw JSON text after json.dumps (json.dumps cannot write them).
_DEEP, _HUGE_INT, _HUGE_FLOAT = "\x00deep\x00", "\x00hugeint\x00", "\x00hugefloat\x00"
_RAW = {json.dumps(_DEEP): "[" * 100_000 + "]" * 100_000, json.dumps(_HUGE_INT): "9" * 5000,
        json.dumps(_HUGE_FLOAT): "1e999"}

HOSTILE = ["false", "true", "0", "16", "", "x", "ü\u202e名", "\ud800", "../../etc/passwd", "/abs/path", "a" * 3000,
           -1, 0, 1, 2, -0.5, 1e-300, 1e308, 2 ** 63, 10 ** 6, 10 ** 12, float("nan"), float("inf"), float("-inf"),
           True, False, None, [], {}, [1], [0, 4], ["0", "4"], [None], {"a": 1}, {"": {}}, [[[]]],
           _DEEP, _HUGE_INT, _HUGE_FLOAT]
DTYPES = ["F8_E4M3", "F8_E5M2", "BOOL", "I64", "I32", "U8", "I8", "F16", "BF16", "F64", "F32", "X", 7, None]
TORCH_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bool, torch.int64, torch.uint8, torch.float16,
                torch.bfloat16, torch.float64, torch.int32]


def dumps(value) -> str:
    """``json.dumps`` with the placeholders of :data:`HOSTILE` expanded to raw (invalid or extreme) JSON."""
    text = json.dumps(value)
    for k, v in _RAW.items():
        if k in text:
            text = text.replace(k, v)
    return text


# ---------------------------------------------------------------------------------------------------- safetensors
def st_parts(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of safetensors bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_bytes(header: dict | str, body: bytes) -> bytes:
    """safetensors bytes from a header (dict, or raw JSON text) and a data section."""
    raw = (header if isinstance(header, str) else dumps(header)).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


# ------------------------------------------------------------------------------------------------- JSON mutation
def _nodes(doc, path=()) -> list[tuple]:
    """Every (path) to a value inside a JSON document (the root is ``()``)."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, path + (i,))
    return out


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _near(rng: random.Random, value):
    """A value of the wrong type but close to ``value``: ``"false"`` for False, ``"16"`` for 16, 16 for "16"..."""
    if isinstance(value, bool):
        return rng.choice([str(value).lower(), int(value), None, [value]])
    if isinstance(value, (int, float)):
        return rng.choice([str(value), -value, 0, value * 10 ** 6, float("nan"), float("inf"), True, [value],
                           value + 1, value - 1, -1])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value * 2, "", value.upper(), [value], {value: value}, 1,
                           value + "\ud800", "../" + value, "/" + value])
    if isinstance(value, list):
        return rng.choice([value + value[:1], value[1:], value[::-1], [value], {}, dict.fromkeys(map(str, value))])
    if isinstance(value, dict):
        return rng.choice([list(value), list(value.values()), {}, {k: None for k in value}])
    return rng.choice(HOSTILE)


def mutate_doc(rng: random.Random, doc):
    """``doc`` (a parsed JSON value, not modified) with one mutation applied."""
    doc = json.loads(json.dumps(doc))
    nodes = _nodes(doc)
    path = rng.choice(nodes)
    op = rng.random()
    if not path:
        return rng.choice(HOSTILE) if op < 0.5 else _near(rng, doc)
    parent, key = _get(doc, path[:-1]), path[-1]
    if op < 0.35:
        parent[key] = rng.choice(HOSTILE)
    elif op < 0.6:
        parent[key] = _near(rng, parent[key])
    elif op < 0.75:
        del parent[key]
    elif op < 0.85 and isinstance(parent, dict):
        parent[rng.choice(["extra", "__metadata__", "r", "modules", "file", key + "x"])] = rng.choice(HOSTILE)
    elif op < 0.92 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), json.loads(json.dumps(parent[key])))  # a duplicate entry
    elif isinstance(parent, dict):  # rename a key
        value = parent.pop(key)
        parent[rng.choice([key.upper(), key + ".", "", " " + key, key.replace(".", "_"), "../" + key])] = value
    else:
        parent[key] = _near(rng, parent[key])
    return doc


def mutate_json_text(rng: random.Random, text: str) -> str:
    """JSON text with 1-3 structural mutations, or a raw text mutation (truncation, a stray byte, deep nesting)."""
    op = rng.random()
    if op < 0.75:
        doc = json.loads(text)
        for _ in range(rng.choice([1, 1, 2, 3])):
            doc = mutate_doc(rng, doc)
        return dumps(doc)
    if op < 0.85:
        return text[:rng.randrange(len(text) + 1)]
    if op < 0.92:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(["[" * 100_000, "{", "\\", "\"", "\ud800", ",", "\x00", "NaN"]) + text[i:]
    return rng.choice(["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "", "null", "[]",
                       "\ufeff" + text, "9" * 5000])


# ---------------------------------------------------------------------------------------- safetensors mutation
def _table_mutation(rng: random.Random, header: dict) -> dict:
    """A targeted change to one tensor entry of a safetensors header table."""
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return mutate_doc(rng, header)
    header = json.loads(json.dumps(header))
    info = header[rng.choice(keys)]
    op = rng.randrange(6)
    if op == 0:
        info["dtype"] = rng.choice(DTYPES)
    elif op == 1:
        shape = info["shape"]
        info["shape"] = rng.choice([[], shape + [1], shape[:-1], [0] + shape[1:], [10 ** 6, 0], [-1] + shape[1:],
                                    [str(s) for s in shape], shape[::-1], [2 ** 62, 2 ** 62], [10 ** 6] * 4])
    elif op == 2:
        s, e = info["data_offsets"]
        info["data_offsets"] = rng.choice([[str(s), str(e)], [e, s], [s, e + 4], [s - 4, e], [s, 2 ** 64],
                                           [s + 0.5, e], [s], [s, e, e], None, [True, e], [-8, e - 8]])
    elif op == 3:
        del info[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 4:
        header[rng.choice(keys)] = rng.choice(HOSTILE)
    else:
        header[rng.choice(keys) + rng.choice(["x", ".A", ".alpha"])] = info
    return header


def _tensor_mutation(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A well-formed safetensors file with the wrong content: extra / missing tensors, shapes, dtypes, values."""
    tensors = dict(tensors)
    key = rng.choice(list(tensors))
    t = tensors[key]
    op = rng.randrange(9)
    if op == 0:
        del tensors[key]
    elif op == 1:
        stem = key.rpartition(".")[0] or key
        tensors[stem + rng.choice([".A", ".B", ".magnitude", ".alpha", ".lora_A.weight", ".lora_B.weight",
                                   ".lora_down.weight", ".lora_up.weight", ".dora_scale", "x", ".lora_magnitude_vector"
                                   ])] = torch.randn(rng.choice([(), (2,), (2, 6), (5, 2), (3, 3)]))
    elif op == 2:
        tensors["override:" + rng.choice(["head.weight", "x", ""])] = torch.randn(4)
    elif op == 3:
        tensors[key] = torch.zeros(())
    elif op == 4:
        tensors[key] = rng.choice([t.reshape(-1), t.unsqueeze(0), t.reshape(*t.shape, 1), t.T.contiguous() if t.ndim
                                   == 2 else t.reshape(-1), torch.empty(10 ** 6, 0), torch.empty(0, 6),
                                   torch.randn(3, 7), torch.randn(2, 6, 3, 3)])
    elif op == 5:
        tensors[key] = t.to(rng.choice(TORCH_DTYPES))
    elif op == 6:
        tensors[key] = t.clone().fill_(rng.choice([float("nan"), float("inf"), 0.0, 1e30]))
    elif op == 7:
        tensors[key] = torch.empty(10 ** 6, 0) if t.ndim != 2 else torch.empty(t.shape[0], 0)
    else:
        tensors = {k + rng.choice(["", ".x"]) if k == key else k: v for k, v in tensors.items()}
    return tensors


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    """safetensors bytes with one mutation of its metadata JSON, tensor table, tensors or raw bytes."""
    header, body = st_parts(data)
    meta = header.get("__metadata__", {})
    op = rng.random()
    json_keys = [k for k, v in meta.items() if v[:1] in "{["]
    if op < 0.3 and json_keys:
        k = rng.choice(json_keys)
        header["__metadata__"] = {**meta, k: mutate_json_text(rng, meta[k])}
        return st_bytes(header, body)
    if op < 0.4:
        meta = dict(meta)
        k = rng.choice(list(meta) + ["lorakit", "lorakit.extras", "lora_adapter_metadata", "ss_network_alpha"])
        meta[k] = rng.choice(["", "{}", "[]", "null", "x", "\ud800", dumps(rng.choice(HOSTILE))]) \
            if rng.random() < 0.7 else rng.choice(HOSTILE)
        if rng.random() < 0.2:
            meta.pop(k)
        header["__metadata__"] = meta
        return st_bytes(header, body)
    if op < 0.6:
        return st_bytes(_table_mutation(rng, header), body)
    if op < 0.85:
        tensors = _tensor_mutation(rng, st_load(data))
        return st_save(tensors, metadata={k: v for k, v in meta.items() if isinstance(v, str)} or None)
    raw = data[8:8 + struct.unpack("<Q", data[:8])[0]]
    choice = rng.randrange(5)
    if choice == 0:
        return data[:rng.randrange(len(data))]
    if choice == 1:
        n = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, len(data), 2 ** 63, 2 ** 64 - 1, 99_999_999])
        return struct.pack("<Q", n) + data[8:]
    if choice == 2:
        i = rng.randrange(8, 8 + len(raw))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    if choice == 3:
        return st_bytes(mutate_json_text(rng, raw.decode()), body)
    return data + b"\x00" * rng.choice([1, 8, 4096])


# ---------------------------------------------------------------------------------------------------------- seeds
def _mod(gen: torch.Generator, kind: str, n_in: int, n_out: int, rank: int, alpha: float, kernel=(),
         dora: bool = False, rslora: bool = False) -> ModuleLora:
    mag = torch.rand(n_out, generator=gen) + 0.5 if dora else None
    return ModuleLora(A=torch.randn(rank, n_in, *kernel, generator=gen), B=torch.randn(n_out, rank, generator=gen),
                      alpha=alpha, kind=kind, rslora=rslora, magnitude=mag)


def seed_adapters() -> dict[str, Adapter]:
    """One small valid adapter per dialect, using what that dialect can hold (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    native_a = Adapter({"blocks.0.0": _mod(g, "linear", 6, 5, 2, 4.0), "conv2": _mod(g, "conv2d", 3, 4, 2, 1.5, (3, 3)),
                        "embed": _mod(g, "embedding", 20, 8, 3, 3.0), "blocks.1.0": _mod(g, "linear", 6, 6, 1, 2.0,
                                                                                          dora=True, rslora=True)},
                       {"head.weight": torch.randn(4, 11, generator=g)}, base_model="tiny", targets=("blocks",),
                       metadata={"note": "seed"})
    peft_a = Adapter({"blocks.0.0": _mod(g, "linear", 6, 5, 2, 4.0), "conv2": _mod(g, "conv2d", 3, 4, 2, 1.5, (3, 3)),
                      "embed": _mod(g, "embedding", 20, 8, 3, 3.0), "h.0.attn.c_attn": _mod(g, "linear_t", 6, 9, 2,
                                                                                             2.0)},
                     {"head.weight": torch.randn(4, 11, generator=g)}, base_model="tiny", targets=("blocks",))
    sd = {"unet.down_blocks.0.attentions.0.proj_in": _mod(g, "linear", 6, 5, 2, 4.0),
          "unet.down_blocks.0.resnets.0.conv1": _mod(g, "conv2d", 3, 4, 2, 1.0, (3, 3)),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": _mod(g, "linear", 6, 6, 1, 0.5)}
    kohya_a = Adapter({**sd, "unet.mid_block.attentions.0.proj_out": _mod(g, "linear", 5, 5, 2, 2.0, dora=True)},
                      metadata={"ss_network_dim": "2", "ss_network_alpha": "4"})
    return {"native": native_a, "peft": peft_a, "kohya": kohya_a, "diffusers": Adapter(sd, base_model="sd15")}


def _strip_hints(data: bytes) -> bytes:
    header, body = st_parts(data)
    header["__metadata__"] = {k: v for k, v in header.get("__metadata__", {}).items() if k != "lorakit.extras"}
    return st_bytes(header, body)


def build_seeds(work: Path) -> dict[str, list[dict[str, bytes]]]:
    """Target → list of seeds, each seed a map of relative file path → bytes (written by lorakit itself)."""
    from lorakit.ops import save_split, split

    adapters = seed_adapters()
    work.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, list[dict[str, bytes]]] = {}
    native.save(adapters["native"], work / "n.safetensors")
    seeds["native"] = [{"a.safetensors": (work / "n.safetensors").read_bytes()}]
    peft.save(adapters["peft"], work / "p")
    files = {name: (work / "p" / name).read_bytes() for name in (peft.CONFIG_NAME, peft.WEIGHTS_NAME)}
    seeds["peft"] = [files, {**files, peft.WEIGHTS_NAME: _strip_hints(files[peft.WEIGHTS_NAME])}]
    kohya.save(adapters["kohya"], work / "k.safetensors")
    kohya.save(adapters["kohya"], work / "k2.safetensors", sgm="sd15")
    data = [(work / f).read_bytes() for f in ("k.safetensors", "k2.safetensors")]
    seeds["kohya"] = [{"a.safetensors": d} for d in data] + [{"a.safetensors": _strip_hints(d)} for d in data]
    diffusers.save(adapters["diffusers"], work / "d.safetensors")
    data = (work / "d.safetensors").read_bytes()
    seeds["diffusers"] = [{"a.safetensors": data}, {"a.safetensors": _strip_hints(data)}]
    seeds["manifest"] = []
    for mode, source, opts in (("type", "native", {}), ("rank", "peft", {"bands": [1, 1]})):
        folder = work / f"s-{mode}"
        save_split(split(adapters[source], mode, **opts), folder)
        seeds["manifest"].append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    return seeds


# -------------------------------------------------------------------------------------------------------- variants
def mutate(rng: random.Random, target: str, seed: dict[str, bytes]) -> dict[str, bytes]:
    """One malformed variant of ``seed`` (a map of relative path → bytes)."""
    files = dict(seed)
    if target == "manifest" and rng.random() < 0.55:
        files["split.json"] = mutate_json_text(rng, files["split.json"].decode()).encode("utf-8", "surrogatepass")
        return files
    if target == "manifest":  # a malformed part, re-hashed into the manifest half of the time so it is parsed
        import hashlib

        parts = sorted(k for k in files if k.endswith(".safetensors"))
        name = rng.choice(parts)
        files[name] = mutate_safetensors(rng, files[name])
        if rng.random() < 0.5:
            manifest = json.loads(files["split.json"])
            for entry in manifest["parts"]:
                if entry["file"] == name:
                    entry["sha256"], entry["bytes"] = hashlib.sha256(files[name]).hexdigest(), len(files[name])
            files["split.json"] = json.dumps(manifest).encode()
        return files
    if target == "peft" and rng.random() < 0.5:
        text = files[peft.CONFIG_NAME].decode()
        files[peft.CONFIG_NAME] = mutate_json_text(rng, text).encode("utf-8", "surrogatepass")
        return files
    name = next(k for k in files if k.endswith(".safetensors"))
    for _ in range(rng.choice([1, 1, 1, 2])):
        try:
            files[name] = mutate_safetensors(rng, files[name])
        except Exception:  # the previous mutation left bytes this generator cannot parse: keep them
            break
    return files


def write_variant(folder: Path, files: dict[str, bytes]) -> None:
    """Replace the contents of ``folder`` with ``files``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def readers(target: str) -> list[Callable[[Path], object]]:
    """The public readers a variant of ``target`` goes through (each gets the variant's folder)."""
    import lorakit as lk
    from lorakit.cli import describe
    from lorakit.formats.detect import read_any
    from lorakit.ops import load_parts, load_split, read_manifest, recombine

    if target == "native":
        return [lambda d: lk.load(d / "a.safetensors"), lambda d: describe(d / "a.safetensors"),
                lambda d: native.read_info(d / "a.safetensors"),
                lambda d: native.load(d / "a.safetensors", modules=["conv2"])]
    if target == "peft":
        return [lambda d: describe(d), lambda d: peft.load(d)]
    if target in ("kohya", "diffusers"):
        module = kohya if target == "kohya" else diffusers
        return [lambda d: describe(d / "a.safetensors"), lambda d: read_any(d / "a.safetensors", root="unet"),
                lambda d: module.load(d / "a.safetensors", root="text_encoder")]
    def first_part(d: Path) -> object:
        return load_parts(d, names=[read_manifest(d)["parts"][0]["name"]])

    def weighted(d: Path) -> object:
        s = load_split(d)
        return recombine(s, {s.names[0]: 0.5} if s.names else {})

    return [read_manifest, load_parts, first_part, weighted]


def cli_commands(target: str, d: Path, out: Path, seed: dict[str, bytes]) -> list[list[str]]:
    """CLI invocations of a variant of ``target`` (made from ``seed``) in folder ``d``, writing under ``out``."""
    if target == "manifest":
        name = json.loads(seed["split.json"])["parts"][0]["name"]
        return [["join", str(d), "--out", str(out / "j.safetensors")],
                ["join", str(d), "--out", str(out / "j.safetensors"), "--part", name, "--weights", f"{name}=0.5"]]
    src = str(d if target == "peft" else d / "a.safetensors")
    return [["inspect", src], ["inspect", src, "--json"], ["convert", src, str(out / "c"), "--to", "native"],
            ["convert", src, str(out / "p"), "--to", "peft", "--lossy"],
            ["split", src, "--out", str(out / "s"), "--by", "type"]]


@dataclass
class Report:
    """What a campaign found."""

    target: str
    variants: int = 0
    reads: int = 0
    refusals: int = 0
    accepted: int = 0
    raw: Counter = field(default_factory=Counter)
    cli_runs: int = 0
    cli_bad: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    @property
    def raw_count(self) -> int:
        return sum(self.raw.values())

    def line(self) -> str:
        return (f"fuzz {self.target}: {self.variants} variants, {self.reads} reads: {self.refusals} clean refusals, "
                f"{self.accepted} accepted, {self.raw_count} raw exceptions from {len(self.raw)} places; CLI: "
                f"{self.cli_runs} runs, {sum(self.cli_bad.values())} bad (traceback, exit code or not one line)")


def _where(e: BaseException) -> str:
    """``Type at file:line`` of the innermost lorakit frame of an exception's traceback."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "lorakit" in f.filename and "tests" not in
              f.filename]
    f = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__} at {Path(f.filename).name}:{f.lineno}"


def cli_check(runner, args: list[str]) -> str | None:
    """None if the CLI behaved (exit 0, or exit 1 with one error line and no traceback), else what went wrong."""
    from lorakit.cli import app

    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return _where(res.exception)
    if res.exit_code == 0:
        return None
    if res.exit_code != 1:
        return f"exit code {res.exit_code}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if len(lines) != 1 or "Traceback" in res.output:
        return f"{len(lines)} error lines"
    return None


def campaign(target: str, n: int, work: Path, seed: int = 0, cli_every: int = 50) -> Report:
    """Read ``n`` malformed variants of ``target`` through every public reader (and every ``cli_every``-th one
    through the CLI, in-process), counting clean refusals and raw exceptions."""
    from typer.testing import CliRunner

    rng = random.Random(f"{target}:{seed}")
    seeds = build_seeds(work / "seeds")[target]
    report = Report(target)
    folder, out = work / "v", work / "out"
    runner = CliRunner()
    for i in range(n):
        seed_files = rng.choice(seeds)
        files = mutate(rng, target, seed_files)
        write_variant(folder, files)
        report.variants += 1
        for read in readers(target):
            report.reads += 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    read(folder)
                    report.accepted += 1
                except LorakitError:
                    report.refusals += 1
                except Exception as e:  # noqa: BLE001 - counting raw exceptions is the point
                    where = _where(e)
                    report.raw[where] += 1
                    report.examples.setdefault(where, (i, str(e)[:200]))
            for w in caught:  # a reader never warns: the library never prints, refusals are errors
                where = f"{w.category.__name__} at {Path(w.filename).name}:{w.lineno}"
                report.raw[where] += 1
                report.examples.setdefault(where, (i, str(w.message)[:200]))
        if cli_every and i % cli_every == 0:
            for args in cli_commands(target, folder, out, seed_files):
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir()
                report.cli_runs += 1
                bad = cli_check(runner, args)
                if bad is not None:
                    report.cli_bad[f"{args[0]}: {bad}"] += 1
                    report.examples.setdefault(f"cli {args[0]}: {bad}", (i, ""))
    return report
