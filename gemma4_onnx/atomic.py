"""Outputs appear whole or not at all: every command writes into a temporary directory beside its
target and publishes it with one rename, after every file is written and fsynced.

Replacing an existing output swaps the two directories in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``), so the target path always names a complete package; where the OS or the
filesystem cannot swap, two renames leave a moment in which the target is absent, never partial.
Staging directories carry their writer's pid: one left by a killed process is removed by the next
command writing the same target. A full disk removes the staging directory and says how much space
was needed.
"""

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemma4_onnx.errors import DiskFullError, UsageError

AT_FDCWD = -100
RENAME_EXCHANGE = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def check_target(target: Path, force: bool) -> None:
    """Refuse, before any work, to replace a non-empty directory without ``force``."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UsageError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"output directory {target} is not empty; pass --force to replace it")


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for directory in [*sorted(p for p in root.rglob("*") if p.is_dir()), root]:
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where this OS or filesystem cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; an existing ``target`` is swapped out in one step, then removed."""
    if not target.exists():
        os.rename(staging, target)
    elif exchange(staging, target):
        shutil.rmtree(staging)  # now the previous output
    else:
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Staging and retired directories of ``target`` whose writer is dead (killed mid-write): removed."""
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        kind, _, rest = path.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and path.is_dir() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _size(n: int) -> str:
    return f"{n} bytes ({n / 1e9:.2f} GB)" if n >= 10**8 else f"{n} bytes"


def check_free_space(directory: Path, needed: int) -> None:
    while not directory.exists():  # the output's parent may not exist yet: its filesystem is the nearest one
        directory = directory.parent
    free = free_bytes(directory)
    if needed > free:
        raise DiskFullError(f"not enough space in {directory}: the output needs about {_size(needed)}, "
                            f"{_size(free)} free")


def _prepare(target: Path, force: bool) -> Path:
    """``target`` made absolute, checked, its parent created and stale staging beside it removed."""
    target = Path(target).absolute()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    return target


@contextlib.contextmanager
def _publishing(staging: Path, target: Path, needed_bytes: int | None, keep_if_interrupted: bool) -> Iterator[Path]:
    """Yield ``staging``; on success it replaces ``target`` atomically, on failure it is removed (kept on
    Ctrl-C where ``keep_if_interrupted``) and ``target`` is left as it was."""
    try:
        yield staging
        fsync_tree(staging)
        replace_dir(staging, target)
        fsync_dir(target.parent)
    except KeyboardInterrupt:
        if not keep_if_interrupted:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as exc:
        raise _removed_after(exc, staging, target, needed_bytes) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def publish_dir(target: Path, force: bool = False, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``target`` atomically, on failure it is
    removed and ``target`` is left as it was. ``needed_bytes``, where the caller can estimate it, is
    checked against the free space first."""
    target = _prepare(target, force)
    if needed_bytes is not None:
        check_free_space(target.parent, needed_bytes)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    with _publishing(staging, target, needed_bytes, keep_if_interrupted=False):
        yield staging


def _removed_after(exc: OSError, staging: Path, target: Path, needed_bytes: int | None) -> Exception:
    """Remove ``staging`` after ``exc``; the error to raise (a full disk says how much was needed)."""
    written = tree_bytes(staging) if staging.exists() else 0
    shutil.rmtree(staging, ignore_errors=True)
    if exc.errno not in DISK_FULL:
        return exc
    needs = f"about {_size(needed_bytes)}" if needed_bytes else f"more than {_size(written)}"
    return DiskFullError(f"out of space writing {target} ({exc.strerror}): {_size(written)} written before the "
                         f"filesystem refused more; the output needs {needs}, {_size(free_bytes(target.parent))} "
                         "free; nothing was published")


RESUME_STATE = ".resume"


def partial_dir(target: Path) -> Path:
    """Where a resumable writer of ``target`` keeps its work until it is complete."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.partial"


@contextlib.contextmanager
def publish_resumable(target: Path, key: str, force: bool = False, needed_bytes: int | None = None) -> Iterator[Path]:
    """``publish_dir`` for long writers that can pick up where an interrupted run stopped: the staging
    directory is ``partial_dir(target)``, kept when the run is interrupted (Ctrl-C, a kill, a crash of
    the machine) and reused by the next run whose ``key`` (what it would write) is the same; a different
    key starts afresh. Any other failure removes it, as ``publish_dir`` does. The writer removes its
    ``RESUME_STATE`` folder before the staging directory is published."""
    target = _prepare(target, force)
    staging = partial_dir(target)
    state = staging / RESUME_STATE / "key"
    writer = staging / RESUME_STATE / "pid"
    if writer.is_file() and writer.read_text().isdigit() and _pid_alive(int(writer.read_text())):
        raise UsageError(f"{target} is being written by another process (pid {writer.read_text()})")
    if staging.exists() and not (state.is_file() and state.read_text() == key):
        shutil.rmtree(staging)
    if not staging.exists():
        if needed_bytes is not None:
            check_free_space(target.parent, needed_bytes)
        (staging / RESUME_STATE).mkdir(parents=True)
        state.write_text(key)
    writer.write_text(str(os.getpid()))
    with _publishing(staging, target, needed_bytes, keep_if_interrupted=True):
        yield staging
