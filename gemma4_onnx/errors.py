"""User-facing failures. Each one is reported as a single line naming the problem; no traceback
unless ``--debug``. Anything else escaping a command is a bug in this tool."""


class Gemma4OnnxError(Exception):
    """A failure caused by the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(Gemma4OnnxError):
    """config.json is missing, malformed, or describes something this tool does not export."""


class UnknownVariantError(ConfigError):
    """A variant name that the registry does not know."""


class CheckpointError(Gemma4OnnxError):
    """A checkpoint's files or tensors are missing, malformed or inconsistent with its config."""


class UsageError(Gemma4OnnxError):
    """An argument value that cannot work (bad path, existing output, impossible option)."""


class MediaError(UsageError):
    """An image or audio file that cannot be read, or is too large or too long to use."""


class NotBuiltYet(Gemma4OnnxError):
    """A stage of the toolchain that later work fills in."""

    exit_code = 3

    def __init__(self, stage: str) -> None:
        super().__init__(f"'{stage}' is not built yet in this version of gemma4-onnx")
        self.stage = stage


class PackageError(UsageError):
    """A package directory that is incomplete, tampered with, or unsafe to hand to onnx or onnxruntime."""


class DiskFullError(Gemma4OnnxError):
    """The filesystem refused more bytes while an output was being written; nothing was published."""
