"""The GPU matrix of ``python -m bench.fusion --provider cuda``: what SE costs, and how far
ONNX Runtime's CUDA provider goes, at every precision, layout and launch mode the service can use.

    python -m bench.fusion --provider cuda [--batch 1 8 32 128] [--precision fp32 tf32 fp16]
                           [--graphs off on] [--cache /tmp/bm] [--dry-run]

Rows (each a session of ONNX Runtime's CUDA provider, I/O bound to device buffers):
  resnet50               ResNet-50, unfused (no SE: the floor SE is measured against)
  seresnet50-unfused     SE-ResNet-50 with ORT's own ops for the SE blocks
  seresnet50-fused       every SE block one ai.seresnet::SqueezeExcitation node (channels first)
  seresnet50-fused-cl    the same with channels-last SE nodes (ops.to_channels_last), only with
                         prefer_nhwc, where ORT cancels the Transposes around them
at precision fp32 (use_tf32=0), tf32 (use_tf32=1, ORT's default) or fp16 (models converted by
export.float16, use_tf32=1), channels first or prefer_nhwc=1 (fp16 only), CUDA graphs off or on
(enable_cuda_graph=1, one graph per batch size through RunOptions gpu_graph_id, captured in the
warm-up). The anchor: PyTorch eager fp16 channels_last (cudnn.benchmark on) for both nets.

Sessions that are compared (one precision/layout/graphs group) are timed side by side,
round-robin over the repeats; groups run one after another so that only a few sessions hold GPU
memory at a time. The JSON is rewritten after every group, so a run cut short keeps what it
measured. ``--dry-run`` runs the same code on the CPU provider with small nets, one batch and
one short repeat: it checks the plumbing (exports, float16 and channels-last variants, I/O
binding, graph ids, the JSON), not speed.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.fusion import time_calls
from service.engine.policy import CUDA_EP

PRECISIONS = ("fp32", "tf32", "fp16")
CUDA = CUDA_EP
# The GPU engine's goals (H200 figures), kept beside the results they are checked against.
ANCHOR_H200_SERESNET50_FP16_CL = {"1": 138, "8": 1055, "32": 4070, "128": 11600}
GOALS = {
    "faster_than_pytorch_fp16_channels_last": "every batch",
    "vs_pytorch_fp16_channels_last_batch_1_to_32": 2.0,
    "se_tax_fp16_max": 1.05,
    "batch1_latency_ms_with_graphs_max": 1.0,
}


@dataclass(frozen=True)
class Group:
    """Sessions timed side by side: one precision, layout and launch mode."""

    precision: str
    nhwc: bool
    graphs: bool

    @property
    def label(self) -> str:
        return f"{self.precision}/{'nhwc' if self.nhwc else 'nchw'}/graphs-" + (
            "on" if self.graphs else "off"
        )

    @property
    def models(self) -> list[str]:
        names = ["resnet50", "seresnet50-unfused", "seresnet50-fused"]
        return [*names, "seresnet50-fused-cl"] if self.nhwc else names


def servable(model: str, group: Group) -> dict[str, Any]:
    """Whether the service can serve this row's configuration, and with which settings (or
    why not): the matrix's ``servable`` column."""
    graphs = f"SERESNET_CUDA_GRAPHS={'on' if group.graphs else 'off'}"
    precision = {
        "fp32": "SERESNET_PRECISION=fp32 SERESNET_CUDA_TF32=0",
        "tf32": "SERESNET_PRECISION=fp32 SERESNET_CUDA_TF32=1",
        "fp16": "SERESNET_PRECISION=fp16",
    }[group.precision]
    why = None
    if group.nhwc and model != "seresnet50-fused-cl":
        why = "the service pairs prefer_nhwc with channels-last SE nodes (seresnet50-fused-cl)"
    elif group.precision == "fp16" and model in ("resnet50", "seresnet50-unfused"):
        why = "the service's float16 graph is the fused model.fp16.se.onnx"
    if why:
        return {"servable": False, "why": why}
    settings = {
        "resnet50": "SERESNET_GRAPH=unfused (a ResNet-50 folder)",
        "seresnet50-unfused": "SERESNET_GRAPH=unfused",
        "seresnet50-fused": "SERESNET_GRAPH=fused",
        "seresnet50-fused-cl": "SERESNET_GRAPH=fused SERESNET_CUDA_LAYOUT=nhwc",
    }[model]
    return {"servable": True, "settings": f"{settings} {precision} {graphs}"}


def groups(precisions: list[str], graphs: list[bool]) -> list[Group]:
    """fp32 and tf32 channels first; fp16 channels first and prefer_nhwc (where ORT's fp16
    convolutions are fastest); each with CUDA graphs off and on."""
    found = []
    for precision in precisions:
        for nhwc in (False, True) if precision == "fp16" else (False,):
            found.extend(Group(precision, nhwc, g) for g in graphs)
    return found


def model_files(cache: Path, se_arch: str, plain_arch: str) -> dict[tuple[str, bool], Path]:
    """(row model, float16?) -> ONNX file, exported once into ``cache`` (random weights)."""
    import onnx

    import ops
    from bench.fusion import exported
    from export.float16 import convert_file

    se, plain = exported(se_arch, cache), exported(plain_arch, cache)
    files = {
        ("resnet50", False): plain / "model.onnx",
        ("seresnet50-unfused", False): se / "model.onnx",
        ("seresnet50-fused", False): se / "model.se.onnx",
    }
    for (name, _), src in list(files.items()):
        dst = src.with_name(src.name.replace(".onnx", ".fp16.onnx"))
        if not dst.exists():
            convert_file(src, dst)
        files[(name, True)] = dst
    cl = se / "model.se.fp16.cl.onnx"
    if not cl.exists():
        onnx.save(ops.to_channels_last(onnx.load(str(files[("seresnet50-fused", True)]))), str(cl))
    files[("seresnet50-fused-cl", True)] = cl
    return files


def provider_options(group: Group) -> dict[str, str]:
    return {
        "device_id": "0",
        "use_tf32": "0" if group.precision == "fp32" else "1",
        "prefer_nhwc": "1" if group.nhwc else "0",
        "enable_cuda_graph": "1" if group.graphs else "0",
    }


def make_session(path: Path, group: Group, provider: str) -> ort.InferenceSession:
    import ops

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ops.register(so)  # harmless for the unfused graphs
    if provider == CUDA:
        # A node the CUDA provider cannot run must fail the row, not run on the CPU unseen.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers: list[Any] = [(CUDA, provider_options(group))]
    else:
        providers = [provider]
    return ort.InferenceSession(str(path), so, providers=providers)


class BoundRun:
    """One batch size of a session: input and output bound to fixed device buffers (what CUDA
    graphs need), run with this batch's ``gpu_graph_id``."""

    def __init__(
        self, sess: ort.InferenceSession, batch: int, graph_id: int, provider: str
    ) -> None:
        device = "cuda" if provider == CUDA else "cpu"
        meta = sess.get_inputs()[0]
        shape = [batch, *meta.shape[1:]]
        self.x = np.random.default_rng(batch).integers(0, 256, shape, dtype=np.uint8)
        self.x_value = ort.OrtValue.ortvalue_from_numpy(self.x, device, 0)
        self.binding = sess.io_binding()
        self.binding.bind_ortvalue_input(meta.name, self.x_value)
        self.outputs = []
        for out in sess.get_outputs():
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, *out.shape[1:]], np.float32, device, 0
            )
            self.binding.bind_ortvalue_output(out.name, value)
            self.outputs.append(value)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.sess = sess

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.binding, self.options)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Copy ``x`` into the bound input buffer (same address), run, return the logits."""
        self.x_value.update_inplace(x)
        self()
        return self.outputs[0].numpy()


@functools.cache
def _torch_model(arch: str, device: str) -> Any:
    import torch

    from export.pipeline import load_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = load_model(arch, None).to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last)


def torch_anchor(arch: str, batch: int, dry_run: bool) -> Callable[[], None]:
    """PyTorch eager, fp16, channels_last on the GPU (float32 on the CPU for a dry run)."""
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.backends.cudnn.benchmark = True
    model = _torch_model(arch, device)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if cuda:
            torch.cuda.synchronize()

    return run


def measure(
    runners: dict[str, Callable[[], object]], repeats: int, seconds: float
) -> dict[str, dict[str, Any]]:
    """Warm up (CUDA graphs are captured here), size each repeat to about ``seconds``, then
    time round-robin; median per call."""
    calls = {}
    for name, fn in runners.items():
        for _ in range(3):
            fn()
        calls[name] = max(1, min(200, round(seconds / max(time_calls(fn, 2), 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            samples[name].append(time_calls(fn, calls[name]))
    return {
        name: {
            "median_ms": round(statistics.median(s) * 1e3, 4),
            "samples_ms": [round(v * 1e3, 4) for v in s],
            "calls_per_sample": calls[name],
        }
        for name, s in samples.items()
    }


def run_group(
    group: Group,
    files: dict[tuple[str, bool], Path],
    batches: list[int],
    provider: str,
    repeats: int,
    seconds: float,
) -> Iterator[tuple[str, int, dict]]:
    """(row name, batch, result) for every model of ``group`` at every batch size."""
    sessions: dict[str, ort.InferenceSession] = {}
    unusable: dict[str, str] = {}  # models whose session could not be made: every batch
    for model in group.models:
        try:
            sessions[model] = make_session(
                files[(model, group.precision == "fp16")], group, provider
            )
        except Exception as error:  # a row that cannot run is a result too
            unusable[model] = f"{type(error).__name__}: {str(error)[:400]}"
    for graph_id, batch in enumerate(batches):
        errors = dict(unusable)  # a failure at one batch says nothing of the next
        runners: dict[str, Callable[[], object]] = {}
        for model, sess in sessions.items():
            try:
                runners[model] = BoundRun(sess, batch, graph_id, provider)
            except Exception as error:
                errors[model] = f"{type(error).__name__}: {str(error)[:400]}"
        try:
            rows = measure(runners, repeats, seconds)
        except Exception as error:  # one failing run (e.g. capture) loses the group's batch
            rows = {}
            for model in runners:
                errors[model] = f"{type(error).__name__}: {str(error)[:400]}"
        for model, row in rows.items():
            row["images_per_s"] = round(batch / (row["median_ms"] / 1e3), 1)
            yield f"{model}/{group.label}", batch, {**row, **servable(model, group)}
        for model, message in errors.items():
            yield f"{model}/{group.label}", batch, {"error": message, **servable(model, group)}
    sessions.clear()


def summarise(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Per batch: the best of each net and precision, the SE tax, the PyTorch anchor ratio."""
    summary = {}
    for batch, by_name in rows.items():

        def best(
            prefix: str,
            precision: str | None = None,
            graphs: str | None = None,
            by_name: dict = by_name,
        ) -> tuple[str, float] | None:
            found = [
                (n, r["median_ms"])
                for n, r in by_name.items()
                if "median_ms" in r
                and n.startswith(prefix + "/")
                and (precision is None or f"/{precision}/" in n)
                and (graphs is None or n.endswith(f"graphs-{graphs}"))
            ]
            return min(found, key=lambda t: t[1]) if found else None

        entry: dict[str, Any] = {}
        for precision in PRECISIONS:
            plain = best("resnet50", precision)
            se = min(
                filter(
                    None,
                    (
                        best(m, precision)
                        for m in ("seresnet50-fused", "seresnet50-fused-cl", "seresnet50-unfused")
                    ),
                ),
                key=lambda t: t[1],
                default=None,
            )
            if plain and se:
                entry[precision] = {
                    "best_resnet50": plain[0],
                    "best_seresnet50": se[0],
                    "seresnet50_images_per_s": round(int(batch) / se[1] * 1e3, 1),
                    "se_tax": round(se[1] / plain[1], 4),
                }
                served = [
                    (n, r["median_ms"])
                    for n, r in by_name.items()
                    if r.get("servable")
                    and "median_ms" in r
                    and n.startswith("seresnet50-")
                    and f"/{precision}/" in n
                ]
                if served:
                    name, _ = min(served, key=lambda t: t[1])
                    entry[precision]["best_servable_seresnet50"] = name
                    entry[precision]["served_with"] = by_name[name]["settings"]
        anchor = by_name.get("seresnet50/pytorch-eager-fp16-channels-last", {})
        if "fp16" in entry and "median_ms" in anchor:
            se_ms = by_name[entry["fp16"]["best_seresnet50"]]["median_ms"]
            entry["fp16"]["vs_pytorch_fp16_channels_last"] = round(anchor["median_ms"] / se_ms, 3)
        if batch == "1":
            latency = min(
                filter(
                    None,
                    (best(m, graphs="on") for m in ("seresnet50-fused", "seresnet50-fused-cl")),
                ),
                key=lambda t: t[1],
                default=None,
            )
            if latency:
                entry["batch1_latency_ms_with_graphs"] = {"row": latency[0], "ms": latency[1]}
        summary[batch] = entry
    return summary
