"""``python -m client score PATH... [--url URL]`` (console script: ``seresnet-client``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from client.job import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_SERVICE,
    EXIT_USAGE,
    JobOptions,
    run_job,
)
from client.scoring import Settings
from client.shards import parse_shard

DESCRIPTION = """\
Score images through a running seresnet-serve service and write one result row per image.

PATH is an image file, a folder (walked recursively; files with image extensions such as
.jpg .png .webp .bmp .tif, in sorted order; hidden entries skipped; symlinked folders followed
once), or @LIST: a text file with one path (file or folder) per line, '#' comments allowed;
@- reads the list from standard input.
"""

EPILOG = f"""\
examples:
  # score a folder with the local service (make serve); results.jsonl gets one JSON object
  # per image
  python -m client score photos/

  # a labelled folder (class/xxx.png): also report top-1/top-5 accuracy and a per-class table
  python -m client score fashion-test/ --labels-from-dirs --out fashion.jsonl \\
      --summary-json fashion-summary.json

  # continue after Ctrl-C, a crash or a service outage: skips what is already done
  python -m client score fashion-test/ --labels-from-dirs --out fashion.jsonl --resume

  # one of 8 processes sharing a job (each with its own --out), over three replicas
  python -m client score @manifest.txt --shard 3/8 --out part-3.jsonl --resume \\
      --url http://gpu-a:8000 --url http://gpu-b:8000 --url http://gpu-c:8000

  # paths from another tool, CSV out, bigger requests
  find archive -name '*.jpg' -newer stamp | python -m client score @- --url http://gpu-box:8000 \\
      --format csv --out new.csv --batch-size 64 --concurrency 8

output rows (JSON Lines; --format csv has the same fields as columns):
  {{"path": "...", "true_label": "Coat", "predictions": [{{"label": "Coat", "class_id": 4,
   "score": 0.93}}, ...]}}
  {{"path": "...", "error": {{"code": "...", "message": "...", "scope": "image|request|file"}}}}
  scope "image": the service (or the client) judged the image itself unusable; kept by
  --resume. "request": the request failed even after retries; "file": the file could not be
  read. Both are retried by a rerun with --resume.

exit codes:
  {EXIT_OK}    every image of the job (the whole --out file) was scored
  {EXIT_INCOMPLETE}    the run finished, but some images have error rows (see the summary)
  {EXIT_USAGE}    bad arguments or inputs (nothing was scored)
  {EXIT_SERVICE}    the service is unreachable, refused the API key, or failed every request
  {EXIT_OUTPUT}    the output file could not be written
  {EXIT_INTERRUPTED}  interrupted by Ctrl-C (143: SIGTERM); every row written so far is kept

environment: SERESNET_URL (instead of --url), SERESNET_API_KEY (instead of --api-key)
"""


def _number(kind: type[int] | type[float], low: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: a ``kind`` number above ``low`` (``strict``) or at least ``low``."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < low or (strict and value == low):
            bound = f"more than {low:g}" if strict else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return parse


_positive_int = _number(int, 1, strict=False)
_non_negative_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0, strict=True)


DEFAULT_URL = "http://127.0.0.1:8000"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Batch scoring client for seresnet-serve (knows only its HTTP API).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    score = commands.add_parser(
        "score",
        help="score files, folders or @lists of images",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder, or @LIST")
    score.add_argument(
        "--url",
        action="append",
        help=f"the service's base URL (default: $SERESNET_URL, else {DEFAULT_URL}, where "
        "`make serve` listens). Repeat it (or give $SERESNET_URL as a comma-separated list) "
        "to spread the job over replicas without a balancer: batches go round-robin to those "
        "that pass /v2/health/ready, and a request that fails on one goes to the next",
    )
    score.add_argument(
        "--shard",
        metavar="I/N",
        help="score only shard I of N (0 <= I < N), by a hash of each path: N processes with "
        "the same PATHs split the job between them, e.g. an Indexed Job's "
        "--shard $(JOB_COMPLETION_INDEX)/N. Rows record the shard; --resume refuses a file "
        "of another shard",
    )
    score.add_argument(
        "--out",
        help="result file, written as it goes (default results.jsonl, or results.csv with "
        "--format csv); '-' for standard output",
    )
    score.add_argument(
        "--format",
        choices=["jsonl", "csv"],
        help="result format (default: from the --out extension, else jsonl)",
    )
    score.add_argument(
        "--top-k", type=_positive_int, metavar="K", default=5, help="classes per image (5)"
    )
    score.add_argument(
        "--batch-size", type=_positive_int, default=16, help="images per request (16)"
    )
    score.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        help="requests in flight at once, over as many keep-alive connections (4)",
    )
    score.add_argument(
        "--retries",
        type=_non_negative_int,
        default=5,
        help="retries of a failed request (connection error, timeout, 429/502/503/504) with "
        "exponential backoff and jitter, or as long as Retry-After says (5)",
    )
    score.add_argument(
        "--timeout", type=_positive_float, default=60.0, help="seconds per request (60)"
    )
    score.add_argument(
        "--resume",
        action="store_true",
        help="continue the job in --out: skip images already there, retry failed ones",
    )
    score.add_argument(
        "--overwrite", action="store_true", help="replace an --out file that has results"
    )
    score.add_argument(
        "--labels-from-dirs",
        action="store_true",
        help="each image's folder name is its true label (class/xxx.jpg); adds accuracy. "
        "Names match class labels ignoring case and punctuation (T-shirt_top = T-shirt/top)",
    )
    score.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    score.add_argument(
        "--api-key",
        default=os.environ.get("SERESNET_API_KEY"),
        help="API key, when the service requires one (default: $SERESNET_API_KEY, the safer "
        "way: other users can read command lines)",
    )
    score.add_argument(
        "--quiet", action="store_true", help="no progress bar, notices or summary text"
    )
    return parser


def _output(args: argparse.Namespace) -> tuple[str, str]:
    fmt = args.format
    out = args.out
    if fmt is None:
        fmt = "csv" if out is not None and out.lower().endswith(".csv") else "jsonl"
    if out is None:
        out = f"results.{fmt}"
    return out, fmt


def urls_of(args: argparse.Namespace) -> list[str]:
    """The replicas' base URLs: every --url, else $SERESNET_URL (comma-separated), else the
    local service; each once, in order."""
    given = args.url or (os.environ.get("SERESNET_URL") or DEFAULT_URL).split(",")
    return list(dict.fromkeys(u.strip().rstrip("/") for u in given if u.strip()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    urls = urls_of(args)
    for url in urls or [""]:
        if not url.startswith(("http://", "https://")):
            print(f"error: --url {url!r} must start with http:// or https://", file=sys.stderr)
            return EXIT_USAGE
    shard = None
    if args.shard is not None:
        try:
            shard = parse_shard(args.shard)
        except ValueError as e:
            print(f"error: --shard {e}", file=sys.stderr)
            return EXIT_USAGE
    key = args.api_key
    if key and not (key.isascii() and key.isprintable()):
        # An HTTP header carries only visible ASCII; say so instead of failing mid-request.
        print(
            "error: the API key (--api-key or SERESNET_API_KEY) has characters an HTTP "
            "header cannot carry: use printable ASCII only",
            file=sys.stderr,
        )
        return EXIT_USAGE
    out, fmt = _output(args)
    settings = Settings(
        url=urls[0],
        top_k=args.top_k,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        retries=args.retries,
        timeout=args.timeout,
        api_key=args.api_key or None,
    )
    opts = JobOptions(
        paths=list(args.paths),
        settings=settings,
        out=out,
        fmt=fmt,
        labels_from_dirs=args.labels_from_dirs,
        resume=args.resume,
        overwrite=args.overwrite,
        summary_json=args.summary_json,
        quiet=args.quiet,
        shard=shard,
        urls=urls,
    )
    try:
        return run_job(opts)
    except KeyboardInterrupt:
        # Ctrl-C before scoring started (e.g. while reading a long --resume file): nothing
        # was written yet, so there is nothing to flush.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
