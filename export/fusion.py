"""ONNX Runtime optimisation pass: every Squeeze-and-Excitation block becomes one node.

In the style of ONNX Runtime's own Python optimiser (``onnxruntime.transformers``): the graph is
wrapped in an :class:`OnnxModel`, each pattern is a :class:`Fusion` subclass in its own module
(``fusion_se_conv``, ``fusion_se_linear``, sharing ``fusion_se``) whose ``fuse`` method matches
one chain from its anchor ``Mul`` with ``match_parent_path``, and the edits are applied in one
batch by ``Fusion.apply``. The fused node is ``ai.seresnet::SqueezeExcitation``
(docs/design.md §4), backed by the ``ops`` library:

    y = x * sigmoid(w2 · relu(w1 · mean_hw(x) + b1) + b2)   [+ residual]   [then ReLU]

Every rejection is a debug line on the ``export.fusion`` logger; SE-like blocks that no fusion
took are counted, with the reason, in the :class:`FusionReport`.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnxruntime.transformers.onnx_model import OnnxModel

from export.errors import ExportError
from export.fusion_se import NearMisses, Shapes, SqueezeExcitationFusion
from export.fusion_se_conv import FusionSqueezeExcitationConv
from export.fusion_se_linear import FusionSqueezeExcitationLinear
from ops import OP_DOMAIN, OP_TYPE, opset_import

log = logging.getLogger(__name__)


class FusionError(ExportError):
    pass


def _inferred_shapes(model: onnx.ModelProto) -> Shapes:
    """Shapes of every tensor ONNX shape inference (with data propagation) can work out.

    Symbolic dims keep their names, so ``[batch, 64, 28, 28]`` equals itself but not
    ``[1, 64, 28, 28]``; unknown dims are ``None``.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # inference is best effort; unknown shapes only block absorption
        log.warning("shape inference failed (%s); residual adds will not be absorbed", e)
        inferred = model
    shapes: Shapes = {}
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


@dataclass(frozen=True)
class FusionReport:
    fused: int
    with_residual: int
    nodes_before: int
    nodes_after: int
    # SE-like blocks no fusion took, by the reason the match stopped ("3x3 excitation": 1)
    left_alone: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        text = (
            f"fused {self.fused} SE block{'s' if self.fused != 1 else ''} "
            f"({self.with_residual} with residual Add+ReLU absorbed); "
            f"{self.nodes_before} -> {self.nodes_after} nodes"
        )
        missed = sum(self.left_alone.values())
        if missed:
            reasons = ", ".join(
                reason if count == 1 else f"{reason} ({count})"
                for reason, count in self.left_alone.most_common()
            )
            text += f"; {missed} SE-like block{'s' if missed != 1 else ''} left alone: {reasons}"
        return text


FUSIONS: Sequence[Callable[[OnnxModel, Shapes, NearMisses], SqueezeExcitationFusion]] = (
    FusionSqueezeExcitationConv,
    FusionSqueezeExcitationLinear,
)


def fuse_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FusionReport]:
    """Apply every SE fusion to ``model`` (changed in place) and report what happened."""
    before = len(model.graph.node)
    wrapped = OnnxModel(model)
    shapes = _inferred_shapes(model)  # once: fused nodes have no schema for shape inference
    near_misses = NearMisses()
    for fusion in FUSIONS:
        fusion(wrapped, shapes, near_misses).apply()
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
        left_alone=near_misses.left_alone(
            {n.output[0] for n in model.graph.node if n.op_type == "Mul"}
        ),
    )
    if report.left_alone:
        log.info("SE-like blocks left alone: %s", dict(report.left_alone))
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
