"""The typer app and what every subcommand shares: the global options, loading the hostfile
and topology, and -x / --env-file. Subcommand modules (cli.py, cli_plan.py, …) import this
module and register on `app`; launcher.cli imports them all, so nothing imports in a circle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from launcher import ssh
from launcher.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Launch MLX distributed programs and models across hosts, mpirun-style.",
)


@dataclass
class Globals:
    hostfile: Optional[Path]
    topology: Optional[Path]
    verbose: bool


@app.callback()
def _globals(
    ctx: typer.Context,
    hostfile: Optional[Path] = typer.Option(
        None, "--hostfile", envvar="EXOLAUNCH_HOSTFILE",
        help="Hosts to run on: YAML, mlx.launch JSON or OpenMPI `host slots=N`. "
             "Default: 2 ranks on this machine, no SSH."),
    topology: Optional[Path] = typer.Option(
        None, "--topology", envvar="EXOLAUNCH_TOPOLOGY",
        help="YAML links between hosts (tb5/tb4/ethernet/wifi, RDMA devices, bandwidth, latency)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail from exolaunch and mlx."),
):
    ctx.obj = Globals(hostfile, topology, verbose)


def load_cluster(g: Globals):
    from launcher.hostfile import load_hostfile
    from launcher.topology import load_topology

    hostfile = load_hostfile(g.hostfile)
    topology = load_topology(g.topology) if g.topology else None
    return hostfile, topology


def collect_env(xs: list[str], env_files: list[Path]) -> dict[str, str]:
    from launcher.envfile import load_env_file, parse_x

    env: dict[str, str] = {}
    for f in env_files:
        env.update(load_env_file(f))
    env.update(parse_x(xs))
    return env


BLAS_OPTION = typer.Option(
    None, "--blas", help="CPU ranks on Linux: auto (OpenBLAS when the host has it; default) | openblas (required) "
                         "| bundled (mlx's reference BLAS) | /path/to/libblas.so.")


def check_blas(value: Optional[str]) -> Optional[str]:
    from launcher import blas

    try:
        return None if value is None else blas.check_mode(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_host_key_check(value: Optional[str]) -> None:
    if value is not None and value not in ssh.HOST_KEY_MODES:
        raise ConfigError(f"--host-key-check {value!r}: expected one of {', '.join(ssh.HOST_KEY_MODES)}.")
