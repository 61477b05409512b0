"""Spending a bit budget where measurement says it pays (recipes with ``budget_bits``).

Every int4 linear or expert tensor of a decoder block has a sensitivity: the relative error at its
block's output when only it is quantized (``sensitivity``). Moving tensor t to int8 removes most of that
error for n_t·Δbits extra bits, so tensors move in order of sensitivity per extra bit while the average
stored bits per linear weight stays within the budget (the greedy answer to this knapsack; exact when the
tensors are small next to the budget).
"""

from dataclasses import replace

from gemma4_onnx.errors import UsageError
from gemma4_onnx.quantize.blockwise import average_bits, bits_per_weight
from gemma4_onnx.quantize.plan import LINEAR_KINDS, Entry

UPGRADE_BITS = 8


def upgradable(plan: list[Entry]) -> list[Entry]:
    return [e for e in plan if e.candidate.kind in LINEAR_KINDS and e.decision.bits == 4]


def spend(plan: list[Entry], sensitivity: dict[str, float], budget: float, asked: bool = True) -> list[Entry]:
    """The plan with the most sensitive int4 tensors at int8, average bits ≤ ``budget``. A budget the
    user ``asked`` for that the rules alone already exceed is an error; a recipe's own budget then
    simply buys nothing (small models, where the int8 K/V projections weigh more)."""
    floor = average_bits(plan)
    if floor > budget and asked:
        raise UsageError(f"--budget-bits {budget:g} is below this recipe's own {floor:.3f} bits per linear weight")
    weights = {e.candidate.name: float(e.candidate.size) for e in plan if e.candidate.kind in LINEAR_KINDS}
    total_weights = sum(weights.values())
    spent = floor * total_weights
    chosen: dict[str, Entry] = {}

    def extra(entry: Entry) -> float:
        upgraded = replace(entry.decision, bits=UPGRADE_BITS)
        return (bits_per_weight(upgraded) - bits_per_weight(entry.decision)) * weights[entry.candidate.name]

    measured = [e for e in upgradable(plan) if e.candidate.name in sensitivity]  # tensors outside the blocks stay
    for entry in sorted(measured, key=lambda e: -sensitivity[e.candidate.name] / extra(e)):
        if spent + extra(entry) <= budget * total_weights:
            spent += extra(entry)
            rule = f"budget {budget:g} bits: int4 costs block error {sensitivity[entry.candidate.name]:.2e}"
            chosen[entry.candidate.name] = Entry(entry.candidate, replace(entry.decision, bits=UPGRADE_BITS), rule)
    return [chosen.get(e.candidate.name, e) for e in plan]
