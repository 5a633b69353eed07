"""``python -m export`` — offline tool chain: train -> onnx -> fuse -> verify, or all as build."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from export.errors import ExportError
from export.model_card import FASHION_MNIST

if TYPE_CHECKING:
    from export.pipeline import ExportOptions

DESCRIPTION = """\
Turn a trained SE-ResNet into a model folder the service can load.

Run 'python -m export COMMAND --help' for each command's options and an example.
"""


def _cmd_train(args: argparse.Namespace) -> int:
    from export.train import TrainRecipe, train

    recipe = TrainRecipe(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    record = train(recipe, args.out, progress=not args.quiet)
    print(
        f"{args.arch}: test top-1 {record.test_top1:.2%}, top-5 {record.test_top5:.2%} "
        f"after {recipe.epochs} epochs in {record.seconds / 60:.1f} min -> {args.out}"
    )
    return 0


def _options(args: argparse.Namespace, out: Path) -> ExportOptions:
    from export.pipeline import ExportOptions

    return ExportOptions(
        arch=args.arch,
        out=out,
        checkpoint=args.checkpoint,
        seed=getattr(args, "seed", 0),
        name=args.name,
        version=args.version,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        labels=args.labels,
        mean=args.mean,
        std=args.std,
        opset=args.opset,
        parity_images=args.parity_images,
        float16=args.float16,
        int8=args.int8,
    )


def _cmd_onnx(args: argparse.Namespace) -> int:
    from export.pipeline import export_folder

    if args.checkpoint is None and not args.random_init:
        raise ExportError("give --checkpoint FILE, or --random-init for random weights")
    opts = _options(args, args.out)
    opts.fuse = args.fuse
    opts.benchmark_only = args.benchmark_only
    export_folder(opts)
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from export.fusion import fuse_file

    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("export.fusion").setLevel(logging.DEBUG)
    report = fuse_file(args.input, args.output)
    forms: list[str] = []
    if args.float16 or args.channels_last:
        import onnx

        import ops
        from export.float16 import to_float16

        model = onnx.load(str(args.output))
        if args.float16:
            model, forms = to_float16(model), [*forms, "float16"]
        if args.channels_last:
            model, forms = ops.to_channels_last(model), [*forms, "channels-last SE nodes"]
        onnx.save(model, str(args.output))
    print(
        f"{args.input} -> {args.output}: {report.summary()}"
        + (f"; {', '.join(forms)}" if forms else "")
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from export.pipeline import verify_folder

    ok = verify_folder(args.folder, images=args.parity_images)
    print("verified" if ok else "verification FAILED")
    return 0 if ok else 1


def _cmd_build(args: argparse.Namespace) -> int:
    from export.pipeline import BASELINE_RECORD, CHECKPOINT_FILE, TRAIN_RECORD, export_folder
    from export.train import record_path

    folder: Path = args.folder
    if args.checkpoint is None:
        args.checkpoint = folder / CHECKPOINT_FILE
    if not args.checkpoint.is_file():
        raise ExportError(
            f"no checkpoint at {args.checkpoint}: train one with 'python -m "
            "export train --out ...' or pass --checkpoint FILE"
        )
    train_record = record_path(args.checkpoint)
    if not train_record.is_file():
        train_record = folder / TRAIN_RECORD
    opts = _options(args, folder)
    opts.train_record = train_record if train_record.is_file() else None
    opts.baseline_record = args.baseline_record or folder / BASELINE_RECORD
    if opts.labels is None and opts.train_record is not None:
        opts.labels = FASHION_MNIST
    export_folder(opts)
    return 0


def _add_model_args(
    p: argparse.ArgumentParser, arch_default: str | None, random_init: bool
) -> None:
    from export.architectures import ARCHITECTURES

    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        default=arch_default,
        required=arch_default is None,
        choices=sorted(ARCHITECTURES),
        metavar="ARCH",
        help=f"architecture ({', '.join(sorted(ARCHITECTURES))})"
        + (" (default: %(default)s)" if arch_default else ""),
    )
    g.add_argument(
        "--checkpoint", type=Path, help="state dict (.pt/.pth/.safetensors), timm key names"
    )
    g.add_argument("--num-classes", type=int, help="classes (default: the architecture's)")
    g.add_argument(
        "--in-chans", type=int, help="input channels, 1 or 3 (default: the architecture's)"
    )
    g.add_argument(
        "--labels", help=f"labels file (one per line) or '{FASHION_MNIST}' (default: class_<i>)"
    )
    g.add_argument("--mean", type=float, nargs="+", help="per-channel mean of x/255")
    g.add_argument("--std", type=float, nargs="+", help="per-channel std of x/255")
    if random_init:  # only 'onnx' can start from random weights; a seed means nothing elsewhere
        g.add_argument("--random-init", action="store_true", help="random weights, no checkpoint")
        g.add_argument("--seed", type=int, default=0, help="seed for --random-init (default: 0)")
    o = p.add_argument_group("output")
    o.add_argument("--name", help="model name in the card (default: the folder's name)")
    o.add_argument("--version", default="1", help="model version (default: %(default)s)")
    o.add_argument("--opset", type=int, default=20, help="ONNX opset, >= 18 (default: 20)")
    o.add_argument(
        "--parity-images",
        type=int,
        default=256,
        help="real test images for the parity checks (default: %(default)s)",
    )
    o.add_argument(
        "--no-fp16",
        dest="float16",
        action="store_false",
        help="skip the float16 variant model.fp16.se.onnx (written by default when "
        "fusing, if it agrees with float32: top-5 on >= 99%% of the images)",
    )
    o.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="skip the int8 variant model.int8.se.onnx (written by default when fusing: "
        "static QDQ quantisation calibrated on Fashion-MNIST training images, kept if top-1 "
        "agrees with float32 on >= 99%% of the images and, for Fashion-MNIST models, test "
        "top-1 is within 0.5%% of float32's; the card records the figures and its CPU speedup)",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the embedded default on Fashion-MNIST",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a small SE-ResNet on Fashion-MNIST on the CPU, reproducibly.\n\n"
        "Writes CHECKPOINT (a timm-style state dict) and CHECKPOINT's .train.json record "
        "(recipe,\nper-epoch test accuracy, time), which 'export build' copies into the model "
        "card.\nThe data comes from Debian's dataset-fashion-mnist package "
        "(or $FASHION_MNIST_DIR).\n\nexample:\n  python -m export train --out "
        "models/fashion-seresnet/checkpoint.pt\n  python -m export train --arch resnet14_cifar "
        "--out build/baseline/checkpoint.pt   # no-SE twin",
    )
    p.add_argument(
        "--arch",
        default="seresnet14_cifar",
        help="architecture to train (default: %(default)s; resnet14_cifar is the "
        "same net without SE)",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint path to write (.pt)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument(
        "--lr", type=float, default=0.1, help="peak learning rate (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _add_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "onnx",
        help="checkpoint -> model folder with model.onnx, model.se.onnx and model.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a checkpoint (or random weights) to a model folder.\n\n"
        "The graph takes uint8 pixels [batch, C, H, W] (dynamic batch) and normalises inside;\n"
        "its logits must match PyTorch's within 1e-4 with identical top-5 classes on real test\n"
        "images, or nothing is written. Unless --no-fuse, the SE-fused model.se.onnx is\n"
        "written and checked too (needs the built op library), and unless --no-fp16 its\n"
        "float16 variant model.fp16.se.onnx (kept if top-5 agrees with float32 on >= 99%)\n"
        "and unless --no-int8 the int8 variant model.int8.se.onnx (gated likewise).\n\n"
        "examples:\n"
        "  python -m export onnx --arch seresnet50 --checkpoint seresnet50.pth "
        "--labels imagenet.txt --out models/seresnet50\n"
        "  python -m export onnx --arch seresnet50 --random-init --out build/seresnet50-random\n"
        "  python -m export onnx --arch seresnet50 --random-init --parity-images 8 "
        "--benchmark-only --out /tmp/bm/seresnet50",
    )
    _add_model_args(p, None, random_init=True)
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="skip model.se.onnx")
    p.add_argument(
        "--benchmark-only",
        action="store_true",
        help="keep model.fp16.se.onnx and model.int8.se.onnx whatever their agreement with "
        "float32 (random nets have tiny logit gaps) and record parity_gated: false in the "
        "card: the service then serves them only with SERESNET_PRECISION=fp16 or int8, "
        "never by auto",
    )
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.set_defaults(func=_cmd_onnx)


def _add_fuse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fuse",
        help="fuse every SE block of IN.onnx into one node, write OUT.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rewrite each Squeeze-and-Excitation subgraph (pool -> FC/1x1 conv -> ReLU ->\n"
        "FC/1x1 conv -> sigmoid -> Mul, with the residual Add and ReLU after it) into one\n"
        "ai.seresnet::SqueezeExcitation node, and say how many were fused. SE-like blocks\n"
        "left alone are counted with the reason (e.g. '3x3 excitation'); --verbose logs why\n"
        "each candidate was rejected. A model without SE blocks is copied unchanged.\n\n"
        "examples:\n"
        "  python -m export fuse models/x/model.onnx models/x/model.se.onnx\n"
        "  python -m export fuse --fp16 models/x/model.onnx models/x/model.fp16.se.onnx",
    )
    p.add_argument("input", type=Path, metavar="IN.onnx")
    p.add_argument("output", type=Path, metavar="OUT.onnx")
    p.add_argument(
        "--fp16",
        dest="float16",
        action="store_true",
        help="write the float16 variant (uint8/float32 boundary kept)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="SE nodes on [N,H,W,C] between Transposes, for ORT's CUDA provider with "
        "prefer_nhwc=1, which cancels them against its own (ops/layout.py)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log each rejected SE candidate and why"
    )
    p.set_defaults(func=_cmd_fuse)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="re-check a model folder against PyTorch and itself",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PyTorch vs model.onnx (when checkpoint.pt is in the folder), model.onnx vs\n"
        "model.se.onnx, model.se.onnx vs model.fp16.se.onnx when present (top-5 agreement\n"
        ">= 99 %), and the card's test accuracy (Fashion-MNIST models). Exit 1 on any failure.\n"
        "\nexample:\n  python -m export verify models/fashion-seresnet",
    )
    p.add_argument("folder", type=Path)
    p.add_argument("--parity-images", type=int, default=1000, help="default: %(default)s")
    p.set_defaults(func=_cmd_verify)


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="the whole chain for a model folder that holds checkpoint.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rebuild FOLDER from FOLDER/checkpoint.pt: ONNX export and parity, fusion\n"
        "and parity, test accuracy, model card. The training record beside the checkpoint\n"
        "(checkpoint.train.json) supplies normalisation, labels and provenance; a no-SE\n"
        "baseline record (baseline.train.json) goes into the card's metrics.\n\n"
        "example (reproduces the embedded model):\n"
        "  python -m export build models/fashion-seresnet",
    )
    p.add_argument("folder", type=Path)
    _add_model_args(p, "seresnet14_cifar", random_init=False)
    p.add_argument(
        "--baseline-record",
        type=Path,
        help="training record of the no-SE twin (default: FOLDER/baseline.train.json)",
    )
    p.set_defaults(func=_cmd_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_train(sub)
    _add_onnx(sub)
    _add_fuse(sub)
    _add_verify(sub)
    _add_build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
