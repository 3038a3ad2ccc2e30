"""Runs a sweep: per (model, ranks, backend, sharding, blas) one cluster per server (exolaunch, then
the anchor if asked), warm it up, measure idle CPU, then every (prompt, gen, concurrency) ×
repeat on it, appending each record to results.jsonl the moment it exists. A rerun skips what
is already recorded as ok, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher import ssh
from launcher.backends import first_slots
from launcher.bench import measure, probes, records, roofline
from launcher.bench.sweep import Sweep
from launcher.errors import ConfigError, LaunchError
from launcher.ports import free_port
from runtime import contract

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Target:
    """Where to run: the hostfile (parsed and its path, for the child `exolaunch run`)."""
    hostfile: object
    hostfile_path: Optional[Path] = None
    topology_path: Optional[Path] = None
    sopts: ssh.SshOptions = field(default_factory=ssh.SshOptions)
    api_key: Optional[str] = None
    ready_timeout: float = 900.0


def environment(hosts: list[str]) -> dict:
    from launcher.doctor import local_versions

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, False
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except Exception:
        mem = ""
    return {"hosts": hosts, "versions": {k: v for k, v in local_versions().items() if v},
            "git_commit": (commit + ("-dirty" if dirty else "")) if commit else None,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores{mem}, "
                       f"python {platform.python_version()}",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def eos_ids(model_dir: Path, tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    cfg = json.loads((model_dir / "config.json").read_text())
    e = cfg.get("eos_token_id")
    ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    return sorted(ids)


def blas_summary(per_rank: list) -> dict:
    """A record's "blas": the library its ranks ran (None: unknown, e.g. macOS), and per rank."""
    libs = sorted({x for x in per_rank if x})
    return {"library": ", ".join(libs) if libs else None, "ranks": per_rank}


class Runner:
    def __init__(self, sweep: Sweep, target: Target, out_dir: Path, *, progress=None, say=print, echo=None):
        self.sweep, self.target, self.out = sweep, target, Path(out_dir)
        self.results = self.out / "results.jsonl"
        self.progress = progress  # callable(advance: int, description: str) or None
        self.say = say
        self.echo = echo          # cluster output, with -v
        self.failed = 0
        self._variant = 0

    # -- bookkeeping ---------------------------------------------------------------------------

    def _done(self) -> set:
        return {(r["point"], r["server"], r["repeat"]) for r in records.load(self.results)
                if r.get("ok") and r.get("sweep") == self.sweep.name}

    def _write(self, rec: dict) -> None:
        with open(self.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> list[tuple]:
        """(cluster, server, [(load, repeat)]) still to measure, in run order."""
        done = self._done()
        out = []
        for cl in self.sweep.clusters():
            for server in ["exolaunch", *self.sweep.against]:
                todo = [(ld, rep) for ld in self.sweep.loads() for rep in range(self.sweep.repeats)
                        if (records.point_key(self._config(cl, ld)), server, rep) not in done]
                if todo:
                    out.append((cl, server, todo))
        return out

    def _config(self, cl, ld) -> dict:
        model, ranks, backend, sharding, blas = cl
        prompt, gen, conc = ld
        return {"model": model, "ranks": ranks, "hosts": self._rank_hosts(ranks), "backend": backend,
                "sharding": sharding, "blas": blas, "prompt_tokens": prompt, "gen_tokens": gen, "concurrency": conc}

    def _rank_hosts(self, n: int) -> list[str]:
        sub = first_slots(self.target.hostfile, n)
        return [h.name for h in sub.hosts for _ in range(h.slots)]

    # -- the sweep -------------------------------------------------------------------------------

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        for n in self.sweep.ranks:
            self._rank_hosts(n)  # a rank count the hostfile cannot hold fails before anything starts
        work = self.pending()
        total = sum(len(t) for _, _, t in work)
        if not work:
            self.say(f"exolaunch: bench: every run of sweep {self.sweep.name!r} is already in {self.results}")
            return 0
        hosts = sorted({h for cl, _, _ in work for h in self._rank_hosts(cl[1])})
        host_objs = [h for h in self.target.hostfile.hosts if h.name in hosts]
        env = environment(hosts)
        try:
            bw = probes.bandwidth(host_objs, self.target.sopts)
        except probes.ProbeError as e:
            self.say(f"exolaunch: bench: warning: no roofline: {e}")
            bw = {}
        for h, b in bw.items():
            self.say(f"exolaunch: bench: {h}: memory read bandwidth {b['gbs']:.1f} GB/s ({b['method']})")
        self.say(f"exolaunch: bench: {total} run(s) to do in {len(work)} cluster start(s); results in {self.results}")
        for cl, server, todo in work:
            self._cluster(cl, server, todo, env, bw)
        return 1 if self.failed else 0

    def _cluster(self, cl, server: str, todo: list, env: dict, bw: dict) -> None:
        from mlx_lm.utils import load_tokenizer

        from runtime.contract import ModelError, resolve_model

        model, ranks, backend, sharding, blas = cl
        label = f"{server} {model} {ranks} rank(s) {backend} {sharding} blas {blas}"
        try:
            model_dir, _ = resolve_model(model)
            tokenizer = load_tokenizer(model_dir)
        except ModelError as e:
            return self._fail_all(cl, server, todo, env, f"model: {e}")
        tag = "exl" + uuid.uuid4().hex[:12]
        cluster = self._make_cluster(server, model, model_dir, ranks, backend, sharding, tag, blas)
        if server != "exolaunch":
            self._variant += 1
            cluster.ready_prompt = measure.exact_text_prompt(tokenizer, 32, self._variant)
        suppress = ({"ignore_eos": True} if server == "exolaunch"
                    else {"logit_bias": {str(i): -1000.0 for i in eos_ids(model_dir, tokenizer)}})
        rank_hosts = self._rank_hosts(ranks)
        hosts = [h for h in self.target.hostfile.hosts if h.name in set(rank_hosts)]
        monitor = probes.RankMonitor(hosts, tag, cluster.rank_cmd_marker, self.target.sopts)
        self._show(0, f"starting {label}")
        try:
            cluster.start()
        except (LaunchError, ConfigError) as e:
            return self._fail_all(cl, server, todo, env, f"cluster start: {e}")
        try:
            name = cluster.model_name

            def body(prompt: int, gen: int) -> dict:
                self._variant += 1
                return {"model": name, "prompt": measure.exact_text_prompt(tokenizer, prompt, self._variant),
                        "max_tokens": gen, "temperature": 0, **suppress}

            launch_ftt = None
            try:
                self._show(0, f"warming up {label}")
                if server == "exolaunch":
                    first = measure.first_token_at(cluster.base_url, body(32, 8), api_key=self.target.api_key)
                    launch_ftt = first - cluster.started_at
                else:  # its ready probe was this very request, queued as soon as its HTTP answered
                    launch_ftt = cluster.ready_at - cluster.started_at
                for _ in range(max(0, self.sweep.warmup - 1)):
                    measure.run_burst(cluster.base_url, [body(32, 8)], api_key=self.target.api_key)
                idle = monitor.idle_cpu(self.sweep.idle_seconds) if self.sweep.idle_seconds else []
                ran = monitor.blas()  # what each rank's matmuls really use, whatever the mode said
            except (RuntimeError, OSError, probes.ProbeError) as e:
                return self._fail_all(cl, server, todo, env, f"warm-up: {e}")
            for (prompt, gen, conc), rep in todo:
                config = self._config(cl, (prompt, gen, conc))
                self._show(0, f"{label}: prompt {prompt}, gen {gen}, x{conc}, repeat {rep + 1}")
                rec = self._record(config, server, rep, env)
                rec["blas"] = blas_summary(ran)
                try:
                    m = measure.run_burst(cluster.base_url, [body(prompt, gen) for _ in range(conc)],
                                          api_key=self.target.api_key)
                    m["launch_to_first_token_s"] = launch_ftt
                    launch_ftt = None  # only the first run after a start carries it
                    m["peak_mem_mb"] = monitor.peak_mb()
                    m["idle_cpu_pct"] = idle
                    rec.update(ok=True, metrics=m, roofline=self._roofline(model_dir, rank_hosts, sharding, bw,
                                                                             prompt, gen, conc, m))
                except (RuntimeError, OSError, probes.ProbeError, ValueError) as e:
                    rec.update(ok=False, error=str(e))
                    self.failed += 1
                self._write(rec)
                self._show(1, None)
        finally:
            self._show(0, f"stopping {label}")
            cluster.stop()

    def _make_cluster(self, server, model, model_dir, ranks, backend, sharding, tag, blas=None):
        from launcher.served import RunOptions, ServedCluster

        env = {probes.TAG_VAR: tag}
        if os.environ.get(contract.ENV_CACHE):
            env[contract.ENV_CACHE] = os.environ[contract.ENV_CACHE]
        if server == "exolaunch":
            if self.target.api_key:  # run reads it from the environment: never on a command line
                env[contract.ENV_API_KEY] = self.target.api_key
            c = ServedCluster(model, RunOptions(
                hostfile=self.target.hostfile_path, topology=self.target.topology_path, np=ranks, backend=backend,
                sharding=sharding, port=free_port(), data_port=free_port() + 1, env=env, blas=blas,
                ready_timeout=self.target.ready_timeout),
                log=self.out / "cluster.log", echo=self.echo)
            c.model_name = model
            c.rank_cmd_marker = "runtime serve"
            return c
        from launcher.bench.anchor import AnchorCluster

        return AnchorCluster(model_dir, self.target.hostfile, np=ranks, backend=backend, sharding=sharding,
                             port=free_port(), env=env, log=self.out / "anchor.log",
                             ready_timeout=self.target.ready_timeout, echo=self.echo, blas=blas)

    def _roofline(self, model_dir, rank_hosts, sharding, bw, prompt, gen, conc, m) -> Optional[dict]:
        if not bw or any(h not in bw for h in rank_hosts):
            return None
        gbs = {h: bw[h]["gbs"] for h in set(rank_hosts)}
        c = roofline.ceiling(model_dir, rank_hosts, sharding, gbs, prompt_tokens=prompt, gen_tokens=gen,
                             concurrency=conc)
        return {"bandwidth_gbs": {h: round(v, 2) for h, v in gbs.items()}, **c,
                "pct_of_ceiling": 100 * m["decode_sum_tok_s"] / c["ceiling_tok_s"]}

    def _record(self, config: dict, server: str, rep: int, env: dict) -> dict:
        return {"schema": records.SCHEMA, "sweep": self.sweep.name, "point": records.point_key(config),
                "repeat": rep, "server": server, "config": config, "ok": False, "error": None,
                "blas": None, "metrics": None, "roofline": None, "env": env}

    def _fail_all(self, cl, server, todo, env, message: str) -> None:
        self.say(f"exolaunch: bench: {server} {cl[0]} on {cl[1]} rank(s) ({cl[2]}, {cl[3]}, blas {cl[4]}): {message}")
        for ld, rep in todo:
            rec = self._record(self._config(cl, ld), server, rep, env)
            rec["error"] = message
            self._write(rec)
            self.failed += 1
            self._show(1, None)

    def _show(self, advance: int, description: Optional[str]) -> None:
        if self.progress:
            self.progress(advance, description)

