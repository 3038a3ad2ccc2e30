"""Emulated links (tests/netem.py): the relay's delay, tbf's rate limit, and TP-2 against
pipeline-2 on demo-kimi:tiny over a Wi-Fi-like link, checked against launcher.planner.

Needs permission to create network namespaces (root); skipped with the reason otherwise.
scripts/emulated_links.py makes the full table (docs/emulated-links.md).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

from tests import netem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import emulated_links as el  # noqa: E402

NETNS_WHY = netem.netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS_WHY is not None, reason=f"emulated links need network namespaces: {NETNS_WHY}")


def _planner_or_skip():
    try:
        from launcher import planner
    except ImportError:
        pytest.skip("launcher.planner is not there yet")
    if not hasattr(planner, "plan_for"):
        pytest.skip("launcher.planner has no plan_for yet")


@needs_netns
def test_relay_adds_the_configured_delay():
    delay_us = 5000.0
    with netem.EmulatedLink(ports1=[7000]) as fast:
        srv = netem.echo_server(fast.ns[1], (netem.X1, 7000))
        base = netem.rtt_us(fast.ns[0], (netem.X1, 7000), n=30)
        srv.close()
    with netem.EmulatedLink(delay_us=delay_us, ports1=[7000]) as slow:
        srv = netem.echo_server(slow.ns[1], (netem.X1, 7000))
        rtt = netem.rtt_us(slow.ns[0], (netem.X1, 7000), n=30)
        srv.close()
        ns = slow.ns + [slow.nsr]
    assert rtt >= 2 * delay_us, f"RTT {rtt:.0f} us through a {delay_us:.0f} us relay (no-delay RTT {base:.0f} us)"
    assert rtt < 2 * delay_us + 20_000, f"RTT {rtt:.0f} us: the relay adds far more than its delay"
    listed = netem._ip("netns", "list").stdout
    assert not any(n in listed for n in ns), "namespaces left behind"


@needs_netns
def test_tbf_limits_throughput():
    rate = 50.0  # Mbit/s: far below what the relay forwards unlimited (Gbit/s)
    with netem.EmulatedLink(rate_mbit=rate, ports1=[7001]) as link:
        srv = netem.sink_server(link.ns[1], (netem.X1, 7001))
        got = netem.throughput_mbit(link.ns[0], (netem.X1, 7001), 3 << 20)
        srv.close()
    assert 0.4 * rate <= got <= 1.5 * rate, f"{got:.1f} Mbit/s over a {rate:.0f} Mbit/s tbf link"


@needs_netns
def test_cleanup_on_failure():
    link = netem.EmulatedLink(ports1=[7000])
    with pytest.raises(RuntimeError):
        with link:
            names = link.ns + [link.nsr]
            raise RuntimeError("boom")
    listed = netem._ip("netns", "list").stdout
    assert not any(n in listed for n in names)


def test_planner_picks_pipeline_on_wifi_and_tensor_on_tb5():
    _planner_or_skip()
    wifi = el.planner_choice(el.LINKS["wifi"], "demo-kimi:tiny", rtt_us=6000)
    tb5 = el.planner_choice(el.LINKS["tb5"], "demo-kimi:tiny")
    assert wifi["sharding"] == "pipeline", wifi
    assert tb5["sharding"] == "tensor", tb5
    # the estimates agree with the rule: TP loses on Wi-Fi
    assert wifi["estimates"]["pipeline"] > wifi["estimates"]["tensor"], wifi


@pytest.mark.slow
@needs_netns
def test_wifi_like_link_pipeline_beats_tensor_and_planner_agrees():
    from runtime import demo_models

    demo_models.ensure("demo-kimi", size="tiny")
    model = "demo-kimi:tiny"
    r = el.measure(el.LINKS["wifi"], model=model, launches=1, gen_tokens=16, repeats=3, log=print)
    tp, pp = statistics.median(r["tensor"]), statistics.median(r["pipeline"])
    print(f"wifi-like (RTT {r['rtt_us']:.0f} us): TP-2 {tp:.1f} tok/s, pipeline-2 {pp:.1f} tok/s")
    assert r["rtt_us"] >= 2 * el.LINKS["wifi"].delay_us
    # each token costs TP two all-reduces per layer (one round of link delay each), pipeline
    # one send per stage boundary: over 3 ms one-way, pipeline wins by several times
    assert pp > 1.5 * tp, f"pipeline {pp:.1f} tok/s vs TP {tp:.1f} tok/s over a Wi-Fi-like link"
    try:
        import launcher.planner  # noqa: F401
    except ImportError:
        return
    choice = el.planner_choice(el.LINKS["wifi"], model, r["rtt_us"])
    assert choice["sharding"] == "pipeline", choice
