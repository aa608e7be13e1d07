import json
import subprocess
import sys

from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from tests.formats.test_native import sample_adapter


def test_inspect_table_and_json(tmp_path):
    path = tmp_path / "a.safetensors"
    a = sample_adapter()
    lk.save(a, path)
    res = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "enc.1.conv" in res.output and "conv2d" in res.output and "4 modules" in res.output
    res = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    info = json.loads(res.output)
    assert info["num_modules"] == 4 and info["total_rank"] == 11 and info["base_model"] == "tiny/base"
    q = info["modules"][0]
    assert q["module"] == "enc.0.q" and q["rank"] == 4 and q["alpha"] == 7.5 and q["params"] == 44
    assert abs(q["delta_norm"] - float(a.delta("enc.0.q").norm())) < 1e-4


def test_errors_print_one_line_and_exit_nonzero(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(bad) in lines[0] and "too short" in lines[0]
    assert proc.stdout == ""
