"""The bench record: one JSON object per run (one sweep point, one repeat, one server), appended
to results.jsonl as soon as it is measured. Everything downstream (CSV, markdown, plots,
resume) reads these records and nothing else.

    {
      "schema": 1,
      "sweep": "NAME",                  # the sweep's name (YAML file stem or "adhoc")
      "point": "KEY",                   # point_key(config): same config -> same key, any server
      "repeat": 0,                      # 0..repeats-1
      "server": "exolaunch" | "mlx-lm", # mlx-lm = the anchor, mlx.launch/mpirun + mlx_lm.server
      "config": {"model": str, "ranks": int, "hosts": [str], "backend": str, "sharding": str,
                 "blas": str,           # the sweep's blas: auto | openblas | bundled | PATH (absent
                                        # in records from before it existed)
                 "prompt_tokens": int, "gen_tokens": int, "concurrency": int},
      "ok": bool, "error": str | null,  # a failed run keeps its config and says why
      "blas": {                         # what the server's ranks actually ran, read from each rank
        "library": str | null,          # process's mapped libraries (null: unknown, e.g. macOS)
        "ranks": [str | null per rank]
      } | null,                         # null when the cluster did not start
      "metrics": {                      # absent when ok is false
        "ttft_s":  {"p50", "p90", "p99", "mean"},   # over the run's requests
        "tpot_s":  {"p50", "p90", "p99", "mean"},   # (e2e - ttft) / (tokens - 1), per request
        "itl_s":   {"p50", "p90", "p99", "mean"},   # every gap between streamed chunks
        "e2e_s":   {"p50", "p90", "p99", "mean"},
        "prompt_tok_s": float,        # median over requests of prompt_tokens / ttft
        "decode_tok_s": float,        # median over requests of (tokens - 1) / (last - first token)
        "aggregate_tok_s": float,     # all generated tokens / wall time of the run
        "requests": int, "completed": int, "tokens_generated": int,
        "prompt_tokens_seen": int,    # what the server reported (checks exact-length prompts)
        "launch_to_first_token_s": float | null,  # set on the first run after a cluster start
        "peak_mem_mb": [float per rank],           # peak RSS of each rank process so far
        "idle_cpu_pct": [float per rank]           # % of one core, idle cluster, before the run
      },
      "roofline": {                     # null when it could not be measured
        "bandwidth_gbs": {host: float},           # measured per host
        "bytes_per_token": {host: float},         # weights (+ KV) read per decode step on that host
        "ceiling_tok_s": float,                   # per-stream ceiling x concurrency
        "pct_of_ceiling": float                   # aggregate decode rate / ceiling, in %
      },
      "env": {"hosts": [str], "versions": {pkg: version}, "git_commit": str | null,
              "machine": str, "started": ISO-8601 UTC}
    }
"""

from __future__ import annotations

import hashlib
import json

SCHEMA = 1
CONFIG_KEYS = ("model", "ranks", "hosts", "backend", "sharding", "blas", "prompt_tokens", "gen_tokens",
               "concurrency")
OPTIONAL_KEYS = ("blas",)  # keyed only when present: older records keep their keys


def point_key(config: dict) -> str:
    """A short stable id for a sweep point (its config without the repeat or server)."""
    blob = json.dumps({k: config[k] for k in CONFIG_KEYS if k in config or k not in OPTIONAL_KEYS}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load(path) -> list[dict]:
    """The records in a results.jsonl; a torn last line (killed mid-write) is skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out
