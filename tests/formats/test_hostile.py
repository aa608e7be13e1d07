"""Regression tests for hostile input: each case was a raw exception or a silent misreading before the checked
reader (``lorakit.formats.checked``); now each is one :class:`LorakitError` naming the file and the key."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import lorakit as lk
from lorakit.adapter import Adapter, ModuleLora
from lorakit.cli import app
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats import checked, detect, diffusers, native, peft
from lorakit.ops import load_parts, load_split, save_split, split

runner = CliRunner()


def _adapter(rank: int = 2, alpha: float = 4.0) -> Adapter:
    g = torch.Generator().manual_seed(0)
    mods = {p: ModuleLora(A=torch.randn(rank, 6, generator=g), B=torch.randn(5, rank, generator=g), alpha=alpha)
            for p in ("enc.0.q", "enc.1.v")}
    return Adapter(mods, base_model="tiny")


def _write(path, tensors: dict, metadata: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _native_parts(adapter: Adapter) -> tuple[dict, dict]:
    tensors, meta = native.to_tensors(adapter)
    return dict(tensors), {**meta, "lorakit": meta["lorakit"]}


# ---------------------------------------------------------------------------------------------- the JSON reader
@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 32"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"a": "\\ud800"}', "lone UTF-16 surrogate"),
])
def test_parse_refuses_hostile_json_without_recursing(text, needle):
    t0 = time.perf_counter()
    with pytest.raises(FileFormatError, match=needle) as e:
        checked.parse(text, "f.json", "config")
    assert str(e.value).startswith("f.json: config: ") and time.perf_counter() - t0 < 1.0


def test_parse_depth_scan_ignores_brackets_inside_strings():
    assert checked.parse(json.dumps({"k": "[" * 1000}), "f", "x") == {"k": "[" * 1000}
    with pytest.raises(FileFormatError, match="over the limit"):
        checked.parse("[]" + " " * 100, "f", "x", max_bytes=50)


@pytest.mark.parametrize("schema,value,needle", [
    (checked.Bool(), "false", "expected true or false, got the string 'false'"),
    (checked.Bool(), 0, "expected true or false, got the number 0"),
    (checked.Int(1), True, "expected an integer, got true"),
    (checked.Int(1), 2.0, "expected an integer, got the number 2.0"),
    (checked.Int(1), 0, "expected an integer in [1, "),
    (checked.Num(), False, "expected a number, got false"),
    (checked.Num(), "16", "expected a number, got the string '16'"),
])
def test_schema_types_are_strict(schema, value, needle):
    problems = checked.Obj(required={"k": schema}).problems({"k": value}, "")
    assert len(problems) == 1 and problems[0].startswith("k: ") and needle in problems[0]


# ------------------------------------------------------------------------------------------------- PEFT, diffusers
def test_peft_string_false_is_not_true(tmp_path):
    """``"use_rslora": "false"`` used to be truthy: the adapter was read with alpha/√r instead of alpha/r."""
    peft.save(_adapter(rank=4), tmp_path / "p")
    config = json.loads((tmp_path / "p" / peft.CONFIG_NAME).read_text())
    for key, value in (("use_rslora", "false"), ("fan_in_fan_out", "false"), ("r", "4"), ("lora_alpha", True)):
        (tmp_path / "p" / peft.CONFIG_NAME).write_text(json.dumps({**config, key: value}))
        with pytest.raises(FileFormatError, match=rf"adapter_config.json: {key}: expected") as e:
            lk.read_any(tmp_path / "p")
        assert str(tmp_path / "p") in str(e.value)
    (tmp_path / "p" / peft.CONFIG_NAME).write_text(json.dumps({**config, "rank_pattern": {"(": 2}}))
    with pytest.raises(FileFormatError, match="rank_pattern: key '\\(' is not a valid regular expression"):
        lk.read_any(tmp_path / "p")


def test_diffusers_metadata_fields_are_typed(tmp_path):
    a = Adapter({f"unet.{p}": m for p, m in _adapter(rank=4).modules.items()})
    tensors, meta = diffusers.to_tensors(a)
    config = json.loads(meta[diffusers.METADATA_KEY])
    for key, value in (("unet.use_rslora", "false"), ("unet.lora_alpha", None), ("unet.alpha_pattern", [1])):
        bad = json.dumps({**config, key: value})
        _write(tmp_path / "d.safetensors", tensors, {**meta, diffusers.METADATA_KEY: bad})
        with pytest.raises(FileFormatError, match=rf"component 'unet': {key.removeprefix('unet.')}: expected"):
            lk.read_any(tmp_path / "d.safetensors")


def test_lorakit_hints_are_typed(tmp_path):
    """A hint of the wrong type used to crash deep inside (``set("abc")`` of a string ``order``, ...)."""
    peft.save(_adapter(), tmp_path / "p")
    weights = tmp_path / "p" / peft.WEIGHTS_NAME
    tensors, meta = lk.formats.read_safetensors(weights)
    for hint in ({"order": "enc.0.q"}, {"kinds": {"enc.0.q": "lstm"}}, {"targets": [1]}, {"order": ["a", "a"]}):
        _write(weights, tensors, {**meta, "lorakit.extras": json.dumps(hint)})
        with pytest.raises(FileFormatError, match=f"metadata 'lorakit.extras': {next(iter(hint))}"):
            peft.load(tmp_path / "p")


# ----------------------------------------------------------------------------------------- native header vs file
def test_header_must_declare_exactly_the_files_tensors(tmp_path):
    """Tensors absent from the header used to be dropped, ``modules: {}`` gave an empty adapter."""
    tensors, meta = _native_parts(_adapter())
    header = json.loads(meta["lorakit"])
    path = tmp_path / "a.safetensors"
    del header["modules"]["enc.1.v"]
    _write(path, tensors, {**meta, "lorakit": json.dumps(header)})
    with pytest.raises(FileFormatError, match=r"in the file but not declared: 'enc.1.v.A', 'enc.1.v.B'"):
        lk.load(path)
    with pytest.raises(FileFormatError, match="not declared"):  # a partial read checks the whole header too
        lk.load(path, modules=["enc.0.q"])
    _write(path, tensors, {**meta, "lorakit": json.dumps({**header, "modules": {}})})
    with pytest.raises(FileFormatError, match="not declared: 'enc.0.q.A'"):
        lk.load(path)
    _write(path, {"enc.0.q.A": tensors["enc.0.q.A"]}, meta)
    with pytest.raises(FileFormatError, match=r"declared but missing from the file: 'enc.0.q.B', 'enc.1.v.A'"):
        lk.load(path)


@pytest.mark.parametrize("change,needle", [
    (lambda t: {**t, "enc.0.q.A": t["enc.0.q.A"].to(torch.float8_e4m3fn)}, "enc.0.q.A: dtype float8_e4m3fn"),
    (lambda t: {**t, "enc.0.q.A": torch.tensor(1.0)}, r"enc.0.q.A: expected 2 or 3 or 4 dims, got shape \(\)"),
    (lambda t: {**t, "enc.0.q.B": torch.randn(5, 2, 1)}, r"enc.0.q.B: expected 2 dims, got shape \(5, 2, 1\)"),
    (lambda t: {**t, "enc.0.q.A": torch.empty(10 ** 6, 0), "enc.0.q.B": torch.empty(0, 10 ** 6)},
     r"enc.0.q.A: shape \(1000000, 0\) has a zero-size dimension"),
])
def test_unusable_factors_are_named(tmp_path, change, needle):
    """float8 factors used to reach ``aminmax`` (NotImplementedError), 0-d ones ``shape[0]`` (IndexError), and an
    empty rank-10⁶ factor sent ``inspect`` into a 10⁶×10⁶ Gram matrix."""
    tensors, meta = _native_parts(_adapter())
    header = json.loads(meta["lorakit"])
    header["modules"]["enc.0.q"]["rank"] = 10 ** 6 if "zero-size" in needle else 2
    path = tmp_path / "a.safetensors"
    _write(path, change(tensors), {**meta, "lorakit": json.dumps(header)})
    with pytest.raises(FileFormatError, match=needle):
        lk.load(path)
    res = runner.invoke(app, ["inspect", str(path)])
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1 and "enc.0.q" in res.stderr


def test_high_rank_tiny_module_norm_is_computed_without_a_gram_matrix():
    """rank 4·10⁴ on a 1→1 layer: the r×r Gram matrices would take 12.8 GB; B·A is one number."""
    m = ModuleLora(A=torch.full((40_000, 1), 0.5), B=torch.full((1, 40_000), 2.0), alpha=40_000.0)
    assert m.delta_norm() == pytest.approx(40_000.0)


# ------------------------------------------------------------------------------------------ safetensors headers
def _raw_file(path, table: dict, body: bytes) -> None:
    raw = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("entry,needle", [
    ({"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}, r"tensor 'x'.data_offsets\[0\]: expected an integer"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "shape \\[2\\] of F32 needs 8 bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "truncated: tensor 'x' needs bytes 0..16"),
    ({"dtype": "C64", "shape": [1], "data_offsets": [0, 4]}, r"tensor 'x'.dtype: expected one of"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, r"tensor 'x'.shape\[0\]: expected an integer"),
])
def test_safetensors_table_fields_are_checked(tmp_path, entry, needle):
    path = tmp_path / "x.safetensors"
    _raw_file(path, {"x": entry}, b"\x00" * 4)
    with pytest.raises(FileFormatError, match=needle):
        lk.read_any(path)


# ----------------------------------------------------------------------------------------------------- packages
def _package(tmp_path):
    folder = tmp_path / "pkg"
    save_split(split(_adapter(), "rank", bands=[1, 1]), folder)
    return folder, json.loads((folder / "split.json").read_text())


def test_two_manifest_entries_naming_one_file_are_refused(tmp_path):
    folder, manifest = _package(tmp_path)
    manifest["parts"][1] = {**manifest["parts"][1], "file": "./" + manifest["parts"][0]["file"],
                            "sha256": manifest["parts"][0]["sha256"], "bytes": manifest["parts"][0]["bytes"]}
    (folder / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(FileFormatError, match="is also the file of part 'band0'"):
        load_split(folder)


@pytest.mark.parametrize("change,needle", [
    (lambda m: m["parent"]["modules"]["enc.0.q"].update(rank=0), "rank: expected an integer in \\[1"),
    (lambda m: m["parent"]["modules"]["enc.0.q"].update(rslora="false"), "rslora: expected true or false"),
    (lambda m: m["parts"][0].update(rank_range={"enc.0.q": [0, 9]}), "does not fit the parent's module of rank 2"),
    (lambda m: m["parts"][0].update(tags="band"), "tags: expected a list"),
    (lambda m: m["parts"][0].update(file="../outside.safetensors"), "lies outside the package folder"),
])
def test_manifest_fields_are_typed(tmp_path, change, needle):
    """Each used to be a raw ZeroDivisionError, a silent ``bool("false")``, or a TypeError in ``join``."""
    folder, manifest = _package(tmp_path)
    change(manifest)
    (folder / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(FileFormatError, match=needle):
        load_parts(folder)


def test_join_refuses_bands_that_do_not_fit_each_other(tmp_path):
    s = split(_adapter(), "rank", bands=[1, 1])
    part = s.parts[1]
    m = part.adapter["enc.0.q"]
    bad = Adapter({**part.adapter.modules, "enc.0.q": ModuleLora(A=torch.randn(1, 7), B=m.B, alpha=m.alpha)})
    from dataclasses import replace

    with pytest.raises(LorakitError, match=r"module 'enc.0.q': band 1 has A \(1, 7\)"):
        lk.ops.join(replace(s, parts=(s.parts[0], replace(part, adapter=bad))))


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_internal_error_is_one_line_with_exit_code_3(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    lk.save(_adapter(), path)

    def broken(*args, **kwargs):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(detect, "read_any", broken)
    res = runner.invoke(app, ["inspect", str(path)])
    assert res.exit_code == 3 and res.stderr.count("\n") == 1
    assert "TypeError: 'int' object is not iterable" in res.stderr and str(path) in res.stderr
    res = runner.invoke(app, ["--debug", "inspect", str(path)])
    assert res.exit_code == 3 and "Traceback (most recent call last)" in res.stderr and "broken" in res.stderr


def test_cli_split_of_a_peft_directory(tmp_path):
    """``lorakit split DIR`` on a PEFT directory used to hash the directory: IsADirectoryError."""
    peft.save(_adapter(), tmp_path / "p")
    res = runner.invoke(app, ["split", str(tmp_path / "p"), "--out", str(tmp_path / "s"), "--by", "type"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "s" / "split.json").read_text())
    assert manifest["parent"]["sha256"] == lk.formats.sha256_file(tmp_path / "p" / peft.WEIGHTS_NAME)
    assert lk.adapters_equal(load_parts(tmp_path / "s"), lk.read_any(tmp_path / "p"))


def test_ambiguous_pattern_is_refused_without_a_warning(tmp_path):
    import warnings

    peft.save(_adapter(), tmp_path / "p")
    config = json.loads((tmp_path / "p" / peft.CONFIG_NAME).read_text())
    (tmp_path / "p" / peft.CONFIG_NAME).write_text(json.dumps({**config, "alpha_pattern": {"[[a]": 2}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileFormatError, match="alpha_pattern: key '\\[\\[a\\]' is not a valid regular"):
            lk.read_any(tmp_path / "p")


def test_json_files_are_size_checked_before_reading_and_vanishing_files_are_refused(tmp_path):
    """A config or manifest removed between the ``is_file`` check and the read (a directory swap) used to escape
    as FileNotFoundError from the readers."""
    with pytest.raises(FileFormatError, match="manifest: no such file"):
        checked.load_file(tmp_path / "gone.json", checked.Any_(), "manifest")
    (tmp_path / "big.json").write_text("[" + "0," * 100 + "0]")
    with pytest.raises(FileFormatError, match="203 bytes of JSON is over the limit of 100"):
        checked.load_file(tmp_path / "big.json", checked.Any_(), "manifest", max_bytes=100)
