"""Atomic writes: a reader never sees a half-written file or directory, and a failure leaves the
previous content (if any) as it was."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import glob
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from florist.errors import ConfigError


@contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    Raises ``ConfigError`` before anything is written when ``path`` exists and ``overwrite`` is
    False. On any exception the temporary directory is removed and ``path`` is untouched. An
    existing ``path`` is swapped with the new one in one step where the OS can (Linux
    ``renameat2(RENAME_EXCHANGE)``), so readers see the old content or the new, never nothing.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise ConfigError(
            f"output {str(dest)!r} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest, "tmp"), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it a normal directory's mode
    try:
        yield tmp
        _swap_in(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_normal_mode(path: str | os.PathLike[str]) -> None:
    """Give a file written by a library with 0600 (safetensors, mkstemp) a normal file's mode."""
    os.chmod(path, 0o666 & ~_umask())


def _tmp_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


def clean_stale(dest: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` leftovers of writers that died (SIGKILL)."""
    for entry in dest.parent.glob(f".{glob.escape(dest.name)}.*-*-*"):
        m = _STALE.match(entry.name)
        if m is None or m["name"] != dest.name or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if _exchange(tmp, dest):  # dest now holds the new content, tmp the old
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest, "old"), dir=dest.parent))
    os.replace(dest, old / "content")  # no atomic exchange here: a brief moment without dest
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old / "content", dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or file system cannot."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def file_lock(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; yields False at
    once, holding nothing, when ``wait`` is off and another process holds it. The lock goes with
    the process, so a killed holder never leaves it stuck."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def update_json_atomic(path: str | os.PathLike[str], key: str, value: Any) -> dict[str, Any]:
    """Set ``key`` in the JSON object at ``path`` (read afresh under a lock beside it) and write it
    atomically: processes that share one results file each add their entries, none is lost. Returns
    the object as written."""
    dest = Path(path)
    with file_lock(dest.with_name(dest.name + ".lock")):
        data: dict[str, Any] = json.loads(dest.read_text()) if dest.is_file() else {}
        data[key] = value
        write_json_atomic(dest, data)
    return data


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (fsync'ed when ``sync``).

    The file gets a normal file's mode (0666 less the umask), not mkstemp's 0600.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(dest, "tmp"), dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
        if sync:
            _fsync_dir(dest.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """``fig.savefig`` through ``write_bytes_atomic`` (format from the file suffix)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_bytes_atomic(path, buf.getvalue())


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_name(name: str, what: str) -> str:
    """``name`` if it is one safe path component (letters, digits, ``._-``, no leading dot, at most
    128 characters), else ``ConfigError`` naming ``what``: nothing read from a config or a message
    may climb out of the directory it is joined to."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r:.80} is not a safe file name (letters, digits, '.', '_', '-')")
    return name
