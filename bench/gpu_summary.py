"""One screen from a GPU check's results folder (scripts/gpu-check.sh writes it): the steps and
their exit codes, what the service served, fp16 parity, raw engine against HTTP, the SE tax,
first-request latency and GPU memory per bucket, time to ready.

    python -m bench.gpu_summary bench/results [--require-served fp16+graphs]

Exit 1 when a step failed, or when ``--require-served`` is not what the service served.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def served_problem(serving: dict, want: str) -> str | None:
    """Why ``serving`` (see :func:`served`) is not ``want`` ("fp16", "graphs", joined by +)."""
    wanted = set(want.split("+"))
    if not serving:
        return "the service's log has no 'engine loaded' record"
    why = []
    if "fp16" in wanted and serving.get("precision") != "fp16":
        why.append(f"precision {serving.get('precision')}, not fp16")
    if "graphs" in wanted and not serving.get("cuda_graphs"):
        why.append("CUDA graphs off")
    if why and serving.get("fallbacks"):
        why.append(f"fallbacks: {serving['fallbacks']}")
    return "served " + "; ".join(why) if why else None


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"unreadable": str(path)}


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def summarise(folder: Path, require: str | None = None) -> tuple[list[str], list[str]]:
    """The summary's lines, and the problems that fail the check."""
    lines: list[str] = [f"GPU check results in {folder}"]
    problems: list[str] = []
    check = _load(folder, "gpu-check.json")
    if check:
        lines.append(
            f"steps ({check.get('mode')}, {check.get('seconds')}s of {check.get('budget_s')}s):"
        )
        for step in check.get("steps", []):
            rc = step.get("rc")
            state = "ok" if rc == 0 else step.get("skipped") or f"exit {rc}"
            lines.append(f"  {step['step']:<9} {state:<8} {step.get('seconds', 0)}s")
            if rc != 0:
                problems.append(f"step {step['step']}: {state}")
    frontend = _load(folder, "gpu-frontend.json")
    if frontend:
        serving = frontend.get("served", {})
        lines.append(
            f"served: {serving.get('provider')} {serving.get('precision')} "
            f"graphs={serving.get('cuda_graphs')} layout={serving.get('layout')} "
            f"file={serving.get('graph_file')}"
        )
        raw = frontend.get("raw_engine", {})
        lines.append(
            f"ready: raw engine {_fmt(raw.get('seconds_to_ready'), 's')}, service "
            f"{_fmt(frontend.get('service_seconds_to_ready'), 's')}; raw "
            f"{_fmt(raw.get('images_per_s'))} img/s at batch {frontend['settings']['batch']}"
        )
        for row in frontend.get("http", []):
            lines.append(
                f"  http {row['images_per_request']} img/req c={row['concurrency']}: "
                f"{row['images_per_s']} img/s ({row.get('over_raw', 0):.0%} of raw), p99 "
                f"{row['p99_ms']} ms, service CPU {_fmt(row.get('service_cpu_ms_per_request'))}"
                " ms/request"
            )
        for b in raw.get("buckets", []):
            lines.append(
                f"  bucket {b['bucket']:>3}: first run {b['first_ms']} ms, then "
                f"{b['median_ms']} ms; GPU memory {_fmt(b.get('gpu_memory_mib'), ' MiB')}"
            )
        if require:
            problem = served_problem(serving, require)
            if problem:
                problems.append(problem)
    elif require:
        problems.append("no gpu-frontend.json: what the service serves was not measured")
    checks = _load(folder, "gpu-checks.json")
    if checks:
        lines.append("parity and replays (gpu-checks.json):")
        for name, value in checks.items():
            if isinstance(value, dict) and "error" in value:
                lines.append(f"  {name}: ERROR {value['error']}")
                problems.append(f"gpu_checks {name}: {value['error']}")
            elif isinstance(value, dict):
                keys = ", ".join(f"{k}={v}" for k, v in list(value.items())[:4])
                lines.append(f"  {name}: {keys}"[:100])
    fusion = _load(folder, "gpu-fusion.json")
    if fusion and isinstance(fusion.get("summary"), dict):
        lines.append("SE tax and matrix (gpu-fusion.json summary):")
        for batch, entry in list(fusion["summary"].items())[:6]:
            lines.append(f"  {batch}: {json.dumps(entry)[:92]}")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="the results folder (gpu-check.sh --out)")
    parser.add_argument(
        "--require-served", metavar="WHAT", help="fail unless served, e.g. fp16+graphs"
    )
    args = parser.parse_args(argv)
    lines, problems = summarise(args.folder, args.require_served)
    print("\n".join(lines))
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
