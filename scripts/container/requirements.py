"""Print the runtime requirements of seresnet-serve, one per line, from ``pyproject.toml``.

The Dockerfile installs these in a layer of their own before it installs the package itself,
so a code change reuses that layer instead of downloading the dependencies again. Extras named
on the command line are added (``gpu`` brings CUDA and cuDNN from PyPI). Extras that would
bring torch (``export``) are refused: the runtime image holds no torch.

    python scripts/container/requirements.py pyproject.toml            # CPU-only image
    python scripts/container/requirements.py pyproject.toml gpu        # GPU image
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

FORBIDDEN_EXTRAS = frozenset({"export", "dev"})


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's dependencies plus those of ``extras``; raises ValueError on a bad extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        if extra in FORBIDDEN_EXTRAS:
            raise ValueError(f"extra {extra!r} does not belong in the runtime image")
        if extra not in optional:
            raise ValueError(f"no extra {extra!r} in {pyproject} (have: {', '.join(optional)})")
        reqs.extend(optional[extra])
    return reqs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, help="path of pyproject.toml")
    parser.add_argument("extras", nargs="*", help="extras to add, e.g. gpu")
    args = parser.parse_args(argv)
    try:
        print("\n".join(requirements(args.pyproject, args.extras)))
    except (OSError, ValueError, KeyError) as e:
        print(f"requirements: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
