"""The prefix KV cache (issue 14) on one rank, in this process: greedy outputs with the cache on
are token-identical to a cold engine's across exact repeats, grown conversations, shared system
prompts and interleaved batches; eviction under a tiny budget never breaks a request and the
store stays within it; a request cancelled mid-prefill leaves no entry behind. Two ranks (tensor
and pipeline) are in tests/test_prefix_cache_cluster.py."""

from __future__ import annotations

import time

import pytest

from runtime.prefix_cache import PrefixIndex, common_prefix
from runtime.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from tests.conftest import running_engine

SYSTEM = [5 + (i * 7) % 1900 for i in range(300)]  # a "system prompt with tools": 300 tokens


@pytest.fixture(scope="module")
def cold(demo_model_path):
    with running_engine(demo_model_path, prefix_cache_gb=0) as eng:
        yield eng


@pytest.fixture(scope="module")
def warm(demo_model_path):
    with running_engine(demo_model_path, prefix_cache_gb=0.5) as eng:
        yield eng


def _submit(eng, prompt, max_tokens=10):
    return eng.submit(GenerationRequest(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True)))


def _result(handle, timeout=120.0) -> tuple[list[int], FinishEvent]:
    toks = []
    for ev in handle.iter_sync(timeout):
        if isinstance(ev, TokenEvent):
            toks.append(ev.token)
        else:
            return toks, ev
    raise AssertionError("no finish")


def _run(eng, prompt, max_tokens=10):
    return _result(_submit(eng, prompt, max_tokens))


def test_common_prefix_and_index_lookup():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    idx = PrefixIndex(budget_tokens=10)
    eid, evicted = idx.add([1, 2, 3, 4])
    assert eid >= 0 and evicted == []
    assert idx.lookup([1, 2, 3, 4]) == (eid, 3)  # the last prompt token is always prefilled
    assert idx.lookup([1, 2, 7]) == (eid, 2)
    assert idx.lookup([9]) == (-1, 0)
    # A longer entry makes the one it extends redundant; the budget evicts the least recent.
    eid2, evicted = idx.add([1, 2, 3, 4, 5, 6])
    assert evicted == [eid] and idx.tokens == 6
    eid3, evicted = idx.add([8, 8, 8, 8, 8])
    assert evicted == [eid2] and idx.tokens == 5
    assert idx.add(list(range(11))) == (-1, [])  # larger than the whole budget: not kept


def test_exact_repeat_and_grown_conversation_equal_cold(cold, warm):
    turn1 = SYSTEM + [700, 701, 702]
    ref1, _ = _run(cold, turn1)
    got1, fin1 = _run(warm, turn1)
    again, fin_again = _run(warm, turn1)
    assert got1 == ref1 and again == ref1
    assert fin1.cached_tokens == 0 or fin1.cached_tokens < len(turn1)
    assert fin_again.cached_tokens == len(turn1) - 1 and fin_again.prompt_tokens == len(turn1)
    # The next turn resends everything plus the answer and a new message.
    turn2 = turn1 + ref1 + [710, 711, 712, 713]
    ref2, _ = _run(cold, turn2)
    got2, fin2 = _run(warm, turn2)
    assert got2 == ref2
    assert fin2.cached_tokens >= len(turn1) + len(ref1) - 1
    turn3 = turn2 + ref2 + [720, 721]
    ref3, _ = _run(cold, turn3)
    got3, fin3 = _run(warm, turn3)
    assert got3 == ref3 and fin3.cached_tokens >= len(turn2)


def test_shared_system_prompt_and_an_interleaved_batch_equal_cold(cold, warm):
    _run(warm, SYSTEM + [800])  # puts the system prompt in the cache
    users = [SYSTEM + [810 + i, 900 + 3 * i, 901] + [1000 + i] * (i * 5) for i in range(5)]
    refs = [_result(h)[0] for h in [_submit(cold, u) for u in users]]
    # All five at once, with different lengths: they prefill and decode as one batch.
    handles = [_submit(warm, u) for u in users]
    got = [_result(h) for h in handles]
    assert [g[0] for g in got] == refs
    assert all(fin.cached_tokens >= len(SYSTEM) for _, fin in got)
    # Interleaved with a request that shares nothing, joining mid-way.
    a = _submit(warm, users[0], max_tokens=30)
    time.sleep(0.05)
    b = _submit(warm, [1500 + i for i in range(40)])
    c = _submit(warm, users[3] + [7, 7])
    ref_b, _ = _run(cold, [1500 + i for i in range(40)])
    ref_c, _ = _run(cold, users[3] + [7, 7])
    ref_a, _ = _run(cold, users[0], max_tokens=30)
    assert [_result(h)[0] for h in (a, b, c)] == [ref_a, ref_b, ref_c]


def test_requests_in_flight_share_a_system_prompt(demo_model_path, cold):
    """A request arriving while another with the same system prompt still runs reuses that
    sequence's KV (nothing of it is in the cache yet), with the cold engine's tokens."""
    system = [9 + (i * 13) % 1700 for i in range(400)]
    first, second = system + [801, 802], system + [901, 902, 903]
    ref_first, _ = _run(cold, first, max_tokens=200)
    ref_second, _ = _run(cold, second)
    with running_engine(demo_model_path, prefix_cache_gb=0.5) as eng:
        a = _submit(eng, first, max_tokens=200)
        events = a.iter_sync(120)
        head = next(events)  # its prompt is all in its KV now
        assert isinstance(head, TokenEvent) and len(eng.index) == 0
        got, fin = _run(eng, second)
        assert not a.done  # still running while the second came and went
        assert got == ref_second and fin.cached_tokens == len(system)
        rest = [ev.token for ev in events if isinstance(ev, TokenEvent)]
        assert [head.token] + rest == ref_first
        # A third, once both left: the cache holds each whole conversation.
        again, fin = _run(eng, second)
        assert again == ref_second and fin.cached_tokens == len(second) - 1


def test_eviction_under_a_tiny_budget_never_breaks_a_request(demo_model_path, cold):
    budget = 600 * 2048  # bytes: ~600 tokens of the tiny model's float32 KV (2048 B/token)
    with running_engine(demo_model_path, prefix_cache_gb=budget / 1e9) as eng:
        assert eng.kv_bytes_per_token == 2048 and eng.index.budget_tokens == 600
        prompts = [[100 + 50 * k + i % 37 for i in range(120 + 40 * (k % 4))] for k in range(10)]
        prompts += [prompts[1] + [5, 6, 7], prompts[8], prompts[9][:50] + [1, 2]]
        refs = [_run(cold, p)[0] for p in prompts]
        for _ in range(2):  # the second round hits what the first kept, where it still fits
            for p, ref in zip(prompts, refs):
                got, fin = _run(eng, p)
                assert got == ref and fin.reason == "length"
                assert eng.index.tokens <= 600 and eng.store.nbytes <= budget, (eng.index.tokens, eng.store.nbytes)
        # The last request's keep is decided with its last token and applied a moment later.
        deadline = time.monotonic() + 10
        while len(eng.store) != len(eng.index) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.index.hits > 0 and len(eng.store) == len(eng.index)


def test_a_request_cancelled_mid_prefill_leaves_no_entry(demo_model_path, cold):
    long = [3 + (i * 11) % 1700 for i in range(1200)]
    # 16-token chunks: the 1200-token prompt takes 75 steps, so the cancel lands mid-prefill.
    with running_engine(demo_model_path, prefix_cache_gb=0.5, prefill_step=16) as eng:
        h = _submit(eng, long)
        deadline = time.monotonic() + 30
        while eng.steps < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        h.cancel()
        toks, fin = _result(h)
        assert (fin.reason, fin.completion_tokens, toks) == ("cancelled", 0, [])
        _run(eng, [1, 2, 3])  # the next decision applies the removal
        assert len(eng.store) == 0  # nothing was kept of the cancelled prompt
        got, fin = _run(eng, long)
        assert fin.cached_tokens == 0 and got == _run(cold, long)[0]
        again, fin = _run(eng, long)  # now complete: kept, and reused
        assert again == got and fin.cached_tokens == len(long) - 1


def test_the_plan_counts_the_prefix_cache_in_the_kv_budget():
    from launcher.hostfile import builtin_local
    from launcher.planner import PREFIX_CACHE_MAX_GB, plan_for

    plan = plan_for("llama-3.1-8b", builtin_local(2), None)
    gb = plan.prefix_cache_gb()
    assert 0 < gb <= PREFIX_CACHE_MAX_GB
    per_token = sum(r.kv_bytes_per_token for r in plan.ranks)  # both ranks on this host
    taken = plan.kv_budget_tokens() - plan.kv_budget_tokens(gb)
    assert taken == pytest.approx(2 * gb * 1e9 / per_token, rel=1e-3)
    assert plan.max_total_tokens(10**6, gb) == plan.kv_budget_tokens(gb)
