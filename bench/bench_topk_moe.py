"""Decode-time cost of ai.gemma4::TopKMoE on onnxruntime (CPU) against a dense all-experts baseline.

One MoE layer at 26B-A4B width (hidden 2816, expert intermediate 704), random fp32 weights fed as
graph inputs (onnxruntime reads the numpy buffers in place), one token per call (decode). TopKMoE
touches only the k experts the router picks; the baseline runs every expert on every token and
weights the outputs with the same top-k router weights (zero for the others), with its weights laid
out for two plain GEMMs. The claim to check: TopKMoE's time follows k, not the number of experts.

The ``topk_moe`` section of ``bench/run.py`` (``section()``), or on its own:

    .venv/bin/python bench/bench_topk_moe.py [--experts 32,64,128] [--top-k 2,4,8] [--runs 20]

which prints the section's Markdown table. A measurement, not a test: no pass/fail.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
from measure import Figure, Section, interleaved_ms
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


class Bound:
    """One session with its inputs bound once per decode token (OrtValues over the numpy buffers,
    no copies); ``call(i)`` runs token ``i mod tokens``."""

    def __init__(self, sess: ort.InferenceSession, shared: dict[str, np.ndarray], tokens: list[dict[str, np.ndarray]]):
        self.sess = sess
        self.values = [{n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in {**shared, **t}.items()} for t in tokens]
        self.bindings = []
        for values in self.values:
            binding = sess.io_binding()
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output(sess.get_outputs()[0].name)
            self.bindings.append(binding)

    def call(self, index: int) -> None:
        self.sess.run_with_iobinding(self.bindings[index % len(self.bindings)])

    def outputs(self) -> np.ndarray:
        """The outputs for every token, [tokens, H]."""
        for index in range(len(self.bindings)):
            self.call(index)
        return np.concatenate([b.copy_outputs_to_cpu()[0] for b in self.bindings])


@dataclass(frozen=True)
class Config:
    experts: tuple[int, ...] = (32, 64, 128)
    top_ks: tuple[int, ...] = (2, 4, 8)
    hidden: int = 2816  # 26B-A4B
    intermediate: int = 704  # 26B-A4B moe_intermediate_size
    runs: int = 24  # timed rounds; each round decodes one token with every (experts, k) point, both ways
    tokens: int = 8  # distinct decode tokens, cycled: consecutive calls route to different experts
    threads: int = 2
    headline: tuple[int, int] = (128, 8)  # 26B-A4B: 128 experts, top-8


QUICK = Config(experts=(8, 16), top_ks=(1, 2), hidden=256, intermediate=64, runs=5, tokens=2, headline=(16, 2))


def section(quick: bool = False) -> Section:
    """The ``topk_moe`` section of bench/run.py (``quick``: a small smoke run of the same code)."""
    return run(QUICK if quick else Config())


def run(config: Config, log: Callable[[str], None] = print) -> Section:
    """TopKMoE and the dense baseline for every (experts, k) of ``config``, medians in ms/token,
    measured round-robin (``measure.interleaved_ms``) so that both sides see the same machine."""
    hidden, intermediate = config.hidden, config.intermediate
    rng = np.random.default_rng(0)
    most = max(config.experts)
    log(f"random weights for {most} experts ({most * 3 * hidden * intermediate * 4 / 2**30:.2f} GiB fp32)...")
    gate_up_all = rng.standard_normal((most, 2 * intermediate, hidden), dtype=np.float32)
    gate_up_all *= 0.02
    down_all = rng.standard_normal((most, hidden, intermediate), dtype=np.float32)
    down_all *= 0.02
    # The baseline's best layout: [E·2I, H] rows (a free view) and down as [E·I, H] (one copy, untimed);
    # the first E experts of either are a prefix of the rows, so every expert count shares them.
    gate_up_rows = gate_up_all.reshape(-1, hidden)
    down_rows = np.ascontiguousarray(down_all.transpose(0, 2, 1)).reshape(-1, hidden)
    router_scale = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    tokens = [
        {n: rng.standard_normal((1, hidden), dtype=np.float32) for n in ("hidden_states", "experts_input")}
        for _ in range(config.tokens)
    ]
    dense = dense_model()
    topk_models = {k: topk_moe_model(k) for k in config.top_ks}

    bound: dict[tuple[str, int, int], Bound] = {}
    for experts in config.experts:
        router = {
            "router_scale": router_scale,
            "router_proj": rng.standard_normal((experts, hidden), dtype=np.float32),
            "per_expert_scale": rng.uniform(0.5, 1.5, experts).astype(np.float32),
        }
        sparse_weights = {"gate_up_proj": gate_up_all[:experts], "down_proj": down_all[:experts]}
        rows = experts * 2 * intermediate, experts * intermediate
        dense_weights = {"gate_up_rows": gate_up_rows[: rows[0]], "down_rows": down_rows[: rows[1]]}
        dense_sess = session(dense, config.threads)
        for k in config.top_ks:
            bound["TopKMoE", experts, k] = Bound(
                session(topk_models[k], config.threads), {**router, **sparse_weights}, tokens
            )
            k_input = {"k": np.array([k], np.int64)}
            bound["dense", experts, k] = Bound(dense_sess, {**router, **dense_weights, **k_input}, tokens)
    log(f"{len(bound)} sessions; {config.runs} rounds of one decode token each...")
    samples = interleaved_ms({key: b.call for key, b in bound.items()}, config.runs)

    result = Section(
        "topk_moe",
        "TopKMoE decode time vs dense all-experts baseline",
        {
            "tokens per call": 1,
            "hidden": hidden,
            "expert intermediate": intermediate,
            "dtype": "fp32",
            "runtime": f"onnxruntime {ort.__version__} CPU",
            "threads": config.threads,
            "timed calls per point": f"{config.runs}, round-robin over all points, {config.tokens} tokens cycled",
        },
    )
    result.columns = [
        "experts", "top-k", "TopKMoE ms/token", "dense ms/token", "dense / TopKMoE",
        "TopKMoE ms per chosen expert", "max abs diff vs dense",
    ]  # fmt: skip
    sparse: dict[tuple[int, int], Figure] = {}
    for experts in config.experts:
        for k in config.top_ks:
            params = {"experts": experts, "top_k": k}
            figure = result.figure(f"TopKMoE E={experts} k={k}", "ms/token", samples["TopKMoE", experts, k], **params)
            dense_figure = result.figure(f"dense E={experts} k={k}", "ms/token", samples["dense", experts, k], **params)
            ratio = result.ratio(f"dense / TopKMoE E={experts} k={k}", dense_figure, figure)
            agree = float(np.abs(bound["TopKMoE", experts, k].outputs() - bound["dense", experts, k].outputs()).max())
            result.rows.append([
                str(experts), str(k), f"{figure.median:.2f}", f"{dense_figure.median:.2f}", f"{ratio.value:.1f}×",
                f"{figure.median / k:.2f}", f"{agree:.1e}",
            ])  # fmt: skip
            sparse[experts, k] = figure
    _findings(result, config, sparse)
    return result


def _findings(result: Section, config: Config, sparse: dict[tuple[int, int], Figure]) -> None:
    """The headline, and whether TopKMoE time follows k or the expert count, from the medians."""
    headline = f"dense / TopKMoE E={config.headline[0]} k={config.headline[1]}"
    for ratio in result.ratios:
        if ratio.name == headline:
            result.findings.append(
                f"{config.headline[0]} experts, top-{config.headline[1]}: TopKMoE "
                f"{ratio.denominator.median:.2f} ms/token vs dense {ratio.numerator.median:.2f} ms/token "
                f"(dense takes {ratio.value:.1f}× as long)."
            )
    few, many = min(config.experts), max(config.experts)
    low, high = min(config.top_ks), max(config.top_ks)
    if few == many or low == high:
        return
    by_experts = [result.ratio(f"TopKMoE k={k}: E={many} / E={few}", sparse[many, k], sparse[few, k])
                  for k in config.top_ks]  # fmt: skip
    by_k = [result.ratio(f"TopKMoE E={e}: k={high} / k={low}", sparse[e, high], sparse[e, low])
            for e in config.experts]  # fmt: skip
    # time ∝ k^a · E^b: the exponents from the end points of the sweep (medians over the other axis)
    a = statistics.median(math.log(r.value) / math.log(high / low) for r in by_k)
    b = statistics.median(math.log(r.value) / math.log(many / few) for r in by_experts)
    follows_k, follows_experts = a >= 0.5, b >= 0.25
    verdict = {(True, False): "k", (True, True): "both", (False, True): "experts", (False, False): "neither"}[
        follows_k, follows_experts
    ]
    result.extra["scaling"] = {
        "exponent_k": a,
        "exponent_experts": b,
        "scales_with": verdict,
        "rule": "time ∝ k^a·E^b; follows k if a ≥ 0.5, follows the expert count if b ≥ 0.25",
    }

    def span(ratios: list[Any]) -> str:
        values = sorted(r.value for r in ratios)
        return f"×{values[0]:.2f}–{values[-1]:.2f}"

    sentence = {
        "k": "TopKMoE time scales with k, not with the number of experts",
        "both": "TopKMoE time scales with k and also with the number of experts",
        "experts": "TopKMoE time scales with the number of experts, not with k",
        "neither": "TopKMoE time follows neither k nor the number of experts (fixed costs dominate)",
    }[verdict]
    result.findings.append(
        f"{sentence}: {span(by_k)} from k={low} to k={high} ({high // low}× the chosen experts) at fixed "
        f"experts; {span(by_experts)} from {few} to {many} experts ({many // few}× the experts) at fixed k "
        f"(time ∝ k^{a:.2f}·E^{b:.2f})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--experts", default=",".join(map(str, defaults.experts)))
    parser.add_argument("--top-k", default=",".join(map(str, defaults.top_ks)))
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--intermediate", type=int, default=defaults.intermediate)
    parser.add_argument("--runs", type=int, default=defaults.runs)
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args()
    experts = tuple(int(e) for e in args.experts.split(","))
    top_ks = tuple(int(k) for k in args.top_k.split(","))
    config = Config(experts, top_ks, args.hidden, args.intermediate, args.runs, args.tokens, args.threads,
                    headline=(max(experts), max(top_ks)))  # fmt: skip
    result = run(config, log=lambda line: print(line, file=sys.stderr))
    print(f"config: {asdict(config)}\n")
    print(result.to_markdown())


if __name__ == "__main__":
    main()
