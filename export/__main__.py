"""``python -m export`` — offline tool chain: train -> onnx -> fuse -> verify, or all as build."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.errors import ExportError

DESCRIPTION = """\
Turn a trained SE-ResNet into a model folder the service can load.

  train   train the embedded default on Fashion-MNIST (CPU, reproducible)
  onnx    checkpoint -> model.onnx + model.json, with a parity check against PyTorch
  fuse    rewrite every SE block of an ONNX model into one SqueezeExcitation node
  verify  compare a folder's model.onnx / model.se.onnx against PyTorch and each other
  build   the whole chain for one model folder (onnx, fuse, verify)

Run 'python -m export COMMAND --help' for each command's options and an example.
"""


def _cmd_train(args: argparse.Namespace) -> int:
    from export.train import TrainRecipe, train

    recipe = TrainRecipe(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, threads=args.threads)
    record = train(recipe, args.out, progress=not args.quiet)
    print(f"{args.arch}: test top-1 {record.test_top1:.2%}, top-5 {record.test_top5:.2%} "
          f"after {recipe.epochs} epochs in {record.seconds / 60:.1f} min -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train the embedded default on Fashion-MNIST",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a small SE-ResNet on Fashion-MNIST on the CPU, reproducibly.\n\n"
        "Writes CHECKPOINT (a timm-style state dict) and CHECKPOINT's .train.json record "
        "(recipe,\nper-epoch test accuracy, time), which 'export build' copies into the model "
        "card.\nThe data comes from Debian's dataset-fashion-mnist package "
        "(or $FASHION_MNIST_DIR).\n\nexample:\n  python -m export train --out "
        "models/fashion-seresnet/checkpoint.pt\n  python -m export train --arch resnet14_cifar "
        "--out build/baseline/checkpoint.pt   # no-SE twin",
    )
    p.add_argument("--arch", default="seresnet14_cifar",
                   help="architecture to train (default: %(default)s; resnet14_cifar is the "
                   "same net without SE)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path to write (.pt)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
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
