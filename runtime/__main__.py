"""Rank entrypoint, started by `exolaunch run` on every rank:

    python -m runtime serve --model MODEL [--sharding tensor|pipeline] [--host H] [--port P]

Every rank joins the mx.distributed group and loads its shard; rank 0 also opens the control
channel, serves the HTTP API and leads the engine; the others follow it. Set by the launcher:
EXOLAUNCH_CONTROL (rank 0's ip:port for the control channel), EXOLAUNCH_JOB_SECRET (what every
control connection proves), EXOLAUNCH_API_KEY (optional).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from launcher.rankapi import phase, ready
from runtime import contract

LOG_LEVELS = ("debug", "info", "warning", "error")
CONTROL_TIMEOUT = 600.0  # ranks that load slower than rank 0 still join


def say(rank: int, msg: str) -> None:
    if rank == 0:  # every rank reports when it has loaded; the steps before, rank 0 alone
        print(f"[load] {msg}", flush=True)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="load a model across the ranks and serve it from rank 0")
    s.add_argument("--model", default="demo-llama")
    s.add_argument("--sharding", default="tensor", choices=contract.SHARDINGS)
    s.add_argument("--host", default=contract.DEFAULT_API_HOST)
    s.add_argument("--port", type=int, default=contract.DEFAULT_API_PORT)
    s.add_argument("--prefill-step", type=int, default=256)
    s.add_argument("--max-num-seqs", type=int, default=contract.DEFAULT_MAX_NUM_SEQS,
                   help="sequences decoded at once; more wait in the queue")
    s.add_argument("--max-queue", type=int, default=contract.DEFAULT_MAX_QUEUE,
                   help="requests waiting for a slot; beyond it the API answers 429")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per sequence (default: the model's context)")
    s.add_argument("--max-body-mb", type=float, default=8.0,
                   help="request bodies over this many MB get a 413 in the client's dialect")
    s.add_argument("--strict-max-tokens", action="store_true",
                   help="refuse (400) a max_tokens the context cannot hold beside the prompt, "
                        "instead of clamping it")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="exolaunch's log level on the ranks (rank 0's access log is at info)")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="no access-log line for requests that succeed (failures still log)")
    s.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV budget: prompt + max_tokens summed over running sequences (default: "
                        "max-num-seqs full sequences)")
    s.add_argument("--prefix-cache-gb", type=float, default=1.0,
                   help="prefix KV cache per rank, GB (0: off); prompts sharing a cached prefix skip its prefill")
    s.add_argument("--kv-bits", type=int, default=None, choices=(4, 8), help="quantize the KV cache to 8 or 4 bits")
    s.add_argument("--kv-group-size", type=int, default=64, choices=(32, 64, 128),
                   help="values per quantization group of the KV cache (with --kv-bits)")
    s.add_argument("--speculative", default=None, choices=("ngram",),
                   help="speculative decoding: n-gram prompt lookup drafts, verified in one forward")
    s.add_argument("--draft", default=None, metavar="MODEL",
                   help="speculative decoding with a draft model's greedy tokens (rank 0 runs it whole)")
    s.add_argument("--num-speculative-tokens", type=int, default=5)
    s.add_argument("--ngram-prompt-lookup-max", type=int, default=4)
    s.add_argument("--ngram-prompt-lookup-min", type=int, default=1)
    b = sub.add_parser("bench", parents=[], help="drive the engine in-process from rank 0 (no HTTP)")
    for a in ("--model", "--sharding", "--prefill-step", "--max-num-seqs", "--max-queue", "--max-model-len",
              "--max-total-tokens", "--prefix-cache-gb", "--kv-bits", "--kv-group-size", "--speculative", "--draft",
              "--num-speculative-tokens", "--ngram-prompt-lookup-max", "--ngram-prompt-lookup-min"):
        b._add_action(next(x for x in s._actions if a in x.option_strings))
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--streams", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def serve(args) -> int:
    from runtime import control
    from runtime.engine import Engine
    from runtime.group import finish, init_group
    from runtime.contract import ModelError, context_length, resolve_model
    from runtime.loader import load
    from runtime.warm import ENV_WARM, warm

    t0 = time.monotonic()
    group = init_group()
    rank, world = group.rank(), group.size()
    phase("up")  # milestones for run's timeline (launcher/timeline.py)
    if rank == 0 and args.cmd == "serve":
        # FastAPI and uvicorn take ~0.5 s to import; do it while the weights load (mlx
        # releases the GIL there) instead of after, since it is on the launch-to-first-token path.
        threading.Thread(target=importlib.import_module, args=("runtime.api.server",), daemon=True,
                         name="exolaunch-import-api").start()
    try:
        say(rank, f"resolving {args.model}")
        path, model_id = resolve_model(args.model)
        say(rank, f"loading {model_id} from {path} ({args.sharding} parallel over {world} ranks)")
        model, tokenizer, config = load(path, group, args.sharding, model_id)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"[load] loaded rank {rank}/{world} in {time.monotonic() - t0:.1f} s", flush=True)
    phase("weights")
    try:
        from runtime.kv_quant import cache_factory

        make_cache = cache_factory(model, args.kv_bits, args.kv_group_size)  # the flags fit this model, or one line
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    def warm_up() -> None:
        # Every rank, as its first collectives after the load (runtime/warm.py): before a
        # follower connects to rank 0, and on rank 0 while its API starts.
        if args.cmd == "serve" and os.environ.get(ENV_WARM, "1") != "0":
            say(rank, f"warmed up in {warm(model, make_cache):.1f} s")
            phase("warm")
    ctx = args.max_model_len or context_length(config)
    speculator = None
    if args.speculative == "ngram" or args.draft:
        from runtime.draft import load_draft
        from runtime.speculative import Speculator

        try:
            draft = load_draft(args.draft, group, tokenizer, config) if args.draft else None
            speculator = Speculator(args.num_speculative_tokens, args.ngram_prompt_lookup_max,
                                    args.ngram_prompt_lookup_min, draft=draft)
        except (ValueError, ModelError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    engine_kw = dict(model_id=model_id, model_path=path, group=group, context_length=ctx,
                     prefill_step=args.prefill_step, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
                     max_total_tokens=args.max_total_tokens, prefix_cache_gb=args.prefix_cache_gb,
                     kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, speculator=speculator)
    ctl_host, ctl_port = contract.parse_control(os.environ.get(contract.ENV_CONTROL))

    if rank != 0:
        warm_up()
        try:
            follower = control.Follower(ctl_host, ctl_port, rank, CONTROL_TIMEOUT)
        except (ConnectionError, TimeoutError) as e:  # refused, or no rank 0: the launcher must act
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        engine = Engine(model, tokenizer, **engine_kw)
        follower.report_every(1.0, engine.stats.snapshot)  # rank 0's /metrics shows this rank
        ready()
        try:
            engine.run_follower(follower.recv)
        except ConnectionError:
            # Rank 0 went away without a stop decision: a failure, even before the first step.
            # Reported a moment late, so that rank 0's own status (when it failed) comes first.
            time.sleep(1.0)
            return 1
        except Exception as e:
            follower.report_error(f"rank {rank}: {type(e).__name__}: {e}")
            raise
        if args.cmd == "bench":
            finish(group, 0)  # with rank 0's, after its report (MPI_Finalize: no mpirun banner)
        return 0

    if args.cmd == "bench":
        leader = control.Leader(ctl_host, ctl_port, world) if world > 1 else None
        engine = Engine(model, tokenizer, control=leader, **engine_kw)
        if leader is not None:
            leader.accept_all(CONTROL_TIMEOUT)
        loop = threading.Thread(target=engine.run_leader, name="exolaunch-engine", daemon=True)
        engine._thread = loop
        loop.start()
        ready()
        from runtime.bench import run_inprocess

        run_inprocess(engine, args)
        engine.shutdown()
        finish(group, 0)

    # The engine thread and the API thread share rank 0's GIL. At the default 5 ms switch
    # interval a waiting engine thread can lose milliseconds per token to the API thread,
    # and every other rank waits in its all-reduce meanwhile.
    sys.setswitchinterval(float(os.environ.get(contract.ENV_SWITCH_INTERVAL, "0.0005")))
    leader = control.Leader(ctl_host, ctl_port, world) if world > 1 else None
    engine = Engine(model, tokenizer, control=leader, **engine_kw)

    def start_api():
        from runtime.api.server import start  # waits for the import begun before the load

        return start(engine, args.host, args.port, api_key=os.environ.get(contract.ENV_API_KEY) or None,
                     max_body_mb=args.max_body_mb, strict_max_tokens=args.strict_max_tokens)

    # The API's import and start (~0.5 s, more when the load was quicker than the import) run
    # while this rank warms up; /ready answers 503 until the engine loop runs.
    with ThreadPoolExecutor(1, thread_name_prefix="exolaunch-api-start") as pool:
        started = pool.submit(start_api)
        warm_up()
        server = started.result()
    if leader is not None:
        leader.on_peer_lost = lambda r, msg: engine.fail(
            msg.get("error") or f"rank {r} stopped: its process ended or its host is unreachable")
        leader.accept_all(CONTROL_TIMEOUT)
    loop = threading.Thread(target=engine.run_leader, name="exolaunch-engine", daemon=True)
    engine._thread = loop
    loop.start()
    ready()
    print(f"serving {model_id} at http://{args.host}:{args.port}/v1 ({world} ranks, context {ctx})", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while loop.is_alive() and not stop.is_set():
        loop.join(0.2)
    failed = engine.failed
    engine.shutdown(timeout=3.0)  # a loop stuck in a collective with a dead peer stays stuck
    server.stop()
    if leader is not None:
        leader.close()
    if stop.is_set():
        # Teardown SIGTERMs every rank at once, so peers often vanish first: not an error here.
        sys.stdout.flush()
        os._exit(0)
    if failed or loop.is_alive():
        print(f"error: {failed or 'the engine did not stop'}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the engine thread may be inside mlx; don't finalize under it
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    logging.getLogger("exolaunch").setLevel(getattr(args, "log_level", "warning").upper())
    if getattr(args, "disable_log_requests", False):
        logging.getLogger("exolaunch.api.access").setLevel(logging.WARNING)
    code = serve(args)
    # Skip interpreter finalization: with a ring group whose collectives ran on the engine
    # thread, mlx's thread-local teardown aborts the process ("terminate called without an
    # active exception") after all work is done. Everything worth keeping is flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
