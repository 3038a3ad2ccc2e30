"""Which BLAS a rank's CPU matmuls use (issue 15), decided on each rank's own host.

The Linux CPU wheel of mlx bundles the reference netlib BLAS: a 40x576 by 576x1536 float32
matmul takes ~30 ms with it and ~1-3 ms with OpenBLAS preloaded (its cblas_sgemm wins symbol
lookup), which is a 5-8x faster prefill for float32 models. mlx's own quantized kernels do not
use BLAS. macOS ranks use Accelerate and Metal, so nothing changes there.

The launcher passes the user's choice in EXOLAUNCH_BLAS (`--blas`); the agent, which starts
every rank on its host (locally, over SSH, under mpirun), resolves it there, because the
library's path is the host's business. Standard library only: the agent imports this.
"""

from __future__ import annotations

import os
import sys

from runtime.contract import ENV_BLAS, ENV_LOCAL_WORLD_SIZE

MODES = ("auto", "openblas", "bundled")  # or a path to a BLAS library
# Where distributions put the pthread build of OpenBLAS (Debian/Ubuntu multiarch, Fedora, Arch).
CANDIDATES = tuple(
    f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0" for arch in ("x86_64", "aarch64")
) + ("/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0",
     "/usr/lib/libopenblas.so")
INSTALL_HINT = "apt-get install libopenblas0-pthread (Debian/Ubuntu) or dnf install openblas (Fedora)"
# OpenBLAS kernel families by the x86 CPU flags they need, best first (OPENBLAS_CORETYPE names).
CORE_TYPES = (("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}), ("Haswell", {"avx2", "fma"}))


def check_mode(value: str) -> str:
    """`--blas` as given: a mode, or a path (checked on each host, where it must exist)."""
    if value in MODES or os.path.isabs(value):
        return value
    raise ValueError(f"--blas {value!r}: expected auto, openblas, bundled or an absolute path to a BLAS library.")


def find_openblas(candidates=CANDIDATES) -> str | None:
    return next((p for p in candidates if os.path.exists(p)), None)


def core_type(cpuinfo: str) -> str | None:
    """The OpenBLAS kernels this x86 CPU can run (None elsewhere). OpenBLAS picks its kernels from
    the CPU's model number; on a model it does not know (a VM's generic "Intel Xeon Processor",
    a CPU newer than the distribution's library) it falls back to SSE3 ("Prescott"). Measured on
    such a VM with Debian's 0.3.21: a 2048x256 by 256x704 sgemm took 41 ms there, 5.5 ms with
    the AVX-512 kernels named."""
    line = next((x for x in cpuinfo.splitlines() if x.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return next((name for name, need in CORE_TYPES if need <= flags), None)


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def rank_env(env: dict[str, str], cpu_count: int | None = None, cpuinfo: str | None = None) -> tuple[dict[str, str], str | None]:
    """The variables to add to a rank's environment on this host, or an error saying what to do.

    Threads: the host's cores shared among the ranks on it, so co-located ranks don't
    oversubscribe; in every mode, since numpy's own OpenBLAS runs the ranks' CPU attention
    (runtime/cpu_attention.py). Kernels: named from the CPU's flags (core_type). A user's
    OPENBLAS_NUM_THREADS or OPENBLAS_CORETYPE wins."""
    mode = env.get(ENV_BLAS, "auto")
    if sys.platform != "linux":
        return {}, None
    add = {}
    if "OPENBLAS_NUM_THREADS" not in env:
        local = max(1, int(env.get(ENV_LOCAL_WORLD_SIZE, "1") or 1))
        add["OPENBLAS_NUM_THREADS"] = str(max(1, (cpu_count or os.cpu_count() or 1) // local))
    if mode == "bundled":
        return add, None
    path = mode if os.path.isabs(mode) else find_openblas()
    if path is None or not os.path.exists(path):
        if mode == "auto":
            return add, None
        what = f"{path} does not exist" if path else "no OpenBLAS found"
        return {}, f"--blas {mode}: {what} on this host. Fix: {INSTALL_HINT}, or --blas bundled."
    if path not in env.get("LD_PRELOAD", "").split(":"):
        add["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    if "OPENBLAS_CORETYPE" not in env:
        core = core_type(cpuinfo if cpuinfo is not None else _cpuinfo())
        if core:
            add["OPENBLAS_CORETYPE"] = core
    return add, None
