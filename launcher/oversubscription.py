"""What a rank needs when its host runs as many ranks as it has cores, or more.

mlx's MPI collectives wait by polling, so a rank waiting for its peers holds a core that
another process on the host needs: with more ranks than cores, the rank it waits for (3 ranks
on 2 cores spent 4.0 s of CPU each in a 4 s wait; a 3-rank greedy run took 28 s instead of
13 s); with as many, the launcher's front door and rank 0's API thread (2 ranks on 2 cores,
`exolaunch bench` over HTTP: 1 stream +9-12%, 8 streams +7% aggregate when they yield).
OpenMPI yields the core while it polls when it knows it is oversubscribed; exolaunch's
hostfile gives it one slot per rank, so the agent, which knows its host's cores, tells it.
mlx's ring backend polls too and has no such switch (README, Backends: ranks and cores).
"""

from __future__ import annotations

import os

from runtime.contract import ENV_LOCAL_WORLD_SIZE

YIELD = "OMPI_MCA_mpi_yield_when_idle"


def rank_env(env: dict[str, str], cpu_count: int | None = None) -> dict[str, str]:
    """Variables to add to a rank's environment on this host; a user's own value wins."""
    local = int(env.get(ENV_LOCAL_WORLD_SIZE, "1") or 1)
    if YIELD in env or local < (cpu_count or os.cpu_count() or 1):
        return {}
    return {YIELD: "1"}
