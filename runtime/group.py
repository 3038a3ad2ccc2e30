"""Distributed init from the environment exolaunch sets (EXOLAUNCH_BACKEND, _WORLD_SIZE)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import mlx.core as mx

from runtime.contract import ENV_BACKEND, ENV_MPI_LIBNAME, ENV_WORLD_SIZE


def init_group() -> mx.distributed.Group:
    world = int(os.environ.get(ENV_WORLD_SIZE, "1"))
    if world == 1:
        return mx.distributed.init(strict=False)  # a one-rank group needs no backend
    backend = os.environ.get(ENV_BACKEND, "any")
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() != world:
        raise RuntimeError(f"mlx formed a group of {group.size()} ranks but exolaunch started {world}")
    return group


def drain() -> None:
    """Wait for the work queued on mlx-lm's generation stream and the default stream.

    Before a collective on another stream than the last work's: mlx-lm's generate_step leaves a
    forward queued past its last token, and its collectives would meet the new one in a
    different order on different ranks (MPI_ERR_TRUNCATE, or a hang with every rank polling)."""
    generate = sys.modules.get("mlx_lm.generate")
    for stream in (getattr(generate, "generation_stream", None), None):
        mx.synchronize(stream)


def finish(group: mx.distributed.Group, code: int = 0) -> NoReturn:
    """End a rank program without failing a peer's last collective.

    mlx's ring can complete a collective on one rank while that rank's last send to a peer is
    still queued; if the rank exits then, the peer sees "connection to a peer was lost". A
    final all_sum returns on a rank only once every rank has entered it, i.e. finished its
    real work, so a failure past that point hurts nobody and is ignored. os._exit skips mlx's
    thread-local teardown, which can abort or segfault after all work is done.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if group.size() > 1:
        drain()
        try:
            mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))
        except RuntimeError:
            pass
        else:
            _mpi_finalize()
    os._exit(code)


def _mpi_finalize() -> None:
    """MPI_Finalize, when mlx's MPI backend initialized MPI: mpirun reports a rank that exits
    without it as "exiting improperly", with a 20-line banner, although all went well. mlx has
    no finalize of its own; the library it loaded (same name, so the same handle) has one. Only
    after a final collective: every rank reaches it, and it waits for them all."""
    if os.environ.get(ENV_BACKEND) != "mpi":
        return
    import ctypes

    try:
        lib = ctypes.CDLL(os.environ.get(ENV_MPI_LIBNAME) or "libmpi.so", mode=ctypes.RTLD_GLOBAL)
        started, ended = ctypes.c_int(0), ctypes.c_int(0)
        lib.MPI_Initialized(ctypes.byref(started))
        lib.MPI_Finalized(ctypes.byref(ended))
        if started.value and not ended.value:
            lib.MPI_Finalize()
    except (OSError, AttributeError):  # no such library or symbol: mpirun's banner is all we lose
        pass
