"""Distributed init from the environment exolaunch sets (EXOLAUNCH_BACKEND, _WORLD_SIZE)."""

from __future__ import annotations

import os

import mlx.core as mx

from runtime.contract import ENV_BACKEND, ENV_WORLD_SIZE


def init_group() -> mx.distributed.Group:
    world = int(os.environ.get(ENV_WORLD_SIZE, "1"))
    if world == 1:
        return mx.distributed.init(strict=False)  # a one-rank group needs no backend
    backend = os.environ.get(ENV_BACKEND, "any")
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() != world:
        raise RuntimeError(f"mlx formed a group of {group.size()} ranks but exolaunch started {world}")
    return group
