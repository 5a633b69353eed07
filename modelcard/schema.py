"""The model card (``models/<name>/model.json``): one schema for the exporter that writes it and
the service that reads it (docs/design.md §3). Torch-free on purpose."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CARD_FILE = "model.json"
UNFUSED_FILE = "model.onnx"
FUSED_FILE = "model.se.onnx"
FP16_FUSED_FILE = "model.fp16.se.onnx"
INT8_FUSED_FILE = "model.int8.se.onnx"


class CardError(ValueError):
    """The card is missing or does not describe a usable model; the message says which field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How an image becomes the graph's input tensor.

    ``resize`` is the geometry rule: ``stretch`` resizes straight to height x width (right for
    Fashion-MNIST, whose images are already centred squares); ``shorter-side-crop`` resizes the
    shorter side to ``resize_shorter`` and takes the centre height x width (the ImageNet rule).
    With ``dtype="uint8"`` the graph takes raw pixels and normalises inside (the card's mean and
    std are then documentation of what the graph does); with ``float32`` the caller normalises.
    """

    tensor: str = "image"
    dtype: Literal["uint8", "float32"] = "uint8"
    layout: Literal["NCHW"] = "NCHW"
    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color: Literal["L", "RGB"]
    resize: Literal["stretch", "shorter-side-crop"] = "stretch"
    resize_shorter: int | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: list[float]
    std: list[float]
    normalization: Literal["in-graph", "caller"] = "in-graph"

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's tensor shape, [C, H, W]."""
        return (self.channels, self.height, self.width)

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if (self.color == "L") != (self.channels == 1):
            raise ValueError(f"color {self.color!r} does not match channels={self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        shorter = self.resize_shorter
        if self.resize == "shorter-side-crop" and (
            shorter is None or shorter < max(self.height, self.width)
        ):
            raise ValueError("shorter-side-crop needs resize_shorter >= height and width")
        if (self.dtype == "uint8") != (self.normalization == "in-graph"):
            raise ValueError("uint8 input means in-graph normalisation, float32 means caller")
        return self


class OutputSpec(_Strict):
    logits: str = "logits"
    dtype: Literal["float32"] = "float32"


class Provenance(_Strict):
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    dataset: str | None = None
    training: dict | None = None


class Metrics(_Strict):
    test_top1: float | None = None
    test_top5: float | None = None
    test_images: int | None = None
    evaluated_with: str | None = None
    baseline_without_se: dict | None = None


class Parity(_Strict):
    images: int = 0
    max_abs_logit_diff_torch_vs_onnx: float | None = None
    max_abs_logit_diff_onnx_vs_fused: float | None = None
    top5_agreement_torch_vs_onnx: float | None = None
    top5_agreement_onnx_vs_fused: float | None = None


class Fusion(_Strict):
    se_blocks: int = 0
    fused: int = 0
    op_domain: str | None = None


class Float16(_Strict):
    """The optional float16 variant of the fused graph (``model.fp16.se.onnx``): same input and
    output tensors and dtypes as ``model.onnx``, float16 inside. Figures compare it with the
    float32 fused graph on the same images; ``test_*`` on the card's test set when there is one.
    """

    file: str = FP16_FUSED_FILE
    layout: Literal["NCHW"] = "NCHW"
    converter: str | None = None
    images: int = 0
    max_abs_logit_diff_vs_fp32: float | None = None
    top5_agreement_vs_fp32: float | None = None
    top1_agreement_vs_fp32: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    test_top1_delta_vs_fp32: float | None = None
    evaluated_with: str | None = None
    # False for a benchmark-only export (random weights): kept whatever its agreement with
    # float32, so the service serves it only when SERESNET_PRECISION=fp16 asks for it.
    parity_gated: bool = True


class Int8(_Strict):
    """The optional int8 variant of the fused graph (``model.int8.se.onnx``): static QDQ
    quantisation calibrated on real training images, same input and output tensors as
    ``model.onnx``, the SE node in float32. Figures compare it with the float32 fused graph on
    the same images (the test set when there is one). ``cpu_speedup_vs_fp32`` is the export
    machine's timing (median of interleaved runs of one batch of ``speedup_batch``), and
    ``cpu_int8_isa`` the int8 instructions that CPU had: the service's ``auto`` picks int8
    only where the speedup is real and this CPU has the same instructions.
    """

    file: str = INT8_FUSED_FILE
    quantizer: str | None = None
    calibration_images: int = 0
    calibration_data: str | None = None
    images: int = 0
    top1_agreement_vs_fp32: float | None = None
    top5_agreement_vs_fp32: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    test_top1_delta_vs_fp32: float | None = None
    evaluated_with: str | None = None
    cpu_speedup_vs_fp32: float | None = None
    speedup_batch: int | None = None
    cpu_int8_isa: str | None = None
    # False for a benchmark-only export (random weights): served only when
    # SERESNET_PRECISION=int8 asks for it, never by auto.
    parity_gated: bool = True


class ModelCard(_Strict):
    name: str
    version: str
    architecture: str
    num_classes: int = Field(gt=0)
    labels: list[str]
    input: InputSpec
    output: OutputSpec = OutputSpec()
    opset: int | None = None
    parameters: int | None = None
    provenance: Provenance = Provenance()
    metrics: Metrics = Metrics()
    parity: Parity = Parity()
    fusion: Fusion = Fusion()
    float16: Float16 | None = None
    int8: Int8 | None = None
    tool_versions: dict[str, str] = {}
    created: str | None = None

    @model_validator(mode="after")
    def _labels_match(self) -> ModelCard:
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for num_classes={self.num_classes}")
        return self

    def write(self, folder: Path) -> Path:
        path = folder / CARD_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def read_card(folder: Path) -> ModelCard:
    """Load and validate ``folder/model.json``; raise :class:`CardError` naming the problem."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise CardError(f"{path} not found: a model folder needs model.json (docs/design.md §3)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"{path} is not readable JSON: {e}") from e
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(card)"
        raise CardError(f"{path}: {where}: {first['msg']}") from e
