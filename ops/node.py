"""Building blocks for ONNX graphs that contain the fused SqueezeExcitation node."""

from __future__ import annotations

from typing import Any

OP_DOMAIN = "ai.seresnet"
OP_TYPE = "SqueezeExcitation"
OP_VERSION = 1


def make_node(
    x: str,
    w1: str,
    b1: str,
    w2: str,
    b2: str,
    output: str,
    residual: str | None = None,
    relu: bool = False,
    name: str | None = None,
    channels_last: bool = False,
) -> Any:
    """An ``onnx.NodeProto`` for one SqueezeExcitation node (inputs and output by name).

    ``residual`` None leaves the optional 6th input off; ``""`` names it as absent explicitly.
    ``channels_last``: x, residual and the output are [N,H,W,C] (the attribute is written only
    then, so channels-first nodes stay what libraries without it read).
    The graph must import the domain too: add :func:`opset_import` to the model.
    """
    from onnx import helper

    inputs = [x, w1, b1, w2, b2]
    if residual is not None:
        inputs.append(residual)
    attributes: dict[str, Any] = {"relu": int(relu)}
    if channels_last:
        attributes["channels_last"] = 1
    return helper.make_node(OP_TYPE, inputs, [output], name=name, domain=OP_DOMAIN, **attributes)


def opset_import(version: int = OP_VERSION) -> Any:
    """The ``onnx.OperatorSetIdProto`` a model using the node must list."""
    from onnx import helper

    return helper.make_opsetid(OP_DOMAIN, version)
