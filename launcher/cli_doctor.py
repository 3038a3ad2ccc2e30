"""`exolaunch doctor` (registered on the typer app in launcher.cli_common)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from launcher.cli_common import BLAS_OPTION, app, check_blas, check_host_key_check, load_cluster
from launcher.errors import ConfigError


@app.command(
    "doctor",
    help="Check every host before a job: SSH and its round-trip time, clock skew, Python / mlx / "
         "mlx-lm / exolaunch versions (must match), memory, free disk for models, free data-plane "
         "ports, RDMA (jaccl) or OpenMPI (mpi). Exit 0 if all is well, 1 listing each problem with "
         "the command that fixes it.",
)
def doctor(
    ctx: typer.Context,
    np: Optional[int] = typer.Option(None, "-n", "--np", help="Check only the hosts of the first N slots."),
    backend: Optional[str] = typer.Option(None, "--backend", help="ring | jaccl | jaccl-ring | mpi (default: the hostfile's, else ring)."),
    port: Optional[int] = typer.Option(None, "--port", help="First data-plane port to check (default: the hostfile's)."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="SSH connect timeout, seconds."),
    host_key_check: Optional[str] = typer.Option(None, "--host-key-check", help="yes | accept-new | no."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    blas: Optional[str] = BLAS_OPTION,
):
    from launcher.doctor import run_checks

    check_host_key_check(host_key_check)
    if connect_timeout <= 0:
        raise ConfigError(f"--connect-timeout {connect_timeout:g}: expected a number of seconds greater than 0.")
    if port is not None and not 2 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port between 2 and 65535.")
    hostfile, topology = load_cluster(ctx.obj)
    report = run_checks(hostfile, topology, backend=backend, np=np, data_port=port,
                        connect_timeout=connect_timeout, host_key_check=host_key_check, blas=check_blas(blas))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif sys.stdout.isatty():
        _print_rich(report)
    else:
        typer.echo(report.render())
    return 0 if report.ok else 1


def _print_rich(report) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = report.table()
    console = Console()
    plain = report.render().splitlines()
    if console.width < max(len(line) for line in plain[:len(rows) + 1]) + 3 * len(header):
        # Too narrow for a boxed table: rich would squeeze every cell to "…"; plain text wraps.
        typer.echo(report.render())
        return
    table = Table(*header, show_edge=False, header_style="bold")
    for r in rows:
        table.add_row(*[("[red]FAIL[/]" if c == "FAIL" else str(c)) for c in r])
    console.print(table)
    console.print()
    for line in report.summary_lines():
        style = "red" if "->" in line and not report.ok else None
        console.print(line, style=style, markup=False, highlight=False)
