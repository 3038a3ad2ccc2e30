"""Per-step timeline of the lock-step loop, on every rank: where a decode step's time goes.

    python scripts/profile_steps.py [--model demo-llama:100m] [-n 2] [--backend mpi|ring]
                                    [--streams 1] [--gen-tokens 128] [--rounds 2]
                                    [--tree DIR --tree DIR ...]

Runs the in-process engine benchmark (`python -m runtime bench` under `exolaunch exec`, no HTTP)
with EXOLAUNCH_STEP_TRACE set (runtime/steptrace.py), then prints, per rank, the median
milliseconds of each phase of a decode step (rank 0: decide, send, apply, build, wait,
dispatch; followers: recv, apply, build, wait) and the decode tok/s of the same run. With
several --tree (source checkouts, e.g. a `git worktree` of the previous commit and this one),
the runs alternate tree by tree for --rounds rounds, so a before/after comes from one session.
Prefill steps (the first of each request) are left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launcher.ports import free_data_port  # noqa: E402

ORDER = ("decide", "send", "recv", "apply", "build", "wait", "dispatch")


def run_once(tree: Path, a) -> tuple[dict, dict[int, list[dict]]]:
    with tempfile.TemporaryDirectory(prefix="exolaunch-trace-") as d:
        env = {"EXOLAUNCH_CACHE": str(Path.home() / ".cache" / "exolaunch"), **os.environ, "PYTHONPATH": str(tree), "EXOLAUNCH_STEP_TRACE": d}
        cmd = [sys.executable, "-m", "launcher", "exec", "-n", str(a.n), "--backend", a.backend,
               "--blas", a.blas, "--port", str(free_data_port(a.n)), "-x", "EXOLAUNCH_CACHE", "-x", "EXOLAUNCH_STEP_TRACE", "-x", "PYTHONPATH",
               "--no-tag-output", "--", "python", "-m", "runtime", "bench", "--model", a.model,
               "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
               "--streams", str(a.streams), "--repeats", str(a.repeats), *a.extra]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tree, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
        if line is None:
            raise SystemExit(f"run failed ({out.returncode}) in {tree}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        steps: dict[int, list[dict]] = defaultdict(list)
        for f in Path(d).glob("rank-*.jsonl"):
            for raw in f.read_text().splitlines():
                rec = json.loads(raw)
                steps[rec["rank"]].append(rec)
        return json.loads(line[6:]), steps


def decode_steps(recs: list[dict]) -> list[dict]:
    """Steady decode steps: drop each rank's slowest 5% (prefills) by build+wait time."""
    if not recs:
        return []
    cost = sorted(r.get("build", 0) + r.get("wait", 0) for r in recs)
    cut = cost[int(len(cost) * 0.95) - 1] if len(cost) > 20 else cost[-1]
    return [r for r in recs if r.get("build", 0) + r.get("wait", 0) <= cut]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-llama:100m")
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--backend", default="mpi")
    ap.add_argument("--blas", default="auto")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", action="append", type=Path, default=None,
                    help="a source checkout to run (repeatable; default: this one)")
    ap.add_argument("extra", nargs="*", help="more `python -m runtime bench` flags (after --)")
    a = ap.parse_args()
    trees = [t.resolve() for t in (a.tree or [ROOT])]
    results: dict[Path, list] = {t: [] for t in trees}
    for _ in range(a.rounds):
        for t in trees:
            results[t].append(run_once(t, a))
    print(f"{a.model}, {a.n} ranks, {a.backend}, blas {a.blas}, {a.streams} stream(s), "
          f"{a.gen_tokens} tokens, {a.rounds} round(s) x {a.repeats} repeat(s); median ms per decode step")
    for t in trees:
        tok_s = statistics.median(b["decode_tok_s"] for b, _ in results[t])
        by_rank: dict[int, list[dict]] = defaultdict(list)
        for _, steps in results[t]:
            for rank, recs in steps.items():
                by_rank[rank] += decode_steps(recs)
        print(f"\n{t}: decode {tok_s:.1f} tok/s per stream (median of rounds)")
        for rank in sorted(by_rank):
            recs = by_rank[rank]
            phases = [p for p in ORDER if any(p in r for r in recs)]
            med = {p: statistics.median(r.get(p, 0.0) for r in recs) * 1e3 for p in phases}
            total = statistics.median(sum(r.get(p, 0.0) for p in phases) for r in recs) * 1e3
            cells = "  ".join(f"{p} {med[p]:6.2f}" for p in phases)
            print(f"  rank {rank}: {len(recs):5d} steps  {cells}  | step {total:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
