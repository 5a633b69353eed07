"""The page at ``/`` and the offline ``/docs`` and ``/redoc``, in a real headless Chromium
(Debian's ``chromium`` + ``chromium-driver``) against a real ``python -m service``.

The browser runs with a dead proxy for everything but loopback, and after every test its
network log (Chrome DevTools ``Network.requestWillBeSent`` events) must show that no request
went anywhere but 127.0.0.1. Screenshots land in ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from testkit.images import TEXT, encode, truncated_jpeg
from testkit.server import EMBEDDED_MODEL, REPO_ROOT, ServiceProcess, running_service

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; .ci/run installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402  (only once chromium is known to be there)
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from testkit.fashion import FashionTest  # noqa: E402

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
WAIT_S = 60
API_KEY = "page-test-key"
# Test-set images of eight classes that the embedded model gets right (it is 94 % accurate:
# index 4, a Shirt, comes back as T-shirt/top).
FASHION_INDICES = (0, 1, 2, 6, 7, 8, 9, 13)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--window-size=1280,1000",
    # Loopback is never proxied; anything else would go to this closed port and fail, so even
    # a request the checks below missed could not leave the machine.
    "--proxy-server=http://127.0.0.1:9",
]


@dataclass
class Browser:
    driver: webdriver.Chrome
    requests: list[dict] = field(default_factory=list)

    def collect(self) -> list[dict]:
        """Requests the browser started since the last call (method and URL)."""
        new = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                request = message["params"]["request"]
                new.append(
                    {
                        "method": request["method"],
                        "url": request["url"],
                        "id": message["params"]["requestId"],
                    }
                )
            elif message["method"] == "Network.loadingFailed":
                new.append(
                    {
                        "method": "FAILED",
                        "id": message["params"]["requestId"],
                        "blocked": message["params"].get("blockedReason"),
                    }
                )
            elif message["method"] == "Network.webSocketCreated":
                new.append({"method": "WS", "url": message["params"]["url"]})
        self.requests += new
        return new

    def wait(self, condition, timeout: float = WAIT_S):
        return WebDriverWait(self.driver, timeout).until(condition)

    def by_id(self, name: str) -> WebElement:
        return self.driver.find_element(By.ID, name)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        return path

    def upload(self, paths: list[Path]) -> None:
        self.by_id("files").send_keys("\n".join(str(p) for p in paths))

    def wait_done(self) -> str:
        """Waits for the page to finish the current selection; its status line."""
        status = self.by_id("status")
        self.wait(lambda _d: status.get_attribute("data-state") == "done")
        return status.text

    def results(self) -> dict[str, WebElement]:
        return {
            e.get_attribute("data-filename"): e
            for e in self.driver.find_elements(By.CSS_SELECTOR, "#results .result")
        }

    def severe_console(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def nothing_leaves_loopback(browser: Browser) -> Iterator[None]:
    browser.collect()  # start from this test's requests only
    start = len(browser.requests)
    yield
    browser.collect()
    seen = browser.requests[start:]
    assert seen, "the network log recorded no request at all: the check would be empty"
    # The browser itself refused these (Content-Security-Policy): they never left it.
    blocked = {r["id"] for r in seen if r["method"] == "FAILED" and r["blocked"]}
    remote = [r for r in seen if "url" in r and not _is_local(r["url"]) and r["id"] not in blocked]
    assert not remote, f"requests left 127.0.0.1: {remote}"


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    with running_service(EMBEDDED_MODEL) as svc:
        yield svc


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, fashion: FashionTest) -> list[Sample]:
    """Eight Fashion-MNIST test images of eight classes as PNG files, with their true labels."""
    paths = fashion.save_pngs(tmp_path_factory.mktemp("fashion-png"), list(FASHION_INDICES))
    return [Sample(path, fashion.label(i)) for path, i in zip(paths, FASHION_INDICES, strict=True)]


def _model_metadata(svc: ServiceProcess, headers: dict[str, str] | None = None) -> dict:
    r = httpx.get(f"{svc.url}/v2/models/fashion-seresnet", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()


def _top1(element: WebElement) -> tuple[str, str]:
    first = element.find_element(By.CSS_SELECTOR, ".bars li:first-child")
    return (
        first.find_element(By.CSS_SELECTOR, ".label").text,
        first.find_element(By.CSS_SELECTOR, ".score").text,
    )


def test_page_shows_the_card_and_classifies_fashion_mnist_images(
    service: ServiceProcess, browser: Browser, samples: list[Sample]
) -> None:
    browser.driver.get(f"{service.url}/")
    facts = browser.by_id("card-facts")
    browser.wait(lambda _d: facts.is_displayed())
    meta = _model_metadata(service)
    assert browser.by_id("card-title").text.startswith("fashion-seresnet · version 1")
    assert browser.by_id("card-classes").text.startswith(
        "10 classes: T-shirt/top · Trouser · Pullover · Dress · Coat · Sandal · Shirt · Sneaker "
        "· Bag · Ankle boot."
    )
    assert browser.by_id("card-input").text.startswith("28×28 grayscale")
    assert browser.by_id("card-accuracy").text == (
        "top-1 93.96 %, top-5 99.97 % on 10,000 test images"
    )
    engine = browser.by_id("card-engine").text
    assert engine.startswith(meta["engine"]["provider"])
    assert ("fused SE graph" in engine) == (meta["engine"]["graph"] == "fused")
    assert browser.by_id("card-limits").text.startswith("256 images and 32 MiB per request")

    chosen = samples[:3]
    browser.upload([s.path for s in chosen])
    status = browser.wait_done()
    assert re.fullmatch(r"3 images classified · 1 request, \d+ ms", status), status

    shown = browser.results()
    assert list(shown) == [s.path.name for s in chosen]  # in the order chosen
    for sample in chosen:
        card = shown[sample.path.name]
        assert card.get_attribute("data-state") == "ok"
        label, score = _top1(card)
        assert label == sample.label
        # The bar says what the API says for the same file.
        r = httpx.post(
            f"{service.url}/classify?top_k=5",
            timeout=30,
            files=[("images", (sample.path.name, sample.path.read_bytes()))],
        )
        api = r.json()["results"][0]["predictions"]
        assert score == f"{api[0]['score'] * 100:.1f} %"
        assert len(card.find_elements(By.CSS_SELECTOR, ".bars li")) == 5
        thumb = card.find_element(By.CSS_SELECTOR, ".thumb img")
        assert browser.driver.execute_script("return arguments[0].naturalWidth", thumb) == 28
    assert browser.severe_console() == []
    posts = [r for r in browser.collect() if r["method"] == "POST"]
    assert [urlsplit(r["url"]).path for r in posts] == ["/classify"]
    browser.screenshot("web_page.png")


def test_page_says_why_a_file_was_not_classified(
    service: ServiceProcess, browser: Browser, samples: list[Sample], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(truncated_jpeg())
    notes = tmp_path / "notes.png"
    notes.write_bytes(TEXT)
    browser.driver.get(f"{service.url}/")
    browser.upload([samples[0].path, broken, notes])
    status = browser.wait_done()
    assert status.startswith("1 image classified, 2 not · 1 request"), status
    shown = browser.results()
    assert _top1(shown[samples[0].path.name])[0] == samples[0].label
    error = shown["broken.jpg"].find_element(By.CSS_SELECTOR, ".error")
    assert shown["broken.jpg"].get_attribute("data-state") == "error"
    assert error.text.startswith("Not a readable image: JPEG data cannot be decoded")
    assert error.text.endswith("(corrupt_image)")
    assert (
        shown["notes.png"]
        .find_element(By.CSS_SELECTOR, ".error")
        .text.startswith("Not an image format the service reads: not a supported image")
    )
    browser.screenshot("web_page_errors.png")

    # Alone, a bad image is the whole request's status (400), not a 200 with an error entry.
    browser.upload([broken])
    status = browser.wait_done()
    assert re.fullmatch(r"0 images classified, 1 not · 1 request, \d+ ms", status), status
    alone = browser.results()["broken.jpg"].find_element(By.CSS_SELECTOR, ".error").text
    assert alone.startswith("Not a readable image: broken.jpg: JPEG data cannot be decoded")


def test_docs_and_redoc_render_offline(service: ServiceProcess, browser: Browser) -> None:
    browser.driver.get(f"{service.url}/docs")
    browser.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {
        e.text.replace("\u200b", "")
        for e in browser.driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/classify", "/v2/health/ready", "/v2/models/{name}", "/metrics"} <= paths
    browser.screenshot("docs.png")
    assert any(
        urlsplit(r.get("url", "")).path == "/static/docs/swagger-ui-bundle.js"
        for r in browser.collect()
    )

    browser.driver.get(f"{service.url}/redoc")
    browser.wait(lambda d: "/classify" in d.find_element(By.TAG_NAME, "body").text)
    browser.screenshot("redoc.png")
    requests = browser.collect()
    assert any(
        urlsplit(r.get("url", "")).path == "/static/docs/redoc.standalone.js" for r in requests
    )
    # ReDoc always asks its CDN for a logo; the page's policy makes the browser refuse it.
    logo = [r["id"] for r in requests if r.get("url", "").endswith("/redoc/logo-mini.svg")]
    assert {"method": "FAILED", "id": logo[0], "blocked": "csp"} in requests


def test_page_asks_for_the_api_key_and_keeps_to_the_limits(
    browser: Browser, samples: list[Sample], tmp_path: Path
) -> None:
    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    big.write_bytes(encode(Image.fromarray(noise, "RGB"), "PNG"))  # noise: incompressible
    assert big.stat().st_size > 8192
    env = {
        "SERESNET_API_KEY": API_KEY,
        "SERESNET_MAX_IMAGES_PER_REQUEST": "2",
        "SERESNET_MAX_BODY_BYTES": "8192",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        browser.driver.get(f"{svc.url}/")
        card_status = browser.by_id("card-status")
        browser.wait(lambda _d: "API key" in card_status.text)
        assert not browser.by_id("card-facts").is_displayed()

        key = browser.by_id("api-key")
        key.send_keys(API_KEY, Keys.TAB)
        browser.wait(lambda _d: browser.by_id("card-facts").is_displayed())
        assert browser.by_id("card-limits").text.startswith("2 images and 8 KiB per request")

        five = [s.path for s in samples[:5]]
        browser.collect()
        browser.upload([*five, big])
        status = browser.wait_done()
        assert re.fullmatch(
            r"5 images classified, 1 not · 3 requests, \d+ ms "
            r"\(\d+ \+ \d+ \+ \d+ ms\)",
            status,
        ), status
        posts = [r for r in browser.collect() if r["method"] == "POST"]
        assert len(posts) == 3  # 2 + 2 + 1 images; the big file was never sent
        shown = browser.results()
        for sample in samples[:5]:
            assert _top1(shown[sample.path.name])[0] == sample.label
        assert (
            shown["big.png"]
            .find_element(By.CSS_SELECTOR, ".error")
            .text.startswith("Too large to send:")
        )
        browser.screenshot("web_page_limits.png")

        # The key lives in sessionStorage: a reload still has it, and the card loads.
        browser.driver.refresh()
        browser.wait(lambda _d: browser.by_id("card-facts").is_displayed())
        assert browser.by_id("api-key").get_attribute("value") == API_KEY
