"""The int8 variant of the fused graph (``model.int8.se.onnx``): ONNX Runtime's static
quantisation in QDQ form, calibrated on real Fashion-MNIST training images (never the test
images the gate measures on).

- Convolutions, the classifier Gemm and their activations become int8 (weights per channel,
  signed; activations unsigned, MinMax ranges); the fused SqueezeExcitation node is not an op
  type the quantiser knows, so it stays float32 between a DequantizeLinear and a
  QuantizeLinear, which is what its kernel needs.
- ORT's calibrator opens its own session without custom-op libraries, so the ranges are
  collected here with the op library registered, saved as ORT's calibration cache, and
  ``quantize_static`` reads them from that cache (its documented way to reuse ranges).
- The gate is the caller's (:mod:`export.pipeline`): the file is kept only when it agrees
  with float32 well enough, and the card records the figures.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    MinMaxCalibrater,
    QuantFormat,
    QuantType,
    quantize_static,
    save_tensors_data,
)
from PIL import Image

from export import fashion_mnist
from export.onnx_export import compare
from export.variants import fused_logits, gate
from modelcard import INT8_FUSED_FILE, InputSpec, to_array
from modelcard.cpu import cpu_int8_isa
from modelcard.schema import Int8

QUANTIZER = "onnxruntime.quantization.quantize_static (QDQ, per-channel s8 weights, u8 activations)"
CALIBRATION_METHOD = "MinMax"
CALIBRATION_BATCH = 64
CALIBRATION_IMAGES = 512
SPEEDUP_BATCH = 32
# The int8 variant is kept only when it agrees with float32 this well: top-1 agreement on at
# least 99 % of the images, and test top-1 within 0.5 % where there is a test set.
MIN_INT8_TOP1_AGREEMENT = 0.99
MAX_INT8_TOP1_DELTA = 0.005


class _Batches(CalibrationDataReader):
    """Feeds ``pixels`` (uint8 [N,C,H,W]) to the calibrator in batches."""

    def __init__(self, input_name: str, pixels: np.ndarray) -> None:
        self._feeds = iter(
            {input_name: pixels[i : i + CALIBRATION_BATCH]}
            for i in range(0, len(pixels), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


class _OpsCalibrater(MinMaxCalibrater):
    """ORT's MinMax calibrater with the op library registered in its session."""

    def create_inference_session(self) -> None:
        import ops

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ops.register(so)
        self.infer_session = ort.InferenceSession(
            self.augmented_model_path, sess_options=so, providers=self.execution_providers
        )


def quantize_file(
    src: Path, dst: Path, calibration: np.ndarray, input_name: str, say: Callable = print
) -> None:
    """Write the int8 QDQ form of the fused float32 graph ``src`` to ``dst``, its activation
    ranges measured on ``calibration`` (uint8 [N,C,H,W] real images)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="seresnet-int8.") as tmp:
        calibrater = _OpsCalibrater(src, augmented_model_path=str(Path(tmp) / "augmented.onnx"))
        calibrater.augment_graph()
        calibrater.create_inference_session()
        calibrater.collect_data(_Batches(input_name, calibration))
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(calibrater.compute_data(), cache)
        del calibrater
        quantize_static(
            str(src),
            str(dst),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    say(
        f"int8: quantised {src.name} -> {dst.name}, calibrated on {len(calibration)} training "
        f"images in {time.monotonic() - start:.1f} s"
    )


def cpu_speedup(
    fp32: Path, int8: Path, pixels: np.ndarray, rounds: int = 7, min_s: float = 0.2
) -> float:
    """How many times faster ``int8`` runs ``pixels`` (one batch) than ``fp32`` on this CPU:
    median of ``rounds`` interleaved timings (each the mean of runs over at least ``min_s``,
    so a tiny model's millisecond runs are not one scheduler tick), one warm-up run each."""
    import ops

    sessions = []
    for path in (fp32, int8):
        so = ort.SessionOptions()
        ops.register(so)
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    name = sessions[0].get_inputs()[0].name
    times: list[list[float]] = [[], []]
    for s in sessions:
        s.run(None, {name: pixels})
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            runs, t = 0, time.perf_counter()
            while runs < 1 or time.perf_counter() - t < min_s:
                s.run(None, {name: pixels})
                runs += 1
            times[i].append((time.perf_counter() - t) / runs)
    return float(np.median(times[0]) / np.median(times[1]))


def calibration_images(spec: InputSpec, count: int = CALIBRATION_IMAGES, seed: int = 0):
    """``count`` Fashion-MNIST *training* images (a seeded sample) through the card's
    preprocessing: uint8 [N, C, H, W]. The test images stay for the gate."""
    images, _ = fashion_mnist.load("train")
    pick = np.random.default_rng(seed).choice(len(images), count, replace=False)
    uint8_spec = spec.model_copy(update={"dtype": "uint8", "normalization": "in-graph"})
    return np.stack([to_array(Image.fromarray(images[i], "L"), uint8_spec) for i in pick])


def int8_variant(
    folder: Path,
    fused_file: str,
    spec: InputSpec,
    pixels: np.ndarray,
    test: tuple[np.ndarray, np.ndarray, float] | None,
    say: Callable = print,
    gated: bool = True,
) -> Int8 | None:
    """Write ``folder/model.int8.se.onnx`` from the fused float32 graph and measure it against
    float32 on ``pixels`` (or on the test set ``(pixels, labels, float32 top-1)``). Returns its
    card entry, or None (and removes the file) when it misses the bars above; with
    ``gated=False`` (benchmark-only folders) the file is kept with ``parity_gated: false``."""
    src, dst = folder / fused_file, folder / INT8_FUSED_FILE
    calibration = calibration_images(spec)
    quantize_file(src, dst, calibration, spec.tensor, say)
    images = pixels if test is None else test[0]
    reference, int8 = fused_logits(src, images, spec), fused_logits(dst, images, spec)
    result = compare(reference, int8)
    agreement = float((int8.argmax(axis=1) == reference.argmax(axis=1)).mean())
    speedup = cpu_speedup(src, dst, images[:SPEEDUP_BATCH])
    entry = Int8(
        quantizer=QUANTIZER,
        calibration_images=len(calibration),
        calibration_data=f"Fashion-MNIST training images (seeded sample), {CALIBRATION_METHOD}",
        images=result.images,
        top1_agreement_vs_fp32=agreement,
        top5_agreement_vs_fp32=result.top5_agreement,
        evaluated_with="onnxruntime, CPUExecutionProvider",
        cpu_speedup_vs_fp32=round(speedup, 3),
        speedup_batch=min(SPEEDUP_BATCH, len(images)),
        cpu_int8_isa=cpu_int8_isa(),
    )
    say(
        f"int8 variant vs float32 fused on {result.images} real images: top-1 agreement "
        f"{agreement:.2%}, {speedup:.2f}x float32 on this CPU ({entry.cpu_int8_isa})"
    )
    problem = None
    if agreement < MIN_INT8_TOP1_AGREEMENT:
        problem = f"top-1 agreement {agreement:.2%} < {MIN_INT8_TOP1_AGREEMENT:.0%}"
    return gate(
        entry,
        int8,
        test,
        path=dst,
        kind="int8",
        problem=problem,
        max_top1_delta=MAX_INT8_TOP1_DELTA,
        gated=gated,
        say=say,
    )
