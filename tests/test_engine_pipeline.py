"""The pipelined lock-step (runtime/engine.py): while nothing changes rank 0 sends one decision per
lease of steps, not one per step, and every decision it sends accounts for exactly the steps the
ranks run. The channel here records what rank 0 broadcasts (a real follower decodes the same
bytes in the cluster tests: test_run_cluster's TP greedy equality runs over leases)."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.decision import StepDecision
from runtime.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from tests.conftest import running_engine


class RecordingChannel:
    """Stands in for control.Leader in a one-process engine: keeps every decision rank 0 sends."""

    def __init__(self):
        self.sent: list[StepDecision] = []
        self.lock = threading.Lock()

    def broadcast(self, data: bytes) -> None:
        with self.lock:
            self.sent.append(StepDecision.decode(data))


def generate(engine, prompt: list[int], n: int, **params) -> list[int]:
    h = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                               **params)))
    tokens = []
    for ev in h.iter_sync(timeout=120):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token)
        elif isinstance(ev, FinishEvent):
            assert ev.reason == "length", ev
            assert ev.completion_tokens == n
            break
    return tokens


@pytest.fixture(scope="module")
def reference(demo_model_path):
    with running_engine(demo_model_path) as eng:
        yield generate(eng, list(range(5, 25)), 96)


def test_one_decision_per_lease_same_tokens(demo_model_path, reference):
    channel = RecordingChannel()
    with running_engine(demo_model_path, control=channel) as eng:
        got = generate(eng, list(range(5, 25)), 96)
        time.sleep(0.2)  # the decision removing the finished request
        steps = eng.steps
        sent = list(channel.sent)
    assert got == reference
    # Every step a rank runs is granted by exactly one decision (followers count the same).
    assert sum(d.steps for d in sent) == steps
    # demo-llama:tiny steps take milliseconds: leases of several steps, so far fewer messages.
    assert len(sent) < steps / 2, (len(sent), steps)
    assert max(d.run for d in sent) > 1


def test_waiting_requests_get_single_step_leases(demo_model_path):
    channel = RecordingChannel()
    with running_engine(demo_model_path, control=channel, max_num_seqs=1) as eng:
        outs = []
        threads = [threading.Thread(target=lambda: outs.append(generate(eng, [7, 8, 9], 24))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        sent = list(channel.sent)
    assert len(outs) == 3 and outs[0] == outs[1] == outs[2]
    # While a request waits for the one slot, rank 0 looks again after every step, so it joins at
    # once when the slot frees up (the lease never holds a waiting request back).
    joins = [i for i, d in enumerate(sent) if d.inserts]
    assert len(joins) == 3
    assert all(d.run == 1 for d in sent[joins[0]:joins[-1] + 1])
    # Once nobody waits, leases grow again.
    assert max(d.run for d in sent[joins[-1]:]) > 1
