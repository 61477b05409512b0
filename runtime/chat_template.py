"""The checkpoint's chat template around a prompt: ``generate`` sends the user's text as one user turn and
asks for the model's turn, as transformers' ``apply_chat_template(messages, add_generation_prompt=True)``
does. The template is the checkpoint's own (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``), rendered in a sandbox; a checkpoint without one (base models, the fixtures)
gets the prompt as it is. Media markers (``<|image|>``, ``<|audio|>``) pass through it as text."""

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from gemma4_onnx.errors import UsageError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / TOKENIZER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def special_token(config: dict[str, Any], name: str) -> str:
    """A special token's text from a tokenizer config (a string, or an AddedToken dict)."""
    value = config.get(name) or ""
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The package's chat template (its own file, or in its tokenizer ``config``), or None."""
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": …}, …]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def render(template: str, config: dict[str, Any], prompt: str) -> str:
    """``prompt`` as one user turn followed by the opening of the model's turn."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UsageError(f"the checkpoint's chat template refused the prompt: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda format: datetime.now().strftime(format))
    try:
        return environment.from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=special_token(config, "bos_token"), eos_token=special_token(config, "eos_token"))
    except TemplateError as error:
        raise UsageError(f"the checkpoint's chat template does not render: {error}") from None
