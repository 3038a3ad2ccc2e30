"""`exolaunch exec` and `exolaunch run`: plan the ranks once, then dry-run or supervise them.

`run` is `exec` of `python -m runtime serve` after the planner and the doctor have had their say,
behind the front door (launcher/frontdoor.py) and relaunched on failure with --restart
(launcher/restart.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer

from launcher import ssh
from launcher.backends import first_slots
from launcher.cli_common import BLAS_OPTION, Globals, app, check_blas, check_host_key_check, collect_env, load_cluster
from launcher.errors import ConfigError, LaunchError
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
    # `python -m runtime` ranks (the in-process bench) find rank 0's control channel from the
    # data port, as under run; otherwise two jobs on one host would share its default port.
    rank_env = collect_env(env, env_file)
    rank_env.setdefault(contract.ENV_CONTROL, contract.format_control(contract.control_address(
        hostfile.hosts[0].ips, hostfile.port, all_local=all(h.is_local for h in hostfile.hosts))))
    spec = plan_launch(hostfile, list(command), backend=backend, topology=topology,
                       env=rank_env, np=np, verbose=g.verbose, blas=check_blas(blas))
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
           heartbeat_timeout: float, grace: float) -> int:
    """What exec and run share once the ranks are planned: dry-run, or supervise."""
    from launcher import supervisor

    if dry_run:
        from launcher.dryrun import describe

        typer.echo(describe(spec, sopts))
        return 0
    opts = supervisor.Options(
        tag_output=tag_output, log_dir=log_dir, timeout=timeout, ready_timeout=ready_timeout,
        heartbeat_timeout=heartbeat_timeout, grace=grace, ssh=sopts,
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
    detach: bool = typer.Option(False, "-d", "--detach", help="Run as a background job: return once it serves, "
                                                             "print its id and URL (see ps, logs, stop)."),
    model: Optional[str] = typer.Argument(
        None, help="What to serve (default: smollm2, SmolLM2-135M-Instruct from the `demo` extra; else demo-llama)."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="tensor or pipeline (default: the planner's choice)."),
    host: str = typer.Option(contract.DEFAULT_API_HOST, "--host", help="Address the API (the front door) binds to."),
    port: int = typer.Option(contract.DEFAULT_API_PORT, "--port",
                             help="API port: the front door, in this process; rank 0 listens on a private one."),
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
    strict_max_tokens: bool = typer.Option(
        False, "--strict-max-tokens", help="Refuse (400) a max_tokens the context cannot hold beside the prompt "
                                           "(default: clamp it to what the context leaves)."),
    log_level: str = typer.Option("info", "--log-level", help="Log level on the ranks: debug, info, warning, "
                                                              "error (rank 0 logs one access line per request at info)."),
    disable_log_requests: bool = typer.Option(False, "--disable-log-requests",
                                              help="No access-log line for requests that succeed."),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", help="Prompt + output tokens per sequence (default: the plan's context: the "
                                      "model's, at most 32768)."),
    max_total_tokens: Optional[int] = typer.Option(
        None, "--max-total-tokens", help="KV budget: prompt + max_tokens summed over running sequences "
                                         "(default: what the plan's spare memory holds)."),
    prefix_cache_gb: Optional[float] = typer.Option(
        None, "--prefix-cache-gb", help="Prefix KV cache per rank, GB (0: off): requests sharing a cached prefix "
                                        "(a conversation's earlier turns, a system prompt) skip its prefill "
                                        "(default: a quarter of the plan's spare memory)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the KV cache to 8 or 4 bits "
                                                                  "(continuous batching stays on)."),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="Values per KV quantization group: 32, 64 or 128."),
    speculative: Optional[str] = typer.Option(
        None, "--speculative", help="Speculative decoding: ngram (prompt lookup: drafts from the request's own "
                                    "text, verified by every rank in one forward; greedy output unchanged)."),
    draft: Optional[str] = typer.Option(
        None, "--draft", metavar="MODEL", help="Speculative decoding with a draft model of the same tokenizer "
                                               "(rank 0 runs it whole; every rank verifies its tokens in one forward)."),
    num_speculative_tokens: int = typer.Option(5, "--num-speculative-tokens", help="Draft tokens per step."),
    ngram_prompt_lookup_max: int = typer.Option(4, "--ngram-prompt-lookup-max", help="Longest n-gram looked up."),
    ngram_prompt_lookup_min: int = typer.Option(1, "--ngram-prompt-lookup-min", help="Shortest n-gram looked up."),
    force: bool = typer.Option(False, "--force", help="Start even if the plan says the model does not fit."),
    skip_doctor: bool = typer.Option(False, "--skip-doctor", help="Skip the preflight checks of `exolaunch doctor`."),
    blas: Optional[str] = BLAS_OPTION,
    restart: int = typer.Option(0, "--restart", "--max-restarts",
                                help="Relaunch up to N times when a rank dies, hangs or its host drops (back-off, "
                                     "the doctor's checks again, re-planned on the hosts that remain)."),
    fallback: Optional[str] = typer.Option(
        None, "--fallback", help="OpenAI-compatible base URL (e.g. https://openrouter.ai/api/v1) that serves "
                                 "OpenAI requests while the cluster is down, loading or full."),
    fallback_anthropic: Optional[str] = typer.Option(
        None, "--fallback-anthropic", help="Anthropic-compatible base URL, as ANTHROPIC_BASE_URL (e.g. "
                                           "https://api.moonshot.ai/anthropic), for Messages requests likewise."),
    fallback_ollama: Optional[str] = typer.Option(
        None, "--fallback-ollama", help="Ollama server URL (e.g. http://127.0.0.1:11434) for Ollama requests likewise."),
    fallback_key_env: Optional[str] = typer.Option(
        None, "--fallback-key-env", help="Environment variable holding the fallbacks' API key."),
    fallback_model: List[str] = typer.Option(
        [], "--fallback-model", help="Model name at the fallback: NAME for every request, or LOCAL=REMOTE (repeatable)."),
):
    from launcher.backends import plan_launch

    if detach:  # the same run, in the background (launcher.cli_jobs)
        from launcher.cli_jobs import detach_run

        return detach_run(ctx)
    blas = check_blas(blas)
    if restart < 0:
        raise ConfigError(f"--restart {restart}: expected a whole number of at least 0.")
    fb = _fallback_config({"--fallback": fallback, "--fallback-anthropic": fallback_anthropic,
                           "--fallback-ollama": fallback_ollama}, fallback_key_env, fallback_model)
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
    if prefix_cache_gb is not None and not 0 <= prefix_cache_gb <= 1 << 20:
        raise ConfigError(f"--prefix-cache-gb {prefix_cache_gb:g}: expected gigabytes of at least 0.")
    if kv_bits not in (None, 4, 8):
        raise ConfigError(f"--kv-bits {kv_bits}: expected 8 or 4.")
    if kv_group_size not in (32, 64, 128):
        raise ConfigError(f"--kv-group-size {kv_group_size}: expected 32, 64 or 128.")
    if speculative not in (None, "ngram"):
        raise ConfigError(f"--speculative {speculative!r}: expected ngram (for a draft model: --draft MODEL).")
    if speculative and draft:
        raise ConfigError(f"--speculative {speculative} and --draft {draft}: choose one source of drafts.")
    if draft is not None:
        from runtime.contract import classify_model

        if classify_model(draft) is None:
            raise ConfigError(f"--draft {draft!r}: no such directory, demo model, .gguf file, packaged model "
                              "or Hugging Face repo id (owner/name).")
    if not (1 <= num_speculative_tokens <= 64 and 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max <= 64):
        raise ConfigError(f"--num-speculative-tokens {num_speculative_tokens}, --ngram-prompt-lookup-min "
                          f"{ngram_prompt_lookup_min}, --ngram-prompt-lookup-max {ngram_prompt_lookup_max}: expected "
                          "1..64 draft tokens and 1 <= min <= max <= 64.")
    if not 0 < max_body_mb <= 4096:
        raise ConfigError(f"--max-body-mb {max_body_mb:g}: expected megabytes between 0 and 4096.")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level {log_level!r}: expected debug, info, warning or error.")
    if not api_key and not _is_loopback(host):
        print(f"exolaunch: warning: the API on {host}:{port} will answer anyone who can reach it: no API key "
              f"is set (set {contract.ENV_API_KEY} or pass --api-key to require one).", file=sys.stderr)
    sopts = ssh_options(connect_timeout, host_key_check, ready_timeout=ready_timeout,
                        heartbeat_timeout=heartbeat_timeout, grace=grace)
    g: Globals = ctx.obj
    hostfile, topology = load_cluster_at(g, data_port)
    used = first_slots(hostfile, np) if np else hostfile
    all_local = all(h.is_local for h in used.hosts)
    data_port_auto = data_port is None and not hostfile.port_given and all_local
    if data_port_auto:
        # Nobody asked for ports and nothing off this machine needs to know them: take free ones,
        # so a second cluster on this host starts as well as the first.
        from launcher.ports import free_data_port

        data_port = free_data_port(sum(h.slots * len(h.ips) for h in used.hosts))
        hostfile = dataclasses.replace(hostfile, port=data_port)
    from launcher.planner import kv_scale

    kv_share = kv_scale(kv_bits, kv_group_size)  # the plan's KV memory with --kv-bits
    plan = _plan_or_none(model, hostfile, topology, backend=backend, sharding=sharding, np=np,
                         context=max_model_len, kv_share=kv_share, draft=draft)
    from launcher.timeline import Timeline

    timeline = Timeline()  # the line run prints once it serves (launcher/timeline.py)
    timeline.mark("plan")
    asked_sharding, asked_backend = sharding, backend  # a re-plan after a host is lost chooses again
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
    from launcher.frontdoor import internal_address

    def rank_spec(hf, np_, p, api_addr):
        """The ranks of one launch on hosts `hf` (first np_ slots) with plan `p`; rank 0's API on api_addr."""
        used_ = first_slots(hf, np_) if np_ else hf
        shard = asked_sharding or (p.sharding if p is not None and p.sharding in contract.SHARDINGS else None) \
            or sharding
        back = asked_backend or hf.backend or (p.backend if p is not None else None) or backend
        command = ["python", "-m", "runtime", "serve", "--model", model, "--sharding", shard,
                   "--host", api_addr[0], "--port", str(api_addr[1]), "--max-num-seqs", str(max_num_seqs),
                   "--max-queue", str(max_queue), "--max-body-mb", f"{max_body_mb:g}", "--log-level", log_level]
        command += ["--strict-max-tokens"] * strict_max_tokens + ["--disable-log-requests"] * disable_log_requests
        # One KV budget: the ranks admit within the numbers the plan sized (context, sequences,
        # bytes per token), so a plan that fits keeps fitting under load.
        mlen = max_model_len or (p.context if p is not None else None)
        pcg = prefix_cache_gb if prefix_cache_gb is not None else (p.prefix_cache_gb() if p is not None else None)
        mtt = max_total_tokens or (p.max_total_tokens(max_num_seqs, pcg or 0.0) if p is not None else None)
        if pcg is not None:
            command += ["--prefix-cache-gb", f"{pcg:g}"]
        if kv_bits:
            command += ["--kv-bits", str(kv_bits), "--kv-group-size", str(kv_group_size)]
        if speculative:
            command += ["--speculative", speculative, "--num-speculative-tokens", str(num_speculative_tokens),
                        "--ngram-prompt-lookup-max", str(ngram_prompt_lookup_max),
                        "--ngram-prompt-lookup-min", str(ngram_prompt_lookup_min)]
        if draft:
            command += ["--draft", draft, "--num-speculative-tokens", str(num_speculative_tokens)]
        if mlen:
            command += ["--max-model-len", str(mlen)]
        if mtt:
            command += ["--max-total-tokens", str(mtt)]
        # The control channel listens on rank 0 just below the data-plane ports (on loopback when
        # every rank is local); its connections prove the job secret plan_launch gives every rank.
        # The API key travels in the environment, not on a command line.
        rank_env = {contract.ENV_CONTROL: contract.format_control(contract.control_address(
            used_.hosts[0].ips, hf.port, all_local=all(h.is_local for h in used_.hosts)))}
        if api_key:
            rank_env[contract.ENV_API_KEY] = api_key
        if p is not None:  # rank 0's dashboard shows the hosts, ranks, links and memory budgets
            from launcher.planner import summary

            rank_env[contract.ENV_PLAN] = json.dumps(summary(p, topology), separators=(",", ":"))
        return plan_launch(hf, command, backend=back, topology=topology,
                           env={**collect_env(env, env_file), **rank_env}, np=np_, verbose=g.verbose, blas=blas)

    def check(hf, np_, api_addr=None):
        """The doctor's checks for a launch on hf (rank 0's private API port too, when known)."""
        from launcher.doctor import run_checks

        used_ = first_slots(hf, np_) if np_ else hf
        return run_checks(hf, topology, backend=asked_backend or hf.backend or backend, np=np_, data_port=hf.port,
                          control=True, blas=blas, ports={used_.hosts[0].name: [api_addr]} if api_addr else None,
                          connect_timeout=connect_timeout, host_key_check=host_key_check)

    first_addr = internal_address(used.hosts[0], hostfile.port)
    if dry_run:
        return launch(rank_spec(hostfile, np, plan, first_addr), sopts, dry_run=True, tag_output=tag_output,
                      log_dir=log_dir, timeout=None, ready_timeout=ready_timeout,
                      heartbeat_timeout=heartbeat_timeout, grace=grace)
    from launcher.frontdoor import ClusterState, FrontDoor

    state = ClusterState(model=model, url=_public_url(host, port), max_restarts=restart)
    door = FrontDoor(state, host, port, api_key=api_key, fallback=fb, max_body_mb=max_body_mb)
    door.bind()  # the public port is taken: say so now (exit 5), before any rank starts
    if not skip_doctor:
        report = check(hostfile, np, first_addr)
        if not report.ok:
            print(report.render(), file=sys.stderr)
            print("exolaunch: refusing to start: fix the problems above (or --skip-doctor).", file=sys.stderr)
            return EXIT_REFUSED
        timeline.mark("preflight")
    # The door's server comes up while the ranks start (its imports cost the launch ~0.2 s);
    # its socket is bound, so a client meanwhile waits in the backlog instead of being refused.
    door.start(wait=False)
    threading.Thread(target=_door_or_stop, args=(door,), daemon=True, name="exolaunch-door-start").start()
    try:
        return _serve_restarting(
            state, restart, rank_spec, None if skip_doctor else check, sopts, tag_output=tag_output,
            log_dir=log_dir, ready_timeout=ready_timeout, heartbeat_timeout=heartbeat_timeout, grace=grace,
            first=(hostfile, np, plan, first_addr),
            fresh_ports=data_port_auto, api_key=api_key, timeline=timeline,
            replan=lambda hf, np_: _plan_or_none(model, hf, topology, backend=asked_backend,
                                                 sharding=asked_sharding, np=np_, context=max_model_len, quiet=True,
                                                 kv_share=kv_share, draft=draft))
    finally:
        state.set("stopping", "exolaunch is stopping")
        door.stop()


def _door_or_stop(door) -> None:
    """A front door that never came up ends the run (torn down as if interrupted) with its reason."""
    try:
        door.wait_started()
    except LaunchError as e:
        print(f"exolaunch: {e}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


def _public_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/v1"


def _fallback_config(urls: dict[str, Optional[str]], key_env: Optional[str], models: List[str]):
    """--fallback, --fallback-anthropic, --fallback-ollama, --fallback-key-env, --fallback-model
    checked (one line naming the flag)."""
    import os
    from urllib.parse import urlsplit

    from launcher.frontdoor import Fallback, parse_fallback_models

    examples = {"--fallback": "https://openrouter.ai/api/v1", "--fallback-anthropic": "https://api.moonshot.ai/anthropic",
                "--fallback-ollama": "http://127.0.0.1:11434"}
    if not any(urls.values()):
        if key_env or models:
            raise ConfigError(f"{'--fallback-key-env' if key_env else '--fallback-model'} needs --fallback URL "
                              "(or --fallback-anthropic / --fallback-ollama).")
        return None
    for flag, url in urls.items():
        parts = urlsplit(url or "")
        if url is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ConfigError(f"{flag} {url!r}: expected an http:// or https:// base URL such as {examples[flag]}.")
    key = None
    if key_env is not None:
        key = os.environ.get(key_env)
        if not key:
            raise ConfigError(f"--fallback-key-env {key_env}: that environment variable is not set (or empty).")
    model, mapping = parse_fallback_models(models)
    url, anthropic_url, ollama_url = ((u.rstrip("/") if u else None) for u in urls.values())
    return Fallback(url=url, key=key, model=model, models=mapping, anthropic_url=anthropic_url, ollama_url=ollama_url)


def _serve_restarting(state, max_restarts: int, rank_spec, check, sopts, *, tag_output, log_dir, ready_timeout,
                      heartbeat_timeout, grace, first, fresh_ports: bool, replan, api_key, timeline=None) -> int:
    """Launch, and with --restart N relaunch (launcher/restart.py) behind the front door."""
    import threading
    import time

    from launcher import supervisor
    from launcher.ports import free_data_port
    from launcher.frontdoor import internal_address, wait_until_ready
    from launcher.restart import INTERRUPTED, Attempt, Policy, Restarter

    first_hf, first_np, first_plan, first_addr = first
    say = lambda msg: print(f"exolaunch: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    policy = Policy(max_restarts=max_restarts)

    def launch_once(a: Attempt) -> int:
        hf, addr = a.hostfile, None
        if a.hostfile is first_hf and a.np == first_np and state.restarts == 0:
            addr = first_addr
        elif fresh_ports:  # a relaunch on this machine takes free ports again
            used_ = first_slots(hf, a.np) if a.np else hf
            hf = dataclasses.replace(hf, port=free_data_port(sum(h.slots * len(h.ips) for h in used_.hosts)))
        if addr is None:
            used_ = first_slots(hf, a.np) if a.np else hf
            addr = internal_address(used_.hosts[0], hf.port)
        spec = rank_spec(hf, a.np, a.plan, addr)
        state.world_size = spec.world_size
        state.hosts = list(dict.fromkeys(r.host.name for r in spec.ranks))
        upstream = f"http://{f'[{addr[0]}]' if ':' in addr[0] else addr[0]}:{addr[1]}"
        t_launch = time.monotonic()
        if state.expected_ready is None:  # the first launch: guess it loads as fast as last time
            state.expected_ready = t_launch + state.load_seconds
        ended, lock = threading.Event(), threading.Lock()  # ready and torn down never interleave
        timed = timeline is not None and state.restarts == 0  # the first launch's timeline only
        if timed:
            timeline.launching(spec.world_size)

        def ready() -> None:  # every rank is loaded: serve once rank 0's engine says it is ready
            threading.Thread(target=confirm_ready, daemon=True, name="exolaunch-ready").start()

        def confirm_ready() -> None:
            if not wait_until_ready(upstream, api_key, stop=ended.is_set):
                return
            api_at = time.monotonic()
            with lock:
                if ended.is_set():
                    return
                state.load_seconds = time.monotonic() - t_launch
                state.expected_ready = None
                state.set("ready", "", upstream=upstream)
            _publish(state)
            if state.restarts == 0:
                say(f"serving {state.model} on {spec.world_size} rank(s): {state.url}")
                if timed:
                    say(timeline.render(api_at))
            else:
                since = f", {time.monotonic() - restarter.failed_at:.1f} s after the failure" \
                    if restarter.failed_at else ""
                say(f"serving {state.model} again on {spec.world_size} rank(s): {state.url} "
                    f"(restart {state.restarts}/{max_restarts}{since})")
            restarter.failed_at = None

        def torn_down(status: int, why: str) -> None:
            with lock:
                ended.set()
                if status in INTERRUPTED:
                    state.set("stopping", "exolaunch is stopping")
                else:
                    restarter.failed_at = restarter.failed_at or time.monotonic()
                    state.last_failure = why
                    more = state.restarts < max_restarts
                    state.expected_ready = (time.monotonic() + policy.delay(state.restarts + 1)
                                            + state.load_seconds) if more else None
                    state.set("restarting" if more else "stopping", why)
            _publish(state)

        opts = supervisor.Options(tag_output=tag_output, log_dir=log_dir, timeout=None, ready_timeout=ready_timeout,
                                  heartbeat_timeout=heartbeat_timeout, grace=grace, ssh=sopts,
                                  on_all_ready=ready, on_teardown=torn_down,
                                  on_event=timeline.on_event if timed else None)
        return supervisor.run(spec, opts)

    restarter = Restarter(policy, state, launch=launch_once, check=check, replan=replan, say=say,
                          on_change=_publish)
    return restarter.run(Attempt(first_hf, first_np, first_plan))


def _publish(state) -> None:
    """A detached run (`run -d`, launcher/jobs.py) keeps the front door's status in its job
    directory too, for `exolaunch ps`."""
    import os

    job = os.environ.get("EXOLAUNCH_JOB_ID")
    if not job:
        return
    try:
        from launcher.jobs import jobs_dir, write_json

        d = jobs_dir() / job
        if d.is_dir():
            write_json(d / "status.json", state.to_dict())
    except Exception:  # status is a convenience: never what ends a run
        pass


EXIT_REFUSED = 5  # run: the plan does not fit, or the preflight checks failed


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def _plan_or_none(model, hostfile, topology, quiet: bool = False, **kw):
    """The planner's view, or None when it cannot know the model (e.g. a hub repo not yet
    downloaded): then run starts without a plan, as the runtime can still fetch it."""
    from launcher.planner import plan_for

    try:
        return plan_for(model, hostfile, topology, **kw)
    except ConfigError as e:
        if "-n " in str(e) or "--" in str(e).split(":")[0]:
            raise  # a flag error: the user must fix it
        if not quiet:
            print(f"exolaunch: warning: no plan for {model} ({e}); starting without one.", file=sys.stderr)
        return None
