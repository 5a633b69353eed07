"""SE with fully-connected excitation (``nn.Linear``, the paper's original form)::

x ─▶ GlobalAveragePool | ReduceMean(axes=[2,3], keepdims=0|1)
  ─▶ [Reshape | Flatten to (N, C)]
  ─▶ Gemm | MatMul+Add (w1, b1) ─▶ Relu ─▶ Gemm | MatMul+Add (w2, b2) ─▶ Sigmoid
  ─▶ Reshape to (N, C, 1, 1) ─▶ [Expand to x's shape] ─▶ Mul(x, ·)
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from onnxruntime.transformers.onnx_model import OnnxModel

from export.fusion_se import (
    FORM,
    Excitation,
    NearMisses,
    Rejected,
    Shapes,
    SqueezeExcitationFusion,
    attribute,
)

Dense = tuple[list[NodeProto], np.ndarray, np.ndarray]  # (nodes in order, W as [out, in], b)


class FusionSqueezeExcitationLinear(SqueezeExcitationFusion):
    def __init__(self, model: OnnxModel, shapes: Shapes, near_misses: NearMisses) -> None:
        super().__init__(model, shapes, near_misses, "linear excitation")

    def match_excitation(
        self, mul: NodeProto, gate_index: int, output_name_to_node: dict[str, NodeProto]
    ) -> Excitation:
        _, path, _ = self.model.match_parent_paths(
            mul,
            [
                (["Expand", "Reshape", "Sigmoid"], [gate_index, 0, 0]),
                (["Reshape", "Sigmoid"], [gate_index, 0]),
            ],
            output_name_to_node,
        )
        *unflatten_nodes, sigmoid = self.sigmoid_gate(mul, path, gate_index)
        unflatten = unflatten_nodes[-1]
        fc2_nodes, w2, b2 = self._dense(sigmoid, output_name_to_node)
        relu = self.model.match_parent(fc2_nodes[0], "Relu", 0, output_name_to_node)
        if relu is None:
            raise Rejected("no Relu between the excitation's two layers", FORM)
        fc1_nodes, w1, b1 = self._dense(relu, output_name_to_node)
        pool, flat_nodes = self._squeeze(fc1_nodes[0].input[0], output_name_to_node)
        self.check_widths(w1, w2)
        self._check_unflatten(unflatten, w1.shape[1])
        chain = [pool, *flat_nodes, *fc1_nodes, relu, *fc2_nodes, sigmoid, *unflatten_nodes[::-1]]
        return Excitation(pool.input[0], chain, w1, b1, w2, b2)

    def _squeeze(
        self, name: str, output_name_to_node: dict[str, NodeProto]
    ) -> tuple[NodeProto, list[NodeProto]]:
        """The pool feeding the first layer, directly (keepdims=0) or through a flatten."""
        flatten = output_name_to_node.get(name)
        if flatten is None or flatten.op_type not in ("Reshape", "Flatten"):
            return self.match_pool(name, output_name_to_node, keepdims=False), []
        if flatten.op_type == "Flatten" and attribute(flatten, "axis", 1) != 1:
            raise Rejected("the squeeze is flattened at an axis other than 1")
        shape = self.shapes.get(flatten.output[0])
        if flatten.op_type == "Reshape" and (shape is None or len(shape) != 2):
            raise Rejected("the squeeze is reshaped to something other than (N, C)")
        return self.match_pool(flatten.input[0], output_name_to_node, keepdims=True), [flatten]

    def _dense(self, after: NodeProto, output_name_to_node: dict[str, NodeProto]) -> Dense:
        """``y = x·Wᵀ + b`` feeding ``after``'s first input, as ``Gemm`` or ``MatMul`` + ``Add``."""
        form, path, _ = self.model.match_parent_paths(
            after, [(["Gemm"], [0]), (["Add", "MatMul"], [0, None])], output_name_to_node
        )
        if path is None:
            raise Rejected("the excitation's layers are not Gemm or MatMul+Add", FORM)
        if form == 0:
            return self._gemm(path[0])
        add, matmul = path
        b = self.constant(add.input[1 if add.input[0] == matmul.output[0] else 0], "a bias")
        w = self.constant(matmul.input[1], "a MatMul's weight")
        if w.ndim != 2 or b.reshape(-1).size != w.shape[1]:
            raise Rejected(f"MatMul weight {w.shape} and bias {b.shape} do not make a layer")
        return [matmul, add], w.T, b.reshape(-1)

    def _gemm(self, gemm: NodeProto) -> Dense:
        if attribute(gemm, "transA", 0) or len(gemm.input) < 2:
            raise Rejected("Gemm with transA")
        w = self.constant(gemm.input[1], "a Gemm's weight")
        if w.ndim != 2:
            raise Rejected(f"{w.ndim}-D Gemm weight")
        alpha = attribute(gemm, "alpha", 1.0)
        beta = attribute(gemm, "beta", 1.0)
        assert isinstance(alpha, float) and isinstance(beta, float)
        w = (w if attribute(gemm, "transB", 0) else w.T) * alpha
        b = self.optional_constant(gemm, 2, "a Gemm's bias")
        b = np.zeros(w.shape[0], np.float32) if b is None else b * beta
        if b.size not in (1, w.shape[0]):
            raise Rejected(f"Gemm bias of {b.size} for {w.shape[0]} outputs")
        return [gemm], w, np.broadcast_to(b.reshape(-1), (w.shape[0],))

    def _check_unflatten(self, node: NodeProto, channels: int) -> None:
        target = self.model.get_constant_value(node.input[1]) if len(node.input) > 1 else None
        if target is not None:
            t = target.reshape(-1).tolist()
            ok = len(t) == 4 and t[1:] == [channels, 1, 1]  # any batch entry: -1, 0 or N
        else:
            shape = self.shapes.get(node.output[0])
            t = shape
            ok = shape is not None and len(shape) == 4 and shape[1:] == [channels, 1, 1]
        if not ok:
            raise Rejected(f"the gate is reshaped to {t}, not (N, {channels}, 1, 1)")
