"""The end-of-run summary: counts, errors by code, throughput, and accuracy when labels are known.

It covers the whole job, that is every row of the output file (rows kept from earlier runs by
--resume and the rows of this run); the throughput covers this run only. A true label (the
image's folder name) matches a predicted label when they are equal after case folding and
dropping everything but letters and digits, so a folder ``T-shirt_top`` matches the class
``T-shirt/top`` (a ``/`` cannot be part of a folder name).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from client.labels import label_key
from client.output import Row


@dataclass
class ClassStats:
    images: int = 0
    errors: int = 0
    top1: int = 0
    top5: int = 0


@dataclass
class Summary:
    """Accumulates rows; :meth:`to_dict` and :meth:`to_text` report them."""

    top_k: int = 5
    url: str = ""
    output: str = ""
    rows: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    errors_by_scope: Counter[str] = field(default_factory=Counter)
    previous_rows: int = 0
    run_ok: int = 0
    run_errors: int = 0
    skipped: int = 0
    models: dict[tuple[str, str], int] = field(default_factory=dict)
    classes: dict[str, ClassStats] = field(default_factory=dict)
    predicted_keys: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    interrupted: bool = False
    aborted: str | None = None

    def add(self, row: Row, previous: bool = False) -> None:
        """Count one row (``previous``: kept from an earlier run by --resume)."""
        self.rows += 1
        if previous:
            self.previous_rows += 1
        error = row.get("error")
        if error is not None:
            self.errors[error.get("code") or "unknown"] += 1
            self.errors_by_scope[error.get("scope") or "unknown"] += 1
            if not previous:
                self.run_errors += 1
        else:
            self.ok += 1
            if not previous:
                self.run_ok += 1
        truth = row.get("true_label")
        if truth is None:
            return
        stats = self.classes.setdefault(truth, ClassStats())
        if error is not None:
            stats.errors += 1
            return
        stats.images += 1
        keys = [label_key(p["label"]) for p in row.get("predictions", [])]
        self.predicted_keys.update(keys)
        want = label_key(truth)
        if keys[:1] == [want]:
            stats.top1 += 1
        if want in keys[:5]:
            stats.top5 += 1

    def note_model(self, name: str, version: str, images: int) -> None:
        key = (name, version)
        self.models[key] = self.models.get(key, 0) + images

    def finish(self) -> None:
        self.finished = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def images_per_s(self) -> float:
        return self.run_ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        """Every image of the job has predictions and nothing stopped the run early."""
        return not self.errors and not self.interrupted and self.aborted is None

    def unmatched_labels(self) -> dict[str, int]:
        """Folder names never seen among any predicted label: probably not a class name of
        this model, so their accuracy says nothing (counts of scored images)."""
        if not self.predicted_keys:
            return {}
        return {
            name: s.images
            for name, s in sorted(self.classes.items())
            if s.images and label_key(name) not in self.predicted_keys
        }

    def accuracy(self) -> dict[str, Any] | None:
        if not self.classes:
            return None
        n = sum(s.images for s in self.classes.values())
        top1 = sum(s.top1 for s in self.classes.values())
        top5 = sum(s.top5 for s in self.classes.values())
        return {
            "images": n,
            "top1_correct": top1,
            "top1": top1 / n if n else None,
            "top5_correct": top5 if self.top_k >= 5 else None,
            "top5": (top5 / n if n else None) if self.top_k >= 5 else None,
        }

    def to_dict(self) -> dict[str, Any]:
        per_class = {
            name: {
                "images": s.images,
                "errors": s.errors,
                "top1": s.top1 / s.images if s.images else None,
                "top5": (s.top5 / s.images if s.images else None) if self.top_k >= 5 else None,
            }
            for name, s in sorted(self.classes.items())
        }
        return {
            "url": self.url,
            "output": self.output,
            "models": [{"name": n, "version": v, "images": c} for (n, v), c in self.models.items()],
            "complete": self.complete,
            "interrupted": self.interrupted,
            "aborted": self.aborted,
            "run": {
                "scored": self.run_ok,
                "errors": self.run_errors,
                "skipped_already_done": self.skipped,
                "elapsed_s": round(self.elapsed_s, 3),
                "images_per_s": round(self.images_per_s, 2),
            },
            "job": {
                "images": self.rows,
                "scored": self.ok,
                "errors": sum(self.errors.values()),
                "from_earlier_runs": self.previous_rows,
                "errors_by_code": dict(sorted(self.errors.items())),
                "errors_by_scope": dict(sorted(self.errors_by_scope.items())),
            },
            "accuracy": self.accuracy(),
            "per_class": per_class or None,
            "unmatched_labels": self.unmatched_labels() or None,
        }

    def to_text(self) -> str:
        out = []
        model = ", ".join(f"{n} {v}" for (n, v) in self.models)
        out.append(
            f"Scored {self.run_ok} images in {self.elapsed_s:.1f} s "
            f"({self.images_per_s:.1f} images/s)"
            + (f" with {model}" if model else "")
            + f" at {self.url}"
        )
        if self.interrupted:
            out.append("  interrupted: rows written so far are kept; rerun with --resume")
        if self.aborted:
            out.append("  stopped early (the error is on standard error); rerun with --resume")
        if self.previous_rows or self.skipped:
            out.append(
                f"  resumed: {self.previous_rows} rows kept from earlier runs, "
                f"{self.skipped} images skipped as already done"
            )
        errors = sum(self.errors.values())
        out.append(f"  {self.output}: {self.rows} images, {self.ok} scored, {errors} errors")
        if errors:
            codes = ", ".join(f"{c} {n}" for c, n in sorted(self.errors.items()))
            out.append(f"  errors by code: {codes}")
            retry = sum(n for s, n in self.errors_by_scope.items() if s in ("request", "file"))
            if retry:
                out.append(f"  {retry} of them are retried by a rerun with --resume")
        acc = self.accuracy()
        if acc and acc["images"]:
            line = f"  accuracy on {acc['images']} labelled images: top-1 {acc['top1']:.2%}"
            if acc["top5"] is not None:
                line += f", top-5 {acc['top5']:.2%}"
            out.append(line)
            out.append(self._class_table())
        for name, n in self.unmatched_labels().items():
            out.append(f"  warning: folder {name!r} ({n} images) matches no predicted label")
        return "\n".join(out)

    def _class_table(self) -> str:
        width = max(5, *(len(n) for n in self.classes))
        with_top5 = self.top_k >= 5
        lines = [
            f"  {'class':<{width}}  images  errors    top-1" + ("    top-5" if with_top5 else "")
        ]
        for name, s in sorted(self.classes.items()):
            line = f"  {name:<{width}}  {s.images:6d}  {s.errors:6d}  " + _pct(s.top1, s.images)
            if with_top5:
                line += "  " + _pct(s.top5, s.images)
            lines.append(line)
        return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:7.2%}" if whole else "      -"
