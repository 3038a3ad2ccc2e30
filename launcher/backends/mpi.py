"""MPI backend: exolaunch runs mpirun, mpirun starts one agent per rank.

Per-rank env and files (API key, job secret, tokens) travel in mpirun's environment, one
variable per host (base64 JSON) that `-x NAME` forwards: only names reach a command line, which
every user sees in `ps`; the agent reads its variable and keeps it out of the rank's environment.
mpirun gets a hostfile, an MPMD app context per host (so each host keeps its own interpreter and
working directory) and flags that OpenMPI 4 and 5 both accept. mlx.launch's `--output :raw` is
exactly what OpenMPI 4 rejects, so it is not used.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from launcher.agent import MPI_SPEC_ENV
from launcher.errors import ConfigError
from runtime.contract import ENV_MPI_LIBNAME


# What an MPI singleton (a process that called MPI_Init without mpirun, e.g. mx.distributed
# with one rank) writes into its environment. A child that inherits these and runs mpirun
# looks to it like a rank of a running job, and mpirun exits 1 without a word.
_SINGLETON_PREFIXES = ("PMIX_", "OMPI_MCA_orte_", "OMPI_COMM_WORLD_")
_SINGLETON_KEYS = ("OMPI_MCA_ess", "OMPI_MCA_pmix", "OMPI_APP_CTX_NUM_PROCS", "ORTE_SCHIZO_DETECTION",
                   "OMPI_UNIVERSE_SIZE", "OMPI_FILE_LOCATION", "OMPI_FIRST_RANKS")


def mpirun_env(env: dict) -> dict:
    """env without an MPI singleton's job variables, for starting mpirun."""
    return {k: v for k, v in env.items() if k not in _SINGLETON_KEYS and not k.startswith(_SINGLETON_PREFIXES)}


def configure(specs, hostfile, **_) -> None:
    libname = mpi_libname()
    for s in specs:
        if libname:
            s.env.setdefault(ENV_MPI_LIBNAME, libname)


def find_mpirun() -> str:
    path = shutil.which("mpirun")
    if not path:
        raise ConfigError(
            "backend mpi: mpirun not found on PATH. Fix: install OpenMPI "
            "(Debian: apt-get install openmpi-bin libopenmpi-dev; macOS: brew install open-mpi)."
        )
    return path


def openmpi_major(mpirun: str) -> int:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 4
    m = re.search(r"Open MPI\)?\s+(\d+)", out)
    return int(m.group(1)) if m else 4


def mpi_libname() -> str | None:
    """The libmpi that mpirun uses, for mlx's dlopen (needed with Homebrew and pip MPI on macOS)."""
    ompi_info = shutil.which("ompi_info")
    if not ompi_info:
        return None
    tool = ["otool", "-L"] if platform.system() == "Darwin" else ["ldd"]
    try:
        out = subprocess.run([*tool, ompi_info], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "libmpi" in line:
            return Path(line.strip().split()[0]).name
    return None


def mpi_hostname(host) -> str:
    return "localhost" if host.is_local else host.ssh


def hostfile_text(launch) -> str:
    lines, seen = [], {}
    for s in launch.ranks:
        seen[mpi_hostname(s.host)] = seen.get(mpi_hostname(s.host), 0) + 1
    for name, n in seen.items():
        lines.append(f"{name} slots={n}")
    return "\n".join(lines) + "\n"


def mpirun_command(launch, *, ssh_agent: list[str], workdir: Path, grace: float, heartbeat: float):
    """(argv, extra env for mpirun itself: the agents' specs, which argv only names)."""
    mpirun = find_mpirun()
    major = openmpi_major(mpirun)
    hf_path = workdir / "mpi-hostfile"
    hf_path.write_text(hostfile_text(launch))
    argv = [mpirun, "--hostfile", str(hf_path), "--bind-to", "none"]
    agent = " ".join(ssh_agent)
    if major >= 5:
        argv += ["--prtemca", "plm_ssh_agent", agent, "--map-by", ":OVERSUBSCRIBE"]
    else:
        argv += ["--mca", "plm_rsh_agent", agent, "--oversubscribe"]
    contexts: dict[str, list] = {}
    for s in launch.ranks:
        contexts.setdefault(s.host.name, []).append(s)
    env, apps = {}, []
    for i, specs in enumerate(contexts.values()):
        host = specs[0].host
        spec = {
            "grace": grace,
            "heartbeat": heartbeat,
            "cwd": host.cwd,
            "ranks": {str(s.rank): {"argv": s.argv, "env": s.env, "files": s.files} for s in specs},
        }
        name = f"{MPI_SPEC_ENV}{i}"
        env[name] = base64.b64encode(json.dumps(spec).encode()).decode()
        # -x belongs to an app context in OpenMPI 4 (given before the first, it reaches only that one)
        apps.append(["-np", str(len(specs)), "--host", f"{mpi_hostname(host)}:{len(specs)}", "-x", name,
                     specs[0].python, "-m", "launcher.agent", "--mpi", name])
    for i, app in enumerate(apps):
        argv += [":", *app] if i else app
    if os.geteuid() == 0:  # OpenMPI refuses root without both of these (containers, CI)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return argv, env
