"""`exolaunch exec` and `exolaunch run`: plan the ranks once, then dry-run or supervise them.

`run` is `exec` of `python -m runtime serve` after the planner and the doctor have had their say.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from pathlib import Path
from typing import List, Optional

import typer

from launcher import ssh
from launcher.backends import first_slots
from launcher.cli_common import BLAS_OPTION, Globals, app, check_blas, check_host_key_check, collect_env, load_cluster
from launcher.errors import ConfigError
from runtime import contract


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
    blas: Optional[str] = BLAS_OPTION,
):
    from launcher.backends import plan_launch

    sopts = ssh_options(connect_timeout, host_key_check, timeout=timeout, ready_timeout=ready_timeout,
                        heartbeat_timeout=heartbeat_timeout, grace=grace)
    g: Globals = ctx.obj
    hostfile, topology = load_cluster_at(g, port)
    spec = plan_launch(hostfile, list(command), backend=backend, topology=topology,
                       env=collect_env(env, env_file), np=np, verbose=g.verbose, blas=check_blas(blas))
    return launch(spec, sopts, dry_run=dry_run, tag_output=tag_output, log_dir=log_dir, timeout=timeout,
                  ready_timeout=ready_timeout, heartbeat_timeout=heartbeat_timeout, grace=grace)


def ssh_options(connect_timeout: float, host_key_check: Optional[str], **seconds: Optional[float]) -> ssh.SshOptions:
    """Check the flags exec and run share (before anything is loaded or started)."""
    check_host_key_check(host_key_check)
    for name, value in dict(seconds, connect_timeout=connect_timeout).items():
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value:g}: expected a number of seconds greater than 0.")
    return ssh.SshOptions(connect_timeout=connect_timeout, host_key_check=host_key_check)


def load_cluster_at(g: Globals, data_port: Optional[int]):
    """The hostfile (with --port / --data-port applied) and topology, loaded once per launch."""
    hostfile, topology = load_cluster(g)
    if data_port is not None:
        if not 2 <= data_port <= 65535:  # the control channel takes data_port - 1
            raise ConfigError(f"--port {data_port}: expected a port between 2 and 65535.")
        hostfile = dataclasses.replace(hostfile, port=data_port)
    return hostfile, topology


def launch(spec, sopts: ssh.SshOptions, *, dry_run: bool, tag_output: bool, log_dir, timeout, ready_timeout,
           heartbeat_timeout: float, grace: float, ready_message: Optional[str] = None) -> int:
    """What exec and run share once the ranks are planned: dry-run, or supervise."""
    from launcher import supervisor

    if dry_run:
        from launcher.dryrun import describe

        typer.echo(describe(spec, sopts))
        return 0
    opts = supervisor.Options(
        tag_output=tag_output, log_dir=log_dir, timeout=timeout, ready_timeout=ready_timeout,
        heartbeat_timeout=heartbeat_timeout, grace=grace, ssh=sopts,
        on_all_ready=(lambda: print(ready_message, file=sys.stderr, flush=True)) if ready_message else None,
    )
    return supervisor.run(spec, opts)


@app.command(
    "run",
    help="Serve MODEL from the cluster: load it sharded across the ranks, API on rank 0 "
         "(OpenAI-compatible at /v1). MODEL: smollm2 (a real instruct model, offline), a .gguf file, a demo "
         "model (demo-llama, demo-qwen3, demo-kimi), a catalogue name, a local mlx-lm directory or a Hugging "
         "Face repo id. Ctrl-C stops every rank.",
)
def run_(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(
        None, help="What to serve (default: smollm2, SmolLM2-135M-Instruct from the `demo` extra; else demo-llama)."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="tensor or pipeline (default: the planner's choice)."),
    host: str = typer.Option(contract.DEFAULT_API_HOST, "--host", help="Address rank 0's API binds to."),
    port: int = typer.Option(contract.DEFAULT_API_PORT, "--port", help="API port on rank 0."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=contract.ENV_API_KEY,
                                          help="Require `Authorization: Bearer KEY` (all but /health). "
                                               "Prefer the environment variable: `ps` shows command lines."),
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
    max_num_seqs: int = typer.Option(contract.DEFAULT_MAX_NUM_SEQS, "--max-num-seqs",
                                     help="Sequences decoded at once; more requests wait in the queue."),
    max_queue: int = typer.Option(contract.DEFAULT_MAX_QUEUE, "--max-queue",
                                  help="Requests waiting for a slot; beyond it the API answers 429 with Retry-After."),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb",
                                      help="Request bodies over this many MB get a 413 in the client's dialect."),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", help="Prompt + output tokens per sequence (default: the plan's context: the "
                                      "model's, at most 32768)."),
    max_total_tokens: Optional[int] = typer.Option(
        None, "--max-total-tokens", help="KV budget: prompt + max_tokens summed over running sequences "
                                         "(default: what the plan's spare memory holds)."),
    force: bool = typer.Option(False, "--force", help="Start even if the plan says the model does not fit."),
    skip_doctor: bool = typer.Option(False, "--skip-doctor", help="Skip the preflight checks of `exolaunch doctor`."),
    blas: Optional[str] = BLAS_OPTION,
):
    from launcher.backends import plan_launch

    blas = check_blas(blas)
    if model is None:
        model, note = contract.default_model()
        if note:
            print(f"exolaunch: note: {note}.", file=sys.stderr)
    if sharding not in (None, *contract.SHARDINGS):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port between 1 and 65535.")
    for flag, value, least in (("--max-num-seqs", max_num_seqs, 1), ("--max-queue", max_queue, 0),
                               ("--max-model-len", max_model_len, 1), ("--max-total-tokens", max_total_tokens, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: expected a whole number of at least {least}.")
    if not 0 < max_body_mb <= 4096:
        raise ConfigError(f"--max-body-mb {max_body_mb:g}: expected megabytes between 0 and 4096.")
    if not api_key and not _is_loopback(host):
        print(f"exolaunch: warning: the API on {host}:{port} will answer anyone who can reach it: no API key "
              f"is set (set {contract.ENV_API_KEY} or pass --api-key to require one).", file=sys.stderr)
    sopts = ssh_options(connect_timeout, host_key_check, ready_timeout=ready_timeout,
                        heartbeat_timeout=heartbeat_timeout, grace=grace)
    g: Globals = ctx.obj
    hostfile, topology = load_cluster_at(g, data_port)
    used = first_slots(hostfile, np) if np else hostfile
    all_local = all(h.is_local for h in used.hosts)
    if data_port is None and not hostfile.port_given and all_local:
        # Nobody asked for ports and nothing off this machine needs to know them: take free ones,
        # so a second cluster on this host starts as well as the first.
        from launcher.ports import free_data_port

        data_port = free_data_port(sum(h.slots * len(h.ips) for h in used.hosts))
        hostfile = dataclasses.replace(hostfile, port=data_port)
    plan = _plan_or_none(model, hostfile, topology, backend=backend, sharding=sharding, np=np,
                         context=max_model_len)
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

        rank0 = used.hosts[0].name
        report = run_checks(hostfile, topology, backend=backend, np=np, data_port=data_port, control=True, blas=blas,
                            ports={rank0: [(host, port)]}, connect_timeout=connect_timeout,
                            host_key_check=host_key_check)
        if not report.ok:
            print(report.render(), file=sys.stderr)
            print("exolaunch: refusing to start: fix the problems above (or --skip-doctor).", file=sys.stderr)
            return EXIT_REFUSED
    command = ["python", "-m", "runtime", "serve", "--model", model, "--sharding", sharding,
               "--host", host, "--port", str(port), "--max-num-seqs", str(max_num_seqs), "--max-queue", str(max_queue),
               "--max-body-mb", f"{max_body_mb:g}"]
    # One KV budget: the ranks admit within the numbers the plan sized (context, sequences,
    # bytes per token), so a plan that fits keeps fitting under load.
    if plan is not None:
        max_model_len = max_model_len or plan.context
        max_total_tokens = max_total_tokens or plan.max_total_tokens(max_num_seqs)
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if max_total_tokens:
        command += ["--max-total-tokens", str(max_total_tokens)]
    # The control channel listens on rank 0 just below the data-plane ports (on loopback when
    # every rank is local); its connections prove the job secret plan_launch gives every rank.
    # The API key travels in the environment, not on a command line.
    rank_env = {contract.ENV_CONTROL: contract.format_control(
        contract.control_address(used.hosts[0].ips, hostfile.port, all_local=all_local))}
    if api_key:
        rank_env[contract.ENV_API_KEY] = api_key
    spec = plan_launch(hostfile, command, backend=backend, topology=topology,
                       env={**collect_env(env, env_file), **rank_env}, np=np, verbose=g.verbose, blas=blas)
    return launch(spec, sopts, dry_run=dry_run, tag_output=tag_output, log_dir=log_dir, timeout=None,
                  ready_timeout=ready_timeout, heartbeat_timeout=heartbeat_timeout, grace=grace,
                  ready_message=_ready_message(spec, model, host, port))


def _ready_message(spec, model: str, host: str, port: int) -> str:
    rank0 = spec.ranks[0].host
    shown = host
    if host in ("0.0.0.0", "::"):
        shown = rank0.ips[0] if rank0.ips else "127.0.0.1"
    msg = f"exolaunch: serving {model} on {spec.world_size} rank(s): http://{shown}:{port}/v1"
    if not rank0.is_local and host.startswith("127."):
        msg += f" (on {rank0.name}; pass --host 0.0.0.0 to reach it from elsewhere)"
    return msg


EXIT_REFUSED = 5  # run: the plan does not fit, or the preflight checks failed


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


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
