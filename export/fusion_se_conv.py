"""SE with 1x1-convolution excitation (timm ``SEModule``, both PyTorch exporters)::

x ─▶ GlobalAveragePool | ReduceMean(axes=[2,3], keepdims=1)
  ─▶ Conv 1x1 (w1, b1) ─▶ Relu ─▶ Conv 1x1 (w2, b2) ─▶ Sigmoid ─▶ Mul(x, ·)
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto
from onnxruntime.transformers.onnx_model import OnnxModel

from export.fusion_se import (
    Excitation,
    NearMisses,
    Rejected,
    Shapes,
    SqueezeExcitationFusion,
    attribute,
)


class FusionSqueezeExcitationConv(SqueezeExcitationFusion):
    def __init__(self, model: OnnxModel, shapes: Shapes, near_misses: NearMisses) -> None:
        super().__init__(model, shapes, near_misses, "conv excitation")

    def match_excitation(
        self, mul: NodeProto, gate_index: int, output_name_to_node: dict[str, NodeProto]
    ) -> Excitation:
        path = self.model.match_parent_path(
            mul, ["Sigmoid", "Conv", "Relu", "Conv"], [gate_index, 0, 0, 0], output_name_to_node
        )
        sigmoid, conv2, relu, conv1 = self.sigmoid_gate(mul, path, gate_index)
        w1, b1 = self._pointwise(conv1)
        w2, b2 = self._pointwise(conv2)
        pool = self.match_pool(conv1.input[0], output_name_to_node, keepdims=True)
        self.check_widths(w1, w2)
        return Excitation(pool.input[0], [pool, conv1, relu, conv2, sigmoid], w1, b1, w2, b2)

    def _pointwise(self, conv: NodeProto) -> tuple[np.ndarray, np.ndarray]:
        """Weights of a plain 1x1 convolution (no groups, strides, padding or dilation)."""
        if len(conv.input) < 2:
            raise Rejected("excitation Conv without weights")
        w = self.constant(conv.input[1], "an excitation Conv's weight")
        if w.ndim != 4:
            raise Rejected(f"{w.ndim - 2}-D excitation Conv")
        if w.shape[2:] != (1, 1):
            raise Rejected(f"{w.shape[2]}x{w.shape[3]} excitation")
        if attribute(conv, "group", 1) != 1:
            raise Rejected("grouped excitation Conv")
        for name in ("strides", "dilations"):
            values = attribute(conv, name, [])
            assert isinstance(values, list)
            if any(v != 1 for v in values):
                raise Rejected(f"excitation Conv with {name} {values}")
        pads = attribute(conv, "pads", [])
        assert isinstance(pads, list)
        if any(p != 0 for p in pads):
            raise Rejected("padded excitation Conv")
        auto_pad = attribute(conv, "auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", b"VALID"):
            raise Rejected(f"excitation Conv with auto_pad {auto_pad!r}")
        b = self.optional_constant(conv, 2, "an excitation Conv's bias")
        out_ch = w.shape[0]
        return w.reshape(out_ch, -1), (np.zeros(out_ch, np.float32) if b is None else b)
