"""Native format: exact round trips, partial reads, and a clear error for every kind of bad file."""

import json
import struct

import pytest
import torch

import lorakit as lk
from lorakit import Adapter, AdapterValidationError, FileFormatError, FormatVersionError, ModuleLora
from lorakit.formats import native, write_safetensors


def sample_adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return Adapter(
        {"enc.0.q": ModuleLora(r(4, 6), r(5, 4), alpha=7.5),
         "enc.1.conv": ModuleLora(r(2, 3, 3, 3), r(8, 2), alpha=1.0, kind="conv2d", rslora=True),
         "emb": ModuleLora(r(3, 10), r(6, 3), alpha=3.0, kind="embedding"),
         "gpt.c_attn": ModuleLora(r(2, 6), r(9, 2), alpha=4.0, kind="linear_t", magnitude=r(9).abs())},
        overrides={"head.weight": r(2, 6)}, base_model="tiny/base", targets=("q", "all-conv"),
        metadata={"note": "hello", "ss_network_dim": "4"})


def test_roundtrip_is_bitwise(tmp_path):
    a = sample_adapter()
    lk.save(a, tmp_path / "a.safetensors")
    b = lk.load(tmp_path / "a.safetensors")
    assert lk.adapters_equal(a, b)
    assert native.read_info(tmp_path / "a.safetensors")["modules"]["enc.1.conv"] == {
        "kind": "conv2d", "rank": 2, "alpha": 1.0, "rslora": True, "dora": False}


def test_pure_halves_do_not_touch_inputs():
    a = sample_adapter()
    tensors, meta = native.to_tensors(a)
    assert tensors["enc.0.q.A"] is a["enc.0.q"].A
    assert lk.adapters_equal(native.from_tensors(tensors, meta), a)


def test_partial_load_reads_only_chosen_modules(tmp_path):
    a = sample_adapter()
    path = tmp_path / "a.safetensors"
    lk.save(a, path)
    # Poison the bytes of every tensor but enc.0.q's: a partial load must not read them.
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    data = bytearray(path.read_bytes())
    for key, info in header.items():
        if key != "__metadata__" and not key.startswith("enc.0.q."):
            start, end = info["data_offsets"]
            nan = struct.pack("<f", float("nan"))
            data[8 + header_len + start:8 + header_len + end] = nan * ((end - start) // 4)
    path.write_bytes(bytes(data))
    part = lk.load(path, modules=["enc.0.q"])
    assert part.paths == ["enc.0.q"] and torch.equal(part["enc.0.q"].B, a["enc.0.q"].B)
    with pytest.raises(AdapterValidationError, match="enc.1.conv.A: contains NaN"):
        lk.load(path)
    with pytest.raises(FileFormatError, match="\\['zz'\\] are not in this adapter"):
        lk.load(path, modules=["zz"])


def _write_raw(path, tensors, header: dict | None = None, raw_header: str | None = None):
    meta = {} if header is None and raw_header is None else {"lorakit": raw_header or json.dumps(header)}
    write_safetensors(tensors, path, meta)


def _header(**modules):
    return {"format": "lorakit", "version": 1, "modules": modules, "overrides": [], "metadata": {}}


LIN = {"kind": "linear", "rank": 2, "alpha": 2.0}


@pytest.mark.parametrize("tensors,header,raw,error,needle", [
    ({"m.A": torch.zeros(2, 3, dtype=torch.int64), "m.B": torch.zeros(4, 2, dtype=torch.int64)}, _header(m=LIN),
     None, FileFormatError, "m.A: dtype int64 is not a factor dtype lorakit can use"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.zeros(4, 3)}, _header(m=LIN), None, AdapterValidationError,
     "m: rank mismatch"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.full((4, 2), float("inf"))}, _header(m=LIN), None,
     AdapterValidationError, "m.B: contains NaN or inf"),
    ({"m.A": torch.zeros(2, 3)}, _header(m=LIN), None, FileFormatError, "declared but missing from the file: 'm.B'"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.zeros(4, 2)}, {**_header(m=LIN), "version": 99}, None,
     FormatVersionError, "unknown lorakit format version 99"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.zeros(4, 2)}, None, "{not json", FileFormatError, "not valid JSON"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.zeros(4, 2)}, None, None, FileFormatError, "not a lorakit file"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.zeros(4, 2)}, _header(m={**LIN, "alpha": "big"}), None,
     FileFormatError, "modules.m.alpha: expected a number, got the string 'big'"),
    ({"m.A": torch.zeros(2, 3), "m.B": torch.zeros(4, 2)}, _header(m={**LIN, "rank": 5}), None,
     FileFormatError, "m.A: header says rank 5"),
])
def test_bad_files_raise_named_errors(tmp_path, tensors, header, raw, error, needle):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, tensors, header, raw)
    with pytest.raises(error) as e:
        lk.load(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_truncated_native_file(tmp_path):
    path = tmp_path / "a.safetensors"
    lk.save(sample_adapter(), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FileFormatError, match="truncated: tensor") as e:
        lk.load(path)
    assert str(path) in str(e.value)


def test_save_refuses_invalid_adapter_and_keeps_old_file(tmp_path):
    path = tmp_path / "a.safetensors"
    lk.save(sample_adapter(), path)
    before = path.read_bytes()
    bad = Adapter({"m": ModuleLora(torch.zeros(2, 3), torch.zeros(4, 3), alpha=1.0)})
    with pytest.raises(AdapterValidationError, match="m: rank mismatch"):
        lk.save(bad, path)
    assert path.read_bytes() == before
