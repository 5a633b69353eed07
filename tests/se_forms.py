"""Small PyTorch nets holding one SE residual block in each form the exporters produce, and
near-misses the fusion pass must leave alone. Used by the fusion tests."""

from __future__ import annotations

import io
import warnings
from typing import Literal

import onnx
import torch
from torch import nn

Form = Literal[
    "conv",
    "conv_gap",
    "linear_mean",
    "linear_gap_flatten",
    "linear_expand",
    "gate_first",
    "matmul",
    # near-misses
    "conv3x3",
    "hardsigmoid",
    "gate_reused",
    "gate_is_output",
    "no_residual_shape",
]


class SEBlockNet(nn.Module):
    """stem conv -> residual block whose branch ends in an SE of ``form`` -> head."""

    def __init__(self, form: Form, channels: int = 32, reduced: int = 8) -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.branch = nn.Conv2d(channels, channels, 3, padding=1)
        c, r = channels, reduced
        if form in (
            "conv",
            "conv_gap",
            "gate_first",
            "hardsigmoid",
            "gate_reused",
            "gate_is_output",
            "no_residual_shape",
        ):
            self.fc1 = nn.Conv2d(c, r, 1)
            self.fc2 = nn.Conv2d(r, c, 1)
        elif form == "conv3x3":
            self.fc1 = nn.Conv2d(c, r, 3, padding=1)
            self.fc2 = nn.Conv2d(r, c, 1)
        elif form == "matmul":
            self.w1 = nn.Parameter(torch.randn(c, r) * 0.2)
            self.w2 = nn.Parameter(torch.randn(r, c) * 0.2)
            self.b1 = nn.Parameter(torch.randn(r) * 0.1)
            self.b2 = nn.Parameter(torch.randn(c) * 0.1)
        else:
            self.fc1 = nn.Linear(c, r)
            self.fc2 = nn.Linear(r, c)
        self.head = nn.Linear(c, 10)

    def se(self, x: torch.Tensor) -> torch.Tensor:
        f = self.form
        b, c = x.shape[:2]
        if f in (
            "conv",
            "gate_first",
            "hardsigmoid",
            "gate_reused",
            "gate_is_output",
            "no_residual_shape",
            "conv3x3",
        ):
            s = x.mean((2, 3), keepdim=True)
            s = self.fc2(torch.relu(self.fc1(s)))
            if f == "hardsigmoid":
                return x * nn.functional.hardsigmoid(s)
            s = torch.sigmoid(s)
            if f == "gate_reused":
                self._extra = s.sum().reshape(1)
            if f == "gate_is_output":
                self._extra = s
            return s * x if f == "gate_first" else x * s
        if f == "conv_gap":
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        if f == "matmul":
            s = x.mean((2, 3))
            s = torch.relu(s @ self.w1 + self.b1) @ self.w2 + self.b2
            return x * torch.sigmoid(s).view(b, c, 1, 1)
        if f == "linear_gap_flatten":
            s = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        else:
            s = x.mean((2, 3))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s)))).view(b, c, 1, 1)
        if f == "linear_expand":
            s = s.expand_as(x)
        return x * s

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.stem(x))
        y = self.se(self.branch(x))
        if self.form == "no_residual_shape":
            y = torch.relu(y + self.head.bias[:1].reshape(1, 1, 1, 1))  # broadcast add, no residual
        else:
            y = torch.relu(y + x)
        out = self.head(y.mean((2, 3)))
        if self.form in ("gate_reused", "gate_is_output"):
            return out, self._extra
        return out


def export(
    model: nn.Module, exporter: Literal["dynamo", "torchscript", "torchscript18"], size: int = 12
) -> onnx.ModelProto:
    """Export ``model`` with a dynamic batch axis; returns the ONNX model."""
    model.eval()
    example = (torch.randn(2, 3, size, size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            import logging

            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            prog = torch.onnx.export(
                model,
                example,
                dynamo=True,
                opset_version=20,
                input_names=["image"],
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            return prog.model_proto
        f = io.BytesIO()
        opset = 18 if exporter == "torchscript18" else 17  # 18: ReduceMean axes as an input
        torch.onnx.export(
            model,
            example,
            f,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            dynamic_axes={"image": {0: "batch"}},
        )
        return onnx.load_from_string(f.getvalue())
