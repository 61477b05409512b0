"""TopKMoE: torch reference vs transformers' Gemma4TextRouter + Gemma4TextExperts (eager) vs
onnxruntime running the exported ai.gemma4::TopKMoE, in fp32; plus the sparsity contract (only the
chosen experts' weights are read) and top-k ties."""

from __future__ import annotations

import functools
from typing import Any

import onnx_ir as ir
import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

from gemma4_onnx.graphs import domain, topk_moe

from op_harness import Exported, assert_close, perturb_, quiet, register_report, text_config

OP = "TopKMoE"
HIDDEN, INTERMEDIATE, EPS = 32, 16, 1e-6


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    register_report(request.config)


def modules(experts: int, top_k: int, seed: int) -> tuple[Gemma4TextRouter, Gemma4TextExperts]:
    config = text_config(
        hidden_size=HIDDEN,
        enable_moe_block=True,
        num_experts=experts,
        top_k_experts=top_k,
        moe_intermediate_size=INTERMEDIATE,
    )
    with quiet():
        router, experts_module = Gemma4TextRouter(config).eval(), Gemma4TextExperts(config).eval()
    generator = torch.Generator().manual_seed(seed)
    perturb_(router, generator)
    perturb_(experts_module, generator)
    with torch.no_grad():  # experts N(0, 0.24): outputs of order 1, so the fp32 comparison has teeth
        experts_module.gate_up_proj.mul_(3)
        experts_module.down_proj.mul_(3)
    return router, experts_module


def weights(router: Gemma4TextRouter, experts: Gemma4TextExperts) -> dict[str, torch.Tensor]:
    return {
        "router_scale": router.scale.detach(),
        "router_proj": router.proj.weight.detach(),
        "per_expert_scale": router.per_expert_scale.detach(),
        "gate_up_proj": experts.gate_up_proj.detach(),
        "down_proj": experts.down_proj.detach(),
    }


def router_weights(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router_scale, router_proj, per_expert_scale): the arguments of ``topk_moe.route`` after r."""
    return tensors["router_scale"], tensors["router_proj"], tensors["per_expert_scale"]


def transformers_moe(
    router: Gemma4TextRouter, experts: Gemma4TextExperts, r: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        _, top_k_weights, top_k_index = router(r.reshape(-1, HIDDEN))
        return experts(z.reshape(-1, HIDDEN), top_k_index, top_k_weights).reshape(z.shape)


@functools.cache
def exported(experts: int, top_k: int) -> Exported:
    def forward(**tensors: torch.Tensor) -> torch.Tensor:
        return torch.ops.gemma4.topk_moe(*tensors.values(), top_k=top_k, eps=EPS)

    example = {
        "hidden_states": torch.randn(2, 3, HIDDEN),
        "experts_input": torch.randn(2, 3, HIDDEN),
        **weights(*modules(experts, top_k, seed=0)),
    }
    tokens = {0: "batch", 1: "seq"}
    graph = Exported(forward, example, {"hidden_states": tokens, "experts_input": tokens})
    graph.assert_has_function(OP)
    return graph


def three_way(
    router: Gemma4TextRouter, experts: Gemma4TextExperts, r: torch.Tensor, z: torch.Tensor, top_k: int
) -> None:
    expected = transformers_moe(router, experts, r, z)
    tensors = weights(router, experts)
    reference = topk_moe.topk_moe(r, z, *tensors.values(), top_k=top_k, eps=EPS)
    assert_close(OP, "reference vs transformers", reference, expected)
    (actual,) = exported(experts.num_experts, top_k).run(hidden_states=r, experts_input=z, **tensors)
    assert_close(OP, "onnxruntime vs transformers", actual, expected)


@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (16, 4)])
@pytest.mark.parametrize("shape", [(1, 1), (1, 12), (2, 5)], ids=["decode", "prefill", "batch2"])
def test_three_way_random_routing(experts: int, top_k: int, shape: tuple[int, int]) -> None:
    router, experts_module = modules(experts, top_k, seed=experts + shape[1])
    generator = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    with torch.no_grad():  # decisive routing: a wider router, so no near-ties decide the test
        router.proj.weight.mul_(10)
    r = torch.randn(*shape, HIDDEN, generator=generator)
    z = torch.randn(*shape, HIDDEN, generator=generator)
    three_way(router, experts_module, r, z, top_k)


def structured_router(top_k: int, tied_experts_equal: bool) -> tuple[Gemma4TextRouter, Gemma4TextExperts, torch.Tensor]:
    """8 experts with positive r, so the sign of each router row fixes its logit's sign for every token:
    expert 2 (row +a) wins for every token, experts 4 and 7 (zero rows) tie at logit exactly 0, the rest
    (rows −c·a) are never chosen for k ≤ 3. With ``tied_experts_equal`` experts 4 and 7 are identical."""
    router, experts = modules(8, top_k, seed=11)
    generator = torch.Generator().manual_seed(5)
    a = torch.rand(HIDDEN, generator=generator) + 0.5
    with torch.no_grad():
        rows = [-1.0 * a, -2.0 * a, a, -3.0 * a, 0 * a, -4.0 * a, -10.0 * a, 0 * a]
        router.proj.weight.copy_(torch.stack(rows))
        if tied_experts_equal:
            experts.gate_up_proj[7] = experts.gate_up_proj[4]
            experts.down_proj[7] = experts.down_proj[4]
            router.per_expert_scale[7] = router.per_expert_scale[4]
    r = torch.rand(2, 6, HIDDEN, generator=generator) + 0.1
    return router, experts, r


def test_tie_inside_top_k_and_experts_hit_by_all_and_by_none() -> None:
    """k = 3: experts {2, 4, 7} for every token (4 and 7 tied inside the selection); 0, 1, 3, 5, 6
    chosen by no token. transformers' tie order does not matter here: all three agree."""
    router, experts, r = structured_router(top_k=3, tied_experts_equal=False)
    tensors = weights(router, experts)
    _, index = topk_moe.route(r.reshape(-1, HIDDEN), *router_weights(tensors), top_k=3, eps=EPS)
    assert all(set(row) == {2, 4, 7} for row in index.tolist())
    assert index[:, 0].eq(2).all()  # hit by every token, first
    z = torch.randn(r.shape, generator=torch.Generator().manual_seed(6))
    three_way(router, experts, r, z, top_k=3)


def test_tie_at_kth_place_picks_lower_expert_id() -> None:
    """k = 2: expert 2 plus one of the tied experts 4 and 7. The reference and onnxruntime (ONNX TopK)
    keep the lower id, 4; torch.topk's choice is unspecified, so transformers is compared where the
    tied experts are identical (any choice gives the same output) and the rule itself where not."""
    z = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(7))
    router, experts, r = structured_router(top_k=2, tied_experts_equal=True)
    three_way(router, experts, r, z, top_k=2)

    router, experts, r = structured_router(top_k=2, tied_experts_equal=False)
    tensors = weights(router, experts)
    _, index = topk_moe.route(r.reshape(-1, HIDDEN), *router_weights(tensors), top_k=2, eps=EPS)
    assert index.tolist() == [[2, 4]] * 12
    reference = topk_moe.topk_moe(r, z, *tensors.values(), top_k=2, eps=EPS)
    (actual,) = exported(8, 2).run(hidden_states=r, experts_input=z, **tensors)
    assert_close(OP, "onnxruntime vs reference (k-th tie)", actual, reference)


def test_unchosen_experts_are_never_read() -> None:
    """NaN in every expert no token picks leaves the output finite and unchanged: no dense compute."""
    router, experts, r = structured_router(top_k=3, tied_experts_equal=False)
    z = torch.randn(r.shape, generator=torch.Generator().manual_seed(8))
    tensors = weights(router, experts)
    clean = topk_moe.topk_moe(r, z, *tensors.values(), top_k=3, eps=EPS)
    poisoned = {n: t.clone() for n, t in tensors.items()}
    for expert in (0, 1, 3, 5, 6):
        poisoned["gate_up_proj"][expert] = float("nan")
        poisoned["down_proj"][expert] = float("nan")
    (actual,) = exported(8, 3).run(hidden_states=r, experts_input=z, **poisoned)
    assert torch.isfinite(torch.from_numpy(actual)).all()
    assert_close(OP, "onnxruntime vs reference (unchosen experts NaN)", actual, clean)


def test_expert_weights_are_read_inside_the_loop_only() -> None:
    """The function body: the router Gemm and one Loop at the top level; every read of gate_up_proj or
    down_proj is a Gather of one expert inside the Loop body."""
    function = domain.functions()[(domain.DOMAIN, OP, "")]
    top_level = [node.op_type for node in function]
    assert top_level.count("Loop") == 1 and top_level.count("Gemm") == 1
    expert_inputs = {function.inputs[i] for i in (5, 6)}
    for node in ir.traversal.RecursiveGraphIterator(function.graph):
        if any(value in expert_inputs for value in node.inputs):
            assert node.op_type == "Gather" and node.graph is not function.graph, node
    loop = next(node for node in function if node.op_type == "Loop")
    assert sum(node.op_type == "Gemm" for node in loop.attributes["body"].as_graph()) == 2


def test_route_matches_transformers_router() -> None:
    router, _ = modules(16, 4, seed=3)
    r = torch.randn(20, HIDDEN, generator=torch.Generator().manual_seed(4))
    tensors: dict[str, Any] = weights(router, modules(16, 4, seed=3)[1])
    with torch.no_grad():
        _, expected_weights, expected_index = router(r)
    got_weights, got_index = topk_moe.route(r, *router_weights(tensors), top_k=4, eps=EPS)
    assert torch.equal(got_index, expected_index)
    assert_close(OP, "router weights: reference vs transformers", got_weights, expected_weights)


# ---------------------------------------------------------------------------------------------
# TopKMoE:nbits, the overload the quantizer writes: MatMulNBits experts, same routing.


def nbits_model(tensors: dict[str, torch.Tensor], top_k: int, bits: int, block: int) -> tuple[Any, dict[str, Any]]:
    """A one-node model calling TopKMoE:nbits on the experts of ``tensors`` quantized to ``bits``, and the
    float weights its quantized experts stand for (dequantized), for the reference."""
    import numpy as np
    import onnx
    from onnx import helper

    from gemma4_onnx.quantize.blockwise import blockwise
    from gemma4_onnx.quantize.experts import attach_nbits_function, dequantize, nbits_node
    from gemma4_onnx.quantize.recipe import Decision

    decision = Decision(bits=bits, block_size=block, symmetric=False, algorithm="rtn")
    feeds: dict[str, Any] = {n: tensors[n].numpy() for n in ("router_scale", "router_proj", "per_expert_scale")}
    dequantized: dict[str, Any] = {}
    quantized_inputs: dict[str, list[str]] = {}
    for name in ("gate_up_proj", "down_proj"):
        parts = [blockwise(m.numpy(), decision) for m in tensors[name]]
        stacked = [np.stack(p) for p in zip(*parts, strict=True)]
        quantized_inputs[name] = [f"{name}.{kind}" for kind in ("codes", "scales", "zero_points")]
        feeds.update(zip(quantized_inputs[name], [stacked[0], stacked[1].astype(np.float16), stacked[2]], strict=True))
        k = tensors[name].shape[-1]
        dequantized[name] = torch.from_numpy(np.stack([  # the scales as stored: fp16
            dequantize(codes, scales.astype(np.float16), zeros, bits=bits, k=k) for codes, scales, zeros in parts]))
    float_node = helper.make_node("TopKMoE", ["hidden_states", "experts_input", "router_scale", "router_proj",
                                              "per_expert_scale", "gate_up_proj", "down_proj"], ["output"],
                                  domain=domain.DOMAIN, top_k=top_k, eps=EPS)
    node = nbits_node(float_node, quantized_inputs["gate_up_proj"], quantized_inputs["down_proj"], decision, decision,
                      tuple(tensors["gate_up_proj"].shape))
    names = ["hidden_states", "experts_input", *feeds]
    tokens = ["batch", "seq", HIDDEN]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape)
              if n in feeds else helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, tokens) for n in names]
    output = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, tokens)
    graph = helper.make_graph([node], "nbits", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(domain.DOMAIN, domain.VERSION)],
                              ir_version=domain.MIN_IR_VERSION)
    attach_nbits_function(model)
    onnx.checker.check_model(model)
    return model, {**feeds, "dequantized": dequantized}


@pytest.mark.parametrize(("bits", "block"), [(4, 16), (8, 32)])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7)], ids=["decode", "batch2"])
def test_nbits_overload_matches_reference_on_dequantized_experts(bits: int, block: int, shape: tuple[int, int]) -> None:
    import onnxruntime as ort

    router, experts_module = modules(16, 4, seed=21)
    with torch.no_grad():
        router.proj.weight.mul_(10)
    tensors = weights(router, experts_module)
    model, feeds = nbits_model(tensors, top_k=4, bits=bits, block=block)
    dequantized = feeds.pop("dequantized")
    generator = torch.Generator().manual_seed(shape[1])
    r, z = torch.randn(*shape, HIDDEN, generator=generator), torch.randn(*shape, HIDDEN, generator=generator)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"hidden_states": r.numpy(), "experts_input": z.numpy(), **feeds})
    expected = topk_moe.topk_moe(r, z, *router_weights(tensors), dequantized["gate_up_proj"],
                                 dequantized["down_proj"], top_k=4, eps=EPS)
    assert_close(OP, f"nbits int{bits} vs reference (dequantized)", actual, expected)


def test_nbits_overload_reads_only_the_chosen_experts() -> None:
    """NaN scales for every expert no token picks leave the quantized op's output finite and unchanged."""
    import numpy as np
    import onnxruntime as ort

    router, experts, r = structured_router(top_k=3, tied_experts_equal=False)
    model, feeds = nbits_model(weights(router, experts), top_k=3, bits=4, block=16)
    feeds.pop("dequantized")
    z = torch.randn(r.shape, generator=torch.Generator().manual_seed(8)).numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (clean,) = session.run(None, {"hidden_states": r.numpy(), "experts_input": z, **feeds})
    for name in ("gate_up_proj.scales", "down_proj.scales"):
        feeds[name] = feeds[name].copy()
        feeds[name][[0, 1, 3, 5, 6]] = np.nan
    (poisoned,) = session.run(None, {"hidden_states": r.numpy(), "experts_input": z, **feeds})
    assert np.isfinite(poisoned).all()
    np.testing.assert_array_equal(poisoned, clean)
