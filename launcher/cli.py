"""exolaunch command line: one thin function per subcommand.

User errors (ConfigError) print one line and exit 2; nothing reaches the user as a traceback
(EXOLAUNCH_DEBUG=1 shows it for bug reports).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import click
import typer

from launcher import ssh
from launcher.backends import first_slots
from launcher.errors import ConfigError, LaunchError

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


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
    help="Run COMMAND on every rank (an mx.distributed program), like mpirun. "
         "Exit status: 0 if all ranks succeed, else the first failing rank's; "
         "3 not ready, 4 unresponsive rank, 124 --timeout, 255 SSH failure (see README).",
)
def exec_(
    ctx: typer.Context,
    command: List[str] = typer.Argument(..., metavar="-- COMMAND [ARGS]...", show_default=False),
    np: Optional[int] = typer.Option(None, "-n", "--np", help="Use the first N slots of the hostfile."),
    backend: Optional[str] = typer.Option(None, "--backend", help="ring | jaccl | jaccl-ring | mpi (default: the hostfile's, else ring)."),
    env: List[str] = typer.Option([], "-x", "--env", help="Forward VAR, or set VAR=value, on every rank (repeatable)."),
    env_file: List[Path] = typer.Option([], "--env-file", help="KEY=VALUE lines to set on every rank (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each rank's host, argv, env and files; start nothing."),
    tag_output: bool = typer.Option(True, "--tag-output/--no-tag-output", help="Prefix each line with [rank@host]."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Also write each rank's output to DIR/rank-N.log."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="End the whole job after SECONDS (exit 124)."),
    ready_timeout: Optional[float] = typer.Option(
        None, "--ready-timeout",
        help="Every rank must call launcher.rankapi.ready() within SECONDS (exit 3 naming the late ranks)."),
    heartbeat_timeout: float = typer.Option(5.0, "--heartbeat-timeout", help="A rank silent or stopped this long is unresponsive (exit 4)."),
    grace: float = typer.Option(5.0, "--grace", help="Seconds between SIGTERM and SIGKILL at teardown."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="SSH connect timeout, seconds."),
    host_key_check: Optional[str] = typer.Option(
        None, "--host-key-check", help="yes | accept-new | no (default: your ssh config; checking stays on)."),
    port: Optional[int] = typer.Option(None, "--port", help="Starting data-plane port (overrides the hostfile)."),
):
    return launch(ctx.obj, list(command), np=np, backend=backend, env=env, env_file=env_file, dry_run=dry_run,
                  tag_output=tag_output, log_dir=log_dir, timeout=timeout, ready_timeout=ready_timeout,
                  heartbeat_timeout=heartbeat_timeout, grace=grace, connect_timeout=connect_timeout,
                  host_key_check=host_key_check, data_port=port)


def launch(g: Globals, command: list[str], *, np, backend, env, env_file, dry_run, tag_output, log_dir, timeout,
           ready_timeout, heartbeat_timeout, grace, connect_timeout, host_key_check, data_port,
           extra_env: Optional[dict] = None, on_ready_message=None) -> int:
    """What exec and run share: validate flags, plan the ranks, dry-run or supervise."""
    from launcher import supervisor
    from launcher.backends import plan_launch

    if host_key_check is not None and host_key_check not in ssh.HOST_KEY_MODES:
        raise ConfigError(f"--host-key-check {host_key_check!r}: expected one of {', '.join(ssh.HOST_KEY_MODES)}.")
    for name, value in (("--timeout", timeout), ("--ready-timeout", ready_timeout),
                        ("--heartbeat-timeout", heartbeat_timeout), ("--grace", grace),
                        ("--connect-timeout", connect_timeout)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} {value:g}: expected a number of seconds greater than 0.")
    hostfile, topology = load_cluster(g)
    if data_port is not None:
        if not 2 <= data_port <= 65535:
            raise ConfigError(f"--port {data_port}: expected a port between 2 and 65535.")
        hostfile = dataclasses.replace(hostfile, port=data_port)
    env_vars = collect_env(env, env_file)
    spec = plan_launch(hostfile, command, backend=backend, topology=topology,
                       env={**env_vars, **(extra_env(hostfile) if extra_env else {})}, np=np, verbose=g.verbose)
    sopts = ssh.SshOptions(connect_timeout=connect_timeout, host_key_check=host_key_check)
    if dry_run:
        from launcher.dryrun import describe

        typer.echo(describe(spec, sopts))
        return 0
    opts = supervisor.Options(
        tag_output=tag_output, log_dir=log_dir, timeout=timeout, ready_timeout=ready_timeout,
        heartbeat_timeout=heartbeat_timeout, grace=grace, ssh=sopts,
        on_all_ready=(lambda: print(on_ready_message(spec), file=sys.stderr, flush=True)) if on_ready_message else None,
    )
    return supervisor.run(spec, opts)


@app.command(
    "run",
    help="Serve MODEL from the cluster: load it sharded across the ranks, API on rank 0 "
         "(OpenAI-compatible at /v1). MODEL: a demo model (demo-llama, demo-qwen3, demo-kimi), "
         "a local mlx-lm directory or a Hugging Face repo id. Ctrl-C stops every rank.",
)
def run_(
    ctx: typer.Context,
    model: str = typer.Argument("demo-llama", help="What to serve (default: the built-in demo model)."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="tensor or pipeline (default: the planner's choice)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address rank 0's API binds to."),
    port: int = typer.Option(52415, "--port", help="API port on rank 0."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EXOLAUNCH_API_KEY",
                                          help="Require `Authorization: Bearer KEY` (all but /health)."),
    np: Optional[int] = typer.Option(None, "-n", "--np", help="Use the first N slots of the hostfile."),
    backend: Optional[str] = typer.Option(None, "--backend", help="ring | jaccl | jaccl-ring | mpi."),
    env: List[str] = typer.Option([], "-x", "--env", help="Forward VAR, or set VAR=value, on every rank."),
    env_file: List[Path] = typer.Option([], "--env-file", help="KEY=VALUE lines to set on every rank."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would start where; start nothing."),
    tag_output: bool = typer.Option(True, "--tag-output/--no-tag-output", help="Prefix each line with [rank@host]."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Also write each rank's output to DIR/rank-N.log."),
    ready_timeout: float = typer.Option(900.0, "--ready-timeout", help="Seconds for every rank to load (exit 3)."),
    heartbeat_timeout: float = typer.Option(5.0, "--heartbeat-timeout", help="Unresponsive rank after SECONDS (exit 4)."),
    grace: float = typer.Option(5.0, "--grace", help="Seconds between SIGTERM and SIGKILL at teardown."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="SSH connect timeout, seconds."),
    host_key_check: Optional[str] = typer.Option(None, "--host-key-check", help="yes | accept-new | no."),
    data_port: Optional[int] = typer.Option(None, "--data-port", help="First data-plane port (overrides the hostfile)."),
    force: bool = typer.Option(False, "--force", help="Start even if the plan says the model does not fit."),
    skip_doctor: bool = typer.Option(False, "--skip-doctor", help="Skip the preflight checks of `exolaunch doctor`."),
):
    if sharding not in (None, "tensor", "pipeline"):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port between 1 and 65535.")
    g: Globals = ctx.obj
    hostfile, topology = load_cluster(g)
    plan = _plan_or_none(model, hostfile, topology, backend=backend, sharding=sharding, np=np)
    if plan is not None:
        if dry_run:
            typer.echo(plan.render())
        elif not plan.fits and not force:
            print(plan.render(), file=sys.stderr)
            print("exolaunch: refusing to start: the plan above does not fit or cannot run "
                  "(--force to try anyway).", file=sys.stderr)
            return EXIT_REFUSED
        else:
            print(f"exolaunch: plan: {plan.sharding} over {len(plan.ranks)} rank(s), backend {plan.backend}"
                  f"{'' if plan.fits else ' (does not fit; --force)'}", file=sys.stderr)
        if sharding is None and plan.sharding in ("tensor", "pipeline"):
            sharding = plan.sharding
        if backend is None and hostfile.backend is None:
            backend = plan.backend
    sharding = sharding or "tensor"
    if not skip_doctor and not dry_run:
        from launcher.doctor import run_checks

        rank0 = (first_slots(hostfile, np) if np else hostfile).hosts[0].name
        report = run_checks(hostfile, topology, backend=backend, np=np, data_port=data_port, control=True,
                            ports={rank0: [(host, port)]}, connect_timeout=connect_timeout,
                            host_key_check=host_key_check)
        if not report.ok:
            print(report.render(), file=sys.stderr)
            print("exolaunch: refusing to start: fix the problems above (or --skip-doctor).", file=sys.stderr)
            return EXIT_REFUSED
    command = ["python", "-m", "runtime", "serve", "--model", model, "--sharding", sharding,
               "--host", host, "--port", str(port)]

    def rank_env(hostfile) -> dict:
        # The control channel listens on rank 0's first data-plane address, just below the
        # data-plane ports. The API key travels in the environment, not on a command line.
        first = hostfile.hosts[0]
        env = {"EXOLAUNCH_CONTROL": f"{first.ips[0] if first.ips else '127.0.0.1'}:{hostfile.port - 1}"}
        if api_key:
            env["EXOLAUNCH_API_KEY"] = api_key
        return env

    def ready_message(spec) -> str:
        rank0 = spec.ranks[0].host
        shown = host
        if host in ("0.0.0.0", "::"):
            shown = rank0.ips[0] if rank0.ips else "127.0.0.1"
        msg = f"exolaunch: serving {model} on {spec.world_size} rank(s): http://{shown}:{port}/v1"
        if not rank0.is_local and host.startswith("127."):
            msg += f" (on {rank0.name}; pass --host 0.0.0.0 to reach it from elsewhere)"
        return msg

    return launch(ctx.obj, command, np=np, backend=backend, env=env, env_file=env_file, dry_run=dry_run,
                  tag_output=tag_output, log_dir=log_dir, timeout=None, ready_timeout=ready_timeout,
                  heartbeat_timeout=heartbeat_timeout, grace=grace, connect_timeout=connect_timeout,
                  host_key_check=host_key_check, data_port=data_port, extra_env=rank_env,
                  on_ready_message=ready_message)


EXIT_REFUSED = 5  # run: the plan does not fit, or the preflight checks failed


def _plan_or_none(model, hostfile, topology, **kw):
    """The planner's view, or None when it cannot know the model (e.g. a hub repo not yet
    downloaded): then run starts without a plan, as the runtime can still fetch it."""
    from launcher.planner import plan_for

    try:
        return plan_for(model, hostfile, topology, **kw)
    except ConfigError as e:
        if "-n " in str(e) or "--" in str(e).split(":")[0]:
            raise  # a flag error: the user must fix it
        print(f"exolaunch: warning: no plan for {model} ({e}); starting without one.", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="exolaunch")
    except click.exceptions.Abort:
        rv = 130
    except click.ClickException as e:
        e.show()
        rv = e.exit_code
    except click.exceptions.Exit as e:
        rv = e.exit_code
    except ConfigError as e:
        print(f"exolaunch: error: {e}", file=sys.stderr)
        rv = 2
    except LaunchError as e:
        print(f"exolaunch: {e}", file=sys.stderr)
        rv = e.status
    except KeyboardInterrupt:
        rv = 130
    except Exception as e:  # a bug in exolaunch: one line, the traceback only on request
        if os.environ.get("EXOLAUNCH_DEBUG"):
            traceback.print_exc()
        print(f"exolaunch: internal error: {type(e).__name__}: {e} "
              "(rerun with EXOLAUNCH_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        rv = 70
    sys.exit(rv if isinstance(rv, int) else 0)


# Subcommands that live in their own modules register themselves on `app`.
from launcher import cli_batch, cli_bench, cli_doctor, cli_plan, cli_pull  # noqa: E402,F401
