"""`exolaunch batch` (registered on the typer app in launcher.cli_common)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from launcher.cli_common import Globals, app, collect_env, load_cluster
from launcher.errors import ConfigError
from runtime import contract


@app.command(
    "batch",
    help="Run a file of OpenAI Batch API requests (JSONL: custom_id, method, url, body; as `vllm run-batch` "
         "takes) through MODEL and write one result line per request (OpenAI's batch output format). Starts "
         "a cluster like `exolaunch run` and stops it at the end, or uses a running server with --url. "
         "Resumable: a journal (default OUTPUT.journal) records every answer; rerun the same command after a "
         "crash or Ctrl-C and only what is missing is sent. Exit status: 0 all succeeded; 1 some request "
         "failed or a line was malformed; 2 bad input or flags; the cluster's status if it could not start; "
         "130 Ctrl-C.",
)
def batch_(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="The model to serve (as for `run`), and the \"model\" of requests "
                                          "whose body has none."),
    input: Path = typer.Option(..., "--input", "-i", help="Requests, one JSON object per line."),
    output: Path = typer.Option(..., "--output", "-o", help="Results, one JSON line per request, in input order "
                                                          "(rewritten from the journal at the end of each run)."),
    journal: Optional[Path] = typer.Option(None, "--journal", help="SQLite journal (default: OUTPUT.journal)."),
    restart: bool = typer.Option(False, "--restart", help="Discard the journal and send every request again."),
    concurrency: int = typer.Option(8, "--concurrency", "-c", help="Requests in flight at once."),
    max_retries: int = typer.Option(2, "--max-retries", help="Retries per request for connection errors, "
                                                             "timeouts, 5xx and 429 (other 4xx are final)."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds for one attempt's answer."),
    url: Optional[str] = typer.Option(None, "--url", help="Use a running server (http://host:port/v1) instead of "
                                                         "starting a cluster; cluster flags do not apply."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=contract.ENV_API_KEY,
                                          help="Sent as `Authorization: Bearer KEY`; the started cluster "
                                               "requires it too."),
    np: Optional[int] = typer.Option(None, "-n", "--np", help="Cluster: use the first N slots of the hostfile."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Cluster: ring | jaccl | jaccl-ring | mpi."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="Cluster: tensor or pipeline."),
    port: Optional[int] = typer.Option(None, "--port", help="Cluster: API port on rank 0 (default: a free one)."),
    data_port: Optional[int] = typer.Option(None, "--data-port", help="Cluster: first data-plane port."),
    env: List[str] = typer.Option([], "-x", "--env", help="Cluster: forward VAR, or set VAR=value, on every rank."),
    env_file: List[Path] = typer.Option([], "--env-file", help="Cluster: KEY=VALUE lines to set on every rank."),
    ready_timeout: float = typer.Option(900.0, "--ready-timeout", help="Cluster: seconds for every rank to load."),
):
    from launcher.batch import job
    from launcher.served import RunOptions

    g: Globals = ctx.obj
    cluster_flags = {"-n": np, "--backend": backend, "--sharding": sharding, "--port": port,
                     "--data-port": data_port, "-x": env or None, "--env-file": env_file or None}
    if url is not None:
        given = [flag for flag, value in cluster_flags.items() if value is not None]
        if given:
            raise ConfigError(f"--url uses a running server, so {', '.join(given)} "
                              f"{'does' if len(given) == 1 else 'do'} not apply. Fix: drop "
                              f"{'it' if len(given) == 1 else 'them'}, or drop --url to let batch start a cluster.")
        cluster = RunOptions()
    else:
        cluster = _cluster_options(g, np=np, backend=backend, sharding=sharding, port=port, data_port=data_port,
                                   env=env, env_file=env_file, ready_timeout=ready_timeout)
    return job.run(job.BatchOptions(
        model=model, input=input, output=output, journal=journal, restart=restart, concurrency=concurrency,
        max_retries=max_retries, request_timeout=request_timeout, url=url, api_key=api_key, cluster=cluster,
        verbose=g.verbose))


def _cluster_options(g: Globals, *, np, backend, sharding, port, data_port, env, env_file, ready_timeout):
    """RunOptions for the cluster, checked here so a bad flag costs nothing (exit 2, nothing started)."""
    from launcher.backends import first_slots
    from launcher.served import RunOptions

    if np is not None and np < 1:
        raise ConfigError(f"-n {np}: expected 1 or more ranks.")
    if sharding not in (None, "tensor", "pipeline"):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port between 1 and 65535.")
    if data_port is not None and not 2 <= data_port <= 65535:
        raise ConfigError(f"--data-port {data_port}: expected a port between 2 and 65535.")
    if ready_timeout <= 0:
        raise ConfigError(f"--ready-timeout {ready_timeout:g}: expected seconds greater than 0.")
    hostfile, _ = load_cluster(g)  # a broken hostfile is reported now, not from inside `run`
    extra: tuple = ()
    rank0 = (first_slots(hostfile, np) if np else hostfile).hosts[0]
    if not rank0.is_local:
        # `run` binds the API to 127.0.0.1 on rank 0's host by default, out of our reach: bind it
        # to the address we will connect to instead (not 0.0.0.0: no wider than needed).
        extra = ("--host", rank0.ips[0] if rank0.ips else "0.0.0.0")
    return RunOptions(hostfile=g.hostfile, topology=g.topology, np=np, backend=backend, sharding=sharding,
                      port=port, data_port=data_port, env=collect_env(env, env_file), extra=extra,
                      ready_timeout=ready_timeout)
