"""The split/join/compose/resize/extract/merge verbs and `inspect --plot`, end to end on small files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lorakit as lk
from lorakit import Adapter, adapters_equal
from lorakit.cli import app
from tests.ops.strategies import SLOTS, make_module

runner = CliRunner()


@pytest.fixture
def adapter_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mods = {}
    for i in range(2):
        for template, kind, n_in, n_out, kernel in SLOTS[1:5]:
            mods[template.format(i=i)] = make_module(gen, kind, n_in, n_out, kernel, 3, 6.0, i == 1)
    adapter = Adapter(mods, base_model="toy")
    lk.save(adapter, tmp_path / "a.safetensors")
    return adapter, tmp_path / "a.safetensors"


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.parametrize("how", [["--by", "block", "--family", "bert"], ["--by", "type"], ["--by", "size",
                                 "--max-bytes", "400"], ["--by", "selector", "--select", "q=query"]])
def test_split_then_join_gives_the_parent_back(adapter_file, tmp_path, how):
    adapter, file = adapter_file
    _ok(["split", file, "--out", tmp_path / "pkg", *how])
    manifest = json.loads((tmp_path / "pkg" / "split.json").read_text())
    assert manifest["parent"]["sha256"] == lk.formats.sha256_file(file)
    _ok(["join", tmp_path / "pkg", "--out", tmp_path / "back.safetensors"])
    assert adapters_equal(lk.load(tmp_path / "back.safetensors"), adapter)


def test_rank_split_join_and_partial_join(adapter_file, tmp_path):
    adapter, file = adapter_file
    _ok(["split", file, "--out", tmp_path / "bands", "--by", "rank", "--bands", "1,2"])
    _ok(["join", tmp_path / "bands", "--out", tmp_path / "back.safetensors"])
    back = lk.load(tmp_path / "back.safetensors")
    for p, m in adapter.modules.items():
        torch.testing.assert_close(back[p].lowrank_delta(), m.lowrank_delta(), rtol=1e-5, atol=1e-6)
    _ok(["join", tmp_path / "bands", "--out", tmp_path / "top.safetensors", "--part", "band0"])
    assert all(m.rank == 1 for m in lk.load(tmp_path / "top.safetensors").modules.values())


def test_join_refuses_a_tampered_package(adapter_file, tmp_path):
    _, file = adapter_file
    _ok(["split", file, "--out", tmp_path / "pkg", "--by", "block", "--family", "bert"])
    (tmp_path / "pkg" / "L00.safetensors").write_bytes(b"garbage")
    result = runner.invoke(app, ["join", str(tmp_path / "pkg"), "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "L00" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_compose_resize_inspect_plot(adapter_file, tmp_path):
    adapter, file = adapter_file
    _ok(["compose", file, file, "--weights", "0.5,0.5", "--out", tmp_path / "c.safetensors"])
    c = lk.load(tmp_path / "c.safetensors")
    for p, m in adapter.modules.items():
        torch.testing.assert_close(c[p].lowrank_delta(), m.lowrank_delta(), rtol=1e-5, atol=1e-6)
    _ok(["resize", file, "--rank", "1", "--out", tmp_path / "r.safetensors"])
    assert lk.load(tmp_path / "r.safetensors").total_rank == len(adapter)
    _ok(["inspect", file, "--plot", tmp_path / "e.png", "--family", "bert"])
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_extract_and_merge(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {"lin.weight": torch.randn(7, 5, generator=gen), "lin.bias": torch.zeros(7)}
    save_file(base, tmp_path / "base.safetensors")
    m = make_module(gen, "linear", 5, 7, (), 2, 2.0, False)
    _ok(["merge", tmp_path / "base.safetensors", _save(Adapter({"lin": m}), tmp_path / "a.safetensors"),
         "--out", tmp_path / "tuned.safetensors"])
    tuned = load_file(tmp_path / "tuned.safetensors")
    torch.testing.assert_close(tuned["lin.weight"], base["lin.weight"] + m.lowrank_delta())
    _ok(["extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "2",
         "--out", tmp_path / "x.safetensors"])
    got = lk.load(tmp_path / "x.safetensors")
    torch.testing.assert_close(got["lin"].lowrank_delta(), m.lowrank_delta(), rtol=1e-4, atol=1e-5)


def _save(adapter, path):
    lk.save(adapter, path)
    return path


@pytest.mark.parametrize("bad", [["--weight", "band0"], ["--bands", "1.5,2"], ["--energy", "x"],
                                 ["--select", "=query"]])
def test_malformed_options_are_usage_errors(adapter_file, tmp_path, bad):
    _, file = adapter_file
    result = runner.invoke(app, ["split", str(file), "--out", str(tmp_path / "p"), "--by", "rank", *bad])
    assert result.exit_code == 2, result.output
