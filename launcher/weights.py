"""Model weights onto every host: `exolaunch pull` and `stage()` (reusable by `run`).

Two ways to get a model's files where its ranks run:

hub     (`pull REPO`) every host runs a small Python script (sent as `python -c`, parameters as
        JSON on stdin) calling huggingface_hub.snapshot_download for what its ranks need; the
        hub client resumes interrupted downloads by itself. The free disk of the host's HF cache
        (or --dest) is checked against the files' sizes first. A host that cannot reach the hub
        fails with "host X cannot reach the Hugging Face Hub: <err>. Fix: use --stage".

stage   (`pull --stage`, local directories, demo models) the model is resolved here once
        (a local directory, a demo model, or snapshot_download on this machine) and copied to each
        host over SSH, all hosts in parallel. Per host one probe (a `python -c` script) reports
        the free disk at the destination and, for every file that is already there with the
        right size, its sha256 (cached in <EXOLAUNCH_CACHE>/hashes.json by path, size and mtime,
        on both sides). Files with the same size and hash are skipped; a shorter file is a
        partial copy and is resumed (appended, then verified); anything else is copied again.
        Too little free space refuses the host before a byte is copied, naming the numbers.
        Copies go with rsync (`--partial --inplace --append-verify`) when both ends have rsync
        >= 3.1, else through a stream of (header, bytes) frames into a receiver script that
        writes in place and hashes what it wrote. Nothing from the hostfile or the model passes
        through a remote shell unquoted: paths travel inside JSON, rsync runs with
        --secluded-args (-s).

Destination of a staged model on a host, first that applies:
  1. `--dest PATH` (dest=): the model directory itself, on every host;
  2. `EXOLAUNCH_MODELS` in the host's `env:` (or the hostfile's top-level `env:`):
     `$EXOLAUNCH_MODELS/<name>` (name: the directory's name; `owner--repo` for a hub snapshot);
  3. the same absolute path as here, so `run` can use one MODEL path on every host. For a hub
     model that is the Hugging Face cache layout (models--owner--repo/{snapshots/REV,refs}).
A host where that path already holds identical files (a shared filesystem, or this machine)
costs one hash check and copies nothing: local directories are used in place where every host
sees the same path, and staged where not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from launcher import ssh
from launcher.backends import host_python
from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile

MODELS_ENV = "EXOLAUNCH_MODELS"
# Copied last, in their own step: a reader that trusts them must never see them before the rest.
LAST_FILES = (".exolaunch-complete",)
# Never staged: locks, temp dirs of demo_models.ensure, hf local_dir metadata, VCS.
_SKIP_RE = re.compile(r"(^|/)(\.git|\.cache|\.[^/]*\.tmp-[^/]*|\.[^/]*\.old-[^/]*)(/|$)|\.lock$|\.incomplete$")
# What a rank needs besides weights (mlx_lm.sharded_load's first download).
META_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
MIN_RSYNC = (3, 1)  # --append-verify, --info=progress2, -s


# ============================================================================= shared helpers
# These functions also run on the remote hosts: their source is sent inside the probe, receiver
# and hub scripts (see _script), so they use only the standard library and no module globals.


def cache_dir() -> str:
    env = os.environ.get("EXOLAUNCH_CACHE")
    return os.path.expanduser(env) if env else os.path.join(os.path.expanduser("~"), ".cache", "exolaunch")


def load_hash_cache() -> dict:
    try:
        with open(os.path.join(cache_dir(), "hashes.json")) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_hash_cache(cache: dict) -> None:
    """Atomic replace; concurrent writers lose entries, never corrupt the file."""
    d = cache_dir()
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".hashes.json.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, os.path.join(d, "hashes.json"))
    except OSError:
        pass


def file_sha256(path: str, cache: dict | None = None) -> str:
    """sha256 of a file, from `cache` when its path, size and mtime are unchanged."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = [st.st_size, st.st_mtime_ns]
    if cache is not None:
        hit = cache.get(real)
        if isinstance(hit, list) and hit[:2] == key:
            return hit[2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    digest = h.hexdigest()
    if cache is not None:
        cache[real] = key + [digest]
    return digest


def free_bytes(path: str) -> tuple[int, str]:
    """Free bytes on the filesystem that would hold `path` (its nearest existing ancestor)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return shutil.disk_usage(p).free, p


def compare_files(dest: str, files: list, hash_cache: dict) -> dict:
    """What is at dest for each [rel, size, sha]: {rel: ["same"|"missing"|"partial"|"differs", size]}."""
    out = {}
    for rel, size, sha in files:
        p = os.path.join(dest, rel)
        if not os.path.isfile(p):
            out[rel] = ["missing", 0]
            continue
        have = os.path.getsize(p)
        if have < size:
            out[rel] = ["partial", have]
        elif have > size:
            out[rel] = ["differs", have]
        else:
            out[rel] = ["same" if file_sha256(p, hash_cache) == sha else "differs", have]
    return out


def bytes_needed(files: list, state: dict) -> int:
    """Bytes a copy adds at the destination: partial files grow in place, others are rewritten."""
    n = 0
    for rel, size, _ in files:
        kind, have = state[rel]
        if kind == "partial":
            n += size - have
        elif kind == "differs":
            n += max(0, size - have)
        elif kind == "missing":
            n += size
    return n


def layer_range(n_layers: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the layers pipeline rank `rank` of `size` holds, as mlx-lm's
    PipelineMixin.pipeline splits them: evenly, low ranks get the extra layers, and rank r runs
    the layers after those of ranks r+1..size-1 (the last rank holds the first layers)."""
    base, extra = divmod(n_layers, size)
    split = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(split[rank + 1:])
    return start, start + split[rank]


def config_layers(config: dict) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("num_hidden_layers"), int):
            return c["num_hidden_layers"]
    return None


def pipeline_selection(weight_map: dict, n_layers: int, ranks: list, size: int) -> set:
    """Safetensors files the given pipeline ranks load (mlx_lm.sharded_load's rule: a tensor of
    layer L goes to the stage holding L; tensors outside any layer go to every stage)."""
    ranges = [layer_range(n_layers, r, size) for r in ranks]
    out = set()
    for key, fname in weight_map.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        if m is None or any(s <= int(m.group(1)) < e for s, e in ranges):
            out.add(fname)
    return out


# ============================================================================= model files


def uses_default_pipeline_split(model_type: str | None) -> bool:
    """True when mlx-lm's model for model_type pipelines with PipelineMixin's even split.
    Models with their own split (or unknown here) make every stage fetch every file."""
    if not model_type:
        return False
    try:
        import importlib

        from mlx_lm.models.pipeline import PipelineMixin
        from mlx_lm.utils import MODEL_REMAPPING

        mod = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    except Exception:
        return False
    mixins = [c for c in vars(mod).values()
              if isinstance(c, type) and issubclass(c, PipelineMixin) and c is not PipelineMixin]
    return bool(mixins) and all(
        all("pipeline" not in vars(k) for k in c.__mro__ if k is not PipelineMixin and k is not object)
        for c in mixins)


def list_model_files(model_dir: Path) -> list[str]:
    """Relative paths of the files to stage (symlinks followed), sorted, LAST_FILES at the end."""
    out = []
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        dirs.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), model_dir).replace(os.sep, "/")
            if not _SKIP_RE.search(rel) and os.path.isfile(os.path.join(root, n)):
                out.append(rel)
    return sorted(out, key=lambda r: (r.rsplit("/", 1)[-1] in LAST_FILES, r))


def files_for_ranks(model_dir: Path, hostfile: Hostfile, sharding: str = "tensor") -> dict[str, set[str] | None]:
    """{host name: relative paths its ranks need}, None meaning every file.

    Tensor parallel ranks need everything. Pipeline ranks need the shared files (config,
    tokenizer, everything but *.safetensors) and the safetensors holding their layers, their
    non-layer tensors (embeddings, norm, head) included."""
    if sharding == "tensor":
        return {h.name: None for h in hostfile.hosts}
    if sharding != "pipeline":
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        raise ConfigError(f"{model_dir}: pipeline sharding needs model.safetensors.index.json (to fetch only "
                          "each stage's layers). Fix: use --sharding tensor, or re-save with mlx_lm.convert.")
    config = json.loads((model_dir / "config.json").read_text())
    n_layers = config_layers(config)
    if n_layers is None or not uses_default_pipeline_split(config.get("model_type")):
        return {h.name: None for h in hostfile.hosts}
    weight_map = json.loads(index_path.read_text())["weight_map"]
    shared = [f for f in list_model_files(model_dir) if not f.endswith(".safetensors")]
    world = hostfile.world_size
    if n_layers < world:
        raise ConfigError(f"{model_dir.name}: {n_layers} layers cannot be split into {world} pipeline stages.")
    out: dict[str, set[str] | None] = {}
    for h in hostfile.hosts:
        ranks = [r.rank for r in hostfile.ranks() if r.host.name == h.name]
        out[h.name] = set(shared) | pipeline_selection(weight_map, n_layers, ranks, world)
    return out


# ============================================================================= remote scripts

_SHARED_FUNCS = (cache_dir, load_hash_cache, save_hash_cache, file_sha256, free_bytes, compare_files,
                 bytes_needed, layer_range, config_layers, pipeline_selection)


def _script(main: str) -> str:
    head = ("from __future__ import annotations\nimport hashlib, json, os, re, shutil, subprocess, sys, "
            "threading, time\n\n")
    return head + "\n\n".join(inspect.getsource(f) for f in _SHARED_FUNCS) + "\n\n" + main


_PROBE_MAIN = r'''
def _rsync_version():
    exe = shutil.which("rsync")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return None
    m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)", out)
    return [int(m.group(1)), int(m.group(2))] if m else None


def main():
    p = json.loads(sys.stdin.readline())
    os.environ.update(p.get("env") or {})
    dest = os.path.abspath(os.path.expanduser(p["dest"]))
    cache = load_hash_cache()
    state = compare_files(dest, p["files"], cache)
    save_hash_cache(cache)
    need = bytes_needed(p["files"], state)
    free, at = free_bytes(dest)
    out = {"state": state, "need": need, "free": free, "free_at": at, "rsync": _rsync_version(), "dest": dest}
    if need <= free and need > 0:
        try:
            os.makedirs(dest, exist_ok=True)
        except OSError as e:
            out["error"] = "cannot create %s: %s" % (dest, e.strerror or e)
    print("@@probe " + json.dumps(out), flush=True)


main()
'''

_RECEIVE_MAIN = r'''
def main():
    inp = sys.stdin.buffer
    p = json.loads(inp.readline())
    dest = p["dest"]
    done = []
    while True:
        hdr = json.loads(inp.readline() or b'{"end": true}')
        if hdr.get("end"):
            break
        path = os.path.join(dest, hdr["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        off, left = hdr["offset"], hdr["size"] - hdr["offset"]
        f = open(path, "r+b" if off else "wb")  # in place: an interrupted copy leaves a resumable prefix
        with f:
            if off:
                f.truncate(off)
                f.seek(off)
            while left:
                b = inp.read(min(left, 1 << 20))
                if not b:
                    raise SystemExit("stream ended inside %s" % hdr["path"])
                f.write(b)
                left -= len(b)
        done.append(hdr["path"])
    cache = load_hash_cache()
    sums = {rel: file_sha256(os.path.join(dest, rel), cache) for rel in done}
    save_hash_cache(cache)
    print("@@received " + json.dumps(sums), flush=True)


main()
'''

_HUB_MAIN = r'''
def emit(kind, obj):
    print("@@%s %s" % (kind, json.dumps(obj)), flush=True)


def fail(e, step):
    msg = str(e).strip().splitlines()
    emit("error", {"type": type(e).__name__, "msg": msg[0] if msg else "", "step": step})
    sys.exit(1)


def main():
    p = json.loads(sys.stdin.readline())
    os.environ.update(p.get("env") or {})
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub import constants
    except Exception as e:
        fail(e, "import")
    repo, local_dir, rev = p["repo"], p.get("local_dir"), p.get("revision")
    kw = {"revision": rev}
    if local_dir:
        kw["local_dir"] = local_dir
    try:
        meta = snapshot_download(repo, allow_patterns=p["meta_patterns"], **kw)
    except Exception as e:
        fail(e, "metadata")
    patterns = list(p["meta_patterns"]) + ["*.safetensors"]
    pipe = p.get("pipeline")
    if pipe:
        try:
            with open(os.path.join(meta, "config.json")) as f:
                n = config_layers(json.load(f))
            with open(os.path.join(meta, "model.safetensors.index.json")) as f:
                wm = json.load(f)["weight_map"]
            if n:
                patterns = list(p["meta_patterns"]) + sorted(pipeline_selection(wm, n, pipe["ranks"], pipe["size"]))
        except (OSError, ValueError, KeyError):
            pass  # no index: every stage takes every file
    import fnmatch
    sizes = {}
    try:
        info = HfApi().model_info(repo, revision=rev, files_metadata=True)
        for s in info.siblings or []:
            if any(fnmatch.fnmatch(s.rfilename, pat) for pat in patterns):
                sizes[s.rfilename] = s.size or 0
    except Exception:
        sizes = {}
    have = 0
    for name, size in sizes.items():
        q = os.path.join(meta, name)
        if os.path.isfile(q) and os.path.getsize(q) == size:
            have += size
    total = sum(sizes.values())
    where = local_dir or constants.HF_HUB_CACHE
    free, at = free_bytes(where)
    if total - have > free:
        emit("nospace", {"need": total - have, "free": free, "at": at})
        sys.exit(1)
    emit("start", {"total": total, "have": have, "files": len(sizes)})
    stop = threading.Event()

    def watch():
        roots = [local_dir] if local_dir else [os.path.dirname(os.path.dirname(meta))]
        while not stop.wait(0.5):
            n = 0
            for r in roots:
                for d, _, names in os.walk(r):
                    for x in names:
                        try:
                            st = os.lstat(os.path.join(d, x))
                        except OSError:
                            continue
                        if not os.path.islink(os.path.join(d, x)):
                            n += st.st_size
            emit("progress", {"bytes": n})

    threading.Thread(target=watch, daemon=True).start()
    try:
        path = snapshot_download(repo, allow_patterns=patterns, **kw)
    except Exception as e:
        stop.set()
        fail(e, "download")
    stop.set()
    emit("done", {"path": path, "total": total})


main()
'''

PROBE_SCRIPT = _script(_PROBE_MAIN)
RECEIVE_SCRIPT = _script(_RECEIVE_MAIN)
HUB_SCRIPT = _script(_HUB_MAIN)


# ============================================================================= report


@dataclass
class HostResult:
    name: str
    dest: str = ""
    method: str = ""  # rsync | stream | in place | hub
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # partial files continued, not restarted
    bytes: int = 0  # bytes the copy had to add
    wire_bytes: int = 0  # bytes actually sent (rsync's "Total bytes sent", or the stream's payload)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Report:
    model: str
    source: str  # local directory staged from, or the repo id
    hosts: list[HostResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts)

    @property
    def failed(self) -> list[HostResult]:
        return [h for h in self.hosts if not h.ok]

    def host(self, name: str) -> HostResult:
        return next(h for h in self.hosts if h.name == name)

    def dest(self, name: str) -> str:
        return self.host(name).dest

    def to_dict(self) -> dict:
        return {"model": self.model, "source": self.source, "ok": self.ok,
                "hosts": [dataclasses.asdict(h) for h in self.hosts]}

    def render(self) -> str:
        head = ["host", "method", "copied", "skipped", "bytes", "sent", "seconds", "status", "destination"]
        rows = [[h.name, h.method or "-", str(len(h.copied)), str(len(h.skipped)), human(h.bytes),
                 human(h.wire_bytes), f"{h.seconds:.1f}", "ok" if h.ok else "FAILED", h.dest]
                for h in self.hosts]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
        for h in self.failed:
            lines.append(f"{h.name}: {h.error}")
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# ============================================================================= progress display


class Progress:
    """One bar per host on a terminal (rich); plain `host: ...` lines otherwise."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.tasks: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.rich = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress as RP, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self.rich = RP(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(file=self.stream), transient=False)
        self.enabled = enabled

    def __enter__(self):
        if self.rich:
            self.rich.start()
        return self

    def __exit__(self, *exc):
        if self.rich:
            self.rich.stop()

    def say(self, host: str, msg: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            if self.rich:
                self.rich.console.print(f"{host}: {msg}", markup=False, highlight=False)
            else:
                print(f"{host}: {msg}", file=self.stream, flush=True)

    def start(self, host: str, total: int) -> None:
        if self.rich:
            with self.lock:
                self.totals[host] = max(total, 1)
                self.tasks[host] = self.rich.add_task(host, total=self.totals[host])

    def update(self, host: str, completed: int) -> None:
        if self.rich and host in self.tasks:
            with self.lock:
                self.rich.update(self.tasks[host], completed=min(completed, self.totals[host]))

    def finish(self, host: str) -> None:
        if self.rich and host in self.tasks:
            with self.lock:
                self.rich.update(self.tasks[host], completed=self.totals[host])


# ============================================================================= running remote code


class _Procs:
    """Child processes of one stage/pull, ended together on Ctrl-C or error."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.cancelled = False

    def popen(self, argv, **kw) -> subprocess.Popen:
        with self.lock:
            if self.cancelled:
                raise KeyboardInterrupt
            p = subprocess.Popen(argv, **kw)
            self.procs.append(p)
            return p

    def kill_all(self) -> None:
        with self.lock:
            self.cancelled = True
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def _python_argv(host: Host, script: str, sopts: ssh.SshOptions) -> list[str]:
    remote = [host_python(host), "-c", script]
    return remote if host.is_local else ssh.remote_argv(sopts, host, remote)


def _run_script(procs: _Procs, host: Host, script: str, params: dict, sopts: ssh.SshOptions,
                on_line: Callable[[str, dict], None] | None = None, timeout: float | None = None) -> tuple[dict, str, int]:
    """Run a script on host with params on stdin; returns ({kind: last payload}, stderr tail, rc)."""
    p = procs.popen(_python_argv(host, script, sopts), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, bufsize=1)
    err: list[str] = []
    t = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
    t.start()
    try:
        p.stdin.write(json.dumps(params) + "\n")
        p.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    got: dict = {}
    for line in p.stdout:
        if line.startswith("@@"):
            kind, _, payload = line[2:].partition(" ")
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            got[kind] = obj
            if on_line:
                on_line(kind, obj)
    rc = p.wait(timeout=timeout)
    t.join(timeout=5)
    return got, _tail(err), rc


def _tail(lines: list[str], n: int = 3) -> str:
    keep = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("Warning: Permanently added")]
    return " | ".join(keep[-n:])


def _ssh_failure(host: Host, rc: int, err: str, what: str) -> str:
    if rc == 255 and not host.is_local:
        return f"cannot reach {host.ssh} over SSH ({err or 'ssh exit 255'}). Fix: check `exolaunch doctor`."
    return f"{what} failed (exit {rc}): {err or 'no output'}"


# ============================================================================= staging


@dataclass
class _Source:
    root: Path  # local directory everything is relative to
    files: list[str]  # relative to root, in copy order (LAST_FILES at the end)
    name: str  # name under $EXOLAUNCH_MODELS
    model_prefix: str = ""  # where the model files sit under root ("snapshots/REV/" for an HF cache)


def _source_for(model_dir: Path, wanted: set[str] | None) -> _Source:
    """Files to stage from model_dir; for a Hugging Face cache snapshot the root is the repo's
    cache directory so the remote copy has the same layout (snapshots/REV and refs/)."""
    model_dir = Path(model_dir)
    files = list_model_files(model_dir)
    if wanted is not None:
        files = [f for f in files if f in wanted]
    snap = model_dir.parent
    if snap.name == "snapshots" and snap.parent.name.startswith("models--"):
        root = snap.parent
        prefix = f"snapshots/{model_dir.name}/"
        refs = [f"refs/{r}" for r in sorted(os.listdir(root / "refs"))] if (root / "refs").is_dir() else []
        name = root.name[len("models--"):]
        return _Source(root, [prefix + f for f in files] + refs, name, prefix)
    return _Source(model_dir, files, model_dir.name)


def destination(host: Host, hostfile: Hostfile, src_root: Path, name: str, dest: str | None) -> str:
    if dest:  # relative or ~ paths: on each host, relative to that host's home directory
        return os.path.expanduser(dest) if host.is_local else dest
    root = host.env.get(MODELS_ENV) or hostfile.env.get(MODELS_ENV)
    if root:
        return os.path.join(root, name)
    return str(Path(src_root).resolve())


def stage(model_dir: str | os.PathLike, hostfile: Hostfile, *, dest: str | None = None,
          ranks_files: dict | None = None, method: str = "auto", bwlimit: int | None = None,
          sopts: ssh.SshOptions | None = None, progress: Progress | None = None,
          hosts: Iterable[str] | None = None) -> Report:
    """Copy model_dir to every host of hostfile (in parallel); see the module docstring.

    ranks_files: {host name or rank number: relative paths that host/rank needs} (None or a
    missing host: every file). method: auto | rsync | stream. bwlimit: KiB/s per host.
    Never raises for a host's failure: it is in the Report (report.ok, report.failed)."""
    if method not in ("auto", "rsync", "stream"):
        raise ConfigError(f"--method {method!r}: expected auto, rsync or stream.")
    model_dir = Path(model_dir).expanduser().resolve()
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such directory.")
    sopts = sopts or ssh.SshOptions(config=hostfile.ssh_config, options=dict(hostfile.ssh_options or {}))
    progress = progress or Progress(enabled=False)
    wanted = _wanted_per_host(hostfile, ranks_files)
    targets = [h for h in hostfile.hosts if hosts is None or h.name in set(hosts)]
    local_hashes = load_hash_cache()
    sources = {h.name: _source_for(model_dir, wanted.get(h.name)) for h in targets}
    digests: dict[str, str] = {}  # absolute local path -> sha256
    for s in sources.values():
        for rel in s.files:
            key = str(s.root / rel)
            if key not in digests:
                digests[key] = file_sha256(key, local_hashes)
    save_hash_cache(local_hashes)
    report = Report(model=model_dir.name, source=str(model_dir))
    report.hosts = [HostResult(h.name) for h in targets]
    procs = _Procs()
    threads = []
    for h, res in zip(targets, report.hosts):
        src = sources[h.name]
        res.dest = destination(h, hostfile, src.root, src.name, dest)
        if dest and src.model_prefix:  # --dest is the model directory itself: flatten the HF layout
            src = _Source(src.root / src.model_prefix, [f[len(src.model_prefix):] for f in src.files
                                                          if f.startswith(src.model_prefix)], src.name)
        env = {**hostfile.env, **h.env}
        t = threading.Thread(target=_stage_host, args=(procs, h, src, digests, res, env, method, bwlimit,
                                                       sopts, progress), daemon=True)
        threads.append(t)
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        procs.kill_all()
        raise
    return report


def _wanted_per_host(hostfile: Hostfile, ranks_files: dict | None) -> dict[str, set[str] | None]:
    if not ranks_files:
        return {}
    by_rank = {r.rank: r.host.name for r in hostfile.ranks()}
    out: dict[str, set[str] | None] = {}
    for key, files in ranks_files.items():
        name = by_rank.get(key, key) if isinstance(key, int) else key
        if files is None or out.get(name, set()) is None:
            out[name] = None
        else:
            out[name] = set(out.get(name) or set()) | set(files)
    return out


def _stage_host(procs: _Procs, host: Host, src: _Source, digests: dict, res: HostResult, env: dict,
                method: str, bwlimit: int | None, sopts: ssh.SshOptions, progress: Progress) -> None:
    t0 = time.monotonic()
    try:
        _stage_host_inner(procs, host, src, digests, res, env, method, bwlimit, sopts, progress)
    except KeyboardInterrupt:
        res.error = "interrupted"
    except Exception as e:  # one host's trouble must not hide the others' results
        res.error = res.error or f"{type(e).__name__}: {e}"
    res.seconds = time.monotonic() - t0
    progress.say(res.name, ("done: " if res.ok else "FAILED: ") +
                 (f"{len(res.copied)} copied, {len(res.skipped)} skipped, {human(res.wire_bytes)} sent "
                  f"in {res.seconds:.1f} s" if res.ok else res.error))


def _stage_host_inner(procs, host, src, digests, res, env, method, bwlimit, sopts, progress) -> None:
    files = [[rel, (src.root / rel).stat().st_size, digests[str(src.root / rel)]] for rel in src.files]
    sizes = {rel: size for rel, size, _ in files}
    if host.is_local and os.path.realpath(res.dest) == str(src.root.resolve()):
        res.method, res.skipped = "in place", list(src.files)
        return
    got, err, rc = _run_script(procs, host, PROBE_SCRIPT, {"dest": res.dest, "files": files, "env": env}, sopts)
    probe = got.get("probe")
    if probe is None:
        res.error = _ssh_failure(host, rc, err, "the destination probe")
        return
    state = probe["state"]
    res.dest = probe.get("dest") or res.dest
    res.skipped = [rel for rel in src.files if state[rel][0] == "same"]
    todo = [rel for rel in src.files if state[rel][0] != "same"]
    res.bytes = probe["need"]
    if not todo:
        res.method = "none needed"
        return
    if probe["need"] > probe["free"]:
        res.error = (f"not enough disk space: {human(probe['need'])} ({probe['need']} bytes) to copy to "
                     f"{res.dest}, but only {human(probe['free'])} ({probe['free']} bytes) free on the filesystem "
                     f"of {probe['free_at']}. Fix: free some space there, or pick another --dest / {MODELS_ENV}.")
        return
    if probe.get("error"):
        res.error = probe["error"]
        return
    use_rsync = method == "rsync" or (method == "auto" and _rsync_ok(probe.get("rsync")) and _local_rsync_ok())
    if method == "rsync" and not (_rsync_ok(probe.get("rsync")) and _local_rsync_ok()):
        res.error = f"rsync >= {'.'.join(map(str, MIN_RSYNC))} is missing here or on {host.name}. Fix: --method stream."
        return
    res.method = "rsync" if use_rsync else "stream"
    res.resumed = [rel for rel in todo if state[rel][0] == "partial"]
    progress.say(host.name, f"{len(todo)} file(s) to copy ({human(res.bytes)}), {len(res.skipped)} already there "
                            f"[{res.method} -> {res.dest}]")
    progress.start(host.name, sum(sizes[r] - (state[r][1] if state[r][0] == "partial" else 0) for r in todo))
    if use_rsync:
        _copy_rsync(procs, host, src, todo, state, res, bwlimit, sopts, progress)
    else:
        _copy_stream(procs, host, src, todo, state, res, digests, bwlimit, sopts, progress)
    if res.ok:
        res.copied = todo
        progress.finish(host.name)


def _rsync_ok(v) -> bool:
    return bool(v) and tuple(v) >= MIN_RSYNC


_local_rsync_cache: list = []


def _local_rsync_ok() -> bool:
    if not _local_rsync_cache:
        exe = shutil.which("rsync")
        ok = False
        if exe:
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
                m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)", out)
                ok = bool(m) and (int(m.group(1)), int(m.group(2))) >= MIN_RSYNC
            except (OSError, subprocess.SubprocessError):
                ok = False
        _local_rsync_cache.append(ok)
    return _local_rsync_cache[0]


def rsync_argv(host: Host, src_root: Path, dest: str, sopts: ssh.SshOptions, *, resume: bool,
               bwlimit: int | None = None) -> list[str]:
    """rsync reading NUL-separated relative paths on stdin. resume: missing and partial files,
    written in place and appended to (verified by rsync's whole-file checksum, re-sent if it
    fails); else files whose content differs, re-sent whole (-I: ignore size/mtime)."""
    argv = ["rsync", "-s", "-t", "-L", "--partial", "--files-from=-", "--from0", "--info=progress2",
            "--stats", "--no-human-readable"]
    argv += ["--inplace", "--append-verify"] if resume else ["-I"]
    if bwlimit:
        argv.append(f"--bwlimit={int(bwlimit)}")
    target = dest.rstrip("/") + "/"
    if not host.is_local:
        argv += ["-e", shlex.join(ssh.base_argv(sopts, host.port))]
        target = f"{host.ssh}:{target}"
    return argv + ["--", str(src_root) + "/", target]


_PROGRESS_RE = re.compile(rb"^\s*([\d,]+)\s+\d+%")
_SENT_RE = re.compile(r"Total bytes sent:\s*([\d,]+)")


def _copy_rsync(procs, host, src, todo, state, res, bwlimit, sopts, progress) -> None:
    last = [r for r in todo if Path(r).name in LAST_FILES]
    resume = [r for r in todo if r not in last and state[r][0] in ("missing", "partial")]
    redo = [r for r in todo if r not in last and state[r][0] == "differs"]
    done_before = 0
    for group, is_resume in ((resume, True), (redo, False), (last, False)):
        if not group:
            continue
        argv = rsync_argv(host, src.root, res.dest, sopts, resume=is_resume, bwlimit=bwlimit)
        p = procs.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err: list[bytes] = []
        te = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
        te.start()
        try:
            p.stdin.write(b"\0".join(r.encode() for r in group) + b"\0")
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        out = b""
        buf = b""
        while True:
            chunk = p.stdout.read1(65536) if hasattr(p.stdout, "read1") else p.stdout.read(65536)
            if not chunk:
                break
            out += chunk
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for part in parts:
                m = _PROGRESS_RE.match(part)
                if m:
                    progress.update(host.name, done_before + int(m.group(1).replace(b",", b"")))
        rc = p.wait()
        te.join(timeout=5)
        text = out.decode(errors="replace")
        m = _SENT_RE.search(text)
        if m:
            res.wire_bytes += int(m.group(1).replace(",", ""))
        done_before += sum((src.root / r).stat().st_size for r in group)
        if rc != 0:
            etext = _tail([ln.decode(errors="replace") for ln in err])
            res.error = (_ssh_failure(host, rc, etext, "rsync") if rc == 255 else
                         f"rsync failed (exit {rc}): {etext or 'no output'}")
            return


def _copy_stream(procs, host, src, todo, state, res, digests, bwlimit, sopts, progress) -> None:
    """Frames into the receiver script; files whose hash then differs are re-sent whole once."""
    offsets = {r: (state[r][1] if state[r][0] == "partial" else 0) for r in todo}
    ordered = [r for r in todo if Path(r).name not in LAST_FILES] + [r for r in todo if Path(r).name in LAST_FILES]
    sent_total = 0
    for attempt in range(2):
        p = procs.popen(_python_argv(host, RECEIVE_SCRIPT, sopts), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
        err: list[bytes] = []
        outb: list[bytes] = []
        threads = [threading.Thread(target=lambda: err.extend(p.stderr), daemon=True),
                   threading.Thread(target=lambda: outb.append(p.stdout.read()), daemon=True)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        sent = 0
        try:
            p.stdin.write(json.dumps({"dest": res.dest}).encode() + b"\n")
            for rel in ordered:
                size = (src.root / rel).stat().st_size
                off = offsets[rel]
                p.stdin.write(json.dumps({"path": rel, "offset": off, "size": size}).encode() + b"\n")
                with open(src.root / rel, "rb") as f:
                    f.seek(off)
                    while True:
                        b = f.read(1 << 20 if not bwlimit else max(4096, bwlimit * 1024 // 10))
                        if not b:
                            break
                        p.stdin.write(b)
                        sent += len(b)
                        progress.update(host.name, sent_total + sent)
                        if bwlimit:
                            ahead = sent / (bwlimit * 1024) - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)
            p.stdin.write(b'{"end": true}\n')
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        rc = p.wait()
        for t in threads:
            t.join(timeout=5)
        sent_total += sent
        res.wire_bytes = sent_total
        text = b"".join(outb).decode(errors="replace")
        m = re.search(r"^@@received (.*)$", text, re.M)
        if rc != 0 or not m:
            res.error = _ssh_failure(host, rc, _tail([ln.decode(errors="replace") for ln in err]), "the receiver")
            return
        sums = json.loads(m.group(1))
        bad = [r for r in ordered if sums.get(r) != digests[str(src.root / r)]]
        if not bad:
            return
        if attempt == 0:  # a resumed prefix was not what we have: send those files whole
            ordered, offsets = bad, {r: 0 for r in bad}
            res.resumed = [r for r in res.resumed if r not in bad]
            continue
        res.error = f"after copying, {len(bad)} file(s) still differ from the source: {', '.join(bad[:3])}"


# ============================================================================= hub fetch


_OFFLINE_TYPES = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout",
                  "ReadTimeout", "Timeout", "MaxRetryError", "NewConnectionError", "ConnectTimeoutError",
                  "ProxyError", "SSLError", "ConnectError", "TimeoutException"}
_REFUSED_TYPES = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
                  "HfHubHTTPError", "HTTPError"}


def hub_error(host: str, repo: str, e: dict) -> str:
    kind, msg = e.get("type", "Error"), e.get("msg", "").rstrip(". ")
    err = f"{kind}: {msg}" if msg else kind
    if e.get("step") == "import":
        return (f"host {host} has no huggingface_hub for its Python ({err}). "
                "Fix: pip install huggingface-hub on that host, or use --stage.")
    if kind in _OFFLINE_TYPES or "offline" in msg.lower() or "connection" in msg.lower():
        return f"host {host} cannot reach the Hugging Face Hub: {err}. Fix: use --stage."
    if kind in _REFUSED_TYPES:
        return (f"host {host}: the Hugging Face Hub refused {repo}: {err}. "
                "Fix: check the repo id, or set HF_TOKEN in the hostfile's env for a gated/private repo.")
    return f"host {host}: fetching {repo} failed: {err}"


def hub_pull(repo: str, hostfile: Hostfile, *, sharding: str = "tensor", dest: str | None = None,
             revision: str | None = None, sopts: ssh.SshOptions | None = None,
             progress: Progress | None = None) -> Report:
    """Every host fetches what its ranks need from the hub itself (resumable, by huggingface_hub)."""
    if sharding not in ("tensor", "pipeline"):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    sopts = sopts or ssh.SshOptions(config=hostfile.ssh_config, options=dict(hostfile.ssh_options or {}))
    progress = progress or Progress(enabled=False)
    report = Report(model=repo, source=repo, hosts=[HostResult(h.name, method="hub") for h in hostfile.hosts])
    procs = _Procs()
    world = hostfile.world_size
    rank_of = {h.name: [r.rank for r in hostfile.ranks() if r.host.name == h.name] for h in hostfile.hosts}

    def one(h: Host, res: HostResult) -> None:
        t0 = time.monotonic()
        root = h.env.get(MODELS_ENV) or hostfile.env.get(MODELS_ENV)
        local_dir = dest or (os.path.join(root, repo.replace("/", "--")) if root else None)
        params = {"repo": repo, "revision": revision, "local_dir": local_dir, "meta_patterns": META_PATTERNS,
                  "env": {**hostfile.env, **h.env},
                  "pipeline": {"ranks": rank_of[h.name], "size": world} if sharding == "pipeline" else None}

        def on_line(kind, obj):
            if kind == "start":
                res.bytes = obj["total"] - obj["have"]
                progress.say(h.name, f"fetching {obj['files']} file(s), {human(res.bytes)} to download")
                progress.start(h.name, obj["total"])
            elif kind == "progress":
                progress.update(h.name, obj["bytes"])

        try:
            got, err, rc = _run_script(procs, h, HUB_SCRIPT, params, sopts, on_line)
        except KeyboardInterrupt:
            res.error = "interrupted"
            return
        res.seconds = time.monotonic() - t0
        if "done" in got:
            res.dest = got["done"]["path"]
            res.wire_bytes = res.bytes
            progress.finish(h.name)
            progress.say(h.name, f"done in {res.seconds:.1f} s -> {res.dest}")
        elif "nospace" in got:
            n = got["nospace"]
            res.error = (f"not enough disk space: {human(n['need'])} ({n['need']} bytes) to download, but only "
                         f"{human(n['free'])} ({n['free']} bytes) free on the filesystem of {n['at']}. "
                         f"Fix: free some space, or pick another --dest / {MODELS_ENV}.")
        elif "error" in got:
            res.error = hub_error(h.name, repo, got["error"])
        else:
            res.error = _ssh_failure(h, rc, err, "the hub fetch")
        if res.error:
            progress.say(h.name, "FAILED: " + res.error)

    threads = [threading.Thread(target=one, args=(h, r), daemon=True) for h, r in zip(hostfile.hosts, report.hosts)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        procs.kill_all()
        raise
    return report
