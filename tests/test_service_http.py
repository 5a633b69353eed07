"""End to end against a real ``python -m service`` on 127.0.0.1 serving the embedded model:
the HTTP contract of docs/design.md §5, results equal to a direct ONNX Runtime run, every kind
of bad input (each a clear error; the server keeps serving), request ids, logs and metrics."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from modelcard.preprocessing import load_array
from modelcard.schema import FUSED_FILE, read_card
from testkit.fashion import FashionTest
from testkit.images import (
    SVG,
    TEXT,
    animated_gif,
    cmyk_jpeg,
    encode,
    gif_claiming,
    photo,
    png16,
    png_claiming,
    truncated_jpeg,
)
from testkit.server import EMBEDDED_MODEL, ServiceProcess, metric_value, running_service
from testkit.sessions import served_graph_session

pytestmark = pytest.mark.e2e

MAX_BODY = 4 * 2**20
MAX_IMAGES = 64
CARD = read_card(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_MAX_BODY_BYTES": str(MAX_BODY),
        "SERESNET_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
    }
    with running_service(EMBEDDED_MODEL, env=env) as service:
        yield service


@pytest.fixture(scope="module")
def client(svc: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        yield c


def fm_png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels, "L"), "PNG")


def fm_jpeg224(pixels: np.ndarray) -> bytes:
    big = Image.fromarray(pixels, "L").resize((224, 224), Image.Resampling.BICUBIC)
    return encode(big.convert("RGB"), "JPEG", quality=90)


def classify(
    client: httpx.Client,
    files: list[tuple[str, bytes]],
    **params: object,
) -> httpx.Response:
    parts = [("images", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/classify", files=parts, params=params)


def error_of(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return r.status_code, body["error"]["code"]


def direct_top_k(
    session: ort.InferenceSession,
    datas: list[bytes],
    k: int,
) -> list[list[tuple[int, float]]]:
    """What the model says, without the service: export's preprocessing + one ORT run."""
    batch = np.stack([load_array(d, CARD.input) for d in datas])
    logits = session.run([CARD.output.logits], {CARD.input.tensor: batch})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return [[(int(c), float(p[c])) for c in np.argsort(-p, kind="stable")[:k]] for p in probs]


@pytest.fixture(scope="module")
def direct_session(client: httpx.Client) -> ort.InferenceSession:
    engine = client.get(f"/v2/models/{CARD.name}").json()["engine"]
    return served_graph_session(engine, EMBEDDED_MODEL)


# ----------------------------------------------------------------------------- contract


def check_predictions(preds: list[dict], k: int) -> None:
    assert len(preds) == k
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)
    assert 0 < sum(scores) <= 1 + 1e-9
    for p in preds:
        assert set(p) == {"label", "class_id", "score"}
        assert CARD.labels[p["class_id"]] == p["label"]


def test_single_image(client: httpx.Client, fashion: FashionTest) -> None:
    r = classify(client, [("shoe.png", fm_png(fashion.images[0]))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == CARD.name and body["model_version"] == CARD.version
    assert [res["filename"] for res in body["results"]] == ["shoe.png"]
    check_predictions(body["results"][0]["predictions"], 5)


def test_many_images_keep_request_order_and_match_direct_onnxruntime(
    client: httpx.Client, fashion: FashionTest, direct_session: ort.InferenceSession
) -> None:
    images, labels = fashion.images, fashion.labels
    files = []
    for i, px in enumerate(images[:24]):
        files.append((f"{i}.png", fm_png(px)) if i % 2 else (f"{i}.jpg", fm_jpeg224(px)))
    r = classify(client, files, top_k=10)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == [name for name, _ in files]
    expected = direct_top_k(direct_session, [d for _, d in files], 10)
    for res, want in zip(results, expected, strict=True):
        got = [(p["class_id"], p["score"]) for p in res["predictions"]]
        assert [c for c, _ in got] == [c for c, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-6)
    top1 = [res["predictions"][0]["class_id"] for res in results]
    assert np.mean(np.array(top1) == labels[:24]) >= 0.75  # the embedded model is trained


def test_raw_body(client: httpx.Client, fashion: FashionTest, direct_session) -> None:
    data = fm_png(fashion.images[3])
    r = client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["filename"] == "body"
    want = direct_top_k(direct_session, [data], 5)[0]
    assert [p["class_id"] for p in res["predictions"]] == [c for c, _ in want]
    named = client.post(
        "/classify",
        content=data,
        headers={"Content-Type": "image/png", "Content-Disposition": 'inline; filename="x.png"'},
    )
    assert named.json()["results"][0]["filename"] == "x.png"


@pytest.mark.parametrize(("k", "n"), [(1, 1), (5, 5), (10, 10), (50, 10)])
def test_top_k(client: httpx.Client, fashion: FashionTest, k: int, n: int) -> None:
    r = classify(client, [("a.png", fm_png(fashion.images[1]))], top_k=k)
    assert r.status_code == 200
    check_predictions(r.json()["results"][0]["predictions"], n)


def test_missing_top_k_means_five(client: httpx.Client, fashion: FashionTest) -> None:
    r = classify(client, [("a.png", fm_png(fashion.images[1]))])
    assert len(r.json()["results"][0]["predictions"]) == 5


def test_a_corrupt_image_costs_only_itself(client: httpx.Client, fashion: FashionTest) -> None:
    good = [fm_png(fashion.images[i]) for i in range(3)]
    files = [
        ("g0.png", good[0]),
        ("trunc.jpg", truncated_jpeg()),
        ("g1.png", good[1]),
        ("text.jpg", TEXT),
        ("empty.png", b""),
        ("huge.png", png_claiming(30000, 30000)),
        ("g2.png", good[2]),
    ]
    r = classify(client, files, top_k=3)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == [n for n, _ in files]
    codes = [res.get("error", {}).get("code") for res in results]
    assert codes == [
        None,
        "corrupt_image",
        None,
        "unsupported_format",
        "empty_image",
        "image_too_large",
        None,
    ]
    alone = classify(client, [(f"g{i}.png", g) for i, g in enumerate(good)], top_k=3).json()
    good_results = [res for res in results if "predictions" in res]
    assert [res["predictions"] for res in good_results] == [
        res["predictions"] for res in alone["results"]
    ]


# ----------------------------------------------------------------------------- bad input


def test_bad_input_statuses_and_the_server_keeps_serving(
    client: httpx.Client, fashion: FashionTest
) -> None:
    """Each kind of bad input gets its status with a JSON error naming the problem."""
    post = client.post
    cases = {
        "empty body": post("/classify", content=b"", headers={"Content-Type": "image/jpeg"}),
        "empty body, no type": post("/classify"),
        "no images part": post("/classify", files=[("image", ("a.png", b"x", "image/png"))]),
        "text file named .jpg": classify(client, [("a.jpg", TEXT)]),
        "truncated JPEG": classify(client, [("t.jpg", truncated_jpeg())]),
        "zero-byte part": classify(client, [("z.jpg", b"")]),
        "30000x30000 PNG": classify(client, [("bomb.png", png_claiming(30000, 30000))]),
        "30000x30000 GIF": classify(client, [("bomb.gif", gif_claiming(30000, 30000))]),
        "SVG": post("/classify", content=SVG, headers={"Content-Type": "image/svg+xml"}),
        "wrong content type": post(
            "/classify", content=b"{}", headers={"Content-Type": "application/json"}
        ),
        "form-urlencoded": post("/classify", data={"images": "x"}),
        "top_k=abc": classify(client, [("a.png", fm_png(fashion.images[0]))], top_k="abc"),
        "top_k=0": classify(client, [("a.png", fm_png(fashion.images[0]))], top_k=0),
        "top_k=-2": classify(client, [("a.png", fm_png(fashion.images[0]))], top_k=-2),
        "top_k=": client.post(
            "/classify?top_k=",
            content=fm_png(fashion.images[0]),
            headers={"Content-Type": "image/png"},
        ),
        "top_k=2.5": classify(client, [("a.png", fm_png(fashion.images[0]))], top_k=2.5),
        "10,000 tiny parts": classify(client, [(f"{i}.png", b"x") for i in range(10_000)]),
        "body too large": post(
            "/classify", content=b"\xff" * (MAX_BODY + 1), headers={"Content-Type": "image/jpeg"}
        ),
        "unclosed multipart": post(
            "/classify",
            content=b'--xyz\r\nContent-Disposition: form-data; name="images"\r\n\r\nabc',
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
    }
    expected = {
        "empty body": (400, "no_image"),
        "empty body, no type": (400, "no_image"),
        "no images part": (400, "no_image"),
        "text file named .jpg": (415, "unsupported_format"),
        "truncated JPEG": (400, "corrupt_image"),
        "zero-byte part": (400, "empty_image"),
        "30000x30000 PNG": (413, "image_too_large"),
        "30000x30000 GIF": (413, "image_too_large"),
        "SVG": (415, "unsupported_format"),
        "wrong content type": (415, "unsupported_media_type"),
        "form-urlencoded": (415, "unsupported_media_type"),
        "top_k=abc": (422, "invalid_parameter"),
        "top_k=0": (422, "invalid_parameter"),
        "top_k=-2": (422, "invalid_parameter"),
        "top_k=": (422, "invalid_parameter"),
        "top_k=2.5": (422, "invalid_parameter"),
        "10,000 tiny parts": (413, "too_many_images"),
        "body too large": (413, "body_too_large"),
        "unclosed multipart": (400, "invalid_multipart"),
    }
    got = {name: error_of(r) for name, r in cases.items()}
    assert got == expected
    assert "'image'" in cases["no images part"].json()["error"]["message"]  # names what it saw
    assert "top_k" in cases["top_k=abc"].json()["error"]["message"]
    assert "30000x30000" in cases["30000x30000 PNG"].json()["error"]["message"]
    still = classify(client, [("a.png", fm_png(fashion.images[0]))])
    assert still.status_code == 200


def test_odd_but_valid_images_are_classified(client: httpx.Client) -> None:
    files = [
        ("one.png", encode(Image.new("L", (1, 1), 200), "PNG")),
        ("anim.gif", animated_gif()),
        ("deep.png", png16()),
        ("cmyk.jpg", cmyk_jpeg()),
        ("big.jpg", encode(photo(1600, 1200), "JPEG", quality=90)),
        ("pal.png", encode(photo(64, 64).convert("P"), "PNG", transparency=0)),
        ("x.webp", encode(photo(50, 70), "WEBP")),
        ("x.bmp", encode(photo(30, 30), "BMP")),
        ("x.tif", encode(photo(40, 40), "TIFF")),
    ]
    for name, data in files:
        r = classify(client, [(name, data)])
        assert r.status_code == 200, (name, r.text)
        check_predictions(r.json()["results"][0]["predictions"], 5)


def test_chunked_body_over_the_limit_is_refused_while_streaming(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 8):
            yield b"\xff" * 65536

    r = client.post("/classify", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert error_of(r) == (413, "body_too_large")


def test_unknown_routes_and_models_get_json_errors(client: httpx.Client) -> None:
    assert error_of(client.get("/nope")) == (404, "not_found")
    # Under /v2 the body is the KServe V2 protocol's {"error": "<string>"}, which Triton's
    # clients parse.
    r = client.get("/v2/models/nope")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    assert isinstance(r.json()["error"], str)
    assert "'nope'" in r.json()["error"]
    assert error_of(client.get("/classify")) == (405, "method_not_allowed")


# ----------------------------------------------------------------------------- operations


def test_health_and_model_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get(f"/v2/models/{CARD.name}").json()
    assert meta["name"] == CARD.name and meta["versions"] == [CARD.version]
    assert meta["inputs"][0] == {
        "name": CARD.input.tensor,
        "datatype": "UINT8",
        "shape": [-1, 1, 28, 28],
    }
    assert meta["outputs"][0]["shape"] == [-1, CARD.num_classes]
    assert meta["card"]["labels"] == CARD.labels
    engine = meta["engine"]
    assert engine["provider"] == "cpu" and engine["session_providers"][0] == "CPUExecutionProvider"
    assert engine["graph"] in ("fused", "unfused") and engine["reason"]
    assert engine["graph_file"] == (FUSED_FILE if engine["graph"] == "fused" else "model.onnx")
    assert engine["warm_shapes"] and engine["warmup_seconds"] is not None
    assert client.get("/docs").status_code == 200
    assert "/classify" in client.get("/openapi.json").json()["paths"]


def test_request_ids_and_structured_logs(
    svc: ServiceProcess, client: httpx.Client, fashion: FashionTest
) -> None:
    data = fm_png(fashion.images[0])
    mine = client.post(
        "/classify",
        content=data,
        headers={"Content-Type": "image/png", "X-Request-ID": "trace-42.a"},
    )
    assert mine.headers["x-request-id"] == "trace-42.a"
    other = client.post(
        "/classify",
        content=data,
        headers={"Content-Type": "image/png", "X-Request-ID": "no spaces; allowed"},
    )
    assert re.fullmatch(r"[0-9a-f]{32}", other.headers["x-request-id"])
    failing = client.post("/classify", content=TEXT, headers={"Content-Type": "image/jpeg"})
    assert failing.headers["x-request-id"]
    wanted = {"trace-42.a", failing.headers["x-request-id"]}
    for _ in range(500):  # the access line is written just after the response is sent
        records = {r.get("request_id"): r for r in svc.log_records() if r.get("event") == "request"}
        if wanted <= set(records):
            break
        time.sleep(0.02)
    line = records["trace-42.a"]
    assert line["status"] == 200 and line["path"] == "/classify" and line["images"] == 1
    assert line["level"] == "info" and "duration_ms" in line and "ts" in line
    assert records[failing.headers["x-request-id"]]["code"] == "unsupported_format"


def test_metrics_have_tritons_meaning(
    svc: ServiceProcess, client: httpx.Client, fashion: FashionTest
) -> None:
    before = svc.metrics_text()
    files = [(f"{i}.png", fm_png(fashion.images[i])) for i in range(6)]
    assert classify(client, files).status_code == 200
    assert classify(client, [("t.jpg", TEXT)]).status_code == 415
    assert classify(client, [*files[:2], ("t.jpg", TEXT)]).status_code == 200
    after = svc.metrics_text()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("seresnet_inference_request_success_total") == 2
    assert delta("seresnet_inference_request_failure_total", code="unsupported_format") == 1
    assert delta("seresnet_image_failure_total", code="unsupported_format") == 1
    assert delta("seresnet_inference_count_total") == 8  # images run
    execs = delta("seresnet_inference_exec_count_total")  # model runs
    assert 2 <= execs <= 8
    assert delta("seresnet_batch_size_sum") == 8 and delta("seresnet_batch_size_count") == execs
    assert delta("seresnet_queue_duration_seconds_count") == 8
    assert delta("seresnet_compute_duration_seconds_count") == execs
    assert delta("seresnet_request_duration_seconds_count") == 3
    assert metric_value(after, "seresnet_queue_depth") == 0
    meta = client.get(f"/v2/models/{CARD.name}").json()["engine"]
    info = [ln for ln in after.splitlines() if ln.startswith("seresnet_model_info{")]
    assert len(info) == 1
    for key in ("provider", "graph", "opt_level"):
        assert f'{key}="{meta[key]}"' in info[0]
    assert metric_value(after, "seresnet_ready") == 1


def test_large_photo_is_downscaled_from_the_jpeg_directly(client: httpx.Client) -> None:
    buf = io.BytesIO()
    photo(4000, 3000, seed=1).save(buf, format="JPEG", quality=85)
    r = classify(client, [("photo.jpg", buf.getvalue())])
    assert r.status_code == 200


def test_documented_statuses_are_ones_the_routes_can_return(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    with_422 = {
        (m, p)
        for p, ops in spec["paths"].items()
        for m, op in ops.items()
        if "422" in op["responses"]
    }
    # Only /classify has a parameter FastAPI validates (top_k); path strings never fail.
    assert with_422 == {("post", "/classify")}
    assert "404" in spec["paths"]["/v2/models/{name}"]["get"]["responses"]
    example = spec["components"]["schemas"]["ClassifyResponse"]["examples"][0]
    assert example["results"][0]["predictions"][0]["label"] == "Ankle boot"
