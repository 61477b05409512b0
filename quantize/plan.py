"""A recipe resolved against one package: every candidate tensor → its decision and the rule behind it.

Candidates are the weights quantization can act on, found by their checkpoint names: decoder linear
weights (q/k/v/o, MLP, double-wide MLP, per-layer gate and projection), the MoE router and experts,
the token embedding (also the tied LM head) and the per-layer embedding table. Norms, scales and
``layer_scalar`` are never candidates.
"""

import math
import re
from dataclasses import dataclass
from typing import Any

from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.geometry import TextGeometry
from gemma4_onnx.quantize.recipe import Decision, Recipe

PREFIX = "model.language_model."
LAYER = re.compile(r"layers\.(\d+)\.")
LINEAR_SUFFIXES = ("_proj.weight", "per_layer_input_gate.weight", "per_layer_projection.weight")
LINEAR_KINDS = ("linear", "router", "experts")  # what "bits per linear weight" averages over
# Encoder towers: the 2-D weights their graphs multiply with (MatMul through a Transpose), by checkpoint name.
TOWERS = {"vision": ("model.vision_tower.", "model.embed_vision."),
          "audio": ("model.audio_tower.", "model.embed_audio.")}
TOWER_LINEAR_SUFFIXES = ("linear.weight", "embedding_projection.weight", "patch_embedder.input_proj.weight",
                         "input_proj_linear.weight")


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # linear | router | experts | embedding | ple | vision | audio
    shape: tuple[int, ...]
    layer: int | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Entry:
    candidate: Candidate
    decision: Decision
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return {"tensor": self.candidate.name, "kind": self.candidate.kind, "shape": list(self.candidate.shape),
                "layer": self.candidate.layer, **self.decision.as_dict(), "rule": self.rule}


def classify(name: str, shape: tuple[int, ...]) -> str | None:
    for tower, prefixes in TOWERS.items():
        if name.startswith(prefixes):
            return tower if len(shape) == 2 and name.endswith(TOWER_LINEAR_SUFFIXES) else None
    if not name.startswith(PREFIX):
        return None
    if name == PREFIX + "embed_tokens.weight":
        return "embedding"
    if name == PREFIX + "embed_tokens_per_layer.weight":
        return "ple"
    if ".experts." in name:
        return "experts"
    if name.endswith("router.proj.weight"):
        return "router"
    if len(shape) == 2 and name.endswith(LINEAR_SUFFIXES):
        return "linear"
    return None


def candidates(shapes: dict[str, tuple[int, ...]]) -> list[Candidate]:
    out = []
    for name, shape in shapes.items():
        kind = classify(name, shape)
        if kind is not None:
            match = LAYER.search(name) if kind not in TOWERS else None  # layer ranges address decoder layers
            out.append(Candidate(name, kind, shape, int(match.group(1)) if match else None))
    return out


def layer_types(candidate: Candidate, geometry: TextGeometry) -> set[str]:
    if candidate.kind in TOWERS:
        return {candidate.kind}
    if candidate.layer is None:
        return set()
    spec = geometry.layers[candidate.layer]
    types: set[str] = {spec.attention}
    if spec.kv_mode == "reuse":
        types.add("shared")
    if candidate.kind in ("experts", "router"):
        types.add("moe")
    return types


def resolve(recipe: Recipe, shapes: dict[str, tuple[int, ...]], geometry: TextGeometry) -> list[Entry]:
    """The plan; a rule that matches no candidate tensor of this model is an error naming the rule."""
    used = {rule.name: 0 for rule in recipe.rules if not rule.optional}
    plan = []
    for candidate in candidates(shapes):
        types = layer_types(candidate, geometry)
        matching = [rule for rule in recipe.rules if rule.matches(candidate.name, candidate.layer, types)]
        for rule in matching:
            if rule.name in used:
                used[rule.name] += 1
        first = matching[0] if matching else None
        plan.append(Entry(candidate, first.decide(recipe.default) if first else recipe.default,
                          first.name if first else "default"))
    if unused := [name for name, count in used.items() if count == 0]:
        raise UsageError(f"recipe {recipe.name}: rule '{unused[0]}' matches no tensor of this model")
    return plan
