import os

import pytest
import torch

from lorakit import FileFormatError
from lorakit.formats import atomic_write, read_header, read_safetensors, write_safetensors


def test_write_read_roundtrip_and_shared_storage(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    tensors = {"a": base, "view": base[:, 1], "alias": base}  # non-contiguous view and an alias
    write_safetensors(tensors, tmp_path / "x.safetensors", {"k": "v"})
    out, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)
    assert torch.equal(base, torch.arange(12.0).view(3, 4))  # caller's tensors untouched


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_partial_read(tmp_path):
    write_safetensors({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "x.safetensors")
    out, _ = read_safetensors(tmp_path / "x.safetensors", ["b"])
    assert list(out) == ["b"]
    with pytest.raises(FileFormatError, match="missing tensor\\(s\\) \\['c'\\]"):
        read_safetensors(tmp_path / "x.safetensors", ["c"])


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: b[:5], "too short"),
    (lambda b: b[:-4], "truncated: tensor 'a'"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "declares 1000000000 header bytes"),
    (lambda b: b[:8] + b"x" + b[9:], "not valid JSON"),
])
def test_damaged_files_are_named(tmp_path, mutate, needle):
    path = tmp_path / "x.safetensors"
    write_safetensors({"a": torch.ones(4)}, path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(FileFormatError, match=needle) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        read_safetensors(tmp_path / "nope.safetensors")
