"""``--target ort``: replace ai.gemma4 ops by onnxruntime's fused contrib kernels where they fit.

The ai.gemma4 functions run anywhere as standard ops; onnxruntime also has fused kernels that do the
same work faster: ``com.microsoft.RotaryEmbedding`` and ``com.microsoft.GroupQueryAttention``. This
pass swaps them in where the semantics are exactly the same, and leaves the function call (which
still runs) where they are not, recording why. Like an onnxscript rewrite rule, each lowering is a
``check`` (returns the reason it does not fit, or None) and a ``rewrite``.

What Gemma 4 needs from the kernels (§3.6, §6.4): split-half rotation over the whole head with the
zero-padded p-RoPE frequency table (so ``rotary_embedding_dim`` stays the full head dim: the cos/sin
tables carry cos 1 / sin 0 for the pass-through pairs), attention scale 1.0, head_dim 512.

PRoPE → RotaryEmbedding (the kernel reads 3D input as [B,S,N·D] and 4D input as [B,N,S,D])::

    head_axis 2  X [B,S,N,D] ─Reshape[B,S,N·D]─RotaryEmbedding(position_ids, cos_cache, sin_cache)─Reshape─► Y
    head_axis 1  X [B,N,S,D] ─RotaryEmbedding(position_ids, cos_cache, sin_cache)─► Y

KEqVAttention:kv → GroupQueryAttention::

    query ─Reshape[B,S,Hq,D]─SimplifiedLayerNormalization(w_q)─Reshape─RotaryEmbedding─┐
    key   ─Reshape──────────SimplifiedLayerNormalization(w_k)─Reshape─RotaryEmbedding─┤ GroupQueryAttention
    value ─Reshape──────────SimplifiedLayerNormalization(1)───Reshape─────────────────┤   scale 1
    past_key, past_value, seqlens_k = P+S−1, total_sequence_length = P+S ────────────┘   local_window_size W
        → output, present K, V (past + current: the op's key_states/value_states)
        present_key/value = Slice(last W−1) on sliding layers, as the op's contract says

KEqVAttention:kv_image_blocks → If: GQA's mask is always causal, so it runs only when no token is in an image
block (every decode step, text prompts); a prompt with images runs the function::

    If(ReduceMax(image_blocks) < 0)  then: the GroupQueryAttention lowering above   else: the function node

Measured against the function (tests/test_op_lower_ort.py), three details decide exactness:
* GQA's ``local_window_size`` counts the query itself: W keeps keys k > q − W, Gemma's window (W − 1
  gives a different mask).
* RoPE runs in separate RotaryEmbedding nodes, not GQA's ``do_rotary``: on a first prompt GQA reads
  only the first element of ``position_ids``, which is wrong for batch rows at different positions.
* GQA's fused q/k norm inputs (``q_norm_weight``) are not honoured by the CPU kernel, so the norms
  stay explicit. P is the past buffer length: the masks only need positions relative to the last
  query, which GQA's buffer coordinates give.

Not lowered (reasons recorded in ``LowerToOrtPass.skipped``): ``KEqVAttention:keqv`` (GQA caches
roped keys, the op keeps one cache of values: lowering would change the model's cache I/O),
``KEqVAttention:reuse`` (GQA needs new keys and values), ``TopKMoE`` (com.microsoft.MoE needs
per_expert_scale folded into down_proj and a GeGLU with the tanh gelu; not done).

Nested PRoPE: KEqVAttention's bodies call ``ai.gemma4::PRoPE`` as nodes. A lowered ``kv`` node is
replaced whole, RoPE included (its RotaryEmbedding nodes above), so no PRoPE is left of it. The
nodes left as functions (``keqv``, ``reuse``) keep their bodies, nested PRoPE calls included, and
the PRoPE function stays in the model for them; functions nothing calls any more are removed
(``RemoveUnusedFunctionsPass`` follows nested calls). Only nodes of the main graph are lowered: a
function body cannot hold the cos/sin initializers, so a nested PRoPE always runs as its function.

No table grows with the context: the kernels take cos/sin "caches" indexed by position, and the graph
computes exactly the rows this call needs, once per distinct frequency table, before the first node
that uses them::

    position_ids [B,S] ─Reshape[B·S,1]─Cast float─Mul(inv_freq)─Cast double─Cos, Sin─Cast─► cos, sin [B·S, D/2]
    Range(0, B·S) ─Reshape[B,S]─► the kernels' position_ids

The angle is the float32 product position·inv_freq (as transformers forms it); its cos/sin are
evaluated in float64 and rounded once.

``SimplifiedLayerNormalization`` is onnxruntime's RMSNorm, registered by onnxruntime in the default
domain: the lowered model is for onnxruntime only (and no longer passes the ONNX checker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gemma4_onnx.graphs.domain import DOMAIN, ORT_CONTRIB_DOMAIN

_INT64_MAX = 9223372036854775807


@dataclass(frozen=True)
class Rotary:
    """The kernels' view of one call's positions: ``indices`` [B,S] into the ``cos``/``sin`` rows [B·S, D/2]."""

    indices: ir.Value
    cos: ir.Value
    sin: ir.Value

    def apply(self, x: ir.Value | None, tape: ir.tape.Tape) -> ir.Value:
        return tape.op("RotaryEmbedding", [x, self.indices, self.cos, self.sin], attributes={"interleaved": 0},
                       domain=ORT_CONTRIB_DOMAIN)


@dataclass
class LowerToOrtPass(ir.passes.InPlacePass):
    """Lower PRoPE (either head axis) and KEqVAttention:kv nodes of the main graph to onnxruntime
    contrib kernels. After the call, ``lowered`` counts the lowered nodes per op and ``skipped`` lists
    (node name, reason) for the ai.gemma4 nodes left as functions.
    """

    lowered: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _rows: dict[tuple[bytes, str, int], Rotary] = field(default_factory=dict)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.lowered.clear()
        self.skipped.clear()
        self._rows.clear()
        graph = model.graph
        for node in list(graph):
            if node.domain != DOMAIN:
                continue
            reason = self._check(node)
            if reason is not None:
                self.skipped.append((node.name or node.op_type, reason))
                continue
            tape = ir.tape.Tape(graph)
            new_outputs = self._rewrite(node, tape)
            ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes, node.outputs, new_outputs)
            key = f"{node.op_type}:{node.overload}" if node.overload else node.op_type
            self.lowered[key] = self.lowered.get(key, 0) + 1
        modified = bool(self.lowered)
        if modified:
            model.opset_imports.setdefault(ORT_CONTRIB_DOMAIN, 1)
            common_passes.RemoveUnusedFunctionsPass()(model)
            if not any(n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(graph)):
                model.opset_imports.pop(DOMAIN, None)
        return ir.passes.PassResult(model, modified)

    # -- check: None when the node fits, else the reason ------------------------------------------

    def _check(self, node: ir.Node) -> str | None:
        if node.op_type == "PRoPE":
            head_axis = node.attributes.get_int("head_axis")
            return None if head_axis in (1, 2) else f"PRoPE head_axis {head_axis} is not 2 or 1"
        if node.op_type == "KEqVAttention":
            if node.overload == "keqv":
                return "K=V keeps one cache of values; GroupQueryAttention caches roped keys"
            if node.overload == "reuse":
                return "a KV-shared consumer has no new keys/values for GroupQueryAttention"
            if node.overload == "kv":
                return None
            if node.overload == "kv_image_blocks":
                return None
            return f"unknown KEqVAttention overload {node.overload!r}"
        return f"no onnxruntime kernel lowering for {node.op_type}"

    # -- rewrite: new nodes on the tape, the values replacing the node's outputs -------------------

    def _rewrite(self, node: ir.Node, tape: ir.tape.Tape) -> list[ir.Value]:
        if node.op_type == "PRoPE":
            return self._rotary(node, tape)
        rotary = self._rotary_rows(node, "rope_inv_freq", node.inputs[5], tape)
        if node.overload == "kv_image_blocks":
            return self._attention_unless_images(node, tape, rotary)
        return self._attention(node, tape, rotary)

    def _attention_unless_images(self, node: ir.Node, tape: ir.tape.Tape, rotary: Rotary) -> list[ir.Value]:
        causal = ir.tape.Tape()
        causal_outputs = self._attention(node, causal, rotary)
        function = ir.Node(node.domain, node.op_type, list(node.inputs), overload=node.overload,
                           attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                           num_outputs=len(node.outputs))
        no_images = tape.op("Less", [tape.op("ReduceMax", [node.inputs[8]], attributes={"keepdims": 0}),
                                     _ints(tape, [0])])
        for index, value in enumerate(v for n in [*causal.nodes, function] for v in n.outputs):
            value.name = f"{node.name}_branch_{index}"  # unique across branches: ONNX names are graph-wide (SSA)
        branches = {"then_branch": ir.Graph([], causal_outputs, nodes=causal.nodes, name=f"{node.name}_causal"),
                    "else_branch": ir.Graph([], list(function.outputs), nodes=[function], name=f"{node.name}_images")}
        return list(tape.op_multi_out("If", [tape.op("Squeeze", [no_images])], attributes=branches,
                                      num_outputs=len(node.outputs)))

    def _rotary_rows(self, node: ir.Node, attribute: str, position_ids: ir.Value | None,
                     tape: ir.tape.Tape) -> Rotary:
        """The cos/sin rows of ``position_ids`` for the node's frequency table, made on the main graph's
        tape (an If branch below may read them), once per table and position input."""
        assert position_ids is not None
        inv_freq = np.asarray(node.attributes[attribute].as_floats(), dtype=np.float32)
        dtype = node.inputs[0].dtype if node.inputs[0] is not None and node.inputs[0].dtype else ir.DataType.FLOAT
        key = (inv_freq.tobytes(), dtype.name, id(position_ids))
        if key not in self._rows:
            flat = tape.op("Reshape", [position_ids, _ints(tape, [-1, 1])])
            frequencies = tape.op("Constant", [], attributes={"value": ir.tensor(inv_freq[None, :])})
            angles = tape.op("Mul", [tape.op("Cast", [flat], attributes={"to": ir.DataType.FLOAT}), frequencies])
            wide = tape.op("Cast", [angles], attributes={"to": ir.DataType.DOUBLE})
            cos, sin = (tape.op("Cast", [tape.op(f, [wide])], attributes={"to": dtype}) for f in ("Cos", "Sin"))
            rows = tape.op("Range", [_scalar(tape, 0), tape.op("Size", [position_ids]), _scalar(tape, 1)])
            indices = tape.op("Reshape", [rows, tape.op("Shape", [position_ids])])
            self._rows[key] = Rotary(indices, cos, sin)
        return self._rows[key]

    def _rotary(self, node: ir.Node, tape: ir.tape.Tape) -> list[ir.Value]:
        x = node.inputs[0]
        rotary = self._rotary_rows(node, "inv_freq", node.inputs[1], tape)
        if node.attributes["head_axis"].as_int() == 1:  # [B,N,S,D]: the kernel's own 4D layout
            return [rotary.apply(x, tape)]
        rotated = rotary.apply(tape.op("Reshape", [x, _ints(tape, [0, 0, -1])]), tape)
        return [tape.op("Reshape", [rotated, tape.op("Shape", [x])])]

    def _attention(self, node: ir.Node, tape: ir.tape.Tape, rotary: Rotary) -> list[ir.Value]:
        query, key, value, q_norm_weight, k_norm_weight, _, past_key, past_value = node.inputs[:8]
        attrs = node.attributes
        head_dim, window, eps = attrs["head_dim"].as_int(), attrs["sliding_window"].as_int(), attrs["eps"].as_float()
        heads_shape = _ints(tape, [0, 0, -1, head_dim])
        merge_shape = _ints(tape, [0, 0, -1])

        def norm(x: ir.Value | None, weight: ir.Value) -> ir.Value:
            heads = tape.op("Reshape", [x, heads_shape])
            attributes = {"axis": -1, "epsilon": eps, "stash_type": 1}
            normed = tape.op("SimplifiedLayerNormalization", [heads, weight], attributes=attributes)
            return tape.op("Reshape", [normed, merge_shape])

        def int32(x: ir.Value) -> ir.Value:
            return tape.op("Cast", [x], attributes={"to": ir.DataType.INT32})

        assert q_norm_weight is not None and k_norm_weight is not None
        ones_float = tape.op("Constant", [], attributes={"value": ir.tensor(np.ones(head_dim, np.float32))})
        ones = tape.op("CastLike", [ones_float, q_norm_weight])
        past_length = tape.op("Shape", [past_key], attributes={"start": 2, "end": 3})
        step_length = tape.op("Shape", [query], attributes={"start": 1, "end": 2})
        total = tape.op("Add", [past_length, step_length])
        batch = tape.op("Shape", [query], attributes={"start": 0, "end": 1})
        seqlens_k = int32(tape.op("Expand", [tape.op("Sub", [total, _ints(tape, [1])]), batch]))
        total_scalar = int32(tape.op("Squeeze", [total]))

        output, keys, values = tape.op_multi_out(
            "GroupQueryAttention",
            [rotary.apply(norm(query, q_norm_weight), tape), rotary.apply(norm(key, k_norm_weight), tape),
             norm(value, ones),
             past_key, past_value, seqlens_k, total_scalar],
            attributes={
                "num_heads": attrs["num_heads"].as_int(),
                "kv_num_heads": attrs["num_kv_heads"].as_int(),
                "scale": 1.0,
                "local_window_size": window if window > 0 else -1,
            },
            num_outputs=3,
            domain=ORT_CONTRIB_DOMAIN,
        )  # fmt: skip
        if window > 1:
            start, end, axis = _ints(tape, [1 - window]), _ints(tape, [_INT64_MAX]), _ints(tape, [2])
            present_key = tape.op("Slice", [keys, start, end, axis])
            present_value = tape.op("Slice", [values, start, end, axis])
        else:
            present_key, present_value = tape.op("Identity", [keys]), tape.op("Identity", [values])
        return [output, present_key, present_value, keys, values]


def _scalar(tape: ir.tape.Tape, value: int) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(value, dtype=np.int64))})


def _ints(tape: ir.tape.Tape, values: list[int]) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(values, dtype=np.int64))})


def lower_to_ort(model: ir.Model) -> LowerToOrtPass:
    """Run the lowering in place; the returned pass says what was lowered and what was not, and why."""
    lowering = LowerToOrtPass()
    lowering(model)
    return lowering
