"""A small SPMD program that proves a cluster works: init, all_sum, all_gather, timing.

    exolaunch exec -- python -m runtime.selftest [--size N] [--iters K]

Every rank checks the collective results against what they must be and exits 1 if not, so
a broken link or a mis-ordered ring shows up as a failing rank, not as wrong numbers.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import mlx.core as mx

from launcher.rankapi import ready
from runtime import contract
from runtime.group import finish


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.selftest")
    p.add_argument("--size", type=int, default=1 << 20, help="floats per all_sum (default 1M = 4 MB)")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    backend = os.environ.get(contract.ENV_BACKEND, "any")
    world = int(os.environ.get(contract.ENV_WORLD_SIZE, "1"))
    group = mx.distributed.init(strict=world > 1, backend=backend if world > 1 else "any")
    ready()
    r, n = group.rank(), group.size()
    if n != world:
        print(f"rank {r}: mlx sees {n} ranks, exolaunch started {world}", file=sys.stderr)
        return 1

    total = mx.distributed.all_sum(mx.array([float(r + 1)]))
    gathered = mx.distributed.all_gather(mx.array([float(r)]))
    mx.eval(total, gathered)
    ok = total.item() == n * (n + 1) / 2 and gathered.tolist() == [float(i) for i in range(n)]

    x = mx.ones((args.size,), dtype=mx.float32)
    mx.eval(mx.distributed.all_sum(x))  # warm-up: connections, buffers
    t = time.perf_counter()
    for _ in range(args.iters):
        y = mx.distributed.all_sum(x)
        mx.eval(y)
    dt = (time.perf_counter() - t) / args.iters
    ok = ok and y[0].item() == n
    gbps = 2 * (n - 1) / n * x.nbytes / dt / 1e9 if n > 1 else 0.0
    print(f"rank {r}/{n} on {socket.gethostname()} backend {backend}: all_sum ok={ok} "
          f"{x.nbytes / 1e6:.1f} MB in {dt * 1e3:.2f} ms ({gbps:.2f} GB/s bus)", flush=True)
    finish(group, 0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
