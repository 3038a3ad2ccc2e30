"""Backends: what each rank needs (env vars and files) for one mx.distributed backend.

`plan_launch` is the only entry point: it checks the hostfile against the backend (and the
topology, when given) and returns one RankSpec per rank. The supervisor does not know about
backends beyond `LaunchSpec.backend == "mpi"` (ranks started by mpirun instead of by us).
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
from collections import Counter
from dataclasses import dataclass, field

from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile
from launcher.topology import Topology, check_backend
from runtime import contract
from runtime.contract import BACKENDS


@dataclass
class RankSpec:
    rank: int
    host: Host
    local_rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the host's environment
    files: dict[str, str] = field(default_factory=dict)  # env var -> file content (agent writes it)

    @property
    def python(self) -> str:
        return host_python(self.host)

    @property
    def cwd(self) -> str | None:
        return self.host.cwd


@dataclass
class LaunchSpec:
    backend: str
    hostfile: Hostfile
    ranks: list[RankSpec]

    @property
    def world_size(self) -> int:
        return len(self.ranks)


def host_python(host: Host) -> str:
    """The interpreter that runs the agent (and `python ...` commands) on a host.

    Default: this interpreter's path, which is right for local hosts and for the usual
    same-venv-path-on-every-Mac set-up; a host's `python:` overrides it.
    """
    return host.python or sys.executable


def rank_argv(command: list[str], host: Host) -> list[str]:
    # `python script.py` means the host's interpreter, as with mlx.launch --python.
    if command and command[0] in ("python", "python3"):
        return [host_python(host), *command[1:]]
    return list(command)


def plan_launch(
    hostfile: Hostfile,
    command: list[str],
    *,
    backend: str | None = None,
    topology: Topology | None = None,
    env: dict[str, str] | None = None,
    np: int | None = None,
    verbose: bool = False,
    blas: str | None = None,
) -> LaunchSpec:
    from launcher.backends import jaccl, mpi, ring

    backend = backend or hostfile.backend or "ring"
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}.")
    if not command:
        raise ConfigError("no command given. Usage: exolaunch exec [OPTIONS] -- COMMAND [ARGS...]")
    if topology is not None:
        topology.check_hosts(hostfile)
        if backend in ("ring", "jaccl-ring"):
            # Put the fastest links between ring neighbours; rank 0's host stays first.
            hostfile = hostfile.reordered(topology.ring_order(hostfile))
    if np is not None:
        hostfile = first_slots(hostfile, np)
    ranks = hostfile.ranks()
    check_backend(hostfile, backend, topology)

    world = len(ranks)
    common = dict(hostfile.env)
    secret = secrets.token_hex(32)  # this job's: rank 0's control channel admits only who proves it
    specs = []
    per_host = Counter(r.host.name for r in ranks)
    for r in ranks:
        # --blas wins; without it a host's env may choose (an unusual library path), else auto
        renv = {contract.ENV_BLAS: "auto", **common, **r.host.env, **(env or {})}
        if blas is not None:
            renv[contract.ENV_BLAS] = blas
        renv.update({
            contract.ENV_RANK: str(r.rank),
            contract.ENV_WORLD_SIZE: str(world),
            contract.ENV_LOCAL_RANK: str(r.local_rank),
            contract.ENV_LOCAL_WORLD_SIZE: str(per_host[r.host.name]),
            contract.ENV_HOST: r.host.name,
            contract.ENV_BACKEND: backend,
            contract.ENV_JOB_SECRET: secret,
        })
        specs.append(RankSpec(r.rank, r.host, r.local_rank, rank_argv(command, r.host), renv))

    module = {"ring": ring, "jaccl": jaccl, "jaccl-ring": jaccl, "mpi": mpi}[backend]
    module.configure(specs, hostfile, backend=backend, topology=topology, verbose=verbose)
    return LaunchSpec(backend, hostfile, specs)


def first_slots(hostfile: Hostfile, np: int) -> Hostfile:
    """`-n N`: the first N slots of the hostfile, as mpirun -np does (any N on the built-in one)."""
    if np < 1:
        raise ConfigError(f"-n {np}: the number of ranks must be at least 1.")
    if hostfile.format == "builtin":
        return dataclasses.replace(hostfile, hosts=[dataclasses.replace(hostfile.hosts[0], slots=np)])
    if np > hostfile.world_size:
        raise ConfigError(
            f"-n {np}: {hostfile.label} has only {hostfile.world_size} slots. "
            "Fix: add slots or hosts, or ask for fewer ranks."
        )
    counts: dict[str, int] = {}
    for r in hostfile.ranks()[:np]:
        counts[r.host.name] = counts.get(r.host.name, 0) + 1
    kept = hostfile.subset(counts)
    return dataclasses.replace(kept, hosts=[dataclasses.replace(h, slots=counts[h.name]) for h in kept.hosts])
