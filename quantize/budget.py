"""Spending a bit budget where measurement says it pays (recipes with ``budget_bits``).

Every int4 linear or expert tensor of a decoder block has a sensitivity: the relative error at its
block's output when only it is quantized (``sensitivity``), at its planned int4 block size and at the
other int4 block sizes that divide its width. Each tensor thus has a few options, cheapest first: int4
with larger blocks (fewer scales), its planned int4, int4 with smaller blocks, int8 (whose error is taken
as none). Starting from every tensor's cheapest option, the step that buys the most error per extra bit
is taken next, over all tensors, while the average stored bits per linear weight stays within the budget:
the greedy answer to this multiple-choice knapsack, on each tensor's lower convex hull of (bits, error),
so that its steps come in decreasing value per bit. A tensor whose next step does not fit stays where it
is. With only the planned int4 and int8 measured, this is "move the most harmful tensors per extra bit to
int8".
"""

import heapq
from dataclasses import replace

from gemma4_onnx.errors import UsageError
from gemma4_onnx.quantize.blockwise import average_bits, bits_per_weight
from gemma4_onnx.quantize.plan import LINEAR_KINDS, Entry
from gemma4_onnx.quantize.recipe import BLOCK_SIZES, Decision
from gemma4_onnx.quantize.sensitivity import other_block_key

UPGRADE_BITS = 8
Option = tuple[float, float, Decision]  # (stored bits per weight, measured error, decision)


def upgradable(plan: list[Entry]) -> list[Entry]:
    return [e for e in plan if e.candidate.kind in LINEAR_KINDS and e.decision.bits == 4]


def options(entry: Entry, sensitivity: dict[str, float]) -> list[Option]:
    """A tensor's measured options on its lower convex hull of (bits, error), cheapest first."""
    planned, k = entry.decision, entry.candidate.shape[-1]
    measured: list[Option] = [(bits_per_weight(planned, k), sensitivity[entry.candidate.name], planned)]
    for block in BLOCK_SIZES:
        key = other_block_key(entry.candidate.name, block)
        if key in sensitivity:
            other = replace(planned, block_size=block)
            measured.append((bits_per_weight(other, k), sensitivity[key], other))
    upgraded = replace(planned, bits=UPGRADE_BITS)
    measured.append((bits_per_weight(upgraded, k), 0.0, upgraded))
    hull: list[Option] = []
    for option in sorted(measured, key=lambda o: (o[0], o[1])):
        if hull and option[1] >= hull[-1][1]:
            continue  # costs more and is no better
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], option):
            hull.pop()  # the middle option is above the line from its neighbours: never worth stopping at
        hull.append(option)
    return hull


def _slope(a: Option, b: Option) -> float:
    """Error bought per extra bit going from option a to option b."""
    return (a[1] - b[1]) / (b[0] - a[0])


def spend(plan: list[Entry], sensitivity: dict[str, float], budget: float, asked: bool = True) -> list[Entry]:
    """The plan with each measured int4 tensor at the option the budget buys, average bits ≤ ``budget``. A
    budget the user ``asked`` for that the rules alone already exceed is an error; a recipe's own budget
    then simply buys nothing (small models, where the int8 K/V projections weigh more)."""
    floor = average_bits(plan)
    if floor > budget and asked:
        raise UsageError(f"--budget-bits {budget:g} is below this recipe's own {floor:.3f} bits per linear weight")
    if floor > budget:
        return plan
    weights = {e.candidate.name: float(e.candidate.size) for e in plan if e.candidate.kind in LINEAR_KINDS}
    limit = budget * sum(weights.values())
    measured = {e.candidate.name: e for e in upgradable(plan) if e.candidate.name in sensitivity}  # in blocks
    hulls = {name: options(entry, sensitivity) for name, entry in measured.items()}
    at = {name: 0 for name in hulls}  # each tensor starts at its cheapest option
    spent = floor * sum(weights.values()) + sum(
        (hulls[n][0][0] - bits_per_weight(e.decision, e.candidate.shape[-1])) * weights[n]
        for n, e in measured.items())
    steps = [(-_slope(hull[0], hull[1]), name) for name, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(steps)
    while steps:
        _, name = heapq.heappop(steps)
        hull, i = hulls[name], at[name]
        extra = (hull[i + 1][0] - hull[i][0]) * weights[name]
        if spent + extra > limit:
            continue  # its later steps cost more still
        spent += extra
        at[name] = i + 1
        if i + 2 < len(hull):
            heapq.heappush(steps, (-_slope(hull[i + 1], hull[i + 2]), name))
    chosen = {name: _entry(measured[name], hulls[name][i], budget, sensitivity[name])
              for name, i in at.items() if hulls[name][i][2] != measured[name].decision}
    return [chosen.get(e.candidate.name, e) for e in plan]


def _entry(entry: Entry, option: Option, budget: float, planned_error: float) -> Entry:
    decision = option[2]
    rule = f"budget {budget:g} bits: int4 costs block error {planned_error:.2e}"
    if decision.bits != UPGRADE_BITS:
        rule += f", int4 block {decision.block_size} {option[1]:.2e}"
    return Entry(entry.candidate, decision, rule)
