"""Hub pulls: every host fetches what its ranks need from the Hugging Face Hub itself.

Each host runs a snippet that calls huggingface_hub.snapshot_download (which resumes an
interrupted download by itself) for the metadata, works out the files its ranks need, checks
their size against the free disk of the host's HF cache (or --dest, or $EXOLAUNCH_MODELS/
owner--repo), then downloads them, reporting progress. A host that cannot reach the hub fails
with "host X cannot reach the Hugging Face Hub: <err>. Fix: use --stage".
"""

from __future__ import annotations

import functools
import os
import time

from launcher import remote, ssh
from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile
from launcher.weights.files import META_PATTERNS, models_root
from launcher.weights.hostside import snippet
from launcher.weights.progress import Progress
from launcher.weights.report import HostPull, PullReport, human, ssh_failure, stderr_tail
from runtime.contract import ENV_MODELS

HUB_SCRIPT = snippet(r'''
def fail(e, step):
    msg = str(e).strip().splitlines()
    say("error", {"type": type(e).__name__, "msg": msg[0] if msg else "", "step": step})
    sys.exit(1)


def main():
    p = PARAMS
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
        say("nospace", {"need": total - have, "free": free, "at": at})
        sys.exit(1)
    say("start", {"total": total, "have": have, "files": len(sizes)})
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
            say("progress", {"bytes": n})

    threading.Thread(target=watch, daemon=True).start()
    try:
        path = snapshot_download(repo, allow_patterns=patterns, **kw)
    except Exception as e:
        stop.set()
        fail(e, "download")
    stop.set()
    say("done", {"path": path, "total": total})


main()
''')


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
             progress: Progress | None = None) -> PullReport:
    """Every host fetches what its ranks need from the hub itself (resumable, by huggingface_hub)."""
    if sharding not in ("tensor", "pipeline"):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    sopts = sopts or ssh.SshOptions(config=hostfile.ssh_config, options=dict(hostfile.ssh_options or {}))
    progress = progress or Progress(enabled=False)
    report = PullReport(model=repo, source=repo, hosts=[HostPull(h.name, method="hub") for h in hostfile.hosts])
    children = remote.Children()
    world = hostfile.world_size
    rank_of = {h.name: [r.rank for r in hostfile.ranks() if r.host.name == h.name] for h in hostfile.hosts}

    def one(h: Host, res: HostPull) -> None:
        t0 = time.monotonic()
        root = models_root(h, hostfile)
        local_dir = dest or (os.path.join(root, repo.replace("/", "--")) if root else None)
        params = {"repo": repo, "revision": revision, "local_dir": local_dir, "meta_patterns": META_PATTERNS,
                  "env": {**hostfile.env, **h.env},
                  "pipeline": {"ranks": rank_of[h.name], "size": world} if sharding == "pipeline" else None}

        def on_answer(kind, obj):
            if kind == "start":
                res.bytes = obj["total"] - obj["have"]
                progress.say(h.name, f"fetching {obj['files']} file(s), {human(res.bytes)} to download")
                progress.start(h.name, obj["total"])
            elif kind == "progress":
                progress.update(h.name, obj["bytes"])

        try:
            r = remote.run(h, HUB_SCRIPT, params, sopts, children=children, on_answer=on_answer)
        except KeyboardInterrupt:
            res.error = "interrupted"
            return
        res.seconds = time.monotonic() - t0
        got = r.answers
        if "done" in got:
            res.dest = got["done"]["path"]
            res.wire_bytes = res.bytes
            progress.finish(h.name)
            progress.say(h.name, f"done in {res.seconds:.1f} s -> {res.dest}")
        elif "nospace" in got:
            n = got["nospace"]
            res.error = (f"not enough disk space: {human(n['need'])} ({n['need']} bytes) to download, but only "
                         f"{human(n['free'])} ({n['free']} bytes) free on the filesystem of {n['at']}. "
                         f"Fix: free some space, or pick another --dest / {ENV_MODELS}.")
        elif "error" in got:
            res.error = hub_error(h.name, repo, got["error"])
        else:
            res.error = ssh_failure(h, r.rc, stderr_tail(r.stderr), "the hub fetch")
        if res.error:
            progress.say(h.name, "FAILED: " + res.error)

    children.run_threads([functools.partial(one, h, r) for h, r in zip(hostfile.hosts, report.hosts)])
    return report
