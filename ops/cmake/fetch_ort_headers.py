"""Fetch the ONNX Runtime C/C++ headers from Debian trixie's ``libonnxruntime-dev``.

PyPI's onnxruntime wheels ship no headers. Debian trixie packages ORT 1.21 (API version 21),
and a library built against those headers loads in every newer runtime. The package is fetched
with a private apt configuration whose only source is the trixie suite of the Debian archive
this machine already uses (read from its own apt sources), so nothing on the host changes and no
host name lives in the repository.

Prints the include directory (the one holding ``onnxruntime_cxx_api.h``) on stdout; all
diagnostics go to stderr. Fetched headers are cached under ``--cache-dir`` and reused.

    python fetch_ort_headers.py --cache-dir ~/.cache/seresnet-serve/onnxruntime-headers
    SERESNET_DEBIAN_MIRROR=<debian archive URL> python fetch_ort_headers.py --cache-dir DIR
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "libonnxruntime-dev"
SUITE = "trixie"
HEADER = "onnxruntime_cxx_api.h"
# Base suites that identify an entry as the Debian archive (not a third-party repository).
CODENAMES = ("buster", "bullseye", "bookworm", "trixie", "forky", "sid")
DEBIAN_SUITES = frozenset((*CODENAMES, "oldstable", "stable", "testing", "unstable"))
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def log(message: str) -> None:
    print(f"fetch_ort_headers: {message}", file=sys.stderr)


def cached_include_dir(cache_dir: Path, api_version: int) -> Path | None:
    """Return a cached include dir whose headers declare ``api_version``, if any."""
    for header in sorted(cache_dir.glob(f"*/onnxruntime/{HEADER}"), reverse=True):
        if header_api_version(header.parent) == api_version:
            return header.parent
    return None


def header_api_version(include_dir: Path) -> int | None:
    c_api = include_dir / "onnxruntime_c_api.h"
    if not c_api.is_file():
        return None
    match = re.search(r"^#define ORT_API_VERSION (\d+)", c_api.read_text(errors="replace"), re.M)
    return int(match.group(1)) if match else None


def _one_line_entries(path: str) -> list[tuple[str, str | None]]:
    """(uri, signed_by) of ``deb`` lines in a one-line-style sources file."""
    entries = []
    for raw in Path(path).read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        options: dict[str, str] = {}
        rest = line[4:].strip()
        if rest.startswith("["):
            opts, _, rest = rest[1:].partition("]")
            for item in opts.split():
                key, _, value = item.partition("=")
                options[key] = value
        fields = rest.split()
        if len(fields) >= 3 and _is_debian_archive(fields[1:2], fields[2:]):
            entries.append((fields[0], options.get("signed-by")))
    return entries


def _deb822_entries(path: str) -> list[tuple[str, str | None]]:
    """(uri, signed_by) of ``deb`` stanzas in a deb822 ``.sources`` file."""
    entries = []
    text = Path(path).read_text(errors="replace")
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # continuation (e.g. an inline key block)
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        components = fields.get("components", "").split()
        if not _is_debian_archive(suites, components):
            continue
        signed_by = fields.get("signed-by")
        # An inline key (several lines) cannot be passed as a path: rely on the trusted keyrings.
        if signed_by and "\n" in signed_by:
            signed_by = None
        for uri in fields.get("uris", "").split():
            entries.append((uri, signed_by))
    return entries


def _is_debian_archive(suites: list[str], components: list[str]) -> bool:
    return "main" in components and any(s in DEBIAN_SUITES for s in suites)


def debian_archives() -> list[tuple[str, str | None]]:
    """The Debian archive URIs this machine's apt already uses, security mirrors excluded."""
    mirror = os.environ.get("SERESNET_DEBIAN_MIRROR")
    if mirror:
        return [(mirror, None)]
    entries: list[tuple[str, str | None]] = []
    one_line = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in one_line:
        if os.path.isfile(path):
            entries += _one_line_entries(path)
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        entries += _deb822_entries(path)
    seen: set[str] = set()
    result = []
    for uri, signed_by in entries:
        if "security" in uri or uri in seen:
            continue
        seen.add(uri)
        result.append((uri, signed_by))
    return result


def fetch(cache_dir: Path, api_version: int) -> Path:
    archives = debian_archives()
    if not archives:
        raise SystemExit(
            "fetch_ort_headers: no Debian archive found in this machine's apt sources. Install "
            f"{PACKAGE} (Debian trixie or newer), set ORT_INCLUDE_DIR to a directory holding "
            f"{HEADER} (ONNX Runtime <= 1.21 headers), or set SERESNET_DEBIAN_MIRROR to a "
            "Debian archive URL."
        )
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"fetch_ort_headers: {tool} not found; set ORT_INCLUDE_DIR instead")
    with tempfile.TemporaryDirectory(prefix="ort-headers-") as tmp_name:
        tmp = Path(tmp_name)
        for sub in ("lists/partial", "cache/archives/partial", "parts", "prefs", "deb", "x"):
            (tmp / sub).mkdir(parents=True)
        lines = []
        for uri, signed_by in archives:
            keyring = signed_by or (DEFAULT_KEYRING if os.path.isfile(DEFAULT_KEYRING) else None)
            option = f"[signed-by={keyring}] " if keyring else ""
            lines.append(f"deb {option}{uri} {SUITE} main")
        (tmp / "sources.list").write_text("\n".join(lines) + "\n")
        options = {
            "Dir::Etc::SourceList": tmp / "sources.list",
            "Dir::Etc::SourceParts": tmp / "parts",
            "Dir::Etc::Preferences": tmp / "prefs" / "none",
            "Dir::Etc::PreferencesParts": tmp / "prefs",
            "Dir::State::Lists": tmp / "lists",
            "Dir::Cache": tmp / "cache",
            "Dir::State::status": "/dev/null",
            "Debug::NoLocking": 1,
            "Acquire::Languages": "none",
        }
        apt = ["apt-get", "-q"]
        for key, value in options.items():
            apt += ["-o", f"{key}={value}"]
        if os.geteuid() == 0:
            # apt's _apt sandbox user cannot write into a private temporary directory.
            apt += ["-o", "APT::Sandbox::User=root"]
        log(f"downloading {PACKAGE} from the {SUITE} suite of: {', '.join(a for a, _ in archives)}")
        update = subprocess.run([*apt, "update"], capture_output=True, text=True)
        download = subprocess.run(
            [*apt, "download", PACKAGE], cwd=tmp / "deb", capture_output=True, text=True
        )
        debs = list((tmp / "deb").glob("*.deb"))
        if download.returncode != 0 or not debs:
            raise SystemExit(
                f"fetch_ort_headers: could not download {PACKAGE} from {SUITE}.\n"
                f"apt-get update said:\n{update.stdout}{update.stderr}\n"
                f"apt-get download said:\n{download.stdout}{download.stderr}\n"
                f"Install {PACKAGE} yourself or set ORT_INCLUDE_DIR."
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], check=True)
        include = tmp / "x" / "usr" / "include" / "onnxruntime"
        found = header_api_version(include)
        if found != api_version:
            raise SystemExit(
                f"fetch_ort_headers: {debs[0].name} declares ORT_API_VERSION {found}, expected "
                f"{api_version}; set ORT_INCLUDE_DIR to ONNX Runtime 1.{api_version} headers."
            )
        version = debs[0].name.split("_")[1].replace("%3a", "_").replace(":", "_")
        target = cache_dir / version
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
        shutil.copytree(include, staging / "onnxruntime")
        # Rename into place so that a concurrent or interrupted build never sees half a copy.
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / "onnxruntime" / HEADER).is_file():
                raise
        log(f"cached {PACKAGE} {version} headers in {target}")
        return target / "onnxruntime"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        required=True,
        help="where fetched headers are kept between builds",
    )
    parser.add_argument(
        "--api-version",
        type=int,
        default=21,
        help="ORT_API_VERSION the headers must declare (default: 21)",
    )
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    include = cached_include_dir(args.cache_dir, args.api_version)
    if include is None:
        include = fetch(args.cache_dir, args.api_version)
    else:
        log(f"using cached headers in {include}")
    print(include)
    return 0


if __name__ == "__main__":
    sys.exit(main())
