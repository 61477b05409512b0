"""Decode-time cost of ai.gemma4::TopKMoE on onnxruntime (CPU) against a dense all-experts baseline.

One MoE layer at 26B-A4B width (hidden 2816, expert intermediate 704), random fp32 weights fed as
graph inputs (onnxruntime reads the numpy buffers in place), one token per call (decode). TopKMoE
touches only the k experts the router picks; the baseline runs every expert on every token and
weights the outputs with the same top-k router weights (zero for the others), with its weights laid
out for two plain GEMMs. The claim to check: TopKMoE's time follows k, not the number of experts.

    .venv/bin/python bench/bench_topk_moe.py [--experts 32,64,128] [--top-k 2,4,8] [--runs 20]

Prints a Markdown table of medians. A standalone script: not a test, no pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
from onnxscript import opset20

from gemma4_onnx.graphs import domain

op: Any = opset20  # onnxscript bodies follow onnxscript's rules, not Python typing's
BENCH_OPSET = onnxscript.values.Opset("bench", 1)
EPS = 1e-6
TOPK_INPUTS = ["hidden_states", "experts_input", "router_scale", "router_proj", "per_expert_scale"]
TOPK_INPUTS += ["gate_up_proj", "down_proj"]
DENSE_INPUTS = [*TOPK_INPUTS[:5], "gate_up_rows", "down_rows", "k"]


@onnxscript.script(BENCH_OPSET, default_opset=op)
def DenseMoE(hidden_states, experts_input, router_scale, router_proj, per_expert_scale, gate_up_rows, down_rows, k):
    """The same router, then every expert for every token: [T, E·2I] and [T, E·I] · [E·I, H] GEMMs."""
    r2 = op.Mul(hidden_states, hidden_states)
    inv_rms = op.Div(op.CastLike(1.0, r2), op.Sqrt(op.Add(op.ReduceMean(r2, [-1], keepdims=1), op.CastLike(1e-6, r2))))
    hidden = op.Shape(hidden_states, start=-1)
    root = op.CastLike(op.Pow(op.Cast(hidden, to=11), op.Constant(value_float=-0.5)), hidden_states)
    u = op.Mul(op.Mul(op.Mul(hidden_states, inv_rms), router_scale), root)
    probs = op.Softmax(op.Gemm(u, router_proj, transB=1), axis=-1)
    top, index = op.TopK(probs, k, axis=-1)
    weights = op.Mul(op.Div(top, op.ReduceSum(top, [-1], keepdims=1)), op.Gather(per_expert_scale, index))
    dense_weights = op.ScatterElements(op.Mul(probs, 0.0), index, weights, axis=1)  # [T, E], zero if unpicked
    experts = op.Shape(router_proj, start=0, end=1)
    tokens = op.Shape(experts_input, start=0, end=1)
    gate_up = op.Reshape(op.Gemm(experts_input, gate_up_rows, transB=1), op.Concat(tokens, experts, [2, -1], axis=0))
    gate, up = op.Split(gate_up, num_outputs=2, axis=2)
    activated = op.Mul(op.Squeeze(op.Mul(op.Gelu(gate, approximate="tanh"), up), [2]), op.Unsqueeze(dense_weights, [2]))
    return op.MatMul(op.Reshape(activated, op.Concat(tokens, [-1], axis=0)), down_rows)


def one_node_model(op_type: str, domain_name: str, input_names: list[str], attributes: list[ir.Attr]) -> ir.Model:
    """A model whose graph is one call of ``domain_name::op_type`` on float graph inputs."""
    inputs = [
        ir.Value(name=n, type=ir.TensorType(ir.DataType.INT64 if n == "k" else ir.DataType.FLOAT)) for n in input_names
    ]
    node = ir.Node(domain_name, op_type, inputs, attributes=attributes, num_outputs=1)
    node.outputs[0].name = "output"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(inputs, node.outputs, nodes=[node], opset_imports={"": domain.STD_OPSET, domain_name: 1})
    return ir.Model(graph, ir_version=domain.MIN_IR_VERSION)


def topk_moe_model(top_k: int) -> onnx.ModelProto:
    """One ai.gemma4::TopKMoE node, with its function attached by the project's pass."""
    attributes = [ir.AttrInt64("top_k", top_k), ir.AttrFloat32("eps", EPS)]
    model = one_node_model("TopKMoE", domain.DOMAIN, TOPK_INPUTS, attributes)
    domain.attach_functions(model)
    return ir.to_proto(model)


def dense_model() -> onnx.ModelProto:
    model = one_node_model("DenseMoE", BENCH_OPSET.domain, DENSE_INPUTS, [])
    function = ir.serde.deserialize_function(DenseMoE.to_function_proto())
    model.functions[function.identifier()] = function
    return ir.to_proto(model)


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> tuple[float, np.ndarray]:
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}  # no copies
    binding = sess.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(sess.get_outputs()[0].name)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), binding.copy_outputs_to_cpu()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="32,64,128")
    parser.add_argument("--top-k", default="2,4,8")
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    expert_counts = [int(e) for e in args.experts.split(",")]
    top_ks = [int(k) for k in args.top_k.split(",")]
    hidden, intermediate = args.hidden, args.intermediate

    rng = np.random.default_rng(0)
    most = max(expert_counts)
    print(f"random weights for {most} experts ({most * 3 * hidden * intermediate * 4 / 2**30:.2f} GiB fp32)...")
    gate_up_all = rng.standard_normal((most, 2 * intermediate, hidden), dtype=np.float32) * 0.02
    down_all = rng.standard_normal((most, hidden, intermediate), dtype=np.float32) * 0.02
    token = {
        "hidden_states": rng.standard_normal((1, hidden), dtype=np.float32),
        "experts_input": rng.standard_normal((1, hidden), dtype=np.float32),
        "router_scale": rng.uniform(0.5, 1.5, hidden).astype(np.float32),
    }
    dense = dense_model()
    topk_models = {k: topk_moe_model(k) for k in top_ks}

    rows = []
    for experts in expert_counts:
        router = {
            "router_proj": rng.standard_normal((experts, hidden), dtype=np.float32),
            "per_expert_scale": rng.uniform(0.5, 1.5, experts).astype(np.float32),
        }
        gate_up, down = gate_up_all[:experts], down_all[:experts]
        # The baseline's best layout: [E·2I, H] rows (free view) and down as [E·I, H] (one copy, untimed).
        dense_weights = {
            "gate_up_rows": gate_up.reshape(-1, hidden),
            "down_rows": np.ascontiguousarray(down.transpose(0, 2, 1)).reshape(-1, hidden),
        }
        dense_sess = session(dense, args.threads)
        for k in top_ks:
            dense_ms, dense_out = median_ms(
                dense_sess, {**token, **router, **dense_weights, "k": np.array([k], np.int64)}, max(5, args.runs // 4)
            )
            sparse_sess = session(topk_models[k], args.threads)
            feeds = {**token, **router, "gate_up_proj": gate_up, "down_proj": down}
            sparse_ms, sparse_out = median_ms(sparse_sess, feeds, args.runs)
            agree = float(np.abs(sparse_out - dense_out).max())
            rows.append((experts, k, sparse_ms, dense_ms, agree))
            print(f"E={experts} k={k}: TopKMoE {sparse_ms:.2f} ms, dense {dense_ms:.2f} ms (max |Δ| {agree:.1e})")
        del dense_weights

    dense_runs = max(5, args.runs // 4)
    print(
        f"\nOne token, hidden {hidden}, expert intermediate {intermediate}, fp32, onnxruntime {ort.__version__} "
        f"CPU, {args.threads} threads; medians of {args.runs} runs (dense: {dense_runs}).\n"
    )
    print("| experts | top-k | TopKMoE ms/token | dense ms/token | dense / TopKMoE | TopKMoE ms per chosen expert |")
    print("|---:|---:|---:|---:|---:|---:|")
    for experts, k, sparse_ms, dense_ms, _ in rows:
        ratio = dense_ms / sparse_ms
        print(f"| {experts} | {k} | {sparse_ms:.2f} | {dense_ms:.2f} | {ratio:.1f}× | {sparse_ms / k:.2f} |")


if __name__ == "__main__":
    main()
