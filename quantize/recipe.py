"""Quantization recipes: ordered rules over the checkpoint's weight names, kept as TOML data.

A recipe names tensors the way the checkpoint does (``model.language_model.layers.3.mlp.up_proj.weight``),
never by exported node names, which shift between exports. Rules are tried in order and the first
that matches a tensor decides for it; ``[default]`` decides for the rest::

    description = "..."
    [default]
    bits = 4                  # 4, 8 or "float" (kept as exported)
    block_size = 32           # a power of two, 16 … 256
    symmetric = true
    algorithm = "rtn"         # rtn | hqq | k-quant (onnxruntime's MatMulNBits quantizers) | gptq (calibrated)
    activations = "float"     # or "int8": MatMulNBits rounds its input to int8 (accuracy level 4). Much
                              # faster for 8-bit weights on CPU, which onnxruntime otherwise dequantizes on
                              # every call; costs accuracy, so measure it. Linear weights and the LM head only.

    [[rules]]
    name = "router"           # optional: how the plan and errors refer to the rule
    match = 'router\\.proj\\.weight$'    # an exact name, or a regular expression searched in the name
    layers = "0-3,29"         # optional: only these layer indices
    layer_types = ["full"]    # optional: sliding | full | shared | moe | vision | audio (the encoder towers)
    bits = "float"            # or any default key; or skip = true (left exactly as exported)
    optional = true           # may match nothing (family-specific rules of shared recipes)

A recipe may also set ``budget_bits = B`` (top level): after the rules decide, the int4 decoder-block
tensors whose quantization costs the most at their block's output (measured on calibration text,
``sensitivity``) move to int8, most harmful per extra bit first, while the average stored bits per linear weight stays
within B. The built-in ``auto`` recipe takes B from ``--budget-bits``.

Every key is checked for its type and range before anything uses it (an integer is not a float, a
bool is not a string): unknown keys, values of the wrong type, bad regular expressions, impossible bit
widths or block sizes, and (against a model) rules that match no tensor are one-line errors naming the
recipe, the rule and the key. Layer ranges are kept as ranges (``0-4000000000`` costs two integers).
"""

import re
import re._parser as re_parser
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from gemma4_onnx.errors import UsageError
from gemma4_onnx.user_files import regular_file

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("rtn", "hqq", "k-quant", "gptq")
LAYER_TYPES = ("sliding", "full", "shared", "moe", "vision", "audio")
ACTIVATIONS = ("float", "int8")
DECISION_KEYS = ("bits", "block_size", "symmetric", "algorithm", "activations")
RULE_KEYS = ("name", "match", "layers", "layer_types", "skip", "optional", *DECISION_KEYS)
TOP_KEYS = ("description", "default", "rules", "budget_bits")
MAX_BUDGET_BITS = 32.0
MAX_RECIPE_BYTES = 1 << 20  # the built-in recipes are ~3 KB
MAX_LAYER = (1 << 31) - 1
MAX_TEXT = 4096  # characters of a name, pattern or description


@dataclass(frozen=True)
class Decision:
    """What happens to one tensor. ``bits is None``: kept in float."""

    bits: int | None = 4
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "rtn"
    activations: str = "float"

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def as_dict(self) -> dict[str, Any]:
        if self.bits is None:
            return {"bits": "float"}
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "algorithm": self.algorithm, "activations": self.activations}


@dataclass(frozen=True)
class LayerSet:
    """Layer indices as inclusive ranges, tested arithmetically: ``0-4000000000`` holds two integers."""

    spans: tuple[tuple[int, int], ...]

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and any(low <= layer <= high for low, high in self.spans)


@dataclass(frozen=True)
class Rule:
    name: str
    match: str
    pattern: re.Pattern[str]
    layers: LayerSet | None
    layer_types: frozenset[str] | None
    skip: bool
    optional: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def matches(self, tensor: str, layer: int | None, layer_types: set[str]) -> bool:
        if tensor != self.match and not self.pattern.search(tensor):
            return False
        if self.layers is not None and (layer is None or layer not in self.layers):
            return False
        return self.layer_types is None or bool(self.layer_types & layer_types)

    def decide(self, default: Decision) -> Decision:
        return Decision(bits=None) if self.skip else replace(default, **self.overrides)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    default: Decision
    rules: tuple[Rule, ...]
    budget_bits: float | None = None


def _fail(recipe: str, where: str, message: str) -> UsageError:
    return UsageError(f"recipe {recipe}: {where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decision_fields(recipe: str, where: str, table: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in DECISION_KEYS:
        if key not in table:
            continue
        value = table[key]
        if key == "bits":
            if value == "float":
                value = None
            elif not _is_int(value) or value not in BITS:
                raise _fail(recipe, where, f"bits must be 4, 8 or \"float\", got {_shown(value)}")
        elif key == "block_size" and (not _is_int(value) or value not in BLOCK_SIZES):
            raise _fail(recipe, where, f"block_size must be one of {BLOCK_SIZES} (an integer), got {_shown(value)}")
        elif key == "symmetric" and not isinstance(value, bool):
            raise _fail(recipe, where, f"symmetric must be true or false, got {_shown(value)}")
        elif key == "algorithm" and not (isinstance(value, str) and value in ALGORITHMS):
            raise _fail(recipe, where, f"algorithm must be one of {', '.join(ALGORITHMS)}, got {_shown(value)}")
        elif key == "activations" and not (isinstance(value, str) and value in ACTIVATIONS):
            raise _fail(recipe, where, f"activations must be \"float\" or \"int8\", got {_shown(value)}")
        out[key] = value
    return out


def _shown(value: Any) -> str:
    """A value as an error shows it: its TOML type, and its text cut short."""
    text = repr(value)
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__)
    return f"{kind} {text[:40] + '…' if len(text) > 40 else text}"


REPEATS = (re_parser.MAX_REPEAT, re_parser.MIN_REPEAT, re_parser.POSSESSIVE_REPEAT)


def _backtracking(items: Any, inside_repeat: bool) -> str | None:
    """What in a parsed regular expression can backtrack exponentially: a repetition or an alternation
    inside a repetition, or a backreference; None when there is none."""
    for op, value in items:
        if op == re_parser.GROUPREF:
            return "has a backreference"
        if op in REPEATS:
            _, high, body = value
            repeated = high > 1
            if repeated and inside_repeat:
                return "repeats a repetition"
            if found := _backtracking(body, inside_repeat or repeated):
                return found
        elif op == re_parser.BRANCH:
            if inside_repeat:
                return "repeats an alternation"
            for branch in value[1]:
                if found := _backtracking(branch, inside_repeat):
                    return found
        elif op in (re_parser.SUBPATTERN, re_parser.ATOMIC_GROUP, re_parser.ASSERT, re_parser.ASSERT_NOT):
            body = value[-1]
            if found := _backtracking(body, inside_repeat):
                return found
    return None


MAX_REPEATS = 3  # k repetitions in a row can take n^k steps on a name of n characters


def _repeats(items: Any) -> int:
    """How many repetitions a parsed regular expression holds, at any depth."""
    count = 0
    for op, value in items:
        if op in REPEATS:
            count += (value[1] > 1) + _repeats(value[2])
        elif op == re_parser.BRANCH:
            count += sum(_repeats(branch) for branch in value[1])
        elif op in (re_parser.SUBPATTERN, re_parser.ATOMIC_GROUP, re_parser.ASSERT, re_parser.ASSERT_NOT):
            count += _repeats(value[-1])
    return count


def _slow_pattern(match: str) -> str | None:
    """Why matching ``match`` can take exponential or high-degree polynomial time, or None."""
    parsed = re_parser.parse(match).data
    if found := _backtracking(parsed, inside_repeat=False):
        return f"{found}, which can take exponential time"
    if (repeats := _repeats(parsed)) > MAX_REPEATS:
        return f"has {repeats} repetitions (more than {MAX_REPEATS} can take n^{repeats} steps on a name)"
    return None


LAYER_SPAN = re.compile(r"\s*(\d{1,10})\s*(?:-\s*(\d{1,10})\s*)?")


def _layers(recipe: str, where: str, spec: Any) -> LayerSet:
    """``layers``: an index, or a string of indices and inclusive ranges ("0-3,7")."""
    if _is_int(spec) and 0 <= spec <= MAX_LAYER:
        return LayerSet(((spec, spec),))
    if not isinstance(spec, str) or len(spec) > MAX_TEXT:
        raise _fail(recipe, where, f"layers must be like \"0-3,7\", got {_shown(spec)}")
    spans = []
    for part in spec.split(","):
        m = LAYER_SPAN.fullmatch(part)
        low, high = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if not m or high < low or high > MAX_LAYER:
            raise _fail(recipe, where, f"layers must be like \"0-3,7\" (indices 0 to {MAX_LAYER}, ranges low-high), "
                                       f"got {spec[:60]!r}")
        spans.append((low, high))
    return LayerSet(tuple(spans))


def _text(recipe: str, where: str, key: str, value: Any, printable: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (printable and not value.isprintable()):
        raise _fail(recipe, where, f"{key} must be a {'printable ' if printable else ''}string of at most {MAX_TEXT} "
                                   f"characters, got {_shown(value)}")
    return value


def _keys(names: list[str]) -> str:
    return ", ".join(name if name.isprintable() else repr(name) for name in names)[:200]


def _table(recipe: str, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(recipe, where, f"must be a table, got {_shown(value)}")
    return value


def _rule(recipe: str, index: int, table: Any) -> Rule:
    position = f"rules[{index}]"
    table = _table(recipe, position, table)
    label = _text(recipe, position, "name", table["name"], printable=True) if "name" in table else f"rule {index + 1}"
    where = f"rule '{label[:60]}'"
    if unknown := sorted(set(table) - set(RULE_KEYS)):
        raise _fail(recipe, where, f"unknown key(s) {_keys(unknown)}")
    if "match" not in table:
        raise _fail(recipe, where, "needs 'match'")
    match = _text(recipe, where, "match", table["match"])
    try:
        pattern = re.compile(match)
        slow = _slow_pattern(match)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _fail(recipe, where, f"bad regular expression {match[:60]!r} ({exc})") from None
    if slow:
        raise _fail(recipe, where, f"regular expression {match[:60]!r} {slow} (Python's re has no time limit): "
                                   "write it without")
    types = table.get("layer_types")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)
                              or set(types) - set(LAYER_TYPES)):
        raise _fail(recipe, where, f"layer_types must be a list of {', '.join(LAYER_TYPES)}, got {_shown(types)}")
    skip, optional = table.get("skip", False), table.get("optional", False)
    if not isinstance(skip, bool) or not isinstance(optional, bool):
        raise _fail(recipe, where, f"skip and optional must be true or false, got {_shown(skip)}, {_shown(optional)}")
    overrides = _decision_fields(recipe, where, table)
    if skip and overrides:
        raise _fail(recipe, where, "skip = true cannot be combined with " + ", ".join(overrides))
    return Rule(name=label, match=match, pattern=pattern,
                layers=_layers(recipe, where, table["layers"]) if "layers" in table else None,
                layer_types=frozenset(types) if types is not None else None, skip=skip, optional=optional,
                overrides=overrides)


def parse_recipe(name: str, text: str, source: str | None = None) -> Recipe:
    """``source``: how errors name the recipe (its file), ``name`` by default."""
    label = source or name
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, and an integer of more than 4300 digits
        raise UsageError(f"recipe {label}: not valid TOML ({str(exc)[:200]})") from None
    if unknown := sorted(set(data) - set(TOP_KEYS)):
        raise _fail(label, "top level", f"unknown key(s) {_keys(unknown)}")
    default_table = _table(label, "[default]", data.get("default", {}))
    if unknown := sorted(set(default_table) - set(DECISION_KEYS)):
        raise _fail(label, "[default]", f"unknown key(s) {_keys(unknown)}")
    default = Decision(**_decision_fields(label, "[default]", default_table))
    rule_tables = data.get("rules", [])
    if not isinstance(rule_tables, list):
        raise _fail(label, "rules", f"must be an array of tables ([[rules]]), got {_shown(rule_tables)}")
    rules = tuple(_rule(label, i, table) for i, table in enumerate(rule_tables))
    description = _text(label, "top level", "description", data.get("description", ""))
    budget = data.get("budget_bits")
    if budget is not None:
        budget = _budget(label, "budget_bits", budget)
    return Recipe(name, description, default, rules, budget)


def _budget(recipe: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_BUDGET_BITS:
        raise _fail(recipe, where, f"must be a number of bits in (0, {MAX_BUDGET_BITS:g}], got {_shown(value)}")
    return float(value)


BUILTIN = ("int8", "int4", "int4-mobile", "auto")
NEEDS_BUDGET = "auto"


def load_recipe(spec: str, budget_bits: float | None = None) -> Recipe:
    """A built-in recipe by name, or a recipe file (``*.toml``); ``budget_bits`` overrides the recipe's."""
    if spec in BUILTIN:
        text = resources.files("gemma4_onnx.quantize").joinpath(f"recipes/{spec}.toml").read_text()
        recipe = parse_recipe(spec, text)
    elif Path(spec).suffix == ".toml":
        recipe = parse_recipe(Path(spec).stem, recipe_file_text(Path(spec)), source=f"file {spec}")
    else:
        raise UsageError(f"unknown recipe '{spec}': use one of {', '.join(BUILTIN)}, or a .toml file")
    if budget_bits is not None:
        recipe = replace(recipe, budget_bits=_budget(recipe.name, "--budget-bits", budget_bits))
    if spec == NEEDS_BUDGET and recipe.budget_bits is None:
        raise UsageError("recipe auto needs --budget-bits B (average stored bits per linear weight, e.g. 4.8)")
    return recipe


def recipe_file_text(path: Path) -> str:
    """A recipe file's text: a regular file of at most ``MAX_RECIPE_BYTES``, in UTF-8."""
    info = regular_file(path, "recipe file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise UsageError(f"recipe file {path} has {info.st_size} bytes (a recipe has at most {MAX_RECIPE_BYTES})")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"recipe file {path} cannot be read ({exc.strerror})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UsageError(f"recipe file {path} has more than {MAX_RECIPE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"recipe file {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start})") from None
