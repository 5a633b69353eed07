"""The shared half of both SE fusions: the anchor ``Mul``, the squeeze, the residual tail and
the near-miss ledger. Each excitation form lives in its own module (``fusion_se_conv``,
``fusion_se_linear``), as ONNX Runtime's ``fusion_*.py`` keep one pattern per file.

A rejection is raised as :class:`Rejected` from wherever the match stops, logged at debug level
with the anchor's name, and, when the ``Mul`` was gated by something computed from a global
pool of the very tensor it scales (an SE-like block), kept in :class:`NearMisses` so the
fusion report can say why the block was left alone.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, numpy_helper
from onnxruntime.transformers.fusion_base import Fusion
from onnxruntime.transformers.onnx_model import OnnxModel

from ops import OP_TYPE, make_node

log = logging.getLogger("export.fusion")

Shapes = dict[str, list[int | str | None]]

# How far a rejection got, so that of two fusions rejecting one block the report keeps the
# reason that names the real obstacle rather than "not my form".
FORM = 0  # the excitation is not this fusion's op sequence
GATE = 1  # the gate is not a Sigmoid
DETAIL = 2  # the op sequence matched; an attribute, weight or shape did not
SAFETY = 3  # everything matched, but fusing would drop a tensor someone else reads

# Ops that squeeze H and W away; any of them upstream of the gate makes a block SE-like.
_SQUEEZES = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum")
_SE_LIKE_SEARCH = 32  # ancestors of the gate looked at before a Mul is taken as not SE-like


class Rejected(Exception):
    def __init__(self, reason: str, rank: int = DETAIL) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rank = rank


@dataclass
class NearMisses:
    """SE-like blocks some fusion rejected, keyed by the anchor ``Mul``'s output; the reason
    of highest rank wins."""

    by_anchor: dict[str, Rejected] = field(default_factory=dict)

    def note(self, mul: NodeProto, rejection: Rejected) -> None:
        key = mul.output[0]
        kept = self.by_anchor.get(key)
        if kept is None or rejection.rank > kept.rank:
            self.by_anchor[key] = rejection

    def left_alone(self, remaining_muls: set[str]) -> Counter[str]:
        """Reasons of the blocks whose ``Mul`` is still in the graph (no fusion took them)."""
        return Counter(r.reason for key, r in self.by_anchor.items() if key in remaining_muls)


@dataclass(frozen=True)
class Excitation:
    """What a matched excitation contributes to the fused node."""

    pool_input: str  # the tensor x that is pooled (and must be the one that is scaled)
    nodes: list[NodeProto]  # pool ... sigmoid (and any reshape/expand of the gate), in order
    w1: np.ndarray  # [Cr, C]
    b1: np.ndarray  # [Cr]
    w2: np.ndarray  # [C, Cr]
    b2: np.ndarray  # [C]


def attribute(node: NodeProto, name: str, default: object = None) -> object:
    value = OnnxModel.get_node_attribute(node, name)
    return default if value is None else value


class SqueezeExcitationFusion(Fusion, ABC):
    """Shared tail of both excitation forms: find the gate at a ``Mul``, then absorb the
    residual ``Add`` and the block's final ``Relu`` where the graph allows it.

    ::

        x ──┬───────────────────────── Mul ── [Add(residual)] ── [Relu] ──▶
            └── squeeze ─ excitation ──┘
    """

    def __init__(
        self, model: OnnxModel, shapes: Shapes, near_misses: NearMisses, description: str
    ) -> None:
        super().__init__(model, OP_TYPE, "Mul", description)
        self.graph_outputs = {o.name for o in model.model.graph.output}
        self.shapes = shapes
        self.near_misses = near_misses
        self.form = description

    @abstractmethod
    def match_excitation(
        self, mul: NodeProto, gate_index: int, output_name_to_node: dict[str, NodeProto]
    ) -> Excitation:
        """Match the Mul's input ``gate_index`` back through the excitation to its pool, or
        raise :class:`Rejected` saying where the match stopped."""

    def fuse(
        self,
        node: NodeProto,
        input_name_to_nodes: dict[str, list[NodeProto]],
        output_name_to_node: dict[str, NodeProto],
    ) -> None:
        anchor = node.name or node.output[0]
        if len(node.input) != 2:
            log.debug("%s: %s has %d inputs, not 2", self.form, anchor, len(node.input))
            return
        for gate_index in (1, 0):
            x = node.input[1 - gate_index]
            if not self._se_like(x, node.input[gate_index], output_name_to_node):
                continue
            try:
                se = self.match_excitation(node, gate_index, output_name_to_node)
                if se.pool_input != x:
                    raise Rejected("the pooled tensor is not the one scaled")
                self._fuse_block(node, se, input_name_to_nodes)
                return
            except Rejected as rejection:
                log.debug("%s: SE-like %s left alone: %s", self.form, anchor, rejection.reason)
                self.near_misses.note(node, rejection)
                return
        log.debug("%s: %s is not gated by a squeeze of what it scales", self.form, anchor)

    def _se_like(self, x: str, gate: str, output_name_to_node: dict[str, NodeProto]) -> bool:
        """Is ``gate`` computed from a squeeze of ``x``? (A SiLU, ``x * sigmoid(x)``, is not.)"""
        todo = deque([output_name_to_node.get(gate)])  # breadth first: the squeeze is near
        seen = 0
        while todo and seen < _SE_LIKE_SEARCH:
            node = todo.popleft()
            if node is None or x in node.output:
                continue
            seen += 1
            if node.op_type in _SQUEEZES and node.input[0] == x:
                return True
            todo.extend(self.model.get_parents(node, output_name_to_node))
        return False

    def sigmoid_gate(
        self, mul: NodeProto, path: list[NodeProto] | None, gate_index: int
    ) -> list[NodeProto]:
        """``path`` as matched by ``match_parent_path``, or a rejection naming the gate when
        the Mul's gate is not a Sigmoid (hard-sigmoid SE variants, for one)."""
        if path is not None:
            return path
        gate = self.model.get_parent(mul, gate_index)
        while gate is not None and gate.op_type in ("Expand", "Reshape"):
            gate = self.model.get_parent(gate, 0)
        if gate is not None and gate.op_type != "Sigmoid":
            raise Rejected(f"{gate.op_type} gate, not Sigmoid", GATE)
        raise Rejected(f"not a {self.form}", FORM)

    def _fuse_block(
        self, mul: NodeProto, se: Excitation, input_name_to_nodes: dict[str, list[NodeProto]]
    ) -> None:
        chain = [*se.nodes, mul]
        inner = {o for n in se.nodes for o in n.output}
        if inner & self.graph_outputs:
            raise Rejected("a tensor inside the block is a graph output", SAFETY)
        residual: str | None = None
        relu = False
        output = mul.output[0]
        add = self._only_child(output, "Add", input_name_to_nodes)
        if add is not None:
            other = add.input[1] if add.input[0] == output else add.input[0]
            if self._same_shape(other, se.pool_input) and other != output:
                residual, output = other, add.output[0]
                chain.append(add)
                act = self._only_child(output, "Relu", input_name_to_nodes)
                if act is not None:
                    relu, output = True, act.output[0]
                    chain.append(act)
            else:
                log.debug("%s: Add after %s is not a residual", self.form, mul.name)
        if not self.model.is_safe_to_fuse_nodes(chain, [output], input_name_to_nodes, {}):
            raise Rejected("a tensor inside the block is read outside it", SAFETY)

        name = self.model.create_node_name(OP_TYPE, "SE_")
        weights: list[str] = []
        for suffix, value in (("w1", se.w1), ("b1", se.b1), ("w2", se.w2), ("b2", se.b2)):
            tensor = numpy_helper.from_array(
                np.ascontiguousarray(value, np.float32), f"{name}.{suffix}"
            )
            self.model.add_initializer(tensor, self.this_graph_name)
            weights.append(tensor.name)
        w1, b1, w2, b2 = weights
        fused = make_node(
            se.pool_input, w1, b1, w2, b2, output=output, residual=residual, relu=relu, name=name
        )
        self.nodes_to_remove.extend(chain)
        self.nodes_to_add.append(fused)
        self.node_name_to_graph_name[name] = self.this_graph_name
        self.prune_graph = True

    def _only_child(
        self, output: str, op_type: str, input_name_to_nodes: dict[str, list[NodeProto]]
    ) -> NodeProto | None:
        """The one reader of ``output`` when it is an ``op_type`` and ``output`` is internal."""
        children = input_name_to_nodes.get(output, [])
        if output in self.graph_outputs or len(children) != 1:
            return None
        return children[0] if children[0].op_type == op_type else None

    def _same_shape(self, a: str, b: str) -> bool:
        """True only when both shapes are known, 4-D and equal dim by dim (a broadcast Add,
        such as a bias, must not be absorbed)."""
        if self.model.get_constant_value(a) is not None:
            return False
        sa, sb = self.shapes.get(a), self.shapes.get(b)
        return sa is not None and sb is not None and len(sa) == 4 and sa == sb and None not in sa

    # -- shared matching helpers ------------------------------------------------------------
    def constant(self, name: str, what: str) -> np.ndarray:
        value = self.model.get_constant_value(name)
        if value is None:
            raise Rejected(f"{what} is not a constant")
        return value

    def optional_constant(self, node: NodeProto, index: int, what: str) -> np.ndarray | None:
        """Input ``index`` of ``node`` as a constant, None when the input is absent."""
        if len(node.input) <= index or not node.input[index]:
            return None
        return self.constant(node.input[index], what)

    def match_pool(
        self, name: str, output_name_to_node: dict[str, NodeProto], keepdims: bool
    ) -> NodeProto:
        """A global average pool over H and W of a 4-D tensor: ``GlobalAveragePool`` or
        ``ReduceMean(axes={2,3} or {-1,-2}, keepdims)`` with axes as attribute or constant."""
        node = output_name_to_node.get(name)
        if node is None:
            raise Rejected("the excitation does not start at a pool", FORM)
        if node.op_type == "GlobalAveragePool" and keepdims:
            return node
        if node.op_type != "ReduceMean":
            raise Rejected(f"squeeze by {node.op_type}, not a global average")
        if bool(attribute(node, "keepdims", 1)) != keepdims:
            raise Rejected(f"ReduceMean keepdims={int(not keepdims)} where this form needs it")
        if attribute(node, "noop_with_empty_axes", 0):
            raise Rejected("ReduceMean with noop_with_empty_axes")
        axes = attribute(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.constant(node.input[1], "ReduceMean's axes").reshape(-1).tolist()
        assert axes is None or isinstance(axes, list)
        shape = self.shapes.get(node.input[0])
        rank = None if shape is None else len(shape)
        if not axes or rank not in (4, None):
            raise Rejected(f"squeeze of a {rank}-D tensor" if axes else "ReduceMean over all axes")
        normalized = {a % 4 if a < 0 else a for a in axes}
        mixed_signs = any(a < 0 for a in axes) and any(a >= 0 for a in axes)
        if normalized != {2, 3} or (rank is None and mixed_signs):
            raise Rejected(f"ReduceMean over axes {axes}, not H and W")
        return node

    @staticmethod
    def check_widths(w1: np.ndarray, w2: np.ndarray) -> None:
        if w1.shape[0] != w2.shape[1] or w2.shape[0] != w1.shape[1]:
            raise Rejected(f"excitation widths do not chain: {w1.shape} then {w2.shape}")
