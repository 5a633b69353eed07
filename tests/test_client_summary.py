"""The client's end-of-run summary: counts, accuracy, per-class table, label matching."""

from __future__ import annotations

import json

from client.labels import label_key
from client.output import Row
from client.summary import Summary

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Coat"]


def _row(truth: str | None, ranking: list[int], path: str = "p.png") -> Row:
    row: Row = {
        "path": path,
        "predictions": [
            {"label": LABELS[c], "class_id": c, "score": 1.0 / (i + 2)}
            for i, c in enumerate(ranking)
        ],
    }
    if truth is not None:
        row["true_label"] = truth
    return row


def _error(truth: str, code: str, scope: str) -> Row:
    return {
        "path": "e.png",
        "true_label": truth,
        "error": {"code": code, "message": "m", "scope": scope},
    }


def test_folder_names_match_labels_ignoring_case_and_punctuation() -> None:
    assert label_key("T-shirt_top") == label_key("T-shirt/top") == "tshirttop"
    assert label_key("ankle boot") == label_key("Ankle-Boot")
    assert label_key("Coat") != label_key("Coats")


def test_accuracy_and_per_class_table() -> None:
    s = Summary(top_k=5, url="http://svc", output="r.jsonl")
    s.add(_row("T-shirt_top", [0, 1, 2, 3]))  # top-1 right
    s.add(_row("T-shirt_top", [2, 0, 1, 3]))  # top-5 right only
    s.add(_row("Coat", [3, 0, 1, 2]))  # top-1 right
    s.add(_row("Coat", [0, 1, 2, 3], path="old.png"), previous=True)  # top-5 only, earlier run
    s.add(_error("Coat", "decode_error", "image"))
    s.finish()
    acc = s.accuracy()
    assert acc == {
        "images": 4,
        "top1_correct": 2,
        "top1": 0.5,
        "top5_correct": 4,
        "top5": 1.0,
    }
    d = s.to_dict()
    assert d["per_class"]["Coat"] == {"images": 2, "errors": 1, "top1": 0.5, "top5": 1.0}
    assert d["per_class"]["T-shirt_top"]["top1"] == 0.5
    assert d["job"]["images"] == 5 and d["job"]["from_earlier_runs"] == 1
    assert d["job"]["errors_by_code"] == {"decode_error": 1}
    assert d["run"]["scored"] == 3 and d["run"]["errors"] == 1
    assert not d["complete"]
    json.dumps(d)  # --summary-json must be able to write it
    text = s.to_text()
    assert "top-1 50.00%, top-5 100.00%" in text
    assert "decode_error 1" in text
    assert "T-shirt_top" in text


def test_complete_only_without_errors_or_interruption() -> None:
    s = Summary()
    s.add(_row(None, [1]))
    assert s.complete and s.accuracy() is None
    s.interrupted = True
    assert not s.complete


def test_retryable_errors_are_pointed_out() -> None:
    s = Summary()
    s.add(_error("Coat", "connection_error", "request"))
    s.add(_error("Coat", "not_found", "file"))
    s.add(_error("Coat", "decode_error", "image"))
    assert "2 of them are retried by a rerun with --resume" in s.to_text()


def test_folders_that_match_no_class_are_flagged() -> None:
    s = Summary()
    s.add(_row("Coat", [3, 0]))
    s.add(_row("n01440764", [1, 2]))  # an ImageNet-style folder id, not a label
    assert s.unmatched_labels() == {"n01440764": 1}
    assert "n01440764" in s.to_text() and "matches no predicted label" in s.to_text()


def test_top5_is_not_reported_when_fewer_classes_were_asked_for() -> None:
    s = Summary(top_k=1)
    s.add(_row("Coat", [3]))
    acc = s.accuracy()
    assert acc is not None and acc["top1"] == 1.0 and acc["top5"] is None
    assert "top-5" not in s.to_text()
