"""The one request pipeline under every protocol, and the seams it stands on.

A real service answers ``/classify`` and ``/v2`` infer (tritonclient, encoded images) of the
same images with the same logits and the same ranking; failed images and requests leave no
slot leased. The typed engine messages survive the real framing, and anything else on the
socket is refused. The ranking's fast path is the full stable sort's answer. A lone small image is
decoded on the event loop (then admitted and run in one Submit); anything bigger, or a
decode budget in use, still goes to the decode threads and the slots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from modelcard.preprocessing import load_array
from modelcard.schema import read_card
from service import ranking, wire
from service.ingress.engine_client import Lease
from service.ingress.imaging import ImageError
from service.ingress.pipeline import INLINE_FILE_BYTES, Files, Pipeline
from service.ingress.state import IngressState
from service.settings import Settings
from service.slots import SlotArena
from testkit.fashion import fashion_test
from testkit.images import TEXT, encode, photo, truncated_jpeg
from testkit.server import EMBEDDED_MODEL, ServiceProcess, running_service

CARD = read_card(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    with running_service(EMBEDDED_MODEL, env={"SERESNET_WORKERS": "1"}) as service:
        yield service


def _pngs(n: int) -> list[bytes]:
    return fashion_test().pngs(n)


def test_both_protocols_give_the_same_answer(svc: ServiceProcess) -> None:
    files = _pngs(6)
    bad = [files[0], TEXT, files[1], truncated_jpeg(), *files[2:]]
    parts = [("images", (f"{i}.png", b, "application/octet-stream")) for i, b in enumerate(bad)]
    answer = httpx.post(f"{svc.url}/classify", files=parts, params={"top_k": 10}, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [("error" in r) for r in results] == [
        False,
        True,
        False,
        True,
        False,
        False,
        False,
        False,
    ]

    client = triton.InferenceServerClient(svc.url.removeprefix("http://"), network_timeout=60)
    try:
        inp = triton.InferInput(CARD.input.tensor, [len(bad)], "BYTES")
        inp.set_data_from_numpy(np.array(bad, dtype=np.object_), binary_data=True)
        out = client.infer(CARD.name, [inp])
    finally:
        client.close()
    logits = out.as_numpy(CARD.output.logits)
    errors = [e.decode() for e in out.as_numpy("image_errors")]
    for i, result in enumerate(results):
        if "error" in result:
            assert np.isnan(logits[i]).all()
            assert errors[i] and result["error"]["message"] == errors[i]
            continue
        assert not errors[i]
        ids, probs = ranking.top_k(ranking.softmax(logits[i : i + 1]), 10)
        preds = result["predictions"]
        assert [p["class_id"] for p in preds] == ids[0].tolist()
        # The engine may batch the two requests' images differently: float rounding only.
        np.testing.assert_allclose([p["score"] for p in preds], probs[0], rtol=0, atol=1e-6)


def test_no_slot_stays_leased(svc: ServiceProcess) -> None:
    files = _pngs(2)
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        for body in (TEXT, truncated_jpeg(), files[0]):
            c.post("/classify", content=body, headers={"Content-Type": "image/png"})
        parts = [("images", ("a.png", files[1], "image/png")), ("images", ("t", TEXT, "image/png"))]
        assert c.post("/classify", files=parts).status_code == 200
        bad_v2 = c.post(f"/v2/models/{CARD.name}/infer", content=b'{"inputs": []}')
        assert bad_v2.status_code == 400
    deadline = time.monotonic() + 30
    while svc.metric("seresnet_admitted_images") != 0:
        assert time.monotonic() < deadline, "slots still leased after every request ended"
        time.sleep(0.1)


async def _round_trip(messages: list[object]) -> list[wire.Message]:
    reader = asyncio.StreamReader()
    for message in messages:
        reader.feed_data(wire.encode(message))  # type: ignore[arg-type]
    reader.feed_eof()
    return [await wire.read_message(reader) for _ in messages]


def test_engine_messages_survive_the_framing() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    sent: list[object] = [
        wire.Admit(1, 3),
        wire.Run(1, (4, 5), 12.5),
        wire.Release(1),
        wire.StateChanged(False, "warming up"),
        wire.Granted(2, (0, 1)),
        wire.Failed(3, "queue_full", "busy", 1),
    ]
    assert asyncio.run(_round_trip(sent)) == sent
    (done,) = asyncio.run(_round_trip([wire.Done(4, logits)]))
    assert isinstance(done, wire.Done) and np.array_equal(done.logits, logits)
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28)
    (submit,) = asyncio.run(_round_trip([wire.Submit(5, pixels, 3.5)]))
    assert isinstance(submit, wire.Submit) and submit.deadline == 3.5
    assert np.array_equal(submit.pixels, pixels)


@pytest.mark.parametrize("junk", [("admit", 1, 3), {"rid": 1}, "run"])
def test_anything_else_on_the_socket_is_refused(junk: object) -> None:
    with pytest.raises(wire.ProtocolError):
        asyncio.run(_round_trip([junk]))


def test_ranking_is_the_full_stable_sort() -> None:
    rng = np.random.default_rng(7)
    for trial in range(2000):
        n, classes, k = int(rng.integers(0, 5)), int(rng.integers(1, 40)), int(rng.integers(0, 45))
        # Every other trial is all ties, where only the stable order decides.
        if trial % 2:
            scores = rng.integers(0, 3, (n, classes)).astype(np.float64)
        else:
            scores = rng.standard_normal((n, classes))
        ids, values = ranking.top_k(scores, k)
        kk = max(1, min(k, classes))
        order = np.argsort(-scores, axis=-1, kind="stable")[:, :kk]
        assert ids.dtype == np.int32 and np.array_equal(ids, order)
        assert np.array_equal(values, np.take_along_axis(scores, order, axis=-1))


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    """A worker's pipeline without an engine, its decode threads shut down: a fill that
    needs them fails loudly."""
    state = IngressState(Settings(model_dir=EMBEDDED_MODEL), tmp_path / "engine.sock")
    state.pool.shutdown()
    yield Pipeline(state)


def test_a_lone_small_image_is_decoded_on_the_event_loop(pipeline: Pipeline) -> None:
    jpeg = encode(photo(224, 224), "JPEG", quality=90)
    assert len(jpeg) <= INLINE_FILE_BYTES
    pixels = pipeline._decode_inline(jpeg, CARD)
    assert isinstance(pixels, np.ndarray)
    np.testing.assert_array_equal(pixels, load_array(jpeg, CARD.input))
    error = pipeline._decode_inline(truncated_jpeg(), CARD)
    assert isinstance(error, ImageError) and error.code == "corrupt_image"


def test_big_files_big_decodes_and_a_busy_budget_go_to_the_threads(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    small = encode(photo(224, 224), "JPEG", quality=90)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    big_file = encode(Image.fromarray(noise), "PNG")
    big_decode = encode(photo(2048, 2048), "PNG")  # smooth: a few KB that decode to 12 MB
    assert len(big_file) > INLINE_FILE_BYTES >= len(big_decode)
    assert pipeline._decode_inline(big_file, CARD) is None
    assert pipeline._decode_inline(big_decode, CARD) is None
    budget = pipeline.state.decode_budget
    with budget.reserve(budget.limit, time.monotonic()):
        assert pipeline._decode_inline(small, CARD) is None
    # A model input too big for one Submit message (float32 3x224x224) goes through a slot.
    rgb = CARD.input.model_copy(
        update={
            "channels": 3,
            "color": "RGB",
            "height": 224,
            "width": 224,
            "dtype": "float32",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }
    )
    assert pipeline._decode_inline(small, CARD.model_copy(update={"input": rgb})) is None
    # The slot path decodes in the threads, even for one image.
    arena = SlotArena(tmp_path / "slots", CARD.input.shape, CARD.input.dtype, 1, create=True)
    try:
        lease = Lease(None, 1, [0], arena, 0)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="shutdown"):
            asyncio.run(pipeline._fill(lease, Files([small]), CARD, time.monotonic() + 10))
    finally:
        arena.close()
