"""Tables that live in one place, and the copies that cannot import them: each test fails
when a copy drifts from its source.

- ``docker-compose.yml`` passes every ``SERESNET_*`` setting through (but the two the image
  fixes), and nothing that is not one;
- the client walks folders for exactly the file types the service decodes;
- every error code the service raises is in :data:`service.errors.CODES` with the status it
  is raised with, and the page shows the table's words.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from PIL import Image
from serverutil import REPO_ROOT

from client.discovery import IMAGE_EXTENSIONS
from service.errors import CODES
from service.ingress.app import create_app
from service.ingress.imaging import FORMATS
from service.settings import ENV_PREFIX, Settings
from service.v2 import errors as v2_errors
from service.web.page import ERROR_WORDS_SCRIPT, error_words_script

SERVICE = REPO_ROOT / "service"
# Fixed by the image (the container always binds 0.0.0.0:8000 and gRPC's 8001; compose
# publishes them).
SET_BY_DOCKERFILE = {"host", "port", "grpc_port"}


def _compose_environment(path: Path) -> set[str]:
    compose = yaml.safe_load(path.read_text())
    (service,) = compose["services"].values()
    env = service["environment"]
    return set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}


def test_compose_passes_every_setting_through() -> None:
    env = _compose_environment(REPO_ROOT / "docker-compose.yml")
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    fixed = {ENV_PREFIX + name.upper() for name in SET_BY_DOCKERFILE}
    assert sorted(fields - fixed - env) == [], "settings docker-compose.yml does not pass"
    assert sorted(env - fields) == [], "docker-compose.yml variables that are no setting"
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for name in sorted(fixed):
        assert f"{name}=" in dockerfile, f"the image does not set {name}"


def test_the_client_walks_for_the_types_the_service_reads() -> None:
    Image.init()
    served = {ext for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS}
    assert sorted(IMAGE_EXTENSIONS - served) == [], "the client sends files the service refuses"
    assert sorted(served - IMAGE_EXTENSIONS) == [], "the client skips files the service reads"


# ServiceError(status, "code"), ImageError(...), BodyError(...), ServiceError.of("code"),
# wire.Failed(rid, "code"), send_error(scope, send, "code"), raw answers (status, "code").
_RAISED = re.compile(
    r"(?:Error|\.of|Failed|_refuse|raw_json_response|send_error)\(\s*"
    r"(?:rid,\s*|scope,\s*\w+,\s*)?(?:(\d{3}),\s*)?\"([a-z_]+)\""
)


def test_every_code_raised_is_in_the_table_with_its_status() -> None:
    seen: dict[str, set[int | None]] = {}
    for path in SERVICE.rglob("*.py"):
        for status, code in _RAISED.findall(path.read_text()):
            seen.setdefault(code, set()).add(int(status) if status else None)
    assert len(seen) >= 20, sorted(seen)  # the pattern still finds the raises
    for code, statuses in sorted(seen.items()):
        assert code in CODES, f"{code} is raised but not in service.errors.CODES"
        assert statuses <= {None, CODES[code].status}, (code, statuses, CODES[code])
    for cls in vars(v2_errors).values():
        if isinstance(cls, type) and issubclass(cls, v2_errors.V2Error):
            assert cls.code_name in CODES, cls


def test_the_page_shows_the_tables_words() -> None:
    static = SERVICE / "web" / "static"
    page = (static / "page.js").read_text()
    own = re.search(r"const ERROR_WORDS = \{(.*?)\};", page, re.S)
    assert own is not None
    assert re.findall(r"^\s+(\w+):", own.group(1), re.M) == ["network_error"]
    html = (static / "index.html").read_text()
    assert html.index(ERROR_WORDS_SCRIPT) < html.index("page.js")
    client = TestClient(create_app(engine_socket=Path("/nonexistent/engine.sock")))
    r = client.get(f"/static/{ERROR_WORDS_SCRIPT}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.text == error_words_script()
    for code, entry in CODES.items():
        assert f'"{code}": "{entry.words}"' in r.text
