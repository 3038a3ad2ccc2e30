"""The agent trace (launcher/bench/agent.py) against exolaunch alone, once per setting of one rank
environment variable, so a data-plane switch is measured with everything else equal:

    python scripts/ab_agent_trace.py [--model demo-llama:small] [-n 2] [--backend mpi]
                                     [--var EXOLAUNCH_CPU_ATTENTION] [--values 0,1]

Prints turn 1's TTFT and the mean TTFT of turns 2..N for each value. `exolaunch bench --trace
agent` is the comparison against mlx_lm.server; this is the A/B of one of our own switches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-llama:small")
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--backend", default="mpi")
    ap.add_argument("--blas", default="openblas")
    ap.add_argument("--var", default="EXOLAUNCH_CPU_ATTENTION")
    ap.add_argument("--values", default="0,1")
    a = ap.parse_args()
    import os

    from runtime.contract import ENV_CACHE
    from runtime.demo_models import cache_root

    os.environ.setdefault(ENV_CACHE, str(cache_root()))  # the test cluster passes it to its ranks

    from mlx_lm.utils import load_tokenizer

    from launcher.bench.agent import Trace, later_ttft, run_trace
    from runtime.contract import resolve_model
    from tests.launch_helpers import ServingCluster

    tokenizer = load_tokenizer(resolve_model(a.model)[0])
    for value in a.values.split(","):
        with ServingCluster(a.model, "-n", str(a.n), "--backend", a.backend, "--blas", a.blas,
                            "-x", f"{a.var}={value}") as cluster:
            run_trace(cluster.base_url, a.model, tokenizer, Trace(turns=1), suppress={"ignore_eos": True},
                      variant=99)  # a first request, so neither setting pays one-time costs
            rows = run_trace(cluster.base_url, a.model, tokenizer, Trace(), suppress={"ignore_eos": True})
        print(f"{a.var}={value}: turn 1 {rows[0]['ttft_p50_s']:.3f} s, turns 2+ {later_ttft(rows):.3f} s "
              f"({a.model}, {a.n} ranks, {a.backend}, blas {a.blas})", flush=True)


if __name__ == "__main__":
    main()
