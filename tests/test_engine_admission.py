"""The engine's side of hardening (issue 10): admission (max-num-seqs, max-queue, the KV budget),
sampling values that used to stop every rank, and the stop-string scan. A real 1-rank engine on the
tiny demo model, in this process."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from runtime.engine import Engine
from runtime.requests import FinishEvent, GenerationRequest, PromptTooLong, QueueFull, SamplingParams
from tests.conftest import running_engine


@pytest.fixture(scope="module")
def small_engine(demo_model_path):
    # 1 running sequence, 1 waiting, a KV budget of 40 tokens: small enough to hit every limit.
    with running_engine(demo_model_path, max_num_seqs=1, max_queue=1, max_total_tokens=40) as eng:
        yield eng


def _req(n_prompt: int, max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(list(range(10, 10 + n_prompt)),
                             SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw))


def _finish(handle, timeout=60.0) -> tuple[FinishEvent, float]:
    for ev in handle.iter_sync(timeout):
        if isinstance(ev, FinishEvent):
            return ev, time.monotonic()
    raise AssertionError("no finish event")


def test_queue_full_is_refused_with_retry_after_and_the_admitted_ones_complete(small_engine):
    running = small_engine.submit(_req(4, 12))
    waiting = small_engine.submit(_req(4, 12))
    with pytest.raises(QueueFull, match="--max-queue 1") as e:
        small_engine.submit(_req(4, 12))
    assert e.value.retry_after >= 1
    first, t_first = _finish(running)
    second, _ = _finish(waiting)
    assert (first.reason, first.completion_tokens) == ("length", 12)
    assert (second.reason, second.completion_tokens) == ("length", 12)
    assert small_engine.active_requests() == 0


def _stamped(handle):
    """Record when the engine thread pushes each event (consumers may lag behind)."""
    stamps = []
    push = handle.push

    def stamped_push(ev):
        stamps.append((time.monotonic(), ev))
        push(ev)

    handle.push = stamped_push
    return stamps


def test_kv_budget_refuses_what_never_fits_and_queues_what_fits_later(small_engine):
    with pytest.raises(PromptTooLong, match="KV cache budget of 40 tokens"):
        small_engine.submit(_req(30, 20))
    a = small_engine.submit(_req(10, 16))  # 26 of 40 tokens
    a_stamps = _stamped(a)
    b = small_engine.submit(_req(10, 16))  # 52 with a: waits until a has finished
    b_stamps = _stamped(b)
    _finish(a)
    _finish(b)
    a_done = next(t for t, ev in a_stamps if isinstance(ev, FinishEvent))
    assert b_stamps and b_stamps[0][0] > a_done


def test_a_cancelled_waiting_request_frees_its_queue_slot(small_engine):
    running = small_engine.submit(_req(4, 8))
    waiting = small_engine.submit(_req(4, 8))
    waiting.cancel()
    third = small_engine.submit(_req(4, 8))  # the cancelled one no longer counts
    assert _finish(running)[0].reason == "length"
    assert _finish(waiting)[0].reason == "cancelled"
    assert _finish(third)[0].reason == "length"


def test_hostile_sampling_values_do_not_stop_the_engine(engine):
    # top_k beyond the vocabulary used to raise inside every rank's step; a NaN temperature and
    # many distinct top_p values (each one an mlx compile) must not stop or stall it either.
    reqs = [SamplingParams(max_tokens=4, temperature=1.0, top_k=1_000_000, seed=1),
            SamplingParams(max_tokens=4, temperature=float("nan"), seed=2),
            *[SamplingParams(max_tokens=2, temperature=0.8, top_p=0.5 + i / 97, seed=i) for i in range(12)]]
    t0 = time.monotonic()
    handles = [engine.submit(GenerationRequest([10, 11, 12], p)) for p in reqs]
    for h in handles:
        ev, _ = _finish(h)
        assert ev.reason == "length", ev
    assert time.monotonic() - t0 < 30  # 12 compiles of top_p used to take ~0.7 s each
    assert engine.failed is None


def _live(stops, emitted=0):
    return SimpleNamespace(stops=stops, emitted=emitted)


def test_safe_end_holds_back_exactly_a_possible_stop_prefix():
    assert Engine._safe_end(_live(["STOP"]), "hello ST") == 6
    assert Engine._safe_end(_live(["STOP"]), "hello S") == 6
    assert Engine._safe_end(_live(["STOP"]), "hello") == 5
    assert Engine._safe_end(_live(["aab"]), "xaaa") == 2  # "aa" could begin "aab"
    assert Engine._safe_end(_live(["abc", "zz"]), "xxabz") == 4
    assert Engine._safe_end(_live(["STOP"], emitted=7), "hello ST") >= 7  # never goes back
    assert Engine._safe_end(_live([""]), "hello") == 5


def test_stop_scan_cost_does_not_grow_with_the_output():
    # Long stop strings (the API caps them; the engine must not depend on it): the hold-back
    # scan used to try every prefix length up to the output's length, for every token.
    stops = ["q" * 20_000 + str(i) for i in range(16)]
    lv = _live(stops)
    text = ""
    times = []
    for i in range(1500):
        text += "qqqq word "
        t = time.perf_counter()
        Engine._find_stop(lv, text)
        lv.emitted = Engine._safe_end(lv, text)
        times.append(time.perf_counter() - t)
    early, late = sorted(times[200:400])[100], sorted(times[-200:])[100]  # medians
    assert late < early * 5 + 1e-4, (early, late)


def test_requests_the_api_is_preparing_start_in_one_step(engine):
    """Three requests the API admitted together (arriving()) but submitted 10 ms apart, to an
    idle engine: one decision admits all three, so none waits for another's prefill."""
    from runtime.engine import COALESCE_SECONDS

    for _ in range(3):
        engine.arriving()
    handles = []
    for i in range(3):
        handles.append(engine.submit(_req(30 + i, 4)))
        time.sleep(0.01)
    for h in handles:
        _finish(h)
    admitted = [h.admitted_at for h in handles]
    assert max(admitted) - min(admitted) < 0.005, admitted
    # A lone request is not held; one announced but never submitted holds the next at most
    # COALESCE_SECONDS.
    t0 = time.monotonic()
    alone = engine.submit(_req(8, 2))
    _finish(alone)
    assert alone.admitted_at - t0 < COALESCE_SECONDS / 2
    engine.arriving()
    t0 = time.monotonic()
    late = engine.submit(_req(8, 2))
    engine.arriving()  # a request that fails before its submit
    _finish(late)
    assert late.admitted_at - t0 < COALESCE_SECONDS + 0.02
