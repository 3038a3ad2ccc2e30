"""`exolaunch bench` (registered on the typer app in launcher.cli_common): a benchmark sweep, optionally side by side
with mlx.launch + mlx_lm.server, written as JSONL, CSV, markdown and PNG plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from launcher.cli_common import app, load_cluster
from launcher.errors import ConfigError
from runtime import contract


class _Progress:
    """A rich progress bar on a terminal; plain lines in logs (CI, pipes)."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console, disable=not self.live)
        self.task = self.bar.add_task("bench", total=total)
        self.done, self.total = 0, total

    def __call__(self, advance: int, description: Optional[str]) -> None:
        self.done += advance
        if description:
            if not self.live:
                print(f"exolaunch: bench: [{self.done}/{self.total}] {description}", file=sys.stderr, flush=True)
            self.bar.update(self.task, description=description)
        if advance:
            self.bar.advance(self.task, advance)

    def say(self, msg: str) -> None:
        (self.bar.console.print if self.live else lambda m: print(m, file=sys.stderr, flush=True))(msg)


@app.command("bench", help="Benchmark sweep: models × rank counts × backends × shardings × BLAS × prompt tokens × "
                           "generated tokens × concurrency × repeats, from --config (configs/sweeps/*.yaml) and/or flags. Per "
                           "run: TTFT, TPOT, ITL and e2e percentiles, prompt/decode/aggregate tok/s, peak memory and "
                           "idle CPU per rank, % of the memory-bandwidth roofline. Writes OUT/results.jsonl (one "
                           "record per run; a rerun resumes), summary.csv, summary.md and PNG plots. --against "
                           "mlx-lm measures the same points with mlx.launch/mpirun + mlx_lm.server. Exit 1 if any "
                           "run failed.")
def bench_(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Sweep YAML (see configs/sweeps/)."),
    model: List[str] = typer.Option([], "--model", "-m", help="Model(s) to sweep (repeatable)."),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="Rank counts, e.g. 1,2 (first N hostfile slots)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Backends, e.g. mpi,ring."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="tensor and/or pipeline, e.g. tensor."),
    blas: List[str] = typer.Option([], "--blas", help="CPU ranks' BLAS, for both servers alike (run's --blas; the "
                                                      "anchor's ranks get the same LD_PRELOAD and threads), e.g. "
                                                      "bundled,openblas (repeatable; default auto)."),
    prompt_tokens: Optional[str] = typer.Option(None, "--prompt-tokens", help="Exact prompt lengths, e.g. 32,512."),
    gen_tokens: Optional[str] = typer.Option(None, "--gen-tokens", help="Generated tokens per request (EOS suppressed)."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="Requests in flight at once, e.g. 1,8."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Runs per point (default 3)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Untimed requests per cluster start (default 1)."),
    idle_seconds: Optional[float] = typer.Option(None, "--idle-seconds", help="Idle-CPU window per cluster (default 5)."),
    against: Optional[str] = typer.Option(None, "--against", help="mlx-lm: also measure mlx_lm.server (the anchor)."),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: the config file's stem, or adhoc)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default bench-results/NAME)."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard this sweep's earlier results instead of resuming."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rewrite CSV/markdown/plots from results.jsonl."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=contract.ENV_API_KEY, help="API key for the servers."),
    ready_timeout: float = typer.Option(900.0, "--ready-timeout", help="Seconds for a cluster to load."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="SSH connect timeout for the probes."),
    trace: Optional[str] = typer.Option(None, "--trace", help="agent: instead of the load sweep, a coding agent's "
                                                             "trace (a long system prompt, growing conversations) "
                                                             "per cluster, with and without the prefix cache."),
    trace_system: int = typer.Option(2000, "--trace-system", help="Agent trace: system prompt tokens."),
    trace_turns: int = typer.Option(6, "--trace-turns", help="Agent trace: turns per conversation."),
    trace_conversations: int = typer.Option(3, "--trace-conversations", help="Agent trace: conversations at once."),
):
    from launcher.bench import records, report
    from launcher.bench.runner import Runner
    from launcher.bench.sweep import csv_ints, csv_strs, load_sweep

    sweep = load_sweep(config, {
        "name": name, "models": list(model), "ranks": csv_ints("--ranks", ranks),
        "backends": csv_strs(backend), "shardings": csv_strs(sharding),
        "blas": [m for b in blas for m in csv_strs(b)],
        "prompt_tokens": csv_ints("--prompt-tokens", prompt_tokens), "gen_tokens": csv_ints("--gen-tokens", gen_tokens),
        "concurrency": csv_ints("--concurrency", concurrency), "repeats": repeats, "warmup": warmup,
        "idle_seconds": idle_seconds, "against": csv_strs(against)})
    out = out or Path("bench-results") / sweep.name
    if trace is not None:
        return _agent_trace(ctx, sweep, out, trace, trace_system, trace_turns, trace_conversations, api_key,
                            ready_timeout, connect_timeout)
    results = out / "results.jsonl"
    if fresh and results.exists():
        kept = [r for r in records.load(results) if r.get("sweep") != sweep.name]
        results.write_text("".join(__import__("json").dumps(r) + "\n" for r in kept))
    status = 0
    if not report_only:
        g = ctx.obj
        runner = Runner(sweep, _target(g, api_key, ready_timeout, connect_timeout), out)
        todo = sum(len(t) for _, _, t in runner.pending())
        progress = _Progress(todo)
        runner.progress, runner.say = progress, progress.say
        if g.verbose:
            runner.echo = progress.say
        with progress.bar:
            status = runner.run()
    elif not results.exists():
        raise ConfigError(f"--report-only: {results} does not exist. Fix: run the sweep first, or pass --out.")
    recs = [r for r in records.load(results) if r.get("sweep") == sweep.name]
    written = report.write_all(recs, out)
    md = written.get("md")
    if md:
        typer.echo(Path(md).read_text())
    for kind, path in written.items():
        print(f"exolaunch: bench: {kind}: {path}", file=sys.stderr)
    print(f"exolaunch: bench: records: {results}", file=sys.stderr)
    return status


def _target(g, api_key: Optional[str], ready_timeout: float, connect_timeout: float):
    """Where the sweep's clusters run: the loaded hostfile, reached with these SSH options."""
    from launcher import ssh
    from launcher.bench.runner import Target

    hostfile, _ = load_cluster(g)
    return Target(hostfile=hostfile, hostfile_path=g.hostfile, topology_path=g.topology, api_key=api_key,
                  ready_timeout=ready_timeout,
                  sopts=ssh.SshOptions(connect_timeout=connect_timeout, config=hostfile.ssh_config,
                                       options=dict(hostfile.ssh_options or {})))


def _agent_trace(ctx, sweep, out: Path, trace: str, system: int, turns: int, conversations: int,
                 api_key: Optional[str], ready_timeout: float, connect_timeout: float) -> int:
    """`--trace agent` (launcher/bench/agent.py): one trace per sweep cluster and server."""
    from launcher.bench import agent
    from launcher.bench.runner import Runner

    if trace != "agent":
        raise ConfigError(f"--trace {trace!r}: expected agent.")
    for flag, value in (("--trace-system", system), ("--trace-turns", turns), ("--trace-conversations", conversations)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected a whole number of at least 1.")
    runner = Runner(sweep, _target(ctx.obj, api_key, ready_timeout, connect_timeout), out,
                    say=lambda m: print(m, file=sys.stderr, flush=True))
    recs, failed = agent.run(runner, agent.Trace(system=system, turns=turns, conversations=conversations),
                             [*agent.SERVERS, *sweep.against])
    typer.echo(agent.report(recs))
    print(f"exolaunch: bench: records: {out / 'agent.jsonl'}", file=sys.stderr)
    return 1 if failed else 0
