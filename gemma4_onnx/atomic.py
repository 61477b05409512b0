"""Outputs appear whole or not at all, and never in place of something the command did not check: every
command writes into a temporary directory beside its target and publishes it with one rename, after every
file is written and fsynced.

``check_target`` records what is at the target when the command starts (nothing, an empty directory, or,
with ``--force``, a non-empty directory by device and inode), and ``publish`` checks it again in the same
atomic step that puts the output in place:

- nothing: Linux ``renameat2`` with ``RENAME_NOREPLACE``, which fails if anything appeared meanwhile; where
  the OS or the filesystem lacks it, ``mkdir`` of the target (which fails if anything is there) claims the
  name, then a rename replaces that empty claim (``rename_new``);
- an empty directory: a plain rename, which replaces an empty directory and nothing else;
- a non-empty directory (``--force``): ``renameat2`` with ``RENAME_EXCHANGE`` swaps the two in one step, so
  the target always names a complete package; if what came out is not the directory recorded at the start,
  it is swapped back and the command fails. Where the OS cannot swap, the old directory is renamed aside,
  checked, and the new one renamed in: a moment in which the target is absent, never partial.

So of two commands writing one target at once exactly one publishes, and a folder created at the target
during a run is never deleted: the run fails with one line and removes its staging directory. A resumable
writer's staging directory is locked (``flock``) for its writer's life. Staging directories carry their
writer's pid: one left by a killed process is removed by the next command writing the same target. A full
disk removes the staging directory and says how much space was needed; a place the filesystem refuses (under
a file, read-only, not permitted, a name too long) is one line naming it, with nothing left behind.
``check_disjoint`` refuses an output that is, lies inside or contains one of the command's inputs;
``write_file`` keeps the same promises for a single file.
"""

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4_onnx.errors import DiskFullError, UsageError

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)
# What the filesystem answers for a place an output cannot go: one line naming it, not an internal error.
REFUSED = (errno.ENOTDIR, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST,
           errno.EISDIR)
# What a rename answers when the target is no longer what was checked at the start.
TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
STAGING_NAME_EXTRA = 40  # ".NAME.tmp-PID-graphs-XXXXXXXX" and the like, beside NAME


@dataclass(frozen=True)
class Checked:
    """What was at an output path when its command began; ``publish`` puts the output there only if the
    same is still there."""

    target: Path
    found: str = "nothing"  # "nothing", "empty directory" or "directory" (non-empty, replaced with --force)
    identity: tuple[int, int] | None = None  # a non-empty directory's (device, inode)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _changed(target: Path) -> UsageError:
    return UsageError(f"output {target} changed while this command ran (another command or someone wrote "
                      "it); nothing was published")


def filesystem_error(exc: OSError, path: Path) -> Exception:
    """``exc``, raised by the filesystem while writing ``path``, as a one-line error where it is the input's
    fault (see ``REFUSED``, ``DISK_FULL``); anything else unchanged."""
    where = f" ({os.fsdecode(exc.filename)})" if exc.filename is not None else ""
    if exc.errno in DISK_FULL:
        return DiskFullError(f"out of space writing {path}: {exc.strerror}{where}; nothing was written")
    if exc.errno in REFUSED:
        return UsageError(f"cannot write {path}: {exc.strerror}{where}")
    return exc


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Errors the filesystem raises while this block prepares or writes ``path``: one line naming it."""
    try:
        yield
    except OSError as exc:
        raise filesystem_error(exc, path) from None


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_place(target: Path) -> None:
    """Refuse an output path the filesystem would refuse: under something that is not a directory, in a
    folder that cannot be written (read-only filesystem, no permission, immutable), or with a name that,
    with the staging names made beside it, is too long."""
    folder = target.parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {target}: {folder} is not a directory")
    limit, names = _name_max(folder), target.relative_to(folder).parts
    for i, name in enumerate(names):
        room = limit - (STAGING_NAME_EXTRA if i == len(names) - 1 else 0)
        if len(os.fsencode(name)) > room:
            raise UsageError(f"cannot write {target}: the name {name[:24]}... is too long ({len(os.fsencode(name))} "
                             f"bytes, at most {room} fit here with the temporary names made beside it)")
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        raise UsageError(f"cannot write {target}: {folder} "
                         f"{'is on a read-only filesystem' if read_only else 'is not writable (permission denied)'}")


def check_target(target: Path, force: bool) -> Checked:
    """Refuse, before any work, an output path that cannot be written, or that would replace a non-empty
    directory without ``force``; what is there now, for ``publish`` to find again."""
    target = Path(target).absolute()
    with output_errors(target):
        check_place(target)
        if target.is_symlink() or (os.path.lexists(target) and not target.is_dir()):
            raise UsageError(f"output {target} exists and is not a directory")
        if not target.is_dir():
            return Checked(target)
        if not any(target.iterdir()):
            return Checked(target, "empty directory")
        if not force:
            raise UsageError(f"output directory {target} is not empty; pass --force to replace it")
        return Checked(target, "directory", _identity(target.lstat()))


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        raise UsageError(f"cannot resolve {path}: {exc}") from None


def check_disjoint(out: Path, *sources: Path | str | None) -> None:
    """Refuse, before any work, an output that is one of ``sources`` (the command's inputs), lies inside one
    (writing it would change the input), or contains one (replacing it would delete the input), comparing
    paths with symbolic links resolved. A source that does not exist cannot be harmed and is skipped."""
    where = _resolved(Path(out))
    for source in sources:
        if source is None or not os.path.lexists(source):
            continue
        path = _resolved(Path(source))
        if where == path:
            raise UsageError(f"output {out} is the input {source}; write the output somewhere else")
        if where.is_relative_to(path):
            raise UsageError(f"output {out} lies inside the input {source}: writing it would change the input")
        if path.is_relative_to(where):
            raise UsageError(f"the input {source} lies inside the output {out}: replacing the output would "
                             "delete it")


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


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False where this OS or filesystem does not support ``flags``."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where this OS or filesystem cannot."""
    return _rename2(a, b, RENAME_EXCHANGE)


def rename_new(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target`` where nothing is; fails (``_changed``) if anything is there. Where
    ``RENAME_NOREPLACE`` is missing: a folder claims the name with ``mkdir`` (which fails if it is taken) and
    replaces that empty claim; anything else is hard-linked (which fails if it is taken), then unlinked."""
    try:
        if _rename2(staging, target, RENAME_NOREPLACE):
            return
        if staging.is_dir() and not staging.is_symlink():
            os.mkdir(target)
            os.rename(staging, target)
        else:
            os.link(staging, target, follow_symlinks=False)
            os.unlink(staging)
    except OSError as exc:
        if exc.errno in TAKEN:
            raise _changed(target) from None
        raise


def _rename_over_empty(staging: Path, target: Path) -> None:
    """Rename ``staging`` over ``target``, which the kernel allows only while it is an empty directory."""
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in TAKEN:
            raise _changed(target) from None
        raise


def _swap_in(staging: Path, checked: Checked) -> None:
    """Exchange ``staging`` with the directory recorded in ``checked``; swapped back if another is there."""
    target = checked.target
    try:
        if not exchange(staging, target):
            _swap_by_two_renames(staging, checked)
            return
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        rename_new(staging, target)
        return
    if _identity(staging.lstat()) != checked.identity:
        exchange(staging, target)
        raise _changed(target)
    shutil.rmtree(staging)  # now the previous output


def _swap_by_two_renames(staging: Path, checked: Checked) -> None:
    target = checked.target
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    previous = retired / target.name
    try:
        os.rename(target, previous)
    except BaseException:
        os.rmdir(retired)
        raise
    try:
        if _identity(previous.lstat()) != checked.identity:
            raise _changed(target)
        rename_new(staging, target)
    except BaseException:
        with contextlib.suppress(OSError, UsageError):
            rename_new(previous, target)  # put back what was there
            os.rmdir(retired)
        raise
    shutil.rmtree(retired)


def publish(staging: Path, checked: Checked) -> None:
    """Put ``staging`` at ``checked.target`` if what is there is still what ``check_target`` found, in one
    atomic step (see the module's docstring); else fail with one line, leaving what is there."""
    if checked.found == "directory":
        _swap_in(staging, checked)
    elif checked.found == "empty directory":
        _rename_over_empty(staging, checked.target)
    else:
        rename_new(staging, checked.target)


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


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and the missing folders above it; those created, deepest first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


@contextlib.contextmanager
def _removing_parents(created: list[Path]) -> Iterator[None]:
    """On failure, the folders this command created above its output are removed again where empty."""
    try:
        yield
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _prepare(target: Path, force: bool, checked: Checked | None,
             needed_bytes: int | None) -> tuple[Checked, list[Path]]:
    """``target`` checked (and found as ``checked`` recorded, where the caller checked it earlier), its free
    space checked, its parent created and stale staging beside it removed; the record and the folders made."""
    now = check_target(target, force)
    if checked is not None and checked != now:
        raise _changed(now.target)
    if needed_bytes is not None:
        check_free_space(now.target.parent, needed_bytes)
    with output_errors(now.target):
        created = _make_parents(now.target.parent)
        remove_stale_staging(now.target)
    return now, created


def _names_output(exc: OSError, staging: Path, target: Path) -> bool:
    """Whether ``exc`` is about the output's place (its staging directory, itself, its parent), not an input."""
    if exc.filename is None:
        return False
    name = Path(os.fsdecode(exc.filename)).absolute()
    return name == target.parent or name.is_relative_to(staging) or name.is_relative_to(target)


@contextlib.contextmanager
def _publishing(staging: Path, checked: Checked, needed_bytes: int | None,
                keep_if_interrupted: bool) -> Iterator[Path]:
    """Yield ``staging``; on success it is published at the target (``publish``), on failure it is removed
    (kept on Ctrl-C where ``keep_if_interrupted``) and the target is left as it was."""
    try:
        yield staging
        fsync_tree(staging)
        publish(staging, checked)
        fsync_dir(checked.target.parent)
    except KeyboardInterrupt:
        if not keep_if_interrupted:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as exc:
        raise _removed_after(exc, staging, checked.target, needed_bytes) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def publish_dir(target: Path, force: bool = False, needed_bytes: int | None = None,
                checked: Checked | None = None) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it is published at ``target``, on failure it is removed
    and ``target`` is left as it was. ``needed_bytes``, where the caller can estimate it, is checked against
    the free space first. ``checked``: what the caller's own ``check_target`` found when its command began
    (else what is there now), the only thing publishing may replace."""
    checked, created = _prepare(target, force, checked, needed_bytes)
    target = checked.target
    with _removing_parents(created):
        with output_errors(target):
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
            os.chmod(staging, 0o777 & ~_umask())
        with _publishing(staging, checked, needed_bytes, keep_if_interrupted=False):
            yield staging


def _removed_after(exc: OSError, staging: Path, target: Path, needed_bytes: int | None) -> Exception:
    """Remove ``staging`` after ``exc``; the error to raise (a full disk says how much was needed, a refused
    place of the output names it)."""
    written = tree_bytes(staging) if staging.exists() else 0
    shutil.rmtree(staging, ignore_errors=True)
    if exc.errno in REFUSED and _names_output(exc, staging, target):
        return filesystem_error(exc, target)
    if exc.errno not in DISK_FULL:
        return exc
    needs = f"about {_size(needed_bytes)}" if needed_bytes else f"more than {_size(written)}"
    return DiskFullError(f"out of space writing {target} ({exc.strerror}): {_size(written)} written before the "
                         f"filesystem refused more; the output needs {needs}, {_size(free_bytes(target.parent))} "
                         "free; nothing was published")


def check_file_target(path: Path) -> Path:
    """Refuse, before any work, a file output the filesystem would refuse, or one whose path is a symbolic
    link or not a regular file (never written through, never replaced); ``path`` made absolute."""
    path = Path(path).absolute()
    with output_errors(path):
        check_place(path)
        if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
            raise UsageError(f"output {path} exists and is not a regular file")
    return path


def write_file(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: a new temporary file beside it (created exclusively,
    so a link there is never followed), fsynced, renamed over ``path`` (which replaces a name, never writes
    through a link)."""
    path = check_file_target(path)
    with output_errors(path):
        created = _make_parents(path.parent)
    with _removing_parents(created), output_errors(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        temporary = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
    return path


RESUME_STATE = ".resume"


def partial_dir(target: Path) -> Path:
    """Where a resumable writer of ``target`` keeps its work until it is complete."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.partial"


def _lock(staging: Path, target: Path) -> int:
    """An exclusive lock on ``staging`` (created if absent), held by the returned descriptor for the
    writer's life: a second writer of ``target`` is refused, and the kernel drops a killed writer's lock."""
    staging.mkdir(exist_ok=True)
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _identity(os.fstat(fd)) != _identity(staging.lstat()):
            raise BlockingIOError  # published or replaced by the writer that held it
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        pid = staging / RESUME_STATE / "pid"
        writer = f" (pid {pid.read_text()})" if pid.is_file() and not pid.is_symlink() else ""
        raise UsageError(f"{target} is being written by another process{writer}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _start_or_resume(staging: Path, key: str, target: Path, needed_bytes: int | None) -> None:
    """Keep ``staging``'s work if it was written for ``key``, else empty it (checking the free space)."""
    state = staging / RESUME_STATE / "key"
    if not (state.is_file() and state.read_text() == key):
        for path in list(staging.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if needed_bytes is not None:
            check_free_space(target.parent, needed_bytes)
        (staging / RESUME_STATE).mkdir()
        state.write_text(key)
    (staging / RESUME_STATE / "pid").write_text(str(os.getpid()))


@contextlib.contextmanager
def publish_resumable(target: Path, key: str, force: bool = False, needed_bytes: int | None = None,
                      checked: Checked | None = None) -> Iterator[Path]:
    """``publish_dir`` for long writers that can pick up where an interrupted run stopped: the staging
    directory is ``partial_dir(target)``, locked while its writer runs, kept when the run is interrupted
    (Ctrl-C, a kill, a crash of the machine) and reused by the next run whose ``key`` (what it would write)
    is the same; a different key starts afresh. Any other failure removes it, as ``publish_dir`` does. The
    writer removes its ``RESUME_STATE`` folder before the staging directory is published."""
    checked, created = _prepare(target, force, checked, None)
    target = checked.target
    staging = partial_dir(target)
    with _removing_parents(created):
        with output_errors(target):
            lock = _lock(staging, target)
        try:
            with _publishing(staging, checked, needed_bytes, keep_if_interrupted=True):
                _start_or_resume(staging, key, target, needed_bytes)
                yield staging
        finally:
            os.close(lock)
