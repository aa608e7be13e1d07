"""split → join is exact for every mode; rank bands add up to the parent's update; bad packages are refused."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import Adapter, adapters_equal, save
from lorakit.errors import FileFormatError, FormatVersionError, LorakitError
from lorakit.ops import join, load_parts, load_selected, load_split, read_manifest, save_split, split
from lorakit.ops.lowrank import factor_svd
from tests.ops.strategies import SD_SLOTS, adapters, full_delta

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UNION_MODES = [
    ("component", {}),
    ("block", {"family": "bert"}),
    ("type", {}),
    ("selector", {"selectors": {"attn": "attention.**, crossattention.**, !layer.2.**", "ffn": "re:.*dense$"}}),
    ("size", {"max_bytes": 300}),
]


@pytest.mark.parametrize("mode,kwargs", UNION_MODES, ids=[m for m, _ in UNION_MODES])
@FAST
@given(adapter=adapters())
def test_union_split_join_is_bitwise(mode, kwargs, adapter: Adapter):
    s = split(adapter, mode, **kwargs)
    assert s.recombine == "union"
    seen = [p for part in s.parts for p in part.adapter.paths]
    assert sorted(seen) == sorted(adapter.paths)  # every module in exactly one part
    assert adapters_equal(join(s), adapter)
    with tempfile.TemporaryDirectory() as tmp:
        save_split(s, tmp)
        assert adapters_equal(join(load_split(tmp)), adapter)


@pytest.mark.parametrize("family", ["sd15", "blora"])
@FAST
@given(adapter=adapters(slots=SD_SLOTS, with_overrides=False))
def test_sd_block_split_join_is_bitwise(family, adapter: Adapter):
    s = split(adapter, "block", family=family)
    assert adapters_equal(join(s), adapter)
    assert adapters_equal(join(split(adapter, "component")), adapter)
    for part in s.parts:
        assert part.selector == f"block:{family}:{part.name}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@FAST
@given(adapter=adapters(with_overrides=True), bands=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_rank_bands_concatenate_to_the_parent_delta(adapter: Adapter, bands):
    s = split(adapter, "rank", bands=bands)
    assert s.recombine == "concat_rank"
    for path, m in adapter.modules.items():
        summed = sum(full_delta(p.adapter[path]) for p in s.parts if path in p.adapter.modules)
        assert _rel(summed, full_delta(m)) < 1e-6
        # every band has the parent's scale: alpha was adjusted for the band's rank
        for p in s.parts:
            if path in p.adapter.modules:
                assert p.adapter[path].scale == pytest.approx(m.scale, rel=1e-12)
    joined = join(s)
    assert list(joined.modules) == list(adapter.modules)
    for path, m in adapter.modules.items():
        assert _rel(full_delta(joined[path]), full_delta(m)) < 1e-6
    assert adapters_equal(Adapter({}, joined.overrides), Adapter({}, adapter.overrides))
    assert s.parts[-1].retained_energy == pytest.approx(1.0, abs=1e-9)
    with tempfile.TemporaryDirectory() as tmp:
        save_split(s, tmp)
        again = join(load_split(tmp))
        for path, m in adapter.modules.items():
            assert _rel(full_delta(again[path]), full_delta(m)) < 1e-6


@FAST
@given(adapter=adapters(with_overrides=False), cut=st.floats(0.2, 0.95))
def test_first_energy_band_is_the_best_approximation_of_its_rank(adapter: Adapter, cut):
    s = split(adapter, "rank", energy=[cut])
    first = s.parts[0].adapter
    for path, m in first.modules.items():
        k = m.rank
        _, sv, _ = factor_svd(adapter[path])
        optimal = abs(adapter[path].scale) * float((sv[k:] ** 2).sum().sqrt())
        err = float((full_delta(m) - full_delta(adapter[path])).norm())
        assert err == pytest.approx(optimal, rel=1e-5, abs=1e-6 * float(full_delta(adapter[path]).norm()))


def test_rank_split_refuses_bad_arguments():
    from tests.ops.strategies import make_module

    a = Adapter({"x": make_module(torch.Generator().manual_seed(0), "linear", 4, 4, (), 3, 2.0, False)})
    with pytest.raises(LorakitError):
        split(a, "rank")
    with pytest.raises(LorakitError):
        split(a, "rank", bands=[0])
    with pytest.raises(LorakitError):
        split(a, "rank", energy=[1.5])
    with pytest.raises(LorakitError):
        split(a, "nope")


@pytest.fixture
def package(tmp_path):
    from tests.ops.strategies import SLOTS, make_module

    gen = torch.Generator().manual_seed(3)
    mods = {}
    for i in range(3):
        for template, kind, n_in, n_out, kernel in SLOTS[1:5]:
            mods[template.format(i=i)] = make_module(gen, kind, n_in, n_out, kernel, 2 + i, 5.0, False)
    adapter = Adapter(mods, {"classifier.weight": torch.randn(2, 6, generator=gen)}, base_model="toy")
    save(adapter, tmp_path / "parent.safetensors")
    folder = tmp_path / "pkg"
    save_split(split(adapter, "block", family="bert"), folder)
    return adapter, folder, tmp_path / "parent.safetensors"


def test_manifest_records_parts(package):
    adapter, folder, _ = package
    m = read_manifest(folder)
    assert m["format"] == "lorakit-split" and m["version"] == 1 and m["recombine"] == "union"
    assert [p["name"] for p in m["parts"]] == ["L00", "L01", "L02", "HEAD"]
    head = m["parts"][-1]
    assert head["overrides"] == ["classifier.weight"] and head["modules"] == []
    l1 = m["parts"][1]
    assert l1["selector"] == "block:bert:L01" and "bert" in l1["tags"]
    assert all(l1["alphas"][p] == 5.0 for p in l1["modules"])
    assert all(l1["rank_range"][p] == [0, 3] for p in l1["modules"])
    assert set(m["parent"]["modules"]) == set(adapter.paths)


def test_partial_loading_by_name_and_tag(package):
    adapter, folder, parent = package
    part = load_parts(folder, names=["L02", "HEAD"])
    assert part.paths == [p for p in adapter.paths if ".layer.2." in p]
    assert list(part.overrides) == ["classifier.weight"]
    assert adapters_equal(load_parts(folder, tags=["bert"]), adapter)
    with pytest.raises(FileFormatError, match="no part"):
        load_parts(folder, names=["L09"])
    # from the unsplit file: only the chosen modules' tensors are read
    sel = load_selected(parent, "layer.1.**, !intermediate.dense")
    assert sel.paths == [p for p in adapter.paths if ".layer.1." in p and "intermediate" not in p]
    assert load_selected(parent, blocks=["L00"], family="bert").paths == adapter.paths[:4]


def test_wrong_hash_is_refused(package):
    _, folder, _ = package
    m = read_manifest(folder)
    m["parts"][0]["sha256"] = "0" * 64
    (folder / "split.json").write_text(json.dumps(m))
    with pytest.raises(FileFormatError, match="sha256"):
        load_split(folder)
    load_parts(folder, names=["L01"])  # other parts still load: only chosen files are read


def test_tampered_part_is_refused(package):
    _, folder, _ = package
    f = folder / "L01.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="L01"):
        load_split(folder)


def test_missing_part_is_refused(package):
    _, folder, _ = package
    (folder / "L00.safetensors").unlink()
    with pytest.raises(FileFormatError, match="missing part 'L00'"):
        load_split(folder)


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_manifest_path_escaping_the_folder_is_refused(package, bad):
    _, folder, _ = package
    m = read_manifest(folder)
    m["parts"][0]["file"] = bad
    (folder / "split.json").write_text(json.dumps(m))
    with pytest.raises(FileFormatError, match="outside the package"):
        read_manifest(folder)


def test_bad_manifests_are_refused(package):
    _, folder, _ = package
    good = read_manifest(folder)
    cases = [
        ("not json", FileFormatError),
        (json.dumps({**good, "version": 99}), FormatVersionError),
        (json.dumps({**good, "format": "other"}), FileFormatError),
        (json.dumps({**good, "parts": [good["parts"][0], good["parts"][0]]}), FileFormatError),
        (json.dumps({**good, "recombine": "sum"}), FileFormatError),
    ]
    for text, error in cases:
        (folder / "split.json").write_text(text)
        with pytest.raises(error):
            read_manifest(folder)
    with pytest.raises(FileFormatError, match="no such split manifest"):
        read_manifest(Path(folder) / "nowhere")


def test_join_refuses_incomplete_or_foreign_parts(package):
    adapter, folder, _ = package
    s = load_split(folder, names=["L00"])
    with pytest.raises(LorakitError, match="in no part"):
        join(s)
    assert join(s, partial=True).paths == adapter.paths[:4]
    full = load_split(folder)
    doubled = type(full)(full.mode, full.recombine, full.parts + full.parts[:1], full.parent)
    with pytest.raises(LorakitError, match="more than one part"):
        join(doubled)
    from dataclasses import replace

    first = full.parts[0]
    foreign = replace(first, adapter=replace(first.adapter, overrides={"pooler.weight": torch.zeros(1)}))
    with pytest.raises(LorakitError, match="'pooler.weight' is not in the parent"):
        join(replace(full, parts=(foreign, *full.parts[1:])))


@FAST
@given(adapter=adapters(), cuts=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3))
def test_energy_band_split_joins_to_the_parent_delta(adapter: Adapter, cuts):
    s = split(adapter, "rank", energy=sorted(cuts))
    joined = join(s)
    for path, m in adapter.modules.items():
        assert _rel(full_delta(joined[path]), full_delta(m)) < 1e-6
    shares = [p.retained_energy for p in s.parts]
    assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0, abs=1e-9)


def test_default_weights_are_recorded_and_used_by_attach_split(tiny, tiny_inputs, tmp_path):
    import lorakit as lk
    from lorakit.ops import attach_split, recombine
    from tests.conftest import randomize_b

    lk.inject(tiny, ["blocks.0.0", "blocks.1.0", "head"], rank=3, alpha=5, seed=0)
    randomize_b(tiny)
    adapter = lk.extract(tiny, include_trained=False)
    lk.detach(tiny)
    s = split(adapter, "rank", bands=[1, 2], default_weights={"band1": 0.5})
    save_split(s, tmp_path / "pkg")
    assert [p["default_weight"] for p in read_manifest(tmp_path / "pkg")["parts"]] == [1.0, 0.5]
    attach_split(tiny, tmp_path / "pkg")
    with torch.no_grad():
        got = tiny(*tiny_inputs)
    lk.detach(tiny)
    lk.attach(tiny, recombine(load_split(tmp_path / "pkg"), {}))  # parts not named: their default weights
    with torch.no_grad():
        torch.testing.assert_close(got, tiny(*tiny_inputs), rtol=1e-5, atol=1e-6)
    with pytest.raises(LorakitError, match="unknown part"):
        split(adapter, "rank", bands=[1, 2], default_weights={"band7": 0.5})
