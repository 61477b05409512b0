"""The quantization levers of docs/quantization.md: the budget's block-size options, sensitivities at the
model output, GPTQ in activation order, refitted scales, the sequential calibration walk, and the few-token
fallbacks of MoE experts."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4_onnx.quantize.budget import options, spend
from gemma4_onnx.quantize.plan import Candidate, Entry
from gemma4_onnx.quantize.recipe import Decision
from gemma4_onnx.quantize.sensitivity import other_block_key

INT4 = Decision(bits=4, block_size=32, symmetric=False, algorithm="gptq")


def test_options_keep_only_the_lower_convex_hull_of_bits_and_error() -> None:
    entry = Entry(Candidate("t", "linear", (64, 128), 0), INT4, "default")
    # block 16 buys less per bit than going straight from block 32 to int8: never worth stopping at
    sensitivity = {"t": 1e-3, other_block_key("t", 64): 3e-3, other_block_key("t", 16): 0.95e-3}
    assert [(o[2].bits, o[2].block_size) for o in options(entry, sensitivity)] == [(4, 64), (4, 32), (8, 32)]
    sensitivity[other_block_key("t", 16)] = 0.4e-3
    assert [(o[2].bits, o[2].block_size) for o in options(entry, sensitivity)] == [(4, 64), (4, 32), (4, 16), (8, 32)]


def test_budget_takes_cheaper_blocks_where_they_cost_little_and_spends_the_bits_where_they_pay() -> None:
    from gemma4_onnx.quantize.blockwise import average_bits

    plan = [Entry(Candidate(n, "linear", (1024, 128), 0), INT4, "default") for n in "abcd"]
    sensitivity = {"a": 1e-3, "b": 1e-5, "c": 1e-5, "d": 1e-5}
    for n, at64, at16 in [("a", 4e-3, 0.3e-3), ("b", 1.1e-5, 0.9e-5), ("c", 1.1e-5, 0.9e-5), ("d", 1.1e-5, 0.9e-5)]:
        sensitivity[other_block_key(n, 64)], sensitivity[other_block_key(n, 16)] = at64, at16
    floor = average_bits(plan)
    chosen = {e.candidate.name: e for e in spend(plan, sensitivity, floor)}
    # a's block 64 → 32 → 16 steps take 0.9375 of the 1.25 bits per weight the others' block 64 frees; the
    # rest buys one of them back its block 32 (the first by name: ties go in name order)
    assert chosen["a"].decision.block_size == 16 and chosen["a"].decision.bits == 4
    assert [chosen[n].decision.block_size for n in "bcd"] == [32, 64, 64]
    assert "int4 block 16" in chosen["a"].rule
    assert average_bits(list(chosen.values())) <= floor
    assert spend(plan, {n: sensitivity[n] for n in "abcd"}, floor) == plan  # int8 alone: no room, no change


def _weighted_error(w: np.ndarray, x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                    block: int) -> float:
    dequantized = (codes - np.repeat(zeros, block, axis=1)) * np.repeat(scales, block, axis=1)
    return float(np.linalg.norm((w - dequantized[:, :w.shape[1]]) @ x.T))


def test_gptq_in_activation_order_keeps_each_block_range_and_undoes_its_order() -> None:
    import torch

    from gemma4_onnx.quantize import gptq

    rng = np.random.default_rng(7)
    n, k, block = 40, 96, 32
    x = rng.standard_normal((500, k)) * np.exp(rng.uniform(-2, 2, k))  # inputs of very unequal energy
    x[:, 5] = 0
    w = rng.standard_normal((n, k))
    h = x.T @ x
    ordered = gptq.gptq(w, h, 4, block, False, act_order=True)
    again = gptq.gptq(w, h.astype(np.float32), 4, block, False, act_order=True)
    assert all(np.array_equal(a, b) for a, b in zip(ordered, again, strict=True))  # deterministic, any H dtype
    codes, scales, zeros = ordered
    w_dead = np.where(np.arange(k) == 5, 0.0, w).astype(np.float32)
    fixed = gptq._group_params(torch.from_numpy(w_dead.reshape(n, -1, block)), 15, False)
    np.testing.assert_array_equal(scales, fixed[0].numpy())  # ranges chosen on the weights as given
    np.testing.assert_array_equal(zeros, fixed[1].numpy())
    nearest = np.clip(np.round(w_dead / np.repeat(scales, block, 1)) + np.repeat(zeros, block, 1), 0, 15)
    # codes back in K order: below rounding to nearest on the same ranges (in order they would be far above)
    assert _weighted_error(w, x, codes, scales, zeros, block) < _weighted_error(w, x, nearest, scales, zeros, block)
    with gptq.reused_factors():  # a factor reused chunk by chunk carries its order
        chunks = [gptq.gptq(w[rows], h, 4, block, False, act_order=True)[0] for rows in (slice(0, 15), slice(15, n))]
    assert np.array_equal(np.concatenate(chunks), codes)


def test_experts_with_few_routed_tokens_fall_back(monkeypatch) -> None:
    from gemma4_onnx.quantize import calibration

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((30, 4)).astype(np.float32)
    expert = np.array([0] * 20 + [1] * 8 + [2] * 2)
    weight = np.ones(30, np.float32)
    monkeypatch.setattr(calibration, "MIN_ROUTED_PER_INPUT", 1.0)  # at least K = 4 tokens
    monkeypatch.setattr(calibration, "FEW_ROUTED_DAMPING", 0.0)
    statistics = calibration.ExpertHessians(rows, np.arange(30), expert, weight)
    assert statistics.reached == [0, 1] and list(statistics.routed) == [20, 8, 2]
    plain = statistics[[0, 1]]
    monkeypatch.setattr(calibration, "FEW_ROUTED_DAMPING", 2.0)
    damped = statistics[[0, 1]]
    for i, count in enumerate((20, 8)):
        np.testing.assert_allclose(np.diag(damped[i]), np.diag(plain[i]) * (1 + 2.0 * 4 / count), rtol=1e-6)
        off = ~np.eye(4, dtype=bool)
        np.testing.assert_array_equal(damped[i][off], plain[i][off])


@pytest.mark.slow  # a lever off by default (sensitivity.MEASURE_AT = "block"), minutes of decoder runs
def test_sensitivity_at_the_output_is_the_decoders_kl_with_that_tensor_rounded(exported, monkeypatch) -> None:
    """The block-by-block carry to the logits (KV shared across layers included) equals the whole decoder
    graph run with the tensor rounded to nearest."""
    from gemma4_onnx.builtin_text import calibration_text
    from gemma4_onnx.graphs.manifest import read_manifest
    from gemma4_onnx.quantize import sensitivity
    from gemma4_onnx.quantize.calibration import BlockWalk, calibration_tokens, embedded_windows
    from gemma4_onnx.quantize.float_tensors import PackageTensors
    from gemma4_onnx.quantize.graph_session import WeightFedSession
    from gemma4_onnx.runtime.parity import kl_sum

    _, package = exported("tiny-e2b")
    manifest = read_manifest(package)
    tensors = PackageTensors(package, manifest)
    monkeypatch.setattr(sensitivity, "TOKENS", 48)
    monkeypatch.setattr(sensitivity, "OTHER_BLOCKS", ())
    monkeypatch.setattr(sensitivity, "MEASURE_AT", "output")
    names = ["model.language_model.layers.1.self_attn.k_proj.weight",  # a KV producer that later layers reuse
             "model.language_model.layers.6.mlp.down_proj.weight"]
    entries = []
    for name in names:
        shape = next(tuple(t.dims) for f in (b["file"] for b in manifest["graphs"]["blocks"])
                     for t in onnx.load(package / f, load_external_data=False).graph.initializer if t.name == name)
        entries.append(Entry(Candidate(name, "linear", shape, int(name.split(".")[3])), INT4, "test"))
    assert sensitivity.measure_at(entries) == "output"
    measured = sensitivity.sensitivities(package, manifest, tensors, entries, calibration_text())
    tokens = calibration_tokens(package, calibration_text())[:48]
    walk = BlockWalk(package, manifest, tensors, tokens)
    (embedded,) = embedded_windows(package, manifest, tensors, [tokens])
    decoder_model = onnx.load(package / manifest["graphs"]["decoder"]["file"], load_external_data=False)
    decoder = WeightFedSession(decoder_model, tensors, "")
    feeds = {**embedded, "position_ids": np.arange(len(tokens), dtype=np.int64)[None]}
    for spec in walk.geometry.layers:
        if spec.owns_cache:
            for part in spec.cache_parts:
                feeds[f"past.{spec.index}.{part}"] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    (reference,) = decoder.run(["logits"], feeds)
    for entry in entries:
        rounded = sensitivity.fake_quantized(decoder.weights[entry.candidate.name], entry)
        (logits,) = decoder.run(["logits"], feeds, {entry.candidate.name: rounded})
        expected = kl_sum(reference, logits) / len(tokens)
        assert measured[entry.candidate.name] == pytest.approx(expected, rel=1e-3), entry.candidate.name
        assert expected > 0


@given(rows=st.integers(1, 9), blocks=st.integers(1, 4), experts=st.integers(0, 2), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_refitted_scales_keep_gptqs_codes_and_never_raise_the_weighted_error(rows, blocks, experts, seed) -> None:
    from gemma4_onnx.quantize import gptq

    rng = np.random.default_rng(seed)
    k, block = 16 * blocks, 16
    lead = (experts,) if experts else ()
    x = rng.standard_normal((*lead, 3 * k, k)) * np.exp(rng.uniform(-1.5, 1.5, k))
    w = rng.standard_normal((*lead, rows, k)).astype(np.float32)
    h = (np.swapaxes(x, -1, -2) @ x).astype(np.float32)
    plain = gptq.gptq(w, h.copy(), 4, block, False)
    try:
        gptq.REFIT_SCALES = True
        refit = gptq.gptq(w, h.copy(), 4, block, False)
    finally:
        gptq.REFIT_SCALES = False
    np.testing.assert_array_equal(refit[0], plain[0])
    np.testing.assert_array_equal(refit[2], plain[2])
    damping = gptq.DAMPING * np.diagonal(h, axis1=-2, axis2=-1).mean(-1)
    damped = h + np.eye(k, dtype=np.float32) * np.asarray(damping)[..., None, None]

    def error(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> float:
        d = w - (codes - np.repeat(zeros, block, -1)) * np.repeat(scales, block, -1)
        return float(np.sum((d @ damped) * d))

    assert error(*refit) <= error(*plain) * (1 + 1e-4) + 1e-6


def test_a_sequential_walk_hands_on_what_the_quantized_block_computes(exported, monkeypatch) -> None:
    """With ``SEQUENTIAL`` a block's successor is calibrated on the block's outputs with its quantized weights
    standing in; the float weights given back as the "quantized" ones leave every statistic as before."""
    from gemma4_onnx.builtin_text import calibration_text
    from gemma4_onnx.graphs.manifest import read_manifest
    from gemma4_onnx.quantize import calibration
    from gemma4_onnx.quantize.float_tensors import PackageTensors

    _, package = exported("tiny-e2b")
    manifest = read_manifest(package)
    tensors = PackageTensors(package, manifest)
    first, second = calibration.HessianWalk(package, manifest, tensors, set(), calibration_text(), 64).walk.geometry \
        .layers[:2]
    weight = f"model.language_model.layers.{first.index}.mlp.down_proj.weight"
    following = f"model.language_model.layers.{second.index}.self_attn.q_proj.weight"
    monkeypatch.setattr(calibration, "SEQUENTIAL", True)

    def statistics(replaced: str) -> np.ndarray:
        walk = calibration.HessianWalk(package, manifest, tensors, {weight, following}, calibration_text(), 64)
        walk.layer(first)
        float_weight = walk.pending[1].weights[weight] if walk.pending else None
        assert float_weight is not None, "a sequential walk waits for the quantized weights"
        given = {"float": {}, "same": {weight: float_weight}, "rounded": {weight: np.round(float_weight * 4) / 4}}
        walk.advance(given[replaced])
        hessian = walk.layer(second)[following]
        assert isinstance(hessian, np.ndarray)
        return hessian

    reference = statistics("float")
    np.testing.assert_allclose(statistics("same"), reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(statistics("rounded"), reference, rtol=1e-3)
