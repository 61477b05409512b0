"""The ``ai.gemma4`` custom-op domain (version 1) and what its three ops share.

Gemma 4 needs three things that standard ONNX has no single op for: proportional RoPE (``PRoPE``),
its attention with q/k/v norms, K=V caches and KV sharing (``KEqVAttention``) and the 26B-A4B router
plus experts (``TopKMoE``). Each is an ONNX function (a FunctionProto carried inside the model) whose
body uses only standard ONNX ops, so stock onnxruntime runs it by inlining; a runtime with a fused
kernel can match the op instead (``lower_ort``). One file per op holds its math, its PyTorch
reference (a ``torch.library`` op in namespace ``gemma4``), its onnxscript function and its
registration.

How an op reaches the ONNX file (checked with torch 2.13, onnxscript 0.7.2, onnxruntime 1.32)::

    torch.ops.gemma4.<op>  ──custom_translation_table()──►  bare node ai.gemma4::<Op>[:overload]
                                                               │  (no function yet)
    torch.onnx.export: version conversion + optimizer          │  leave unknown-domain nodes alone
                                                               ▼
    AttachFunctionsPass  ──►  model.functions[(ai.gemma4, Op, overload)] = FunctionProto
                              and, transitively, the functions of the ai.gemma4 ops that body calls

Why not let the exporter attach the function itself: torch.onnx.export always runs onnxscript's
version converter, and that begins with onnx_ir's ``InlinePass``; every function the exporter
recorded, custom_translation_table functions included, is inlined into standard ops and disappears.
A bare node of an unknown domain survives conversion and optimisation untouched, so the translation
emits only the node (through an ``onnxscript.values.Op`` whose OpSchema is derived from the function's
signature) and ``AttachFunctionsPass`` adds the bodies afterwards. ``export()`` does both steps.

Overloads: ``KEqVAttention`` has three input/output signatures (K≠V, K=V, KV-shared consumer). An
ONNX function body cannot reference an absent optional input, not even inside an untaken ``If``
branch (onnx and onnxruntime both reject the model), so the op uses ONNX function *overloads*
(IR version 10): one op name, one FunctionProto per signature, selected by ``node.overload``.

Nested ops: an op's body may call another ``ai.gemma4`` op as a node (KEqVAttention's bodies call
``PRoPE`` for q and k), so RoPE stays a visible, separately matchable unit inside attention::

    KEqVAttention:kv body    … RMSNorm ─► ai.gemma4::PRoPE ─► … (q)   … RMSNorm ─► ai.gemma4::PRoPE ─► … (k)
    KEqVAttention:keqv body  … ai.gemma4::PRoPE (q)   … v·w_k ─► ai.gemma4::PRoPE (keys over the cache)
    KEqVAttention:reuse body … ai.gemma4::PRoPE (q)

``AttachFunctionsPass`` attaches the nested functions too; onnxruntime inlines functions recursively.
A nested call names an op's default overload only: onnxruntime (1.32) looks nested calls up by
domain and name, ignoring ``overload`` (``flatten_function`` refuses anything else).

Function bodies import the standard domain at ``STD_OPSET`` (20, torch.onnx's default); onnxruntime
accepts a model that imports another standard version.

The shared pieces live here too: the Gemma 4 RMSNorm (no ``1 + w`` offset, fp32 inside) in torch
and onnxscript, and ``flatten_function`` which inlines the helper functions an op body calls, so
every FunctionProto in a model contains standard ops and nested ``ai.gemma4`` ops only.

Using the ops: importing an op module (``gemma4_onnx.graphs.prope`` …) registers its
``torch.ops.gemma4.*`` op; ``custom_translation_table()`` and ``export()`` import all three. Export
wrappers call the torch ops and export with ``export()`` (or torch.onnx.export with
``custom_translation_table()`` followed by ``attach_functions(program.model)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript
from onnxscript import FLOAT, opset20

if TYPE_CHECKING:
    import torch

# onnxscript bodies follow onnxscript's rules (list literals are tensors...), not Python typing's.
op: Any = opset20

DOMAIN = "ai.gemma4"
VERSION = 1
OPSET = onnxscript.values.Opset(DOMAIN, VERSION)
STD_OPSET = 20
# Helper functions called inside op bodies live in their own domain and are always inlined away.
HELPER_OPSET = onnxscript.values.Opset("ai.gemma4.helpers", 1)
MIN_IR_VERSION = 10  # function overloads
# onnxruntime's contrib ops: allowed only in the bodies of overloads the quantizer writes (TopKMoE:nbits).
ORT_CONTRIB_DOMAIN = "com.microsoft"

_TENSOR_TYPES = [
    f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "int64", "int32", "int8", "uint8", "bool")
]


# ---------------------------------------------------------------------------------------------
# Shared math: Gemma 4 RMSNorm (§3.0): y = x·(mean(x²) + eps)^(-1/2)·w, in fp32, no "1 + w".


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' Gemma4RMSNorm, operation for operation (``weight=None``: the scale-less norm)."""
    import torch

    xf = x.float()
    normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight.float()
    return normed.type_as(x)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def RMSNorm(x, weight, eps: float):
    """RMSNorm over the last axis; torch's pow(·, -0.5) is 1/sqrt, so the body says so."""
    xf = op.Cast(x, to=FLOAT.dtype)
    mean_square = op.Add(op.ReduceMean(op.Mul(xf, xf), [-1], keepdims=1), op.CastLike(eps, xf))
    normed = op.Mul(xf, op.Div(op.CastLike(1.0, xf), op.Sqrt(mean_square)))
    return op.CastLike(op.Mul(normed, op.Cast(weight, to=FLOAT.dtype)), x)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def RMSNormNoScale(x, eps: float):
    """The scale-less RMSNorm (v_norm, the router's norm)."""
    xf = op.Cast(x, to=FLOAT.dtype)
    mean_square = op.Add(op.ReduceMean(op.Mul(xf, xf), [-1], keepdims=1), op.CastLike(eps, xf))
    return op.CastLike(op.Mul(xf, op.Div(op.CastLike(1.0, xf), op.Sqrt(mean_square))), x)


# ---------------------------------------------------------------------------------------------
# From an onnxscript function to a FunctionProto with standard ops only, and to a bare-node emitter.


def flatten_function(function: onnxscript.OnnxFunction, op_type: str, overload: str = "") -> ir.Function:
    """``function`` as the ``ai.gemma4`` function ``op_type[:overload]``, with every helper function
    it calls inlined (onnx_ir's InlinePass), so its body holds standard ops and, where it calls
    another ``ai.gemma4`` op (KEqVAttention → PRoPE), nested ``ai.gemma4`` nodes.

    A nested call must be of an op's default ("") overload: onnxruntime resolves nested calls by
    domain and name only, ignoring the overload."""
    called = function.function_ir.get_called_functions()
    helpers = [f for f in called.values() if f.opset.domain == HELPER_OPSET.domain]
    functions = [ir.serde.deserialize_function(f.to_function_proto()) for f in helpers]
    top = ir.serde.deserialize_function(function.to_function_proto())
    graph = ir.Graph([], [], nodes=[], opset_imports={"": STD_OPSET, DOMAIN: VERSION, HELPER_OPSET.domain: 1})
    model = ir.Model(graph, ir_version=MIN_IR_VERSION, functions=[top, *functions])
    common_passes.InlinePass(criteria=lambda f: f.domain == HELPER_OPSET.domain)(model)
    flat = model.functions[top.identifier()]
    registered = _registered_names()
    nested = [n for n in ir.traversal.RecursiveGraphIterator(flat.graph) if n.domain == DOMAIN]
    for node in nested:
        if registered.get(node.op_type) != (node.op_type, ""):
            raise RuntimeError(
                f"{op_type}: a nested ai.gemma4 node must call an op's default overload by its op name "
                f"(onnxruntime ignores the overload of nested calls), got {node.op_identifier()}"
            )
    leftover = [n.op_identifier() for n in ir.traversal.RecursiveGraphIterator(flat.graph) if n.domain != ""]
    leftover = [i for i in leftover if i[0] not in (DOMAIN, ORT_CONTRIB_DOMAIN)]
    if leftover:
        raise RuntimeError(f"{op_type}: ops other than standard, ai.gemma4 and com.microsoft left in the body: "
                           f"{leftover}")
    flat.opset_imports.pop(HELPER_OPSET.domain, None)
    flat.opset_imports[""] = STD_OPSET
    if nested:
        flat.opset_imports[DOMAIN] = VERSION
    else:
        flat.opset_imports.pop(DOMAIN, None)
    if any(n.domain == ORT_CONTRIB_DOMAIN for n in ir.traversal.RecursiveGraphIterator(flat.graph)):
        flat.opset_imports[ORT_CONTRIB_DOMAIN] = 1
    proto = ir.serde.serialize_function(flat)
    proto.domain, proto.name, proto.overload = DOMAIN, op_type, overload
    return ir.serde.deserialize_function(proto)


def _op_schema(function: onnxscript.OnnxFunction, op_type: str) -> onnx.defs.OpSchema:
    """An (unregistered) OpSchema with the function's inputs, outputs and attributes: what torch's
    OpRecorder needs to record a node. Every input gets its own unconstrained type variable."""
    schema_cls = onnx.defs.OpSchema
    signature = function.op_signature
    assert signature is not None
    inputs, attributes, constraints = [], [], []
    for param in signature.params:
        if isinstance(param, ir.schemas.AttributeParameter):
            attr_type = getattr(schema_cls.AttrType, param.type.name)
            attributes.append(schema_cls.Attribute(param.name, attr_type, "", required=param.required))
        else:
            type_var = f"T_{param.name}"
            inputs.append(schema_cls.FormalParameter(param.name, type_var, ""))
            constraints.append((type_var, _TENSOR_TYPES, ""))
    outputs = []
    for value in function.function_ir.outputs:
        type_var = f"T_out_{value.name}"
        outputs.append(schema_cls.FormalParameter(value.name or "output", type_var, ""))
        constraints.append((type_var, _TENSOR_TYPES, ""))
    return schema_cls(
        op_type,
        DOMAIN,
        VERSION,
        inputs=inputs,
        outputs=outputs,
        type_constraints=constraints,
        attributes=attributes,
    )


def node_emitter(function: onnxscript.OnnxFunction, op_type: str, overload: str = "") -> Callable[..., Any]:
    """A callable for custom_translation_table bodies: records one bare ``ai.gemma4::op_type``
    node (inputs and attributes as for ``function``) and returns its output value(s)."""
    onnx_op = onnxscript.values.Op(OPSET, op_type, _op_schema(function, op_type))

    def emit(*inputs: Any, **attributes: Any) -> Any:
        outputs = onnx_op(*inputs, **attributes)
        first = outputs[0] if isinstance(outputs, Sequence) else outputs
        first.producer().overload = overload
        return outputs

    return emit


# ---------------------------------------------------------------------------------------------
# The registry: every op module exposes OP_TYPE, FUNCTIONS (overload → onnxscript function) and
# TRANSLATIONS (torch op overload → translation callable).


def _op_modules() -> list[Any]:
    from gemma4_onnx.graphs import keqv_attention, prope, topk_moe

    return [prope, keqv_attention, topk_moe]


def _registered_names() -> dict[str, tuple[str, str]]:
    """onnxscript function name → the (op_type, overload) it implements (KEqVAttentionKV → KEqVAttention:kv)."""
    return {f.name: (m.OP_TYPE, overload) for m in _op_modules() for overload, f in m.FUNCTIONS.items()}


def custom_translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for torch.onnx.export covering every ``gemma4`` torch op."""
    table: dict[Any, Callable[..., Any]] = {}
    for module in _op_modules():
        table.update(module.TRANSLATIONS)
    return table


_FUNCTIONS: dict[ir.OperatorIdentifier, ir.Function] = {}


def functions() -> Mapping[ir.OperatorIdentifier, ir.Function]:
    """Every ``ai.gemma4`` FunctionProto, keyed by (domain, op_type, overload)."""
    if not _FUNCTIONS:
        for module in _op_modules():
            for overload, function in module.FUNCTIONS.items():
                flat = flatten_function(function, module.OP_TYPE, overload)
                _FUNCTIONS[flat.identifier()] = flat
    return _FUNCTIONS


def called_functions(model: ir.Model) -> list[ir.OperatorIdentifier]:
    """The ``ai.gemma4`` ops ``model`` calls: nodes of its graph (subgraphs included) and, transitively,
    nodes inside the bodies of those ops (KEqVAttention calls PRoPE), each once, in discovery order."""
    library = functions()
    found: list[ir.OperatorIdentifier] = []
    pending: list[ir.Graph | ir.Function] = [model.graph]
    while pending:
        for node in ir.traversal.RecursiveGraphIterator(pending.pop()):
            identifier = node.op_identifier()
            if node.domain != DOMAIN or identifier in found:
                continue
            if identifier not in library:
                raise ValueError(f"no ai.gemma4 function for {identifier}")
            found.append(identifier)
            pending.append(library[identifier])
    return found


class AttachFunctionsPass(ir.passes.InPlacePass):
    """Adds the FunctionProto of every ``ai.gemma4`` op the model calls, in its graph or nested inside
    another op's body (and the opset import and IR version functions with overloads need). Returns
    whether the model changed."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        library = functions()
        modified = False
        for identifier in called_functions(model):
            if identifier not in model.functions:
                # A copy per model: onnx_ir values belong to one graph.
                model.functions[identifier] = ir.serde.deserialize_function(
                    ir.serde.serialize_function(library[identifier])
                )
                modified = True
        if modified:
            model.opset_imports.setdefault(DOMAIN, VERSION)
            model.opset_imports.setdefault("", STD_OPSET)
            model.ir_version = max(model.ir_version, MIN_IR_VERSION)
        return ir.passes.PassResult(model, modified)


def import_ort_contrib(model: onnx.ModelProto) -> None:
    """Declare onnxruntime's contrib domain in ``model`` (its nodes or function bodies use it)."""
    if not any(o.domain == ORT_CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1))


def attach_functions(model: ir.Model) -> bool:
    """Run ``AttachFunctionsPass`` on ``model`` in place; True if it added a function."""
    return AttachFunctionsPass()(model).modified


def export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    **export_kwargs: Any,
) -> torch.onnx.ONNXProgram:
    """``torch.onnx.export(dynamo=True)`` with every gemma4 op translated, then the functions
    attached. Save with ``program.save(path)``; passing ``f`` would save before the functions exist."""
    import torch

    if "f" in export_kwargs:
        raise TypeError("export(): save with program.save(path) after export, not f=")
    table = {**custom_translation_table(), **export_kwargs.pop("custom_translation_table", {})}
    program = torch.onnx.export(
        module, args, kwargs=kwargs, dynamo=True, custom_translation_table=table, **export_kwargs
    )
    assert program is not None
    attach_functions(program.model)
    return program
