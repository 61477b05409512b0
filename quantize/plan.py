"""A recipe resolved against one package: every candidate tensor → its decision and the rule behind it.

Candidates are the weights quantization can act on, found by their checkpoint names: decoder linear
weights (q/k/v/o, MLP, double-wide MLP, per-layer gate and projection), the MoE router and experts,
the token embedding (also the tied LM head) and the per-layer embedding table. Norms, scales and
``layer_scalar`` are never candidates.

Each decision is then fitted to the kernel that will run it (``fitted``), and the fit is recorded in the
plan beside the rule, because a checkpoint's widths need not be whole numbers of the recipe's blocks:

- MatMulNBits (linear weights, the LM head, MoE experts, tower weights) takes any K: the last block of a
  row is padded with zeros, which multiply nothing. The stored bits per weight count the padding.
- GatherBlockQuantized (the token embedding, read from the LM head's bytes) is given the padded rows and
  its output is sliced back to the hidden width; at 4 bits with an odd number of blocks per row it gets
  its own zero points (MatMulNBits pads each row's to a whole byte, GatherBlockQuantized packs them
  across rows).
- The PLE table is dequantized by standard ops, so any block runs, but no block may straddle two layers'
  slices: its block divides the per-layer width P (the recipe's if it does, else the divisor nearest to
  it), and 4-bit blocks must fill whole bytes: an odd P keeps the table at 8 bits.
"""

import math
import re
from dataclasses import dataclass, replace
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
    refit: str | None = None  # why the decision differs from the rule's: the PLE's blocks (``fitted``)

    @property
    def fit(self) -> str | None:
        """How the tensor's width fits its kernel, in words, where it is not whole blocks (module docstring);
        derived from the decision, so a decision the budget changes later says its own."""
        notes = ([self.refit] if self.refit else []) + padding_notes(self.candidate, self.decision)
        return "; ".join(notes) or None

    def as_dict(self) -> dict[str, Any]:
        fit = {"fit": self.fit} if self.fit else {}
        return {"tensor": self.candidate.name, "kind": self.candidate.kind, "shape": list(self.candidate.shape),
                "layer": self.candidate.layer, **self.decision.as_dict(), "rule": self.rule, **fit}


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
        plan.append(fitted(Entry(candidate, first.decide(recipe.default) if first else recipe.default,
                                 first.name if first else "default"), geometry.ple_dim))
    if unused := [name for name, count in used.items() if count == 0]:
        raise UsageError(f"recipe {recipe.name}: rule '{unused[0]}' matches no tensor of this model")
    return plan


def fitted(entry: Entry, ple_dim: int) -> Entry:
    """``entry`` with its decision fitted to the kernel that runs it: only the PLE table's blocks change (to
    divide the per-layer width ``ple_dim``); padding is said by ``Entry.fit``."""
    if entry.decision.bits is None or entry.candidate.kind != "ple":
        return entry
    return _fitted_ple(entry, ple_dim)


def padding_notes(candidate: Candidate, decision: Decision) -> list[str]:
    """What MatMulNBits and GatherBlockQuantized do with a width that is not whole blocks (not the PLE's)."""
    if decision.bits is None or candidate.kind == "ple":
        return []
    k, block = candidate.shape[-1], decision.block_size
    blocks = -(-k // block)
    notes = []
    if k % block:
        notes.append(f"K = {k} is not a multiple of the {block}-block: the last block of each row is padded with "
                     f"zeros to {blocks * block} (MatMulNBits pads it; the zeros multiply nothing)")
        if candidate.kind == "embedding":
            notes.append(f"the embedding lookup (GatherBlockQuantized) reads the padded rows and slices them to {k}")
    if candidate.kind == "embedding" and decision.bits == 4 and blocks % 2:
        notes.append(f"{blocks} 4-bit blocks per row (odd): GatherBlockQuantized gets its own zero points, packed "
                     "across rows")
    return notes


def _fitted_ple(entry: Entry, ple_dim: int) -> Entry:
    decision = entry.decision
    assert decision.bits is not None
    block = decision.block_size
    if ple_dim % block == 0:
        return entry
    divisors = [d for d in range(1, ple_dim + 1) if ple_dim % d == 0 and (decision.bits == 8 or d % 2 == 0)]
    if not divisors:
        wider = replace(entry, decision=replace(decision, bits=8))
        narrowed = _fitted_ple(wider, ple_dim)
        why = (f"the per-layer width {ple_dim} is odd and a 4-bit block of it would not fill whole bytes: kept at "
               "8 bits")
        return replace(narrowed, refit=why + (f"; {narrowed.refit}" if narrowed.refit else ""))
    chosen = ple_block(ple_dim, block, divisors)
    return replace(entry, decision=replace(decision, block_size=chosen),
                   refit=f"blocks of {chosen}, not {block}: a block must divide the per-layer width {ple_dim} "
                       "(none straddles two layers' slices); the PLE table is dequantized by standard ops, "
                       "which take any block")


def ple_block(ple_dim: int, block: int, divisors: list[int]) -> int:
    """The PLE's block: the largest divisor of P not above the recipe's block, unless it is under half of it
    (scales would cost too much) and a larger divisor exists, which is then the smallest larger one."""
    below = max((d for d in divisors if d <= block), default=None)
    above = min((d for d in divisors if d > block), default=None)
    if below is not None and (above is None or 2 * below >= block):
        return below
    assert above is not None, f"no block divides {ple_dim}"
    return above
