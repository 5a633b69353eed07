"""Reproducible CPU training of the embedded default model on Fashion-MNIST.

The recipe (SGD with Nesterov momentum, linear warm-up then cosine decay, random 2-pixel shifts
and horizontal flips) is recorded beside the checkpoint so ``export build`` can put it in the
model card. Fixed seeds, deterministic algorithms and a fixed thread count make a rerun give the
same weights on the same machine.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from export import fashion_mnist
from export.architectures import count_parameters, create_model
from export.checkpoint import sha256_of


@dataclass(frozen=True)
class TrainRecipe:
    arch: str = "seresnet14_cifar"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    shift_pixels: int = 2
    hflip: bool = True
    seed: int = 0
    threads: int = 2


@dataclass
class TrainRecord:
    recipe: TrainRecipe
    dataset: str
    mean: float
    std: float
    parameters: int
    epochs: list[dict[str, float]] = field(default_factory=list)
    test_top1: float = 0.0
    test_top5: float = 0.0
    seconds: float = 0.0
    checkpoint_sha256: str = ""
    torch_version: str = torch.__version__
    machine: str = f"{platform.machine()} {platform.processor() or ''}".strip()

    def to_json(self) -> dict:
        d = asdict(self)
        d["recipe"] = asdict(self.recipe)
        return d


def normalize(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [N,H,W] -> float [N,1,H,W], as ``(x/255 - mean) / std`` (the card's input rule)."""
    return ((images_u8.float() / 255.0 - mean) / std).unsqueeze(1)


def _augment(
    batch: torch.Tensor, shift: int, hflip: bool, fill: float, gen: torch.Generator
) -> torch.Tensor:
    """Random shifts of up to ``shift`` pixels (background fill) and horizontal flips."""
    n, c, h, w = batch.shape
    if shift:
        padded = F.pad(batch, (shift, shift, shift, shift), value=fill)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * shift)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
        batch = padded.gather(2, rows).gather(3, cols)
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    return batch


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of ``model`` on normalised ``images``."""
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].contiguous(memory_format=torch.channels_last))
        y = labels[i : i + batch_size]
        best = logits.topk(5, dim=1).indices
        top1 += int((best[:, 0] == y).sum())
        top5 += int((best == y[:, None]).any(dim=1).sum())
    return top1 / len(images), top5 / len(images)


def train(recipe: TrainRecipe, checkpoint: Path, progress: bool = True) -> TrainRecord:
    """Train ``recipe.arch`` on Fashion-MNIST; write ``checkpoint`` (a timm-style state dict)
    and ``<checkpoint>.train.json`` (this record). Returns the record."""
    train_x, train_y = fashion_mnist.load("train")
    test_x, test_y = fashion_mnist.load("test")

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(recipe.seed)

    mean = float(train_x.mean() / 255.0)
    std = float(train_x.std() / 255.0)
    xs = normalize(torch.from_numpy(train_x.copy()), mean, std)
    ys = torch.from_numpy(train_y)
    xt = normalize(torch.from_numpy(test_x.copy()), mean, std)
    yt = torch.from_numpy(test_y)

    model = create_model(recipe.arch, num_classes=10, in_chans=1, seed=recipe.seed)
    # torch's stubs lack Module.to's memory_format overload (it exists at run time)
    model = model.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(xs) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warmup = int(recipe.warmup_epochs * steps_per_epoch)

    record = TrainRecord(
        recipe=recipe,
        dataset="Fashion-MNIST (Debian dataset-fashion-mnist)",
        mean=mean,
        std=std,
        parameters=count_parameters(model),
    )
    start = time.perf_counter()
    step = 0
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(xs), generator=gen)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{recipe.arch} epoch {epoch + 1}/{recipe.epochs}",
            disable=not progress,
            unit="batch",
            leave=False,
        )
        running = 0.0
        for i in bar:
            idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            x = _augment(xs[idx], recipe.shift_pixels, recipe.hflip, -mean / std, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, warmup, recipe.lr)
            loss = F.cross_entropy(model(x), ys[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running = 0.98 * running + 0.02 * float(loss) if i else float(loss)
            bar.set_postfix(loss=f"{running:.3f}")
        top1, top5 = evaluate(model, xt, yt)
        elapsed = time.perf_counter() - start
        record.epochs.append(
            {
                "epoch": epoch + 1,
                "loss": round(running, 4),
                "test_top1": top1,
                "test_top5": top5,
                "seconds": round(elapsed, 1),
            }
        )
        tqdm.write(
            f"{recipe.arch} epoch {epoch + 1:2d}/{recipe.epochs}: loss {running:.4f}  "
            f"test top-1 {top1:.2%}  top-5 {top5:.2%}  ({elapsed:.0f} s)"
        )

    record.test_top1 = record.epochs[-1]["test_top1"]
    record.test_top5 = record.epochs[-1]["test_top5"]
    record.seconds = round(time.perf_counter() - start, 1)
    model = model.to(memory_format=torch.contiguous_format).eval()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_suffix(".tmp")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(checkpoint)
    record.checkpoint_sha256 = sha256_of(checkpoint)
    record_path(checkpoint).write_text(json.dumps(record.to_json(), indent=2) + "\n")
    return record


def record_path(checkpoint: Path) -> Path:
    """Where the training record of ``checkpoint`` lives: ``<stem>.train.json`` beside it."""
    return checkpoint.with_name(checkpoint.stem + ".train.json")
