"""A rank program for tensor-parallel equivalence tests:

    exolaunch exec -n N -- python -m tests.tp_greedy DIR [DIR ...]

Every rank loads each model directory through runtime.loader (mlx-lm's shard(), or exolaunch's
sharder for the generic and uneven paths), decodes PROMPTS greedily, and prints one JSON line per
model: {"model": DIR, "rank": r, "tokens": [[...], ...]}. `greedy` is also what the tests run
on the unsharded model in one process for the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = [[1, 300, 301, 640, 900, 1200, 77], [1, 1500, 12, 13, 14]]
MAX_TOKENS = 12


def greedy(model, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for p in prompts:
        steps = generate_step(mx.array(p), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1))
        out.append([int(t) for t, _ in steps])
    return out


def main(dirs: list[str]) -> None:
    from runtime.group import finish, init_group
    from runtime.loader import load

    group = init_group()
    for d in dirs:
        model, _, _ = load(Path(d), group, "tensor", Path(d).name)
        print(json.dumps({"model": d, "rank": group.rank(), "tokens": greedy(model)}), flush=True)
        del model
    finish(group)


if __name__ == "__main__":
    main(sys.argv[1:])
