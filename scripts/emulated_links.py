"""TP-2 against pipeline-2 on emulated Thunderbolt-, Ethernet- and Wi-Fi-like links.

    sudo python scripts/emulated_links.py [--model demo-kimi:tiny] [--launches 3] [--links tb5,ethernet,wifi]

For each link kind, two ranks run `python -m runtime bench` under `exolaunch exec`, each in its
own network namespace, with every rank->rank connection (mlx ring in both directions and the
control channel) going through tests/netem.py's delaying relay and over tbf-limited veths.
The Thunderbolt-like case needs no emulation: both ranks in this namespace on loopback (about
10 us round trip, faster than any relay could forward). Prints decode tok/s (median over
launches; each launch is itself the median of `--repeats` generations), the measured link
round trip, and which layout launcher.planner picks for the same link (if the planner exists).
Needs root (network namespaces); see docs/emulated-links.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import netem  # noqa: E402


@dataclass(frozen=True)
class LinkSpec:
    kind: str            # the topology kind the planner sees
    label: str
    delay_us: float      # one-way delay added by the relay (0 and unused when not emulated)
    rate_mbit: float | None
    emulated: bool = True


LINKS = {
    "tb5": LinkSpec("tb5", "Thunderbolt-like (loopback, no relay)", 0.0, None, emulated=False),
    "ethernet": LinkSpec("ethernet", "Ethernet-like (10 Gbit tbf, +50 us one-way)", 50.0, 10000.0),
    "wifi": LinkSpec("wifi", "Wi-Fi-like (300 Mbit tbf, +3 ms one-way)", 3000.0, 300.0),
}
PORT = 52700  # inside fresh namespaces nothing else listens; for tb5 (loopback) see ports()


def ports(spec: LinkSpec) -> int:
    # loopback is shared with other jobs on this machine: pick a free-ish port range per process
    return PORT if spec.emulated else 40000 + (os.getpid() * 7) % 20000


def bench_once(spec: LinkSpec, link: netem.EmulatedLink | None, sharding: str, *, model: str,
               gen_tokens: int, repeats: int, timeout: float = 300) -> float:
    """One `exolaunch exec` of the bench on two ranks; decode tok/s (rank 0's median)."""
    port = ports(spec)
    with tempfile.TemporaryDirectory(prefix="exolaunch-netem-") as td:
        if link is not None:
            ips = link.addrs
            env = [f"EXOLAUNCH_NETEM_NS={','.join(link.ns)}", f"EXOLAUNCH_CONTROL={ips[0]}:{port - 1}"]
            wrap = ["python", "-m", "tests.netem", "rank-exec"]
        else:
            ips = ["127.0.0.1", "127.0.0.1"]
            env = [f"EXOLAUNCH_CONTROL=127.0.0.1:{port - 1}"]
            wrap = []
        hf = Path(td) / "hosts.yaml"
        hf.write_text(
            f"backend: ring\nport: {port}\nhosts:\n"
            + "".join(f"  - {{name: r{i}, ssh: local, ips: [{ip}], slots: 1, cwd: {ROOT}}}\n"
                      for i, ip in enumerate(ips)))
        cmd = [sys.executable, "-m", "launcher", "--hostfile", str(hf), "exec", "--timeout", str(int(timeout))]
        for e in env:
            cmd += ["-x", e]
        cmd += ["--", *wrap, "python", "-m", "runtime", "bench", "--model", model, "--sharding", sharding,
                "--gen-tokens", str(gen_tokens), "--repeats", str(repeats)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 30,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in p.stdout.splitlines():
        if "BENCH " in line:
            return float(json.loads(line.split("BENCH ", 1)[1])["decode_tok_s"])
    raise RuntimeError(f"bench {sharding} on {spec.kind} failed (exit {p.returncode}):\n"
                       f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def link_rtt_us(spec: LinkSpec, link: netem.EmulatedLink | None) -> float:
    """Median small-message round trip between the ranks' namespaces, through the relay."""
    port = 7000
    if link is None:
        srv = netem.echo_server(None, ("127.0.0.1", 0))
        try:
            return netem.rtt_us(None, srv.getsockname())
        finally:
            srv.close()
    srv = netem.echo_server(link.ns[1], (netem.X1, port))
    try:
        return netem.rtt_us(link.ns[0], (netem.X1, port))
    finally:
        srv.close()


def open_link(spec: LinkSpec) -> netem.EmulatedLink | None:
    if not spec.emulated:
        return None
    return netem.EmulatedLink(delay_us=spec.delay_us, rate_mbit=spec.rate_mbit,
                              ports0=[PORT - 1, PORT], ports1=[PORT + 1, 7000]).__enter__()


def measure(spec: LinkSpec, *, model: str, launches: int, gen_tokens: int, repeats: int,
            shardings=("tensor", "pipeline"), log=print) -> dict:
    """{'rtt_us': ..., 'tensor': [tok/s per launch], 'pipeline': [...]} (launches interleaved)."""
    link = open_link(spec)
    try:
        out: dict = {"rtt_us": link_rtt_us(spec, link)}
        for i in range(launches):
            for sh in (shardings if i % 2 == 0 else tuple(reversed(shardings))):
                v = bench_once(spec, link, sh, model=model, gen_tokens=gen_tokens, repeats=repeats)
                out.setdefault(sh, []).append(v)
                log(f"  {spec.kind:9} {sh:9} launch {i + 1}: {v:8.1f} tok/s")
        return out
    finally:
        if link is not None:
            link.close()


def planner_choice(spec: LinkSpec, model: str, rtt_us: float | None = None) -> dict | None:
    """The layout launcher.planner picks for two hosts joined by this kind of link (None: no
    planner). The link gets the emulated figures: rate, and half the measured round trip."""
    try:
        from launcher import planner
        from launcher.hostfile import load_hostfile
        from launcher.topology import load_topology
    except ImportError:
        return None
    if not hasattr(planner, "plan_for"):
        return None
    with tempfile.TemporaryDirectory() as td:
        hf = Path(td) / "h.yaml"
        hf.write_text("backend: ring\nhosts:\n"
                      "  - {name: a, ssh: local, ips: [127.0.0.1], slots: 1, memory_gb: 64}\n"
                      "  - {name: b, ssh: local, ips: [127.0.0.1], slots: 1, memory_gb: 64}\n")
        extra = ""
        if spec.rate_mbit:
            extra += f", bandwidth_gbps: {spec.rate_mbit / 1000:g}"
        if rtt_us is not None and spec.emulated:
            extra += f", latency_us: {rtt_us / 2:.0f}"
        tf = Path(td) / "t.yaml"
        tf.write_text(f"links:\n  - {{hosts: [a, b], kind: {spec.kind}{extra}}}\n")
        plan = planner.plan_for(model, load_hostfile(hf), load_topology(tf), backend="ring")
    est = {lay.name: lay.tok_s for lay in [plan.layout, *plan.alternatives]}
    return {"sharding": plan.sharding, "estimates": est, "reasons": plan.reasons}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo-kimi:tiny")
    ap.add_argument("--links", default="tb5,ethernet,wifi")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    why = netem.netns_unavailable()
    kinds = args.links.split(",")
    if why and any(LINKS[k].emulated for k in kinds):
        print(f"emulated links unavailable: {why}", file=sys.stderr)
        return 2
    from runtime import demo_models

    name, _, size = args.model.partition(":")
    demo_models.ensure(name, size=size or "small")  # generate once, before the ranks race for it
    rows = []
    t0 = time.monotonic()
    for k in kinds:
        spec = LINKS[k]
        print(f"{spec.label}:", flush=True)
        r = measure(spec, model=args.model, launches=args.launches, gen_tokens=args.gen_tokens,
                    repeats=args.repeats, log=lambda s: print(s, flush=True))
        tp, pp = statistics.median(r["tensor"]), statistics.median(r["pipeline"])
        plan = planner_choice(spec, args.model, r["rtt_us"])
        rows.append({"link": k, "label": spec.label, "rtt_us": r["rtt_us"], "tensor": r["tensor"],
                     "pipeline": r["pipeline"], "tensor_median": tp, "pipeline_median": pp,
                     "faster": "tensor" if tp > pp else "pipeline", "ratio": max(tp, pp) / min(tp, pp),
                     "planner": plan})
    print(f"\n{args.model}, 2 ranks, decode tok/s (median of {args.launches} launches x "
          f"{args.repeats} generations of {args.gen_tokens} tokens), {time.monotonic() - t0:.0f} s\n")
    print("| link | measured RTT | TP-2 tok/s | pipeline-2 tok/s | faster | by | planner picks | planner est. TP / PP tok/s | agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p = row["planner"]
        if p is None:
            pick, est, agree = "(no planner)", "", ""
        else:
            pick = p["sharding"]
            e = p["estimates"]
            est = f"{e.get('tensor', 0):.0f} / {e.get('pipeline', 0):.0f}"
            agree = ("yes" if pick == row["faster"] else "NO") if row["ratio"] >= 1.15 else \
                f"({'yes' if pick == row['faster'] else 'no'}: within 15%, a tie)"
        print(f"| {row['label']} | {row['rtt_us']:.0f} us | {row['tensor_median']:.1f} | "
              f"{row['pipeline_median']:.1f} | {row['faster']} | {row['ratio']:.2f}x | {pick} | {est} | {agree} |")
    print("\nper launch: " + "; ".join(
        f"{r['link']}: TP {', '.join(f'{v:.0f}' for v in r['tensor'])} / PP {', '.join(f'{v:.0f}' for v in r['pipeline'])}"
        for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
