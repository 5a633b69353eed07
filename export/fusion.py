"""ONNX Runtime optimisation pass: every Squeeze-and-Excitation block becomes one node.

In the style of ONNX Runtime's own Python optimiser (``onnxruntime.transformers``): the graph is
wrapped in an :class:`OnnxModel`, each pattern is a :class:`Fusion` subclass whose ``fuse``
method matches one chain from its anchor node, and the edits are applied in one batch by
``Fusion.apply``. The fused node is ``ai.seresnet::SqueezeExcitation`` (docs/design.md §4),
backed by the ``ops`` library:

    y = x * sigmoid(w2 · relu(w1 · mean_hw(x) + b1) + b2)   [+ residual]   [then ReLU]
"""

from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper
from onnxruntime.transformers.fusion_base import Fusion
from onnxruntime.transformers.onnx_model import OnnxModel

from export.errors import ExportError
from ops import OP_DOMAIN, OP_TYPE, make_node, opset_import

log = logging.getLogger(__name__)


class FusionError(ExportError):
    pass


@dataclass(frozen=True)
class Excitation:
    """What a matched excitation contributes to the fused node."""

    pool_input: str  # the tensor x that is pooled (and must be the one that is scaled)
    nodes: list[NodeProto]  # pool ... sigmoid (and any reshape/expand of the gate), in order
    w1: np.ndarray  # [Cr, C]
    b1: np.ndarray  # [Cr]
    w2: np.ndarray  # [C, Cr]
    b2: np.ndarray  # [C]


class _SqueezeExcitationFusion(Fusion, ABC):
    """Shared tail of both excitation forms: find the gate at a ``Mul``, then absorb the
    residual ``Add`` and the block's final ``Relu`` where the graph allows it.

    ::

        x ──┬───────────────────────── Mul ── [Add(residual)] ── [Relu] ──▶
            └── squeeze ─ excitation ──┘
    """

    def __init__(
        self, model: OnnxModel, shapes: dict[str, list[int | str | None]], description: str
    ) -> None:
        super().__init__(model, OP_TYPE, "Mul", description)
        self.graph_outputs = {o.name for o in model.model.graph.output}
        self.shapes = shapes

    @abstractmethod
    def match_excitation(
        self, x: str, gate: str, output_name_to_node: dict[str, NodeProto]
    ) -> Excitation | None:
        """Match ``gate`` (the Mul's other input) back through the excitation to its pool."""

    def fuse(
        self,
        node: NodeProto,
        input_name_to_nodes: dict[str, list[NodeProto]],
        output_name_to_node: dict[str, NodeProto],
    ) -> None:
        if len(node.input) != 2:
            return
        for x, gate in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            found = self.match_excitation(x, gate, output_name_to_node)
            if found is not None and found.pool_input == x:
                self._fuse_block(node, found, input_name_to_nodes)
                return

    def _fuse_block(
        self, mul: NodeProto, se: Excitation, input_name_to_nodes: dict[str, list[NodeProto]]
    ) -> None:
        chain = [*se.nodes, mul]
        inner = {o for n in se.nodes for o in n.output}
        if inner & self.graph_outputs:
            return
        residual: str | None = None
        relu = 0
        output = mul.output[0]
        add = _only_child(output, "Add", input_name_to_nodes)
        if add is not None and output not in self.graph_outputs:
            other = add.input[1] if add.input[0] == output else add.input[0]
            if self._same_shape(other, se.pool_input) and other != output:
                residual, output = other, add.output[0]
                chain.append(add)
                act = _only_child(output, "Relu", input_name_to_nodes)
                if act is not None and output not in self.graph_outputs:
                    relu, output = 1, act.output[0]
                    chain.append(act)
        if not self.model.is_safe_to_fuse_nodes(chain, [output], input_name_to_nodes, {}):
            return

        name = self.model.create_node_name(OP_TYPE, "SE_")
        weights = []
        for suffix, value in (("w1", se.w1), ("b1", se.b1), ("w2", se.w2), ("b2", se.b2)):
            tensor = numpy_helper.from_array(
                np.ascontiguousarray(value, np.float32), f"{name}.{suffix}"
            )
            self.model.add_initializer(tensor, self.this_graph_name)
            weights.append(tensor.name)
        fused = make_node(
            se.pool_input, *weights, output=output, residual=residual, relu=bool(relu), name=name
        )
        self.nodes_to_remove.extend(chain)
        self.nodes_to_add.append(fused)
        self.node_name_to_graph_name[name] = self.this_graph_name
        self.prune_graph = True

    def _same_shape(self, a: str, b: str) -> bool:
        """True only when both shapes are known, 4-D and equal dim by dim (a broadcast Add,
        such as a bias, must not be absorbed)."""
        if self.model.get_constant_value(a) is not None:
            return False
        sa, sb = self.shapes.get(a), self.shapes.get(b)
        return sa is not None and sb is not None and len(sa) == 4 and sa == sb and None not in sa

    # -- shared matching helpers ------------------------------------------------------------
    def constant(self, name: str) -> np.ndarray | None:
        return self.model.get_constant_value(name)

    def match_pool(
        self, name: str, output_name_to_node: dict[str, NodeProto], keepdims: bool
    ) -> NodeProto | None:
        """A global average pool over H and W of a 4-D tensor: ``GlobalAveragePool`` or
        ``ReduceMean(axes={2,3} or {-1,-2}, keepdims)`` with axes as attribute or constant."""
        node = output_name_to_node.get(name)
        if node is None:
            return None
        if node.op_type == "GlobalAveragePool":
            return node if keepdims else None
        if node.op_type != "ReduceMean":
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if bool(attrs.get("keepdims", 1)) != keepdims or attrs.get("noop_with_empty_axes", 0):
            return None
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.constant(node.input[1])
            axes = None if value is None else value.reshape(-1).tolist()
        rank = self._rank(node.input[0])
        if not axes or rank not in (4, None):
            return None
        normalized = {a % 4 if a < 0 else a for a in axes}
        if normalized != {2, 3} or (
            rank is None and any(a < 0 for a in axes) and any(a >= 0 for a in axes)
        ):
            return None
        return node

    def _rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


class FusionSqueezeExcitationConv(_SqueezeExcitationFusion):
    """SE with 1x1-convolution excitation (timm ``SEModule``, both PyTorch exporters)::

    x ─▶ GlobalAveragePool | ReduceMean(axes=[2,3], keepdims=1)
      ─▶ Conv 1x1 (w1, b1) ─▶ Relu ─▶ Conv 1x1 (w2, b2) ─▶ Sigmoid ─▶ Mul(x, ·)
    """

    def __init__(self, model: OnnxModel, shapes: dict[str, list[int | str | None]]) -> None:
        super().__init__(model, shapes, "conv excitation")

    def match_excitation(
        self, x: str, gate: str, output_name_to_node: dict[str, NodeProto]
    ) -> Excitation | None:
        sigmoid = output_name_to_node.get(gate)
        if sigmoid is None or sigmoid.op_type != "Sigmoid":
            return None
        conv2 = output_name_to_node.get(sigmoid.input[0])
        fc2 = self._pointwise(conv2)
        if fc2 is None:
            return None
        relu = output_name_to_node.get(conv2.input[0])
        if relu is None or relu.op_type != "Relu":
            return None
        conv1 = output_name_to_node.get(relu.input[0])
        fc1 = self._pointwise(conv1)
        if fc1 is None:
            return None
        pool = self.match_pool(conv1.input[0], output_name_to_node, keepdims=True)
        if pool is None:
            return None
        (w1, b1), (w2, b2) = fc1, fc2
        if w1.shape[0] != w2.shape[1] or w2.shape[0] != w1.shape[1]:
            return None
        return Excitation(pool.input[0], [pool, conv1, relu, conv2, sigmoid], w1, b1, w2, b2)

    def _pointwise(self, conv: NodeProto | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Weights of a plain 1x1 convolution (no groups, strides, padding or dilation)."""
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 2:
            return None
        w = self.constant(conv.input[1])
        if w is None or w.ndim != 4 or w.shape[2:] != (1, 1):
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("group", 1) != 1 or any(p != 0 for p in attrs.get("pads", [])):
            return None
        if any(s != 1 for s in attrs.get("strides", [])) or any(
            d != 1 for d in attrs.get("dilations", [])
        ):
            return None
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return None
        b = self.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if len(conv.input) > 2 and conv.input[2] and b is None:
            return None
        out_ch = w.shape[0]
        return w.reshape(out_ch, -1), (np.zeros(out_ch, np.float32) if b is None else b)


class FusionSqueezeExcitationLinear(_SqueezeExcitationFusion):
    """SE with fully-connected excitation (``nn.Linear``, the paper's original form)::

    x ─▶ GlobalAveragePool | ReduceMean(axes=[2,3], keepdims=0|1)
      ─▶ [Reshape | Flatten to (N, C)]
      ─▶ Gemm | MatMul+Add (w1, b1) ─▶ Relu ─▶ Gemm | MatMul+Add (w2, b2) ─▶ Sigmoid
      ─▶ Reshape to (N, C, 1, 1) ─▶ [Expand to x's shape] ─▶ Mul(x, ·)
    """

    def __init__(self, model: OnnxModel, shapes: dict[str, list[int | str | None]]) -> None:
        super().__init__(model, shapes, "linear excitation")

    def match_excitation(
        self, x: str, gate: str, output_name_to_node: dict[str, NodeProto]
    ) -> Excitation | None:
        nodes: list[NodeProto] = []
        node = output_name_to_node.get(gate)
        if node is not None and node.op_type == "Expand":
            nodes.append(node)
            node = output_name_to_node.get(node.input[0])
        if node is None or node.op_type != "Reshape":
            return None
        unflatten = node
        nodes.append(unflatten)
        sigmoid = output_name_to_node.get(unflatten.input[0])
        if sigmoid is None or sigmoid.op_type != "Sigmoid":
            return None
        fc2 = self._dense(sigmoid.input[0], output_name_to_node)
        if fc2 is None:
            return None
        relu = output_name_to_node.get(fc2[0][0].input[0])
        if relu is None or relu.op_type != "Relu":
            return None
        fc1 = self._dense(relu.input[0], output_name_to_node)
        if fc1 is None:
            return None
        squeezed = fc1[0][0].input[0]
        flatten = output_name_to_node.get(squeezed)
        flat_nodes: list[NodeProto] = []
        pool = self.match_pool(squeezed, output_name_to_node, keepdims=False)
        if pool is None and flatten is not None and flatten.op_type in ("Reshape", "Flatten"):
            pool = self.match_pool(flatten.input[0], output_name_to_node, keepdims=True)
            if pool is None or not self._is_flatten(flatten):
                return None
            flat_nodes = [flatten]
        if pool is None:
            return None
        (nodes1, w1, b1), (nodes2, w2, b2) = fc1, fc2
        channels = w1.shape[1]
        if w2.shape != (channels, w1.shape[0]) or not self._is_unflatten(unflatten, channels):
            return None
        chain = [pool, *flat_nodes, *nodes1, relu, *nodes2, sigmoid, *reversed(nodes)]
        return Excitation(pool.input[0], chain, w1, b1, w2, b2)

    def _dense(
        self, name: str, output_name_to_node: dict[str, NodeProto]
    ) -> tuple[list[NodeProto], np.ndarray, np.ndarray] | None:
        """``y = x·Wᵀ + b`` as ``Gemm`` or ``MatMul`` + ``Add``: returns (nodes in order, W as
        [out, in], b)."""
        node = output_name_to_node.get(name)
        if node is None:
            return None
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or len(node.input) < 2:
                return None
            w = self.constant(node.input[1])
            if w is None or w.ndim != 2:
                return None
            w = (w if attrs.get("transB", 0) else w.T) * attrs.get("alpha", 1.0)
            b = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and b is None:
                return None
            b = np.zeros(w.shape[0], np.float32) if b is None else b * attrs.get("beta", 1.0)
            if b.size not in (1, w.shape[0]):
                return None
            return [node], w, np.broadcast_to(b.reshape(-1), (w.shape[0],))
        if node.op_type == "Add":
            for i in (0, 1):
                matmul = output_name_to_node.get(node.input[i])
                b = self.constant(node.input[1 - i])
                if matmul is None or matmul.op_type != "MatMul" or b is None:
                    continue
                w = self.constant(matmul.input[1])
                if w is None or w.ndim != 2 or b.reshape(-1).size != w.shape[1]:
                    continue
                return [matmul, node], w.T, b.reshape(-1)
        return None

    def _is_flatten(self, node: NodeProto) -> bool:
        if node.op_type == "Flatten":
            axis = next(
                (helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1
            )
            return axis == 1
        shape = self.shapes.get(node.output[0])
        return shape is not None and len(shape) == 2

    def _is_unflatten(self, node: NodeProto, channels: int) -> bool:
        target = self.constant(node.input[1]) if len(node.input) > 1 else None
        if target is not None:
            t = target.reshape(-1).tolist()
            return len(t) == 4 and t[1:] == [channels, 1, 1]  # any batch entry: -1, 0 or N
        shape = self.shapes.get(node.output[0])
        return shape is not None and len(shape) == 4 and shape[1:] == [channels, 1, 1]


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Shapes of every tensor ONNX shape inference (with data propagation) can work out.

    Symbolic dims keep their names, so ``[batch, 64, 28, 28]`` equals itself but not
    ``[1, 64, 28, 28]``; unknown dims are ``None``.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # inference is best effort; unknown shapes only block absorption
        log.warning("shape inference failed (%s); residual adds will not be absorbed", e)
        inferred = model
    shapes: dict[str, list[int | str | None]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shapes[vi.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _only_child(
    output: str, op_type: str, input_name_to_nodes: dict[str, list[NodeProto]]
) -> NodeProto | None:
    children = input_name_to_nodes.get(output, [])
    if len(children) == 1 and children[0].op_type == op_type:
        return children[0]
    return None


@dataclass(frozen=True)
class FusionReport:
    fused: int
    with_residual: int
    nodes_before: int
    nodes_after: int

    def summary(self) -> str:
        return (
            f"fused {self.fused} SE block{'s' if self.fused != 1 else ''} "
            f"({self.with_residual} with residual Add+ReLU absorbed); "
            f"{self.nodes_before} -> {self.nodes_after} nodes"
        )


FUSIONS: Sequence[type[_SqueezeExcitationFusion]] = (
    FusionSqueezeExcitationConv,
    FusionSqueezeExcitationLinear,
)


def fuse_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FusionReport]:
    """Apply every SE fusion to ``model`` (changed in place) and report what happened."""
    before = len(model.graph.node)
    wrapped = OnnxModel(model)
    shapes = _inferred_shapes(model)  # once: fused nodes have no schema for shape inference
    for fusion in FUSIONS:
        fusion(wrapped, shapes).apply()
    fused_nodes = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == OP_DOMAIN]
    if fused_nodes:
        if not any(o.domain == OP_DOMAIN for o in model.opset_import):
            model.opset_import.append(opset_import())
        wrapped.topological_sort()
        produced = {o for n in model.graph.node for o in n.output}
        stale = [vi for vi in model.graph.value_info if vi.name not in produced]
        for vi in stale:  # shapes of tensors the fused nodes swallowed
            model.graph.value_info.remove(vi)
    report = FusionReport(
        fused=len(fused_nodes),
        with_residual=sum(len(n.input) > 5 for n in fused_nodes),
        nodes_before=before,
        nodes_after=len(model.graph.node),
    )
    return model, report


def fuse_file(src: Path, dst: Path) -> FusionReport:
    """Fuse ``src`` into ``dst``. With nothing to fuse, ``dst`` is a byte-identical copy."""
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise FusionError(f"cannot parse {src} as an ONNX model: {e}") from e
    if not any(n.op_type == "Mul" for n in model.graph.node):
        shutil.copyfile(src, dst)
        n = len(model.graph.node)
        return FusionReport(0, 0, n, n)
    model, report = fuse_model(model)
    if report.fused == 0:
        shutil.copyfile(src, dst)
        return report
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return report


__all__ = [
    "OP_DOMAIN",
    "OP_TYPE",
    "FusionError",
    "FusionReport",
    "FusionSqueezeExcitationConv",
    "FusionSqueezeExcitationLinear",
    "fuse_file",
    "fuse_model",
]
