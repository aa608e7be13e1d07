"""Atomic outputs and consistent reads (issue 12, section 6).

Kill tests: the CLI's ``convert --to peft`` and ``split`` are run in a child process that SIGKILLs itself at the
N-th write step (``LORAKIT_KILL_AT=N``, see :mod:`lorakit.formats.atomic`), for every N until a run completes.
Each child is forked from the test process, which has torch imported already (an exec'ed ``lorakit`` costs 2.6 s
of imports per kill); one test runs the real ``python -m lorakit`` executable as well. After every kill the
output must load and be wholly the old adapter or wholly the new one.

Race tests: a writer thread writes adapters X and Y alternately while a reader reads; X and Y have the same
shapes, so only alphas and factors tell them apart, and every read must be wholly X or wholly Y.

Measured on the code before this change (files written one by one into the output folder, header and tensors
read through separate opens, a part hashed and then read again): killing ``convert --to peft`` over an old
output left old 1 / new 1 / X's config with Y's weights 2 of 4 kills; killing ``split`` left a package that does
not load 28 of 30 kills; reads racing writes were mixed 16 of 1,042 times (native), 164 of 685 (PEFT), and split
reads failed 737 of 769 times. Now: convert 9 kills, old 7 / new 2; split 35 kills, old 33 / new 2; no mixed read.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.adapter import Adapter, ModuleLora, adapters_equal
from lorakit.errors import LorakitError
from lorakit.formats import native, peft
from lorakit.ops import join, load_split, save_split, split

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kill tests fork a child process")

KILL_ENV = "LORAKIT_KILL_AT"
N_MODULES = 14  # a component split gives one part per module: 14 parts


def make_adapter(tag: float, n: int = N_MODULES) -> Adapter:
    """An adapter whose every alpha and factor carries ``tag``, so a mix of two tags is visible anywhere."""
    g = torch.Generator().manual_seed(int(tag))
    mods = {f"c{i}.proj": ModuleLora(A=torch.randn(2, 4, generator=g) + tag, B=torch.randn(3, 2, generator=g),
                                     alpha=float(tag + i))
            for i in range(n)}
    return Adapter(mods, base_model="tiny", metadata={"tag": str(tag)})


def run_cli(args: list[str], kill_at: int | None) -> int:
    """Run ``lorakit ARGS`` in a forked child (killing itself at write step ``kill_at``); its exit code (-9: killed)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 98
        try:
            if kill_at is not None:
                os.environ[KILL_ENV] = str(kill_at)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            sys.stdout = sys.stderr = open(os.devnull, "w")
            sys.argv = ["lorakit", *args]
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def outcome(read, target: Path, old: Adapter | None, new: Adapter) -> str:
    """``old``, ``new``, ``mixed`` (loads, but is neither), ``absent`` (nothing loads, nothing there) or
    ``broken`` (something there that does not load)."""
    try:
        got = read(target)
    except LorakitError:
        return "broken" if target.exists() else "absent"
    if old is not None and adapters_equal(got, old):
        return "old"
    return "new" if adapters_equal(got, new) else "mixed"


def kill_sweep(work: Path, target: Path, write_args, read, x: Adapter, y: Adapter, fresh: bool) -> Counter:
    """Kill ``lorakit`` at every write step while it replaces X by Y in ``target`` (or writes Y afresh).

    After each kill, a clean write of Y must succeed and leave nothing but ``target`` in its folder.
    """
    template = work.with_name(work.name + "-template")
    if not fresh:
        template.mkdir()
        assert run_cli(write_args(template / target.name, "x"), None) == 0
    tally: Counter = Counter()
    for n in range(1, 200):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work) if not fresh else work.mkdir()
        rc = run_cli(write_args(target, "y"), n)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"kill point {n}: exit code {rc}"
        tally[outcome(read, target, None if fresh else x, y)] += 1
        assert run_cli(write_args(target, "y"), None) == 0
        assert adapters_equal(read(target), y)
        assert sorted(os.listdir(work)) == [target.name], f"kill point {n}: leftovers {os.listdir(work)}"
    return tally


@pytest.fixture(scope="module", autouse=True)
def _warm_cli(tmp_path_factory):
    """Run each CLI verb once in this process: typer imports its option machinery on first use, which would
    otherwise cost every forked child 0.3 s."""
    d = tmp_path_factory.mktemp("warm")
    native.save(make_adapter(0.0, 1), d / "a.safetensors")
    for args in (["convert", str(d / "a.safetensors"), str(d / "peft"), "--to", "peft"],
                 ["split", str(d / "a.safetensors"), "--out", str(d / "pkg"), "--by", "component"]):
        sys.argv = ["lorakit", *args]
        with pytest.raises(SystemExit):
            cli.main()


@pytest.fixture
def fast_tmp(tmp_path):
    """A folder in memory (``/dev/shm``) when there is one: a SIGKILL leaves the page cache as it was, so the kill
    tests see the same files there, without paying ~10 ms per fsync on the runner's disk, ~1,000 times."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="lorakit-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sources(fast_tmp):
    tmp_path = fast_tmp
    src = tmp_path / "src"
    src.mkdir()
    x, y = make_adapter(1.0), make_adapter(2.0)
    native.save(x, src / "x.safetensors")
    native.save(y, src / "y.safetensors")
    return src, x, y


@pytest.mark.parametrize("fresh", [False, True], ids=["replace", "fresh"])
def test_killed_convert_to_peft_leaves_old_or_new(fast_tmp, sources, fresh):
    src, x, y = sources
    work = fast_tmp / "work"
    target = work / "out"

    def args(out: Path, which: str) -> list[str]:
        return ["convert", str(src / f"{which}.safetensors"), str(out), "--to", "peft"]

    tally = kill_sweep(work, target, args, peft.load, x, y, fresh)
    kills = sum(tally.values())
    assert kills >= (7 if fresh else 9), tally
    assert set(tally) <= ({"absent", "new"} if fresh else {"old", "new"}), dict(tally)


def test_killed_split_leaves_old_or_new_package(fast_tmp, sources):
    src, x, y = sources
    work = fast_tmp / "work"
    target = work / "pkg"

    def args(out: Path, which: str) -> list[str]:
        return ["split", str(src / f"{which}.safetensors"), "--out", str(out), "--by", "component"]

    tally = kill_sweep(work, target, args, lambda p: join(load_split(p)), x, y, fresh=False)
    kills = sum(tally.values())
    assert kills >= 30, tally
    assert set(tally) <= {"old", "new"}, dict(tally)


def test_kill_between_renames_of_the_real_cli_is_recovered_by_the_reader(fast_tmp, sources):
    """The exec'ed CLI killed right after moving the old output aside: the target is missing, and the next read
    puts the old output back."""
    src, x, y = sources
    target = fast_tmp / "work" / "out"
    assert run_cli(["convert", str(src / "x.safetensors"), str(target), "--to", "peft"], None) == 0
    old = peft.load(target)
    base = [sys.executable, "-m", "lorakit", "convert"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Steps of `convert --to peft`: 1 = temporary directory created, 2-5 = weights and config written and
    # replaced inside it, 6 = directory complete, 7 = old directory moved aside.
    proc = subprocess.run([*base, str(src / "y.safetensors"), str(target), "--to", "peft"],
                          env={**env, KILL_ENV: "7"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    assert adapters_equal(peft.load(target), old)
    assert sorted(os.listdir(target.parent)) == ["out"]


def _race(write_x, write_y, read, x: Adapter, y: Adapter, seconds: float = 2.0) -> Counter:
    """Write X and Y alternately in a thread while reading; the tally of what the reads saw."""
    write_x()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                (write_y if i % 2 == 0 else write_x)()
                i += 1
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    tally: Counter = Counter()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                got = read()
            except LorakitError as e:
                tally[f"error: {type(e).__name__}"] += 1
                continue
            tally["x" if adapters_equal(got, x) else "y" if adapters_equal(got, y) else "mixed"] += 1
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    return tally


def test_reads_racing_native_writes_are_never_mixed(tmp_path):
    x, y = make_adapter(1.0, 3), make_adapter(2.0, 3)
    path = tmp_path / "a.safetensors"
    tally = _race(lambda: native.save(x, path), lambda: native.save(y, path), lambda: native.load(path), x, y)
    assert set(tally) <= {"x", "y"} and sum(tally.values()) > 50, dict(tally)


def test_reads_racing_peft_writes_are_never_mixed(tmp_path):
    x, y = make_adapter(1.0, 3), make_adapter(2.0, 3)
    path = tmp_path / "peft"
    tally = _race(lambda: peft.save(x, path), lambda: peft.save(y, path), lambda: peft.load(path), x, y)
    assert set(tally) <= {"x", "y"} and sum(tally.values()) > 50, dict(tally)


def test_a_directory_moved_aside_between_the_check_and_the_open_is_read_again(tmp_path, monkeypatch):
    """The window the PEFT race test hit about once in 800 reads (a "no adapter_config.json" error instead of X or
    Y), made certain: the writer moves the old directory aside after the reader saw it and before the reader's
    open, and swaps the new one in while the reader waits."""
    from lorakit.formats import atomic

    x, y = make_adapter(1.0, 3), make_adapter(2.0, 3)
    path, fresh = tmp_path / "peft", tmp_path / "fresh"
    peft.save(x, path)
    peft.save(y, fresh)
    aside = atomic._sibling(path, atomic.OLD_PREFIX)  # named as this (running) writer's
    real_open, real_sleep, moved = os.open, time.sleep, []

    def open_mid_swap(p, flags, *args, **kwargs):
        if Path(p) == path and not moved:
            moved.append(True)
            os.rename(path, aside)
            raise FileNotFoundError(p)
        return real_open(p, flags, *args, **kwargs)

    def sleep_while_the_writer_finishes(seconds):
        if moved and not path.exists():
            os.rename(fresh, path)
            shutil.rmtree(aside)
        real_sleep(seconds)

    monkeypatch.setattr(os, "open", open_mid_swap)
    monkeypatch.setattr(time, "sleep", sleep_while_the_writer_finishes)
    assert adapters_equal(peft.load(path), y) and moved


def test_reads_racing_split_writes_are_never_mixed(tmp_path):
    x, y = make_adapter(1.0, 3), make_adapter(2.0, 3)
    sx, sy = split(x, "component"), split(y, "component")
    path = tmp_path / "pkg"
    tally = _race(lambda: save_split(sx, path), lambda: save_split(sy, path), lambda: join(load_split(path)), x, y)
    assert set(tally) <= {"x", "y"} and sum(tally.values()) > 50, dict(tally)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_respect_umask(tmp_path, umask):
    a = make_adapter(1.0, 2)
    old = os.umask(umask)
    try:
        native.save(a, tmp_path / "a.safetensors")
        peft.save(a, tmp_path / "peft")
        save_split(split(a, "component"), tmp_path / "pkg")
    finally:
        os.umask(old)
    files = [tmp_path / "a.safetensors", *(tmp_path / "peft").iterdir(), *(tmp_path / "pkg").iterdir()]
    assert len(files) == 6
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}
    for d in (tmp_path / "peft", tmp_path / "pkg"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.safetensors"
    native.save(make_adapter(1.0, 2), path)
    path.chmod(0o640)
    native.save(make_adapter(2.0, 2), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names file descriptors through /proc")
def test_temp_file_is_fsynced_before_the_replace_and_the_folder_after(tmp_path, monkeypatch):
    from lorakit.formats import atomic

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync",
                        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace",
                        lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = tmp_path / "a.safetensors"
    native.save(make_adapter(1.0, 1), path)
    kinds = [(kind, Path(p).name.startswith(".lorakit-tmp."), Path(p) == tmp_path) for kind, p in events]
    assert kinds == [("fsync", True, False), ("replace", False, False), ("fsync", False, True)]


def test_replacing_a_directory_keeps_foreign_files_and_drops_stale_parts(tmp_path):
    x, y = make_adapter(1.0, 3), make_adapter(2.0, 2)
    peft.save(x, tmp_path / "peft")
    (tmp_path / "peft" / "README.md").write_text("mine")
    peft.save(y, tmp_path / "peft")
    assert (tmp_path / "peft" / "README.md").read_text() == "mine"
    assert adapters_equal(peft.load(tmp_path / "peft"), y)

    save_split(split(x, "component"), tmp_path / "pkg")
    (tmp_path / "pkg" / "notes.txt").write_text("mine")
    save_split(split(y, "component"), tmp_path / "pkg")  # 2 parts where there were 3
    assert sorted(os.listdir(tmp_path / "pkg")) == ["c0.safetensors", "c1.safetensors", "notes.txt", "split.json"]
    assert adapters_equal(join(load_split(tmp_path / "pkg")), y)
    assert sorted(os.listdir(tmp_path)) == ["peft", "pkg"]


def test_a_file_is_not_replaced_by_a_directory(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(LorakitError, match="out: exists and is not a directory"):
        peft.save(make_adapter(1.0, 1), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file"
    assert os.listdir(tmp_path) == ["out"]


def test_a_part_is_hashed_from_the_bytes_that_are_parsed(tmp_path):
    """A part file replaced (by another valid part) while it is read: the read returns the part the manifest
    hashed, or refuses the other one by its hash; never the other part under this part's hash."""
    from lorakit.ops.package import read_manifest, read_part

    x, y = make_adapter(1.0, 1), make_adapter(2.0, 1)
    save_split(split(x, "component"), tmp_path / "pkg")
    save_split(split(y, "component"), tmp_path / "other")
    entry = read_manifest(tmp_path / "pkg")["parts"][0]
    part = tmp_path / "pkg" / entry["file"]
    blobs = [part.read_bytes(), (tmp_path / "other" / entry["file"]).read_bytes()]
    assert len(blobs[0]) == len(blobs[1]) and blobs[0] != blobs[1]
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            tmp = part.with_suffix(".swap")
            tmp.write_bytes(blobs[i % 2])
            os.replace(tmp, part)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    tally: Counter = Counter()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                got = read_part(tmp_path / "pkg", entry).adapter
            except LorakitError as e:
                assert "does not match the manifest" in str(e)
                tally["refused"] += 1
                continue
            tally["x" if adapters_equal(got, x) else "y" if adapters_equal(got, y) else "mixed"] += 1
    finally:
        stop.set()
        t.join()
    assert set(tally) <= {"x", "refused"} and tally["x"] > 10, dict(tally)
