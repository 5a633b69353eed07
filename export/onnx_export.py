"""PyTorch -> ONNX with a dynamic batch axis, uint8 pixels in, and a parity report.

The exported graph takes raw ``uint8`` pixels [N, C, H, W]: the mean is subtracted in the graph
and the 1/(255·std) scale is folded into the stem convolution's weights. That is exact, zero
padding included (padding a mean-subtracted image with zeros is padding the normalised image
with zeros), ships 4x fewer bytes per image and saves the service a pass over every pixel.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from export import fashion_mnist
from export.errors import ExportError
from modelcard import InputSpec, to_array

DEFAULT_OPSET = 20
MAX_LOGIT_DIFF = 1e-4


class ParityError(ExportError):
    pass


class PixelInput(nn.Module):
    """Wrap ``model`` so it takes uint8 pixels; the card's normalisation happens inside."""

    offset: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        stem = self.model.conv1
        assert isinstance(stem, nn.Conv2d)
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=stem.weight.dtype)
        with torch.no_grad():
            stem.weight.mul_(scale[None, :, None, None])
        offset = torch.tensor([255.0 * m for m in mean]).reshape(1, -1, 1, 1)
        self.register_buffer("offset", offset)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.float() - self.offset)


def normalize(pixels: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 [N,C,H,W] -> the float tensor the PyTorch model expects."""
    mean = torch.tensor(spec.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(spec.std).reshape(1, -1, 1, 1)
    return (torch.from_numpy(pixels).float() / 255.0 - mean) / std


def export_onnx(model: nn.Module, spec: InputSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write ``model`` as ONNX to ``path``: input ``spec.tensor`` with a dynamic batch axis,
    output ``logits``."""
    wrapped: nn.Module = PixelInput(model, spec.mean, spec.std) if spec.dtype == "uint8" else model
    dtype = torch.uint8 if spec.dtype == "uint8" else torch.float32
    example = torch.zeros(2, spec.channels, spec.height, spec.width, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The exporter logs a line per missing torchvision op and warns about internals; neither
    # is about this model.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped.eval(),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[spec.tensor],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def parity_images(spec: InputSpec, count: int) -> np.ndarray:
    """A fixed set of real images as model input (the first ``count`` Fashion-MNIST test
    images, through the card's preprocessing): uint8 [N, C, H, W]."""
    images, _ = fashion_mnist.load("test")
    uint8_spec = spec.model_copy(update={"dtype": "uint8", "normalization": "in-graph"})
    return np.stack([to_array(Image.fromarray(img, "L"), uint8_spec) for img in images[:count]])


def session(
    path: Path, providers: list[str] | None = None, so: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"]
    )


def run_onnx(
    sess: ort.InferenceSession, pixels: np.ndarray, spec: InputSpec, batch_size: int = 256
) -> np.ndarray:
    """Logits of ``pixels`` (uint8 [N,C,H,W]) through ``sess``, batch by batch."""
    name = sess.get_inputs()[0].name
    out = []
    for i in range(0, len(pixels), batch_size):
        chunk = pixels[i : i + batch_size]
        feed = chunk if spec.dtype == "uint8" else normalize(chunk, spec).numpy()
        out.append(sess.run(None, {name: feed})[0])
    return np.concatenate(out)


def run_torch(
    model: nn.Module, pixels: np.ndarray, spec: InputSpec, batch_size: int = 256
) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            out.append(model(normalize(pixels[i : i + batch_size], spec)).numpy())
    return np.concatenate(out)


@dataclass(frozen=True)
class Comparison:
    images: int
    max_abs_diff: float
    top5_agreement: float

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.top5_agreement == 1.0


def compare(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Largest |logit difference| and the share of images whose top-5 classes (in order) agree."""
    k = min(5, reference.shape[1])
    ref_top = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    cand_top = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    return Comparison(
        images=len(reference),
        max_abs_diff=float(np.abs(reference - candidate).max()),
        top5_agreement=float((ref_top == cand_top).all(axis=1).mean()),
    )


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    spec: InputSpec,
    count: int = 256,
    tolerance: float = MAX_LOGIT_DIFF,
) -> Comparison:
    """PyTorch vs ONNX Runtime on real images; raise :class:`ParityError` when they differ."""
    pixels = parity_images(spec, count)
    result = compare(run_torch(model, pixels, spec), run_onnx(session(onnx_path), pixels, spec))
    if not result.ok(tolerance):
        raise ParityError(
            f"ONNX model {onnx_path} disagrees with PyTorch on {result.images} real images: "
            f"max |logit diff| {result.max_abs_diff:.3g} (limit {tolerance:g}), top-5 agreement "
            f"{result.top5_agreement:.2%}. The export is not trustworthy; nothing was written."
        )
    return result


def accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top[:, 0] == labels).mean()), float((top == labels[:, None]).any(axis=1).mean())
