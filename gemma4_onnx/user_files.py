"""Files the user names on the command line (a recipe, calibration or evaluation text): checked to be
regular files before they are opened, so a directory, a pipe or a device is one line, not a hang."""

import errno
import os
import stat
from pathlib import Path

from gemma4_onnx.errors import UsageError


def regular_file(path: Path, what: str) -> os.stat_result:
    """``os.stat`` of ``path``, an existing regular file; ``what`` names it in errors ("--calibration")."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {path} is not a regular file")
    return info


def read_own_file(directory: Path, name: str, limit: int) -> bytes:
    """``directory/name``, a file a gemma4-onnx verb wrote there (a parity.json): read through no link (nor
    an extra hard link, which could be a file outside), and refused when it is larger than ``limit`` bytes."""
    path = directory / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
        raise UsageError(f"{path} {reason}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if info.st_nlink != 1:
            raise UsageError(f"{path} has {info.st_nlink} hard links (a file outside {directory} could be one)")
        if info.st_size > limit:
            raise UsageError(f"{path} has {info.st_size} bytes, more than {limit}")
        return f.read(limit + 1)
