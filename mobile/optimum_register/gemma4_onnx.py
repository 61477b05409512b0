"""optimum-cli finds `optimum-cli export gemma4` here (PEP 420 namespace optimum.commands.register)."""

from gemma4_onnx.mobile.optimum_command import REGISTER_COMMANDS  # noqa: F401
