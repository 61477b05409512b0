"""Files the user names on the command line (a recipe, calibration or evaluation text): checked to be
regular files before they are opened, so a directory, a pipe or a device is one line, not a hang."""

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
