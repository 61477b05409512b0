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

Unknown keys, bad regular expressions, impossible bit widths or block sizes, and (against a model)
rules that match no tensor are errors naming the rule.
"""

import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from gemma4_onnx.errors import UsageError

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("rtn", "hqq", "k-quant", "gptq")
LAYER_TYPES = ("sliding", "full", "shared", "moe", "vision", "audio")
ACTIVATIONS = ("float", "int8")
DECISION_KEYS = ("bits", "block_size", "symmetric", "algorithm", "activations")
RULE_KEYS = ("name", "match", "layers", "layer_types", "skip", "optional", *DECISION_KEYS)
TOP_KEYS = ("description", "default", "rules", "budget_bits")
MAX_BUDGET_BITS = 32.0


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
class Rule:
    name: str
    match: str
    pattern: re.Pattern[str]
    layers: frozenset[int] | None
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


def _decision_fields(recipe: str, where: str, table: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in DECISION_KEYS:
        if key not in table:
            continue
        value = table[key]
        if key == "bits":
            if value == "float":
                value = None
            elif value not in BITS or isinstance(value, bool):
                raise _fail(recipe, where, f"bits must be 4, 8 or \"float\", got {value!r}")
        elif key == "block_size" and (value not in BLOCK_SIZES or isinstance(value, bool)):
            raise _fail(recipe, where, f"block_size must be one of {BLOCK_SIZES}, got {value!r}")
        elif key == "symmetric" and not isinstance(value, bool):
            raise _fail(recipe, where, f"symmetric must be true or false, got {value!r}")
        elif key == "algorithm" and value not in ALGORITHMS:
            raise _fail(recipe, where, f"algorithm must be one of {', '.join(ALGORITHMS)}, got {value!r}")
        elif key == "activations" and value not in ACTIVATIONS:
            raise _fail(recipe, where, f"activations must be \"float\" or \"int8\", got {value!r}")
        out[key] = value
    return out


def _layers(recipe: str, where: str, spec: Any) -> frozenset[int]:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return frozenset([spec])
    if not isinstance(spec, str):
        raise _fail(recipe, where, f"layers must be like \"0-3,7\", got {spec!r}")
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise _fail(recipe, where, f"layers must be like \"0-3,7\", got {spec!r}")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return frozenset(out)


def parse_recipe(name: str, text: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe {name}: not valid TOML ({exc})") from None
    if unknown := sorted(set(data) - set(TOP_KEYS)):
        raise _fail(name, "top level", f"unknown key(s) {', '.join(unknown)}")
    default_table = data.get("default", {})
    if unknown := sorted(set(default_table) - set(DECISION_KEYS)):
        raise _fail(name, "[default]", f"unknown key(s) {', '.join(unknown)}")
    default = Decision(**_decision_fields(name, "[default]", default_table))
    rules = []
    for i, table in enumerate(data.get("rules", [])):
        label = table.get("name") or f"rule {i + 1}"
        where = f"rule '{label}'"
        if unknown := sorted(set(table) - set(RULE_KEYS)):
            raise _fail(name, where, f"unknown key(s) {', '.join(unknown)}")
        if "match" not in table:
            raise _fail(name, where, "needs 'match'")
        try:
            pattern = re.compile(table["match"])
        except (re.error, TypeError) as exc:
            raise _fail(name, where, f"bad regular expression {table['match']!r} ({exc})") from None
        types = table.get("layer_types")
        if types is not None and (not isinstance(types, list) or set(types) - set(LAYER_TYPES)):
            raise _fail(name, where, f"layer_types must be a list of {', '.join(LAYER_TYPES)}, got {types!r}")
        skip, optional = table.get("skip", False), table.get("optional", False)
        if not isinstance(skip, bool) or not isinstance(optional, bool):
            raise _fail(name, where, f"skip and optional must be true or false, got {skip!r}, {optional!r}")
        overrides = _decision_fields(name, where, table)
        if skip and overrides:
            raise _fail(name, where, "skip = true cannot be combined with " + ", ".join(overrides))
        rules.append(Rule(
            name=label, match=table["match"], pattern=pattern,
            layers=_layers(name, where, table["layers"]) if "layers" in table else None,
            layer_types=frozenset(types) if types is not None else None, skip=skip, optional=optional,
            overrides=overrides,
        ))
    budget = data.get("budget_bits")
    if budget is not None:
        budget = _budget(name, "budget_bits", budget)
    return Recipe(name, str(data.get("description", "")), default, tuple(rules), budget)


def _budget(recipe: str, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_BUDGET_BITS:
        raise _fail(recipe, where, f"must be a number of bits in (0, {MAX_BUDGET_BITS:g}], got {value!r}")
    return float(value)


BUILTIN = ("int8", "int4", "int4-mobile", "auto")
NEEDS_BUDGET = "auto"


def load_recipe(spec: str, budget_bits: float | None = None) -> Recipe:
    """A built-in recipe by name, or a recipe file (``*.toml``); ``budget_bits`` overrides the recipe's."""
    if spec in BUILTIN:
        text = resources.files("gemma4_onnx.quantize").joinpath(f"recipes/{spec}.toml").read_text()
        recipe = parse_recipe(spec, text)
    elif Path(spec).suffix == ".toml":
        if not Path(spec).is_file():
            raise UsageError(f"recipe file {spec} does not exist")
        recipe = parse_recipe(Path(spec).stem, Path(spec).read_text())
    else:
        raise UsageError(f"unknown recipe '{spec}': use one of {', '.join(BUILTIN)}, or a .toml file")
    if budget_bits is not None:
        recipe = replace(recipe, budget_bits=_budget(recipe.name, "--budget-bits", budget_bits))
    if spec == NEEDS_BUDGET and recipe.budget_bits is None:
        raise UsageError("recipe auto needs --budget-bits B (average stored bits per linear weight, e.g. 4.8)")
    return recipe
