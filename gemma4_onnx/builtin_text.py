"""The text used when the user gives none: parity's evaluation text and quantization's calibration
text (a short Python module, like the trained fixtures' domain)."""

BUILTIN_TEXT = '''import json
import os
from pathlib import Path


def read_config(path):
    """Read a JSON configuration file and return its contents as a dictionary."""
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected an object, got {type(config).__name__}")
    return config


def merge(base, override):
    """Merge two configuration dictionaries, recursing into nested dictionaries."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


class Settings:
    """Settings loaded from a directory of JSON files, later files overriding earlier ones."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.values = {}
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".json"):
                self.values = merge(self.values, read_config(self.directory / name))

    def get(self, key, default=None):
        node = self.values
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node
'''


CALIBRATION_BYTES = 48 * 1024


def calibration_text() -> str:
    """Default calibration text for GPTQ: the built-in text, then the interpreter's own standard-library
    sources in sorted order (``__future__.py``, ``_aix_support.py``, ``abc.py``, …) up to 48 KiB: real
    code, on every machine, nothing downloaded. It suits code models; pass ``--calibration`` with text
    of the model's own domain otherwise."""
    import sysconfig
    from pathlib import Path

    parts, size = [BUILTIN_TEXT], len(BUILTIN_TEXT)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size >= CALIBRATION_BYTES:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
    return "\n".join(parts)[:CALIBRATION_BYTES]
