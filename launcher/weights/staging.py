"""Staging: copy a model directory from here to every host over SSH, all hosts in parallel.

Per host, a probe snippet reports the free disk at the destination and, for every file already
there with the right size, its sha256 (cached in <EXOLAUNCH_CACHE>/hashes.json by path, size and
mtime, on both sides). Files with the same size and hash are skipped; a shorter file is a partial
copy and is resumed (appended, then verified); anything else is copied again. Too little free
space refuses the host before a byte is copied, naming the numbers. Copies go with rsync
(`--partial --inplace --append-verify`) when both ends have rsync >= 3.1, else as a stream of
(header, bytes) frames into a receiver snippet that writes in place and hashes what it wrote.
Nothing from the hostfile or the model passes through a remote shell unquoted: paths travel
inside JSON, rsync runs with --secluded-args (-s).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from launcher import remote, ssh
from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile
from launcher.weights.files import LAST_FILES, list_model_files, models_root
from launcher.weights.hostside import file_sha256, load_hash_cache, rsync_version, save_hash_cache, snippet
from launcher.weights.progress import Progress
from launcher.weights.report import HostPull, PullReport, human, ssh_failure, stderr_tail
from runtime.contract import ENV_MODELS

MIN_RSYNC = (3, 1)  # --append-verify, --info=progress2, -s

PROBE_SCRIPT = snippet(r'''
def main():
    p = PARAMS
    os.environ.update(p.get("env") or {})
    dest = os.path.abspath(os.path.expanduser(p["dest"]))
    cache = load_hash_cache()
    state = compare_files(dest, p["files"], cache)
    save_hash_cache(cache)
    need = bytes_needed(p["files"], state)
    free, at = free_bytes(dest)
    out = {"state": state, "need": need, "free": free, "free_at": at, "rsync": rsync_version(), "dest": dest}
    if need <= free and need > 0:
        try:
            os.makedirs(dest, exist_ok=True)
        except OSError as e:
            out["error"] = "cannot create %s: %s" % (dest, e.strerror or e)
    say("probe", out)


main()
''')

RECEIVE_SCRIPT = snippet(r'''
def main():
    inp = sys.stdin.buffer
    dest = PARAMS["dest"]
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
    say("received", sums)


main()
''')


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
    """Where a staged model goes on a host, first that applies: `dest` (the model directory
    itself), $EXOLAUNCH_MODELS/<name>, else the same absolute path as here (so `run` can use one
    MODEL path on every host; a hub model keeps the HF cache layout there). A host where that
    path already holds identical files (a shared filesystem, this machine) copies nothing."""
    if dest:  # relative or ~ paths: on each host, relative to that host's home directory
        return os.path.expanduser(dest) if host.is_local else dest
    root = models_root(host, hostfile)
    if root:
        return os.path.join(root, name)
    return str(Path(src_root).resolve())


def stage(model_dir: str | os.PathLike, hostfile: Hostfile, *, dest: str | None = None,
          ranks_files: dict | None = None, method: str = "auto", bwlimit: int | None = None,
          sopts: ssh.SshOptions | None = None, progress: Progress | None = None,
          hosts: Iterable[str] | None = None) -> PullReport:
    """Copy model_dir to every host of hostfile (in parallel); see the module docstring.

    ranks_files: {host name or rank number: relative paths that host/rank needs} (None or a
    missing host: every file). method: auto | rsync | stream. bwlimit: KiB/s per host.
    Never raises for a host's failure: it is in the report (report.ok, report.failed)."""
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
    report = PullReport(model=model_dir.name, source=str(model_dir))
    report.hosts = [HostPull(h.name) for h in targets]
    children = remote.Children()
    jobs = []
    for h, res in zip(targets, report.hosts):
        src = sources[h.name]
        res.dest = destination(h, hostfile, src.root, src.name, dest)
        if dest and src.model_prefix:  # --dest is the model directory itself: flatten the HF layout
            src = _Source(src.root / src.model_prefix, [f[len(src.model_prefix):] for f in src.files
                                                          if f.startswith(src.model_prefix)], src.name)
        env = {**hostfile.env, **h.env}
        jobs.append(functools.partial(_stage_host, children, h, src, digests, res, env, method, bwlimit,
                                      sopts, progress))
    children.run_threads(jobs)
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


def _stage_host(children: remote.Children, host: Host, src: _Source, digests: dict, res: HostPull, env: dict,
                method: str, bwlimit: int | None, sopts: ssh.SshOptions, progress: Progress) -> None:
    t0 = time.monotonic()
    try:
        _stage_host_inner(children, host, src, digests, res, env, method, bwlimit, sopts, progress)
    except KeyboardInterrupt:
        res.error = "interrupted"
    except Exception as e:  # one host's trouble must not hide the others' results
        res.error = res.error or f"{type(e).__name__}: {e}"
    res.seconds = time.monotonic() - t0
    progress.say(res.name, ("done: " if res.ok else "FAILED: ") +
                 (f"{len(res.copied)} copied, {len(res.skipped)} skipped, {human(res.wire_bytes)} sent "
                  f"in {res.seconds:.1f} s" if res.ok else res.error))


def _stage_host_inner(children, host, src, digests, res, env, method, bwlimit, sopts, progress) -> None:
    files = [[rel, (src.root / rel).stat().st_size, digests[str(src.root / rel)]] for rel in src.files]
    sizes = {rel: size for rel, size, _ in files}
    if host.is_local and os.path.realpath(res.dest) == str(src.root.resolve()):
        res.method, res.skipped = "in place", list(src.files)
        return
    r = remote.run(host, PROBE_SCRIPT, {"dest": res.dest, "files": files, "env": env}, sopts, children=children)
    probe = r.answers.get("probe")
    if probe is None:
        res.error = ssh_failure(host, r.rc, stderr_tail(r.stderr), "the destination probe")
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
                     f"of {probe['free_at']}. Fix: free some space there, or pick another --dest / {ENV_MODELS}.")
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
        _copy_rsync(children, host, src, todo, state, res, bwlimit, sopts, progress)
    else:
        _copy_stream(children, host, src, todo, state, res, digests, bwlimit, sopts, progress)
    if res.ok:
        res.copied = todo
        progress.finish(host.name)


def _rsync_ok(v) -> bool:
    return bool(v) and tuple(v) >= MIN_RSYNC


@functools.cache
def _local_rsync_ok() -> bool:
    return _rsync_ok(rsync_version())


# ----------------------------------------------------------------------------- rsync


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


def _copy_rsync(children, host, src, todo, state, res, bwlimit, sopts, progress) -> None:
    last = [r for r in todo if Path(r).name in LAST_FILES]
    resume = [r for r in todo if r not in last and state[r][0] in ("missing", "partial")]
    redo = [r for r in todo if r not in last and state[r][0] == "differs"]
    done_before = 0
    for group, is_resume in ((resume, True), (redo, False), (last, False)):
        if not group:
            continue
        argv = rsync_argv(host, src.root, res.dest, sopts, resume=is_resume, bwlimit=bwlimit)
        p = children.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
            etext = stderr_tail([ln.decode(errors="replace") for ln in err])
            res.error = (ssh_failure(host, rc, etext, "rsync") if rc == 255 else
                         f"rsync failed (exit {rc}): {etext or 'no output'}")
            return


# ----------------------------------------------------------------------------- stream


def _copy_stream(children, host, src, todo, state, res, digests, bwlimit, sopts, progress) -> None:
    """Frames into the receiver snippet; files whose hash then differs are re-sent whole once."""
    offsets = {r: (state[r][1] if state[r][0] == "partial" else 0) for r in todo}
    ordered = [r for r in todo if Path(r).name not in LAST_FILES] + [r for r in todo if Path(r).name in LAST_FILES]
    sent_total = 0
    for attempt in range(2):
        with remote.Snippet(host, RECEIVE_SCRIPT, {"dest": res.dest}, sopts, children=children) as rx:
            sent = _send_frames(rx, src.root, ordered, offsets, bwlimit,
                                lambda n: progress.update(host.name, sent_total + n))
            rx.close_stdin()
            got = dict(rx.answers())
            rc = rx.wait()
            err = rx.errors()
        sent_total += sent
        res.wire_bytes = sent_total
        sums = got.get("received")
        if rc != 0 or sums is None:
            res.error = ssh_failure(host, rc, stderr_tail(err), "the receiver")
            return
        bad = [r for r in ordered if sums.get(r) != digests[str(src.root / r)]]
        if not bad:
            return
        if attempt == 0:  # a resumed prefix was not what we have: send those files whole
            ordered, offsets = bad, {r: 0 for r in bad}
            res.resumed = [r for r in res.resumed if r not in bad]
            continue
        res.error = f"after copying, {len(bad)} file(s) still differ from the source: {', '.join(bad[:3])}"


def _send_frames(rx: remote.Snippet, root: Path, files: list[str], offsets: dict[str, int], bwlimit: int | None,
                 on_sent: Callable[[int], None]) -> int:
    """A (header, bytes) frame per file from its offset, then the end mark, at most bwlimit
    KiB/s; stops early once the receiver is gone. Returns the file bytes sent."""
    t0 = time.monotonic()
    sent = 0
    for rel in files:
        size = (root / rel).stat().st_size
        off = offsets[rel]
        if not rx.send(json.dumps({"path": rel, "offset": off, "size": size}).encode() + b"\n"):
            return sent
        with open(root / rel, "rb") as f:
            f.seek(off)
            while True:
                b = f.read(1 << 20 if not bwlimit else max(4096, bwlimit * 1024 // 10))
                if not b:
                    break
                if not rx.send(b):
                    return sent
                sent += len(b)
                on_sent(sent)
                if bwlimit:
                    ahead = sent / (bwlimit * 1024) - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
    rx.send(b'{"end": true}\n')
    return sent
