"""The checkpoint's chat template around a prompt: ``generate`` sends the user's text as one user turn and
asks for the model's turn, as transformers' ``apply_chat_template(messages, add_generation_prompt=True)``
does. The template is the checkpoint's own (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``); a checkpoint without one (base models, the fixtures) gets the prompt as it is.
Media markers (``<|image|>``, ``<|audio|>``) pass through it as text.

Both files come from the package, read only as the manifest lists them (``package_files.read_side_file``),
and a package may be hostile: the tokenizer config is checked field by field, and the template is
rendered in jinja2's immutable sandbox with limits on what it may do: no ``include``/``import``/
``extends`` (there is no loader), bounded ranges, numbers, strings and output, and a wall-clock limit
checked on every line the render runs (a trace function of this thread: no signals, so it works in any
thread). Every failure is one line naming the template or the field."""

import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import wraps
from pathlib import Path
from types import FrameType
from typing import Any

from gemma4_onnx.errors import PackageError, UsageError
from gemma4_onnx.runtime.package_files import read_side_file
from gemma4_onnx.schema import describe_value, loads_json

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_TEMPLATE_BYTES = 1 << 20  # Gemma's own template is ~10 KB
MAX_CONFIG_BYTES = 16 << 20
RENDER_SECONDS = 2.0  # a real template renders one turn in milliseconds
MAX_RENDERED = 1 << 20  # characters of rendered text, and of any string the template builds
MAX_RANGE = 10_000  # items of range()
MAX_ARGUMENT = 10_000  # magnitude of a number passed to a filter or method (widths, counts)
MAX_INT_BITS = 4096  # of an integer the template computes
RENDER_MEMORY = 2 << 30  # address space the render may add (a backstop: the limits above come first)


def _fail(directory: Path, problem: str) -> PackageError:
    return PackageError(f"{directory}: {problem}")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def read_text_file(directory: Path, manifest: dict[str, Any], name: str, limit: int) -> str | None:
    """A side file's text (UTF-8, at most ``limit`` bytes), read as the manifest lists it; None if absent."""
    entry = manifest["files"].get(name)
    if entry is not None and entry["bytes"] > limit:
        raise _fail(directory, f"{name} has {entry['bytes']} bytes (at most {limit})")
    data = read_side_file(directory, manifest, name)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(directory, f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None


def tokenizer_config(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The package's ``tokenizer_config.json`` (``{}`` without one), its fields checked (``check_tokenizer_config``)."""
    text = read_text_file(directory, manifest, TOKENIZER_CONFIG, MAX_CONFIG_BYTES)
    if text is None:
        return {}
    try:
        config = loads_json(text)
    except ValueError as exc:
        raise _fail(directory, f"{TOKENIZER_CONFIG} is not valid JSON ({_one_line(str(exc), 120)})") from None
    if problem := tokenizer_config_problem(config):
        raise _fail(directory, f"{TOKENIZER_CONFIG}: {problem}")
    return config


def _token_problem(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return None
    return f"must be a string or an object with a string \"content\", got {describe_value(value)}"


def tokenizer_config_problem(config: Any) -> str | None:
    """What is wrong with the fields of a tokenizer config this tool reads, or None."""
    if not isinstance(config, dict):
        return f"must be a JSON object, got {describe_value(config)}"
    for name in ("bos_token", "eos_token"):
        if problem := _token_problem(config.get(name)):
            return f"{name} {problem}"
    if config.get("add_bos_token") is not None and not isinstance(config["add_bos_token"], bool):
        return f"add_bos_token must be true or false, got {describe_value(config['add_bos_token'])}"
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return None
    named = "chat_template must be a string or a list of {\"name\": string, \"template\": string}"
    if not isinstance(template, list):
        return f"{named}, got {describe_value(template)}"
    for i, item in enumerate(template):
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)):
            return f"chat_template[{i}]: {named}, got {describe_value(item)}"
    return None


def special_token(config: dict[str, Any], name: str) -> str:
    """A special token's text from a checked tokenizer config (a string, or an AddedToken dict)."""
    value = config.get(name) or ""
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def chat_template(directory: Path, manifest: dict[str, Any], config: dict[str, Any]) -> str | None:
    """The package's chat template (its own file, or in its tokenizer ``config``), or None."""
    template = read_text_file(directory, manifest, CHAT_TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
    if template is not None:
        return template
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": …}, …]
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    if isinstance(template, str) and len(template) > MAX_TEMPLATE_BYTES:
        raise _fail(directory, f"{TOKENIZER_CONFIG}: chat_template has {len(template)} characters (at most "
                               f"{MAX_TEMPLATE_BYTES})")
    return template


class _Limit(BaseException):
    """A render limit reached. A BaseException, so no ``except Exception`` on the way can swallow it."""


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple | dict) and len(value) > MAX_RENDERED:
        raise _Limit(f"builds a value of more than {MAX_RENDERED} items")
    return value


def _check_number(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARGUMENT:
        raise _Limit(f"passes the number {value if value.bit_length() < 64 else '(huge)'} to a function "
                     f"(at most {MAX_ARGUMENT})")


def _check_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        _check_number(value)
        if isinstance(value, str) and len(value) > MAX_RENDERED:
            raise _Limit(f"passes a string of more than {MAX_RENDERED} characters to a function")


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too large, before Python computes it."""
    numbers = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
    if operator == "*":
        if len(numbers) == 2 and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _Limit(f"computes an integer of more than {MAX_INT_BITS} bits")
        if numbers and max(_sized(left), _sized(right)) * max(abs(n) for n in numbers) > MAX_RENDERED:
            raise _Limit(f"repeats a string or list past {MAX_RENDERED} items")
    elif operator == "**" and len(numbers) == 2 and abs(left) > 1 and (
            right > MAX_INT_BITS or right * left.bit_length() > MAX_INT_BITS):
        raise _Limit(f"computes an integer of more than {MAX_INT_BITS} bits")
    elif operator == "+" and _sized(left) + _sized(right) > MAX_RENDERED:
        raise _Limit(f"builds a value of more than {MAX_RENDERED} items")
    elif operator == "%" and isinstance(left, str):
        _check_arguments(right if isinstance(right, tuple) else (right,), {})
        if any(int(width) > MAX_ARGUMENT for width in _digit_runs(left)):
            raise _Limit(f"formats with a width above {MAX_ARGUMENT}")


def _digit_runs(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _check_format_call(function: Any) -> None:
    """``"{:>999999999}".format(x)``: refused by its widths before it allocates."""
    bound = getattr(function, "__wrapped__", function)  # the sandbox wraps str.format
    text = getattr(bound, "__self__", None)
    if getattr(bound, "__name__", None) in ("format", "format_map") and isinstance(text, str) and any(
            int(width) > MAX_ARGUMENT for width in _digit_runs(text)):
        raise _Limit(f"formats with a width above {MAX_ARGUMENT}")


def bounded_range(*args: Any) -> range:
    items = range(*args)
    try:
        size = len(items)
    except OverflowError:  # more than 2^63 items
        raise _Limit(f"asks for a range of over 2^63 items (at most {MAX_RANGE})") from None
    if size > MAX_RANGE:
        raise _Limit(f"asks for a range of {size} items (at most {MAX_RANGE})")
    return items


def _bounded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(function)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args, kwargs)
        return _check_size(function(*args, **kwargs))
    return bounded


def _bounded_format(format_filter: Callable[..., str]) -> Callable[..., str]:
    """The ``format`` filter (``'%9d'|format(1)``), refused by its widths before it allocates."""
    @wraps(format_filter)
    def bounded(value: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(value, str) and any(int(width) > MAX_ARGUMENT for width in _digit_runs(value)):
            raise _Limit(f"formats with a width above {MAX_ARGUMENT}")
        _check_arguments(args, kwargs)
        return _check_size(format_filter(value, *args, **kwargs))
    return bounded


def _environment() -> Any:
    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.nodes import Concat
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Concat, frame: Frame) -> None:  # ``a ~ b``: checked once built
            self.write("environment.bounded_text(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_format_call(__obj)
            if __obj not in (bounded_range, Namespace, dict):  # range checks its size; the others hold values
                _check_arguments(args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

        @staticmethod
        def bounded_text(text: str) -> str:
            return _check_size(text)

    environment = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["format"] = _bounded_format(environment.filters["format"])
    environment.filters = {name: _bounded_filter(f) for name, f in environment.filters.items()}
    environment.globals["range"] = bounded_range
    return environment


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_Limit`` in whatever line of Python this thread runs once ``seconds`` have passed."""
    deadline = time.monotonic() + seconds

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Limit(f"takes more than {seconds:g} s to render")
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


@contextmanager
def _memory_limit(extra: int) -> Iterator[None]:
    """At most ``extra`` more bytes of address space while the template renders: a huge allocation is then a
    MemoryError rather than the machine's memory. A backstop for what the checks above do not foresee."""
    try:
        import resource  # POSIX only; elsewhere the checks above are the only limit

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as statm:  # Linux: the address space in use
            used = int(statm.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError, ValueError):
        yield
        return
    limit = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


UNLOADABLE = {"Include": "include", "Import": "import", "FromImport": "from … import", "Extends": "extends"}


def _refuse_loading(environment: Any, template: str) -> None:
    """A package's template is one self-contained file: no ``include``, ``import`` or ``extends``."""
    from jinja2 import nodes

    for node in environment.parse(template).find_all((nodes.Include, nodes.Import, nodes.FromImport,
                                                      nodes.Extends)):
        raise UsageError(f"the package's chat template uses {{% {UNLOADABLE[type(node).__name__]} %}} (line "
                         f"{node.lineno}): a package's template must be one self-contained file")


def render(template: str, config: dict[str, Any], prompt: str) -> str:
    """``prompt`` as one user turn followed by the opening of the model's turn."""
    from jinja2 import TemplateError

    def raise_exception(message: Any) -> None:
        raise UsageError(f"the package's chat template refused the prompt: {_one_line(message)}")

    environment = _environment()
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda format: datetime.now().strftime(str(format)[:100]))
    pieces: list[str] = []
    size = 0
    try:
        with _memory_limit(RENDER_MEMORY), _time_limit(RENDER_SECONDS):
            _refuse_loading(environment, template)
            compiled = environment.from_string(template)
            for piece in compiled.generate(
                    messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                    bos_token=special_token(config, "bos_token"), eos_token=special_token(config, "eos_token")):
                size += len(piece)
                if size > MAX_RENDERED:
                    raise _Limit(f"renders more than {MAX_RENDERED} characters")
                pieces.append(piece)
    except UsageError:
        raise
    except _Limit as limit:
        raise UsageError(f"the package's chat template {limit}") from None
    except RecursionError:
        raise UsageError("the package's chat template recurses too deeply (a macro calling itself?)") from None
    except MemoryError:
        raise UsageError("the package's chat template needs too much memory to render") from None
    except TemplateError as error:
        raise UsageError(f"the package's chat template does not render: {_one_line(str(error))}") from None
    except Exception as error:  # TypeError, ZeroDivisionError, …: whatever the template's own code raised
        raise UsageError(f"the package's chat template does not render: {type(error).__name__}: "
                         f"{_one_line(str(error))}") from None
    return "".join(pieces)
