"""Atomic outputs: a writer killed at any point leaves the old output or the new one, never a mix of the two.

A **file** is written to a sibling temporary file, fsynced, and ``os.replace``-d over the target; the folder is
fsynced after, so the rename itself is on disk. A **directory** (a PEFT adapter, a split package) is built whole in
a sibling temporary directory, then swapped in. A directory cannot be renamed over a non-empty one, so the swap
takes two renames::

    (1) target                              -> .lorakit-old.<name>.<pid>.<tag>
    (2) .lorakit-tmp.<name>.<pid>.<tag>     -> target
    (3) remove .lorakit-old.<name>.<pid>.<tag>

A kill between (1) and (2) leaves no target but a complete old copy beside it: the next write, or the next
consistent read (:func:`read_directory`), moves it back. Temporaries of writers that are no longer running (the pid
in the name) are removed by the next write to the same target; a live writer's are left alone.

New files get mode ``0o666 & ~umask`` and new directories ``0o777 & ~umask``, as ``open`` and ``mkdir`` would give
(``tempfile`` would give 0600 and 0700); a replaced file or directory keeps its mode.

Test hook: with ``LORAKIT_KILL_AT=N`` in the environment, the process SIGKILLs itself at its N-th write step (file
written, file replaced; directory created, complete, set aside, swapped in, old copy removed), so a test can kill a
writer at every point of a write. Unset, a step costs one environment lookup.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lorakit.errors import FileFormatError, LorakitError

T = TypeVar("T")

KILL_ENV = "LORAKIT_KILL_AT"
TMP_PREFIX = ".lorakit-tmp."
OLD_PREFIX = ".lorakit-old."
_SIBLING = re.compile(r"^\.lorakit-(tmp|old)\.(.+)\.(\d+)\.[0-9a-f]{8}$")
#: How many times a read retries when the directory it read was swapped under it (each a new, complete output).
READ_ATTEMPTS = 100
_steps = {"pid": 0, "count": 0}


def kill_point() -> None:
    """One write step; SIGKILL this process if it is step ``$LORAKIT_KILL_AT`` (counted per process)."""
    at = os.environ.get(KILL_ENV)
    if not at:
        return
    if _steps["pid"] != os.getpid():  # a forked child counts its own steps
        _steps.update(pid=os.getpid(), count=0)
    _steps["count"] += 1
    if _steps["count"] == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def _sibling(path: Path, prefix: str) -> Path:
    return path.with_name(f"{prefix}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(path: Path, alive: bool) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the temporaries (``tmp``) and set-aside copies (``old``) of ``path`` whose writer is
    running (``alive``) or gone."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    out = []
    for name in names:
        m = _SIBLING.match(name)
        if m and m.group(2) == path.name and _alive(int(m.group(3))) == alive:
            out.append((m.group(1), path.parent / name))
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: str | os.PathLike) -> None:
    """Undo what killed writers left beside ``path``.

    If ``path`` is missing and a killed writer set an old copy aside, that copy is moved back (the latest one, if
    several); every other temporary or set-aside copy of a writer that is no longer running is removed.
    """
    path = Path(path)
    left = _siblings(path, alive=False)
    asides = sorted((p for kind, p in left if kind == "old"), key=lambda p: p.lstat().st_ctime_ns)
    if asides and not os.path.lexists(path):
        try:
            os.rename(asides[-1], path)
        except OSError:  # another process restored it first, or the folder is read-only: nothing to undo here
            pass
    for _, p in left:
        if p.exists():
            _remove(p)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # not openable as a directory on this platform (Windows): nothing to sync
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a sibling temporary file, then move it over ``path`` in one step.

    The temporary file is fsynced before the move and the folder after it. A crash or error mid-write leaves the
    old file (if any) untouched; the temporary file goes at once on an error, or with the next write after a kill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _sibling(path, TMP_PREFIX)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    # The replaced file's mode, else 0o666 & ~umask as open() just gave it (read back: asking for the umask
    # would set it). Set again after ``write``, which may recreate the file (safetensors does, with 0600).
    mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        _fsync(tmp)
        kill_point()  # written
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)
    kill_point()  # replaced


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link into ``new`` the entries of ``old`` it lacks and ``keep`` accepts (the old copy stays whole)."""
    for name in os.listdir(old):
        src, dst = old / name, new / name
        if os.path.lexists(dst) or not keep(name):
            continue
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], object],
                     keep: Callable[[str], bool] = lambda name: True) -> None:
    """Build a directory with ``write(tmp_dir)`` in a sibling temporary directory and swap it in for ``path``.

    Args:
        path: the directory to write (a symlink to one: the directory it points to).
        write: fills the (empty) temporary directory it is given.
        keep: which entries of the directory being replaced, absent from the new one, are carried over (as hard
            links): a user's README beside a PEFT adapter, say. Entries the writer owns and no longer writes
            (stale part files) should be refused.

    Raises:
        FileFormatError: ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if os.path.lexists(path) and not path.is_dir():
        raise FileFormatError(path, "exists and is not a directory; refusing to replace it with one")
    tmp = _sibling(path, TMP_PREFIX)
    tmp.mkdir()  # 0o777 & ~umask
    aside: Path | None = None
    try:
        kill_point()  # created
        write(tmp)
        if path.is_dir():
            _carry(path, tmp, keep)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        for entry in tmp.iterdir():
            if entry.is_file() and not entry.is_symlink():
                _fsync(entry)
        _fsync(tmp, directory=True)
        kill_point()  # complete
        if path.is_dir():
            aside = _sibling(path, OLD_PREFIX)
            os.rename(path, aside)
            kill_point()  # set aside
        os.rename(tmp, path)
        _fsync(path.parent, directory=True)
        kill_point()  # swapped in
    except BaseException:
        if aside is not None and not os.path.lexists(path):
            os.rename(aside, path)
            aside = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if aside is not None and os.path.lexists(path):
            shutil.rmtree(aside, ignore_errors=True)
    if aside is not None:
        kill_point()  # old copy removed


def _same_directory(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    pinned = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (pinned.st_dev, pinned.st_ino)


def read_directory(path: str | os.PathLike, read: Callable[[], T]) -> T:
    """``read()`` (which reads files inside directory ``path`` by name) so that it sees one directory only.

    Writers never change files inside a swapped-in directory; they swap a new one in. So a read that found the
    same directory at ``path`` before and after it (held open meanwhile, so its inode cannot be reused) read one
    output. Otherwise, or while a running writer is between its two renames, the read is repeated. A target a
    killed writer left missing is first put back (:func:`recover`).

    Raises:
        FileFormatError: the directory kept changing for :data:`READ_ATTEMPTS` reads; or whatever ``read`` raises
            on a directory that did not change.
    """
    path = Path(path)
    for attempt in range(READ_ATTEMPTS):
        if not os.path.lexists(path):
            try:
                recover(path)
            except OSError:  # a read-only folder: read what is there
                pass
            if not os.path.lexists(path) and _siblings(path, alive=True):
                time.sleep(0.001 * (attempt + 1))  # a running writer is between its renames
                continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            # a writer moved the directory aside between the check above and the open: look again
            if os.path.lexists(path) or _siblings(path, alive=True):
                time.sleep(0.001 * (attempt + 1))
                continue
            return read()  # missing: ``read`` names the problem
        except OSError:
            return read()  # not a directory, or not readable: ``read`` names the problem
        try:
            try:
                result = read()
            except LorakitError:
                if _same_directory(fd, path):
                    raise
                continue
            if _same_directory(fd, path):
                return result
        finally:
            os.close(fd)
    raise FileFormatError(path, f"was replaced during each of {READ_ATTEMPTS} reads; is a writer looping on it?")


def reads_directory(directory_of: Callable[[Path], Path] = lambda p: p):
    """Decorator: run ``fn(path, ...)`` through :func:`read_directory` on ``directory_of(Path(path))``."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def reader(path: str | os.PathLike, *args, **kwargs) -> T:
            return read_directory(directory_of(Path(path)), lambda: fn(path, *args, **kwargs))

        return reader

    return wrap
