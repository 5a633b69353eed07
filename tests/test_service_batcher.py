"""service.batcher: coalescing, order, splitting, failure fan-out, bounds, deadlines,
cancellation, draining and argument validation. ``run_batch`` here is a small numpy function
that records what it was given (the batcher is model-agnostic); one test drives the real
engine on the embedded model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from service.engine.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
)
from testkit.server import EMBEDDED_MODEL


class Recorder:
    """run_batch that doubles each image's value, records batches and the thread it ran on,
    and can be held (to fill the queue) with ``gate``."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on
        self.delay_s = 0.0  # each run takes at least this long

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.entered.set()
        self.threads.add(threading.current_thread().name)
        assert self.gate.wait(30), "test gate never opened"
        time.sleep(self.delay_s)
        values = [float(a[0]) for a in images]
        self.batches.append(values)
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError(f"bad image {self.fail_on}")
        return np.asarray([[2 * v, v] for v in values], dtype=np.float32)

    @property
    def seen(self) -> list[float]:
        return [v for batch in self.batches for v in batch]


def img(v: float) -> np.ndarray:
    return np.full((1,), v, dtype=np.float32)


def make(rec: Recorder, **kw: object) -> Batcher:
    args: dict[str, object] = {"max_batch_size": 4, "max_queue_delay_s": 0.05, "max_queue_size": 64}
    args.update(kw)
    return Batcher(rec, **args)  # type: ignore[arg-type]


async def wait_for_entry(rec: Recorder) -> None:
    """Until the inference thread is inside run_batch (it is then held by ``gate``)."""
    for _ in range(3000):
        if rec.entered.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("run_batch was never entered")


async def busy(**kw: object) -> tuple[Recorder, Batcher, asyncio.Future[np.ndarray]]:
    """A started batcher whose model is busy with image 0, held there by the gate."""
    rec = Recorder()
    rec.gate.clear()
    b = make(rec, max_queue_delay_s=0, **kw)
    b.start()
    first = asyncio.ensure_future(b.submit([img(0)]))
    await wait_for_entry(rec)
    return rec, b, first


def test_concurrent_callers_are_coalesced_and_answered_in_order() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec)
        b.start()
        outs = await asyncio.gather(*(b.submit([img(i)]) for i in range(10)))
        await b.close()
        assert [len(x) for x in rec.batches] == [4, 4, 2]
        for i, out in enumerate(outs):
            assert out.shape == (1, 2) and out[0, 0] == 2 * i and out[0, 1] == i
        assert b.stats.batches == 3 and b.stats.images_run == 10

    asyncio.run(main())


def test_one_request_is_split_over_batches_and_reassembled() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec)
        b.start()
        a, c = await asyncio.gather(
            b.submit([img(i) for i in range(10)]), b.submit([img(100 + i) for i in range(3)])
        )
        await b.close()
        assert all(len(x) <= 4 for x in rec.batches)
        assert any(100.0 in batch and batch[0] < 100 for batch in rec.batches)  # mixed batch
        assert list(a[:, 1]) == list(range(10))
        assert list(c[:, 1]) == [100, 101, 102]

    asyncio.run(main())


def test_a_failed_batch_fails_each_of_its_callers_and_the_batcher_goes_on() -> None:
    async def main() -> None:
        rec = Recorder(fail_on=5.0)
        b = make(rec)
        b.start()
        results = await asyncio.gather(
            *(b.submit([img(i)]) for i in range(8)), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        assert rec.batches[1] == [4.0, 5.0, 6.0, 7.0]
        assert len(failed) == 4 and all(isinstance(r, BatchFailedError) for r in failed)
        assert len({id(r) for r in failed}) == 4  # each caller gets its own exception
        assert "bad image 5.0" in str(failed[0])
        assert all(isinstance(r, np.ndarray) for r in results[:4])
        again = await b.submit([img(9)])  # still serving
        await b.close()
        assert again[0, 1] == 9 and b.stats.failed_batches == 1

    asyncio.run(main())


def test_a_wrongly_shaped_result_is_a_failure_not_a_mix_up() -> None:
    async def main() -> None:
        b = Batcher(
            lambda images: np.zeros((len(images) + 1, 2)),
            max_batch_size=4,
            max_queue_delay_s=0,
            max_queue_size=8,
        )
        b.start()
        with pytest.raises(BatchFailedError, match="returned"):
            await b.submit([img(1), img(2)])
        await b.close()

    asyncio.run(main())


async def settle_down() -> None:
    """Let the batcher's loop act on what it has (it runs only between awaits)."""
    for _ in range(20):
        await asyncio.sleep(0.005)


def test_a_lone_request_is_dispatched_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_batch_size=64, max_queue_delay_s=600)  # a fixed delay: 10 minutes
        b.start()
        b.expect(1)  # admitted, decoding
        b.settle(1)  # decoded: nothing else is on its way
        out = await asyncio.wait_for(b.submit([img(3)]), 30)
        await b.close()
        assert out[0, 1] == 3 and rec.batches == [[3.0]]

    asyncio.run(main())


def test_a_request_waits_for_the_other_admitted_images_and_runs_with_them() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_batch_size=64, max_queue_delay_s=600)
        b.start()
        b.expect(1)
        b.expect(2)  # a second request's two images, still decoding
        b.settle(1)
        first = asyncio.ensure_future(b.submit([img(1)]))
        await settle_down()
        assert rec.batches == [] and b.depth == 1 and b.expected == 2  # held for the others

        async def arrive() -> np.ndarray:
            b.settle(2)  # as the engine does: settled and queued in one step
            return await b.submit([img(2), img(3)])

        second = asyncio.ensure_future(arrive())
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        await b.close()
        assert rec.batches == [[1.0, 2.0, 3.0]]  # one model run for both

    asyncio.run(main())


def test_images_that_never_come_release_the_batch_waiting_for_them() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_batch_size=64, max_queue_delay_s=600)
        b.start()
        b.expect(3)
        b.settle(1)
        pending = asyncio.ensure_future(b.submit([img(1)]))
        await settle_down()
        assert rec.batches == []
        b.settle(2)  # failed to decode, or the caller hung up: not coming
        await asyncio.wait_for(pending, 30)
        await b.close()
        assert rec.batches == [[1.0]] and b.expected == 0

    asyncio.run(main())


def test_a_full_batch_goes_without_waiting_for_images_on_their_way() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_batch_size=4, max_queue_delay_s=600)
        b.start()
        b.expect(10)
        b.settle(4)
        out = await asyncio.wait_for(b.submit([img(i) for i in range(4)]), 30)
        assert list(out[:, 1]) == [0, 1, 2, 3] and b.expected == 6
        b.settle(100)  # more than expected: never below zero
        assert b.expected == 0
        await b.close()

    asyncio.run(main())


def test_always_wait_holds_a_lone_request_for_the_delay() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_batch_size=64, max_queue_delay_s=600, always_wait=True)
        b.start()
        pending = asyncio.ensure_future(b.submit([img(1)]))
        await settle_down()
        assert rec.batches == [] and b.depth == 1  # nothing on its way, and still held
        await asyncio.wait_for(b.close(), 30)  # draining runs it without waiting
        assert pending.result()[0, 1] == 1

    asyncio.run(main())


def test_inference_runs_in_its_own_thread_and_the_loop_stays_free() -> None:
    async def main() -> None:
        rec = Recorder()
        rec.gate.clear()
        b = make(rec, max_queue_delay_s=0)
        b.start()
        pending = asyncio.ensure_future(b.submit([img(1)]))
        await wait_for_entry(rec)
        # The model is busy; the loop still runs other coroutines, which release it.
        await asyncio.sleep(0)
        rec.gate.set()
        out = await pending
        await b.close()
        assert out[0, 1] == 1
        assert rec.threads and all(t.startswith("inference") for t in rec.threads)
        assert threading.current_thread().name not in rec.threads

    asyncio.run(main())


def test_a_quick_lone_image_runs_on_the_loop_and_anything_else_on_the_thread() -> None:
    loop_thread = threading.current_thread().name

    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_queue_delay_s=0, inline_below_s=0.05)
        b.start()
        await b.submit([img(1)])  # never timed yet: the thread
        assert rec.threads == {"inference_0"}
        rec.threads.clear()
        for v in (2, 3):
            assert (await b.submit([img(v)]))[0, 0] == 2 * v
        assert rec.threads == {loop_thread}
        rec.threads.clear()
        await b.submit([img(4), img(5)])  # a batch of two: the thread, however quick
        assert rec.threads == {"inference_0"}
        rec.threads.clear()
        rec.delay_s = 0.1  # lone runs that take longer than the bound go back to the thread
        for v in (6, 7, 8, 9, 10):
            await b.submit([img(v)])
        await b.close()
        assert loop_thread in rec.threads  # the slow lone run blocked the loop once ...
        assert "inference_0" in rec.threads  # ... then lone images went to the thread again

    asyncio.run(main())


def test_a_full_queue_refuses_with_a_retry_hint() -> None:
    async def main() -> None:
        rec, b, first = await busy(max_queue_size=4)  # image 0 in the model, queue empty
        queued = asyncio.ensure_future(b.submit([img(i) for i in (1, 2, 3)]))
        await asyncio.sleep(0)
        assert b.depth == 3
        with pytest.raises(QueueFullError) as info:
            await b.submit([img(7), img(8)])
        assert info.value.retry_after_s >= 1
        assert "SERESNET_MAX_QUEUE_SIZE=4" in str(info.value)
        rec.gate.set()
        await asyncio.gather(first, queued)
        await b.close()
        assert 7.0 not in rec.seen and b.stats.dropped["queue_full"] == 2

    asyncio.run(main())


def test_past_deadline_images_are_not_run() -> None:
    async def main() -> None:
        rec, b, first = await busy()
        with pytest.raises(DeadlineExceededError):
            await b.submit([img(5), img(6)], deadline=time.monotonic() + 0.05)
        assert b.depth == 0  # a caller that gave up holds no queue space
        rec.gate.set()
        await first
        late = await b.submit([img(1)])
        await b.close()
        assert late[0, 1] == 1
        assert 5.0 not in rec.seen and 6.0 not in rec.seen
        assert b.stats.dropped["deadline"] == 2

    asyncio.run(main())


def test_a_deadline_already_passed_is_refused_at_once() -> None:
    async def main() -> None:
        b = make(Recorder())
        b.start()
        with pytest.raises(DeadlineExceededError):
            await b.submit([img(1)], deadline=time.monotonic() - 1)
        await b.close()

    asyncio.run(main())


def test_cancelled_callers_cost_no_model_run() -> None:
    async def main() -> None:
        rec, b, first = await busy()
        gone = asyncio.ensure_future(b.submit([img(5), img(6), img(7)]))
        stays = asyncio.ensure_future(b.submit([img(8)]))
        await asyncio.sleep(0)
        gone.cancel()
        rec.gate.set()
        await first
        assert (await stays)[0, 1] == 8
        await b.close()
        assert rec.batches[1] == [8.0]
        assert b.stats.dropped["cancelled"] == 3

    asyncio.run(main())


def test_close_drains_queued_work_without_waiting_for_a_full_batch() -> None:
    async def main() -> None:
        rec = Recorder()
        b = make(rec, max_batch_size=64, max_queue_delay_s=600)  # would wait 10 minutes
        b.start()
        pending = [asyncio.ensure_future(b.submit([img(i)])) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.wait_for(b.close(), 30)
        outs = [p.result() for p in pending]
        assert [o[0, 1] for o in outs] == [0, 1, 2]
        with pytest.raises(BatcherClosedError):
            await b.submit([img(9)])

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"max_queue_delay_s": -1}, "max_queue_delay_s"),
        ({"max_queue_delay_s": float("nan")}, "max_queue_delay_s"),
        ({"max_queue_delay_s": "5"}, "max_queue_delay_s"),
    ],
)
def test_arguments_are_validated(kwargs: dict, error: str) -> None:
    args: dict[str, object] = {"max_batch_size": 4, "max_queue_delay_s": 0.0, "max_queue_size": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=error):
        Batcher(Recorder(), **args)  # type: ignore[arg-type]


def test_run_batch_must_be_callable_and_submit_validates() -> None:
    with pytest.raises(TypeError, match="callable"):
        Batcher(
            "not a function",
            max_batch_size=1,
            max_queue_delay_s=0,  # type: ignore[arg-type]
            max_queue_size=1,
        )

    async def main() -> None:
        b = make(Recorder())
        with pytest.raises(BatcherClosedError, match="not started"):
            await b.submit([img(1)])
        b.start()
        with pytest.raises(ValueError, match="at least one"):
            await b.submit([])
        with pytest.raises(TypeError):
            await b.submit([[1.0]])  # type: ignore[list-item]
        await b.close()

    asyncio.run(main())


def test_with_the_real_engine_results_equal_direct_runs() -> None:
    from service.engine.model import Engine
    from service.settings import load_settings

    embedded_engine = Engine.load(
        load_settings({"model_dir": EMBEDDED_MODEL, "provider": "cpu"}).engine_config()
    )
    rng = np.random.default_rng(1)
    shape = embedded_engine.sample_shape
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(19)]
    direct = embedded_engine.run(images)

    async def main() -> list[np.ndarray]:
        b = Batcher(
            embedded_engine.run, max_batch_size=8, max_queue_delay_s=0.01, max_queue_size=64
        )
        b.start()
        outs = await asyncio.gather(*(b.submit(images[i : i + 3]) for i in range(0, 19, 3)))
        await b.close()
        return outs

    served = np.concatenate(asyncio.run(main()))
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-5)
