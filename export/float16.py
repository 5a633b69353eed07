"""The float16 variant of a fused model: ``model.se.onnx`` -> ``model.fp16.se.onnx``.

Float16 inside, the same boundary outside: the uint8 image input and the float32 logits stay,
every convolution, dense layer and SqueezeExcitation node computes on float16 tensors (the SE
op's float16 kernel accumulates in float; ORT's CUDA convolutions and GEMMs accumulate in float
on tensor cores).

Why ``onnxruntime.transformers.float16`` and not onnxconverter-common's ``float16``:

- The graph starts with ``Cast(uint8 -> float)`` (normalisation is folded into the graph).
  ORT's converter rewrites a Cast's ``to`` attribute to float16; onnxconverter-common leaves it
  at float, so the next node gets a float input among float16 weights and the model fails to
  load (onnxconverter-common issue #320).
- Both decide tensor types from ``value_info``, which ONNX shape inference cannot produce for a
  custom-domain node: blocking the SqueezeExcitation node (to keep it float32) would need Casts
  on outputs neither converter can see. We do not block it: the op has a float16 kernel, and
  ONNX Runtime infers its output type from its input (the op's shape inference copies x's type),
  so no Cast is needed around it.
- ORT's converter is already installed (it ships with onnxruntime); onnxconverter-common would
  be one more dependency for a worse result.
"""

from __future__ import annotations

from pathlib import Path

import onnx

CONVERTER = "onnxruntime.transformers.float16 (keep_io_types=True)"


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (float32, fused or not) with float16 tensors inside and its inputs and outputs
    of the original types (uint8 stays uint8; float32 logits are cast back to float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True)
    # The converter keeps every value_info it met (float16 or not); ONNX Runtime re-infers them.
    # Dropping them keeps the file free of stale float32 types for tensors after a custom node.
    del converted.graph.value_info[:]
    return converted


def convert_file(src: Path, dst: Path) -> None:
    """Write the float16 variant of ``src`` to ``dst``."""
    onnx.save(to_float16(onnx.load(str(src))), str(dst))
