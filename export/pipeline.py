"""The export chain for one model folder: checkpoint -> model.onnx -> parity -> model.se.onnx ->
parity -> test accuracy -> model.json, written to a staging folder and renamed into place so a
failure never leaves a half-written model folder."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import fashion_mnist
from export.architectures import SEResNet, calibrate_batchnorm, count_parameters, create_model
from export.checkpoint import load_into, read_state_dict, sha256_of
from export.float16 import CONVERTER, convert_file
from export.fusion import fuse_file
from export.model_card import (
    FASHION_MNIST,
    input_spec_for,
    now,
    read_labels,
    read_record,
    tool_versions,
)
from export.onnx_export import (
    DEFAULT_OPSET,
    Comparison,
    ParityError,
    accuracy,
    check_parity,
    compare,
    export_onnx,
    normalize,
    parity_images,
    run_onnx,
    session,
)
from export.quantize import int8_variant
from export.variants import fused_logits, fused_session, gate
from modelcard import FP16_FUSED_FILE, FUSED_FILE, UNFUSED_FILE, InputSpec, ModelCard, read_card
from modelcard.schema import Float16, Fusion, Metrics, Parity, Provenance

MAX_FUSED_DIFF = 1e-5
# The float16 variant is kept only when it agrees with float32 this well: top-5 (in
# order) on at least 99 % of the images, and test top-1 within 0.1 % where there is a test set.
MIN_FP16_TOP5_AGREEMENT = 0.99
MAX_FP16_TOP1_DELTA = 0.001
CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_RECORD = "checkpoint.train.json"
BASELINE_RECORD = "baseline.train.json"


@dataclass
class ExportOptions:
    arch: str
    out: Path
    checkpoint: Path | None = None
    seed: int = 0
    name: str | None = None
    version: str = "1"
    num_classes: int | None = None
    in_chans: int | None = None
    labels: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    opset: int = DEFAULT_OPSET
    parity_images: int = 256
    fuse: bool = True
    float16: bool = True  # also write model.fp16.se.onnx (needs fuse)
    int8: bool = True  # also write model.int8.se.onnx (needs fuse)
    benchmark_only: bool = False  # keep the float16 file ungated (parity_gated: false)
    evaluate: bool | None = None  # None: when the labels are Fashion-MNIST's
    train_record: Path | None = None
    baseline_record: Path | None = None


def load_model(
    arch: str,
    checkpoint: Path | None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    seed: int = 0,
) -> SEResNet:
    """``arch`` with the checkpoint's weights, or random weights (seeded) without one; the
    random net's BN statistics come from real images so its outputs depend on its input."""
    model = create_model(
        arch,
        num_classes=num_classes,
        in_chans=in_chans,
        seed=seed,
        init="train" if checkpoint else "random",
    )
    if checkpoint is not None:
        load_into(model, read_state_dict(checkpoint), arch, str(checkpoint))
    else:  # statistics of real photos-to-be and of noise, the inputs tests and benches use
        spec = input_spec_for(arch, model.conv1.in_channels)
        real = parity_images(spec, 16)
        noise = np.random.default_rng(seed).integers(0, 256, real.shape, dtype=np.uint8)
        calibrate_batchnorm(model, normalize(np.concatenate([real, noise]), spec))
    return model.eval()


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A fresh sibling folder to write into; renamed over ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def check_fused(unfused: Path, fused: Path, spec: InputSpec, pixels: np.ndarray) -> Comparison:
    """Unfused vs fused ONNX Runtime on ``pixels``; raise :class:`ParityError` if they differ."""
    result = compare(
        run_onnx(session(unfused), pixels, spec), run_onnx(fused_session(fused), pixels, spec)
    )
    if not result.ok(MAX_FUSED_DIFF):
        raise ParityError(
            f"fused model {fused} disagrees with {unfused} on {result.images} images: max "
            f"|logit diff| {result.max_abs_diff:.3g} (limit {MAX_FUSED_DIFF:g}), top-5 "
            f"agreement {result.top5_agreement:.2%}"
        )
    return result


def float16_variant(
    folder: Path,
    spec: InputSpec,
    pixels: np.ndarray,
    test: tuple[np.ndarray, np.ndarray, float] | None,
    say=print,
    gated: bool = True,
) -> Float16 | None:
    """Write ``folder/model.fp16.se.onnx`` from ``folder/model.se.onnx`` and measure it against
    float32 on ``pixels`` (or on the test set ``(pixels, labels, float32 top-1)`` when given).
    Returns its card entry, or None (and removes the file) when it misses the bars above;
    with ``gated=False`` (benchmark-only folders) the file is kept and the entry says
    ``parity_gated: false``.

    On the CPU, ONNX Runtime runs float16 convolutions by casting around float kernels (its
    InsertCastTransformer), so every tensor is still rounded to float16 between nodes: the
    figures are float16 storage with float arithmetic, as on a GPU's tensor cores; the GPU check
    (scripts/gpu-check.sh) measures the CUDA provider itself.
    """
    fp16_path = folder / FP16_FUSED_FILE
    convert_file(folder / FUSED_FILE, fp16_path)
    images = pixels if test is None else test[0]
    reference = fused_logits(folder / FUSED_FILE, images, spec)
    fp16_logits = fused_logits(fp16_path, images, spec)
    result = compare(reference, fp16_logits)
    entry = Float16(
        converter=CONVERTER,
        images=result.images,
        max_abs_logit_diff_vs_fp32=result.max_abs_diff,
        top5_agreement_vs_fp32=result.top5_agreement,
        top1_agreement_vs_fp32=float(
            (fp16_logits.argmax(axis=1) == reference.argmax(axis=1)).mean()
        ),
        evaluated_with="onnxruntime, CPUExecutionProvider (float16 tensors, float arithmetic)",
    )
    say(
        f"float16 variant vs float32 fused on {result.images} real images: max |logit diff| "
        f"{result.max_abs_diff:.2e}, top-5 agreement {result.top5_agreement:.2%}"
    )
    problem = None
    if result.top5_agreement < MIN_FP16_TOP5_AGREEMENT:
        problem = f"top-5 agreement {result.top5_agreement:.2%} < {MIN_FP16_TOP5_AGREEMENT:.0%}"
    return gate(
        entry,
        fp16_logits,
        test,
        path=fp16_path,
        kind="float16",
        problem=problem,
        max_top1_delta=MAX_FP16_TOP1_DELTA,
        gated=gated,
        say=say,
    )


def export_folder(opts: ExportOptions, say=print) -> ModelCard:
    """Run the chain of ``opts`` and write the model folder ``opts.out`` atomically."""
    model = load_model(opts.arch, opts.checkpoint, opts.num_classes, opts.in_chans, opts.seed)
    record = read_record(opts.train_record)
    if record and opts.mean is None:
        opts.mean, opts.std = [record["mean"]], [record["std"]]
    spec = input_spec_for(opts.arch, model.conv1.in_channels, opts.mean, opts.std)
    labels = read_labels(opts.labels, model.fc.out_features)  # a bad file fails before the work
    evaluate = opts.evaluate if opts.evaluate is not None else opts.labels == FASHION_MNIST

    with staged_folder(opts.out) as tmp:
        _copy_sources(opts, tmp)
        say(
            f"exporting {opts.arch} to ONNX (opset {opts.opset}, dynamic batch, {spec.dtype} input)"
        )
        export_onnx(model, spec, tmp / UNFUSED_FILE, opts.opset)
        torch_vs_onnx = check_parity(model, tmp / UNFUSED_FILE, spec, opts.parity_images)
        say(
            f"parity PyTorch vs ONNX Runtime on {torch_vs_onnx.images} real images: max |logit "
            f"diff| {torch_vs_onnx.max_abs_diff:.2e}, top-5 agreement "
            f"{torch_vs_onnx.top5_agreement:.0%}"
        )
        fusion, onnx_vs_fused = Fusion(), None
        if opts.fuse:
            fusion, onnx_vs_fused = _fuse_and_check(tmp, spec, opts, say)
        metrics, test = _test_accuracy(tmp, spec, opts, say) if evaluate else (Metrics(), None)
        float16 = None
        if opts.fuse and opts.float16:
            float16 = float16_variant(
                tmp,
                spec,
                parity_images(spec, opts.parity_images),
                test,
                say,
                gated=not opts.benchmark_only,
            )

        int8 = None
        if opts.fuse and opts.int8:
            int8 = int8_variant(
                tmp,
                FUSED_FILE,
                spec,
                parity_images(spec, opts.parity_images),
                test,
                say,
                gated=not opts.benchmark_only,
            )

        card = ModelCard(
            name=opts.name or opts.out.name,
            version=opts.version,
            architecture=opts.arch,
            num_classes=model.fc.out_features,
            labels=labels,
            input=spec,
            opset=opts.opset,
            parameters=count_parameters(model),
            provenance=_provenance(opts, record),
            metrics=metrics,
            parity=_parity(torch_vs_onnx, onnx_vs_fused),
            fusion=fusion,
            float16=float16,
            int8=int8,
            tool_versions=tool_versions(),
            created=now(),
        )
        card.write(tmp)
    say(f"wrote {opts.out}/ ({_folder_size(opts.out) / 1e6:.1f} MB)")
    return card


def _copy_sources(opts: ExportOptions, tmp: Path) -> None:
    """The checkpoint and its training records travel with the model they made."""
    if opts.checkpoint is None:
        return
    shutil.copyfile(opts.checkpoint, tmp / CHECKPOINT_FILE)
    for rec in (opts.train_record, opts.baseline_record):
        if rec is not None and rec.is_file():
            name = TRAIN_RECORD if rec == opts.train_record else BASELINE_RECORD
            shutil.copyfile(rec, tmp / name)


def _fuse_and_check(
    tmp: Path, spec: InputSpec, opts: ExportOptions, say
) -> tuple[Fusion, Comparison]:
    """model.se.onnx from model.onnx, held to model.onnx's logits on real images."""
    import ops

    report = fuse_file(tmp / UNFUSED_FILE, tmp / FUSED_FILE)
    say(f"fusion: {report.summary()}")
    pixels = parity_images(spec, opts.parity_images)
    result = check_fused(tmp / UNFUSED_FILE, tmp / FUSED_FILE, spec, pixels)
    say(
        f"parity ONNX vs fused on {result.images} real images: max |logit diff| "
        f"{result.max_abs_diff:.2e}, top-5 agreement {result.top5_agreement:.0%}"
    )
    return Fusion(se_blocks=report.fused, fused=report.fused, op_domain=ops.OP_DOMAIN), result


def _test_accuracy(
    tmp: Path, spec: InputSpec, opts: ExportOptions, say
) -> tuple[Metrics, tuple[np.ndarray, np.ndarray, float]]:
    """model.onnx on the Fashion-MNIST test set, beside the no-SE twin's record when given.
    Also returns (pixels, labels, top-1) for the float16 variant's check."""
    images, labels_true = fashion_mnist.load("test")
    test_pixels = np.stack([img[None] for img in images])
    top1, top5 = accuracy(run_onnx(session(tmp / UNFUSED_FILE), test_pixels, spec), labels_true)
    say(
        f"test accuracy of model.onnx on {len(images)} Fashion-MNIST test images: "
        f"top-1 {top1:.2%}, top-5 {top5:.2%}"
    )
    baseline = read_record(opts.baseline_record)
    metrics = Metrics(
        test_top1=top1,
        test_top5=top5,
        test_images=len(images),
        evaluated_with="onnxruntime, model.onnx, CPUExecutionProvider",
        baseline_without_se=None
        if baseline is None
        else {
            "architecture": baseline["recipe"]["arch"],
            "parameters": baseline["parameters"],
            "test_top1": baseline["test_top1"],
            "test_top5": baseline["test_top5"],
            "evaluated_with": "PyTorch, after the last epoch, same recipe",
        },
    )
    return metrics, (test_pixels, labels_true, top1)


def _parity(torch_vs_onnx: Comparison, onnx_vs_fused: Comparison | None) -> Parity:
    return Parity(
        images=torch_vs_onnx.images,
        max_abs_logit_diff_torch_vs_onnx=torch_vs_onnx.max_abs_diff,
        top5_agreement_torch_vs_onnx=torch_vs_onnx.top5_agreement,
        max_abs_logit_diff_onnx_vs_fused=None
        if onnx_vs_fused is None
        else onnx_vs_fused.max_abs_diff,
        top5_agreement_onnx_vs_fused=None
        if onnx_vs_fused is None
        else onnx_vs_fused.top5_agreement,
    )


def _provenance(opts: ExportOptions, record: dict | None) -> Provenance:
    return Provenance(
        checkpoint=CHECKPOINT_FILE if opts.checkpoint else None,
        checkpoint_sha256=sha256_of(opts.checkpoint) if opts.checkpoint else None,
        dataset=record.get("dataset") if record else None,
        training=None
        if record is None
        else {
            "recipe": record["recipe"],
            "seconds": record["seconds"],
            "test_top1_pytorch": record["test_top1"],
            "epochs": record["epochs"],
            "torch_version": record.get("torch_version"),
        },
    )


def verify_folder(folder: Path, images: int = 1000, say=print) -> bool:
    """Re-check a model folder: PyTorch vs ONNX (when the checkpoint is there), ONNX vs fused,
    fused vs its float16 variant (when present), and the card's test accuracy (for
    Fashion-MNIST models). True when all hold."""
    card = read_card(folder)
    spec = card.input
    pixels = parity_images(spec, images)
    ok = True
    ckpt = folder / CHECKPOINT_FILE
    if ckpt.is_file():
        model = load_model(card.architecture, ckpt, card.num_classes, spec.channels)
        try:
            r = check_parity(model, folder / UNFUSED_FILE, spec, images)
            say(
                f"PyTorch vs model.onnx: max |diff| {r.max_abs_diff:.2e}, top-5 "
                f"{r.top5_agreement:.2%} on {r.images} images"
            )
        except ParityError as e:
            say(f"FAIL {e}")
            ok = False
    if (folder / FUSED_FILE).is_file():
        try:
            r = check_fused(folder / UNFUSED_FILE, folder / FUSED_FILE, spec, pixels)
            say(
                f"model.onnx vs model.se.onnx: max |diff| {r.max_abs_diff:.2e}, top-5 "
                f"{r.top5_agreement:.2%} on {r.images} images"
            )
        except ParityError as e:
            say(f"FAIL {e}")
            ok = False
    if card.float16 is not None and (folder / card.float16.file).is_file():
        fp16 = compare(
            fused_logits(folder / FUSED_FILE, pixels, spec),
            fused_logits(folder / card.float16.file, pixels, spec),
        )
        good = fp16.top5_agreement >= MIN_FP16_TOP5_AGREEMENT
        ok &= good
        say(
            f"{'ok' if good else 'FAIL'} model.se.onnx vs {card.float16.file}: max |diff| "
            f"{fp16.max_abs_diff:.2e}, top-5 {fp16.top5_agreement:.2%} on {fp16.images} images"
        )
    if card.metrics.test_top1 is not None and card.labels == fashion_mnist.LABELS:
        test_x, test_y = fashion_mnist.load("test")
        top1, _ = accuracy(run_onnx(session(folder / UNFUSED_FILE), test_x[:, None], spec), test_y)
        same = abs(top1 - card.metrics.test_top1) <= 0.001
        ok &= same
        say(
            f"{'ok' if same else 'FAIL'} test top-1 {top1:.2%} (card: {card.metrics.test_top1:.2%})"
        )
    return ok


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
