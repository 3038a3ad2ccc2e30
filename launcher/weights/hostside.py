"""Code that runs on the hosts as well as here, and the snippets built from it.

Staging and hub pulls send launcher.remote snippets that need the same helpers as this side
(the hash cache, free space, what a destination already holds, the pipeline split). `snippet`
inlines their source ahead of a snippet's main code, so each of these functions uses only the
standard library and no module globals.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import threading

from launcher.weights.files import config_layers, layer_range, pipeline_selection


def cache_dir() -> str:
    env = os.environ.get("EXOLAUNCH_CACHE")  # runtime.contract.ENV_CACHE, spelled out: this runs on hosts
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


def rsync_version() -> list[int] | None:
    """[major, minor] of the rsync on PATH, or None."""
    exe = shutil.which("rsync")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return None
    m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)", out)
    return [int(m.group(1)), int(m.group(2))] if m else None


_SHIPPED = (cache_dir, load_hash_cache, save_hash_cache, file_sha256, free_bytes, compare_files, bytes_needed,
            rsync_version, layer_range, config_layers, pipeline_selection)


def snippet(main: str) -> str:
    """A launcher.remote snippet: the imports and every shipped function, then `main`."""
    head = "import hashlib, json, os, re, shutil, subprocess, sys, threading, time\n\n"
    return head + "\n\n".join(inspect.getsource(f) for f in _SHIPPED) + "\n\n" + main
