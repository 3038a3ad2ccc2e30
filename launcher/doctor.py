"""`exolaunch doctor`: check every host before a job, and say how to fix what is wrong.

One probe per host, all in parallel (threads). The probe is a snippet run by launcher.remote
(over the ssh channel, never through a shell; local hosts run it as a subprocess). The probe

  1. answers three pings over the same channel: NTP-style, that gives the round-trip time
     (the smallest of the three) and the clock offset (skew) without trusting ssh set-up time;
  2. then answers once with: versions (python, and mlx / mlx-lm / exolaunch from
     importlib.metadata, so nothing heavy is imported), platform, memory, free disk of the
     model caches, whether each data-plane port is free (bind), `rdma_ctl status` and
     `ibv_devices` on macOS for jaccl, OpenMPI on PATH for mpi, the working directory.

Rules (each problem is `host: what is wrong -> fix: <command>`; warnings do not fail):
  - unreachable over SSH: error, with ssh's own message, within the connect timeout
  - python major.minor, mlx, mlx-lm, exolaunch: must match across hosts. exolaunch must match
    the local one (the launcher talks to the remote agent); mlx / mlx-lm must match the version
    most hosts have (ties: the first host's, i.e. rank 0's). A missing package is an error.
  - usable memory: macOS `iogpu.wired_limit_mb` when set (> 0); when 0 (the default) macOS lets
    the GPU wire about 3/4 of RAM on machines above 36 GB and about 2/3 on smaller ones, and we
    use that rule. Linux: MemAvailable. A `memory_gb:` in the hostfile above the real RAM is an
    error (the planner would overcommit); a default wired limit on a Mac is a warning.
  - a needed port in use, or a data-plane IP that is not on that host: error
  - jaccl: `rdma_ctl status` must say enabled (macOS 26.2+); Linux cannot run jaccl
  - clock skew above 1 s: error (logs and timeouts disagree across hosts)
  - free disk below need_disk_gb (when the caller knows the model size): error; below 20 GB:
    warning.
"""

from __future__ import annotations

import shlex
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata

from launcher import remote, ssh
from launcher.hostfile import Host, Hostfile

MAX_SKEW_S = 1.0
LOW_DISK_GB = 20.0
PROBE_BUDGET_S = 20.0  # after the connection is up, the probe itself must finish in this time
PINGS = 3
PACKAGES = ("mlx", "mlx-lm", "exolaunch")

# The probe: a launcher.remote snippet (say, PARAMS), run under each host's python.
_PROBE = r'''
import json, os, shutil, socket, subprocess, sys, time
P = PARAMS
say("hello", {})
while True:
    line = sys.stdin.readline()
    if not line.startswith("ping"):
        break
    t2 = time.time()
    say("pong", [t2, time.time()])
t0 = time.time()
R = {"executable": sys.executable, "python": "%d.%d.%d" % sys.version_info[:3],
     "platform": sys.platform, "hostname": socket.gethostname()}
def run(argv):
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=5, universal_newlines=True)
        return r.returncode, r.stdout.strip()
    except Exception as e:
        return None, "%s: %s" % (type(e).__name__, e)
try:
    import platform
    R["machine"] = platform.machine()
    R["os"] = ("macOS " + platform.mac_ver()[0]) if sys.platform == "darwin" else platform.platform(terse=True)
except Exception:
    pass
try:
    from importlib import metadata
    V = {}
    for name in P["packages"]:
        try:
            V[name] = metadata.version(name)
        except Exception:
            V[name] = None
    R["versions"] = V
except Exception as e:
    R["versions"] = {}
    R["versions_error"] = str(e)
try:
    import importlib.util
    R["agent"] = importlib.util.find_spec("launcher.agent") is not None
except Exception:
    R["agent"] = False
# memory
mem = {}
try:
    if sys.platform == "darwin":
        mem["total"] = int(run(["sysctl", "-n", "hw.memsize"])[1])
        rc, out = run(["sysctl", "-n", "iogpu.wired_limit_mb"])
        if rc == 0 and out.strip().isdigit():
            mem["wired_limit_mb"] = int(out)
        else:
            rc, out = run(["sysctl", "-n", "debug.iogpu.wired_limit"])  # macOS 13 and older, bytes
            if rc == 0 and out.strip().isdigit():
                mem["wired_limit_mb"] = int(out) // (1 << 20)
        lim = mem.get("wired_limit_mb") or 0
        if lim > 0:
            mem["usable"] = lim << 20
            mem["rule"] = "iogpu.wired_limit_mb"
        else:
            t = mem["total"]
            mem["usable"] = int(t * (0.75 if t > 36 * (1 << 30) else 2.0 / 3))
            mem["rule"] = "macOS default"
    else:
        mem["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    mem["usable"] = int(line.split()[1]) * 1024
        mem["rule"] = "MemAvailable"
except Exception as e:
    mem["error"] = str(e)
R["memory"] = mem
# disk where models live
env = dict(os.environ)
env.update(P.get("env") or {})
home = os.path.expanduser("~")
hf_home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "huggingface")
dirs = {"hf": env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub"),
        "exolaunch": env.get("EXOLAUNCH_CACHE") or os.path.join(home, ".cache", "exolaunch")}
disk = {}
for key, d in dirs.items():
    d = os.path.abspath(os.path.expanduser(d))
    p = d
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        disk[key] = {"path": d, "free": shutil.disk_usage(p).free}
    except Exception as e:
        disk[key] = {"path": d, "error": str(e)}
R["disk"] = disk
# ports: can we bind each (ip, port) the job needs on this host?
ports = []
holders = None
for ip, port in P.get("ports") or []:
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    entry = {"ip": ip, "port": port, "status": "free"}
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
    except OSError as e:
        import errno
        if e.errno == errno.EADDRINUSE:
            entry["status"] = "in use"
            if holders is None:
                holders = {}
                try:
                    import psutil
                    for c in psutil.net_connections(kind="tcp"):
                        if c.status == "LISTEN" and c.laddr and c.pid:
                            holders.setdefault(c.laddr.port, c.pid)
                except Exception:
                    pass
            pid = holders.get(port)
            if pid:
                entry["pid"] = pid
                try:
                    import psutil
                    entry["process"] = psutil.Process(pid).name()
                except Exception:
                    pass
        elif e.errno == errno.EADDRNOTAVAIL:
            entry["status"] = "no such address"
        else:
            entry["status"] = "error"
            entry["error"] = str(e)
    finally:
        s.close()
    ports.append(entry)
R["ports"] = ports
# a data-plane port is taken: find ports free here instead (as many, consecutive) to suggest
D = R["data"] = P.get("data")
if D and any(e["status"] != "free" and D["lo"] <= e["port"] <= D["hi"] for e in ports):
    ips = sorted({e["ip"] for e in ports if D["lo"] <= e["port"] <= D["hi"]})
    def bindable(ip, port):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            return True
        except OSError:
            return False
        finally:
            s.close()
    width, first = D["hi"] - D["lo"] + 1, D["hi"] + 1
    while first + width <= 65536:
        taken = [q for q in range(first, first + width) if not all(bindable(ip, q) for ip in ips)]
        if not taken:
            R["free_run"] = {"first": first, "last": first + width - 1, "data_port": first + D["data_port"] - D["lo"]}
            break
        first = taken[-1] + 1
# an optimized BLAS for CPU ranks (Linux): the first candidate path that exists, or the one asked for
if sys.platform == "linux":
    want = env.get("EXOLAUNCH_BLAS") or P.get("blas") or "auto"
    paths = [want] if want.startswith("/") else P.get("blas_paths") or []
    R["blas"] = {"mode": want, "path": next((q for q in paths if os.path.exists(q)), None)}
# backend needs
backend = P.get("backend")
if backend in ("jaccl", "jaccl-ring") and sys.platform == "darwin":
    rc, out = run(["rdma_ctl", "status"])
    R["rdma"] = {"rc": rc, "status": out}
    if shutil.which("ibv_devices"):
        rc, out = run(["ibv_devices"])
        if rc == 0:
            devs = []
            for line in out.splitlines():
                w = line.split()
                if w and w[0] not in ("device",) and not w[0].startswith("-"):
                    devs.append(w[0])
            R["rdma"]["devices"] = devs
if backend == "mpi":
    R["mpi"] = {n: shutil.which(n, path=env.get("PATH")) for n in ("mpirun", "orted", "prted")}
if P.get("cwd"):
    R["cwd_ok"] = os.path.isdir(os.path.expanduser(P["cwd"]))
R["elapsed"] = time.time() - t0
say("result", R)
'''


# ----------------------------------------------------------------------------- data model


@dataclass
class Problem:
    host: str
    what: str
    fix: str
    severity: str = "error"  # or "warning" (shown, does not fail the check)

    def line(self) -> str:
        return f"{self.host}: {self.what} -> fix: {self.fix}"


@dataclass(kw_only=True)
class HostCheck(remote.HostResult):
    ssh: str
    python: str
    reachable: bool = False  # SSH got through (always True for local hosts that could start)
    probed: bool = False  # the probe answered: info is filled; else error (ssh's own message when unreachable)
    rtt_ms: float | None = None
    connect_s: float | None = None  # from starting ssh to the probe's first line
    skew_s: float | None = None  # remote clock minus local clock
    info: dict = field(default_factory=dict)  # the probe's JSON
    ssh_check: str | None = None  # the plain ssh command that tries this host (for fixes)


@dataclass
class CheckReport(remote.Report):
    hosts: list[HostCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # errors and warnings
    backend: str = "ring"

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def ok(self) -> bool:  # a host that failed has a problem too; other problems fail the check as well
        return not self.errors

    def to_dict(self) -> dict:
        return {**super().to_dict(), "backend": self.backend, "problems": [asdict(p) for p in self.problems]}

    def table(self) -> tuple[list[str], list[list[str]]]:
        header = ["HOST", "SSH", "RTT", "SKEW", "PYTHON", "MLX", "MLX-LM", "EXOLAUNCH",
                  "MEMORY total/usable", "DISK FREE", "PORTS", "RDMA"]
        rows = []
        for h in self.hosts:
            if not h.probed:
                ssh_cell = "FAIL" if not h.reachable else ("ok" if h.ssh != "local" else "local")
                rows.append([h.name, ssh_cell, *["-"] * (len(header) - 2)])
                continue
            i = h.info
            v = i.get("versions", {})
            mem = i.get("memory", {})
            mem_s = "-"
            if "total" in mem:
                mem_s = f"{_gb(mem['total'])}/{_gb(mem['usable'])} GB" if "usable" in mem else f"{_gb(mem['total'])} GB"
            free = [d["free"] for d in i.get("disk", {}).values() if "free" in d]
            ports = i.get("ports", [])
            busy = [p for p in ports if p["status"] != "free"]
            ports_s = "-" if not ports else (f"{len(ports)} free" if not busy else
                                            ", ".join(f"{p['port']} {p['status']}" for p in busy))
            rows.append([
                h.name, "local" if h.ssh == "local" else "ok",
                f"{h.rtt_ms:.1f} ms" if h.rtt_ms is not None else "-",
                _skew_cell(h.skew_s),
                i.get("python", "?"),
                v.get("mlx") or "missing", v.get("mlx-lm") or "missing", v.get("exolaunch") or "missing",
                mem_s,
                f"{_gb(min(free))} GB" if free else "-",
                ports_s,
                _rdma_cell(i, self.backend),
            ])
        return header, rows

    def render(self) -> str:
        return "\n".join([*self.table_lines(), "", *self.summary_lines()])

    def summary_lines(self) -> list[str]:
        out = []
        if self.errors:
            out.append(f"{len(self.errors)} problem(s) to fix:")
            out += ["  " + p.line() for p in self.errors]
        if self.warnings:
            out.append(f"{len(self.warnings)} warning(s):")
            out += ["  " + p.line() for p in self.warnings]
        if self.ok:
            out.append(f"doctor: all checks passed on {len(self.hosts)} host(s) (backend {self.backend}).")
        return out


def _skew_cell(skew: float | None) -> str:
    if skew is None:
        return "-"
    ms = round(skew * 1000)
    return f"{ms:+d} ms" if ms else "0 ms"


def _gb(n: float) -> str:
    g = n / (1 << 30)
    return f"{g:.0f}" if g >= 10 else f"{g:.1f}"


def _rdma_cell(info: dict, backend: str) -> str:
    if backend not in ("jaccl", "jaccl-ring"):
        return "-"
    if info.get("platform") != "darwin":
        return "n/a (not macOS)"
    r = info.get("rdma", {})
    return _rdma_state(r.get("status", ""), r.get("rc")) or "?"


def _rdma_state(text: str, rc) -> str | None:
    t = (text or "").lower()
    if rc is None:
        return "no rdma_ctl"
    if "disabled" in t:
        return "disabled"
    if "enabled" in t:
        return "enabled"
    return None


# ----------------------------------------------------------------------------- probing


def probe_host(host: Host, python: str, params: dict, sopts: ssh.SshOptions) -> HostCheck:
    """Run the probe on one host; never raises."""
    res = HostCheck(name=host.name, ssh=host.ssh, python=python)
    if not host.is_local:
        res.ssh_check = shlex.join(["ssh", *(["-F", sopts.config] if sopts.config else []),
                                    *(["-p", str(host.port)] if host.port else []), "--", host.ssh, "true"])
    try:
        run = remote.Snippet(host, _PROBE, params, sopts, python=python)
    except OSError as e:
        res.reachable = host.is_local
        res.error = f"cannot start {python if host.is_local else 'ssh'}: {e.strerror or e}"
        return res
    with run:
        connect_budget = (sopts.connect_timeout if not host.is_local else 0) + PROBE_BUDGET_S
        try:
            run.expect("hello", run.started + connect_budget)
            res.connect_s = time.perf_counter() - run.started
            deadline = time.perf_counter() + PROBE_BUDGET_S
            best = None
            for _ in range(PINGS):
                t1, p1 = time.time(), time.perf_counter()
                run.send("ping\n")
                t2, t3 = run.expect("pong", deadline)
                t4, p4 = time.time(), time.perf_counter()
                rtt = (p4 - p1) - (t3 - t2)
                if best is None or rtt < best[0]:
                    best = (rtt, ((t2 - t1) + (t3 - t4)) / 2)
            res.rtt_ms = max(0.0, best[0]) * 1000
            res.skew_s = best[1]
            run.send("done\n")
            res.info = run.expect("result", deadline)
            res.reachable = res.probed = True
        except (TimeoutError, EOFError, ValueError) as e:
            waited = time.perf_counter() - run.started
            # At the end of its output the probe is exiting: let ssh report its own status (255 or not).
            rc = run.wait(5 if isinstance(e, EOFError) else 0)
            res.error = _failure_text(rc, "\n".join(run.errors(2)), isinstance(e, TimeoutError), waited)
            # ssh exits 255 when it cannot connect or log in; silence before the probe's first line
            # is the same thing. Anything else means we got through and the interpreter is the trouble.
            res.reachable = host.is_local or not (rc == 255 or res.connect_s is None and
                                                  isinstance(e, TimeoutError))
            return res
        run.wait(5)
    return res


def _failure_text(rc, stderr: str, timed_out: bool, waited: float) -> str:
    text = " ".join(line.strip() for line in stderr.strip().splitlines()[-3:] if line.strip())
    if timed_out and not text:
        text = f"no answer within {waited:.1f} s"
    elif timed_out:
        text = f"{text} (no answer within {waited:.1f} s)"
    if not text:
        text = f"exited with status {rc} before answering"
    return text


# ----------------------------------------------------------------------------- what to check


def needed_ports(spec, *, data_port: int, control: bool = False) -> dict[str, list[tuple[str, int]]]:
    """Per host name, the (ip, port) pairs the backend will listen on (as the backends assign them)."""
    from launcher.backends.ring import ring_addresses
    from runtime import contract

    out: dict[str, list[tuple[str, int]]] = {}
    ranks = spec.ranks
    if spec.backend == "ring" and len(ranks) > 1:
        for r, entry in zip(ranks, ring_addresses(ranks, data_port)):
            for addr in entry:
                ip, _, port = addr.rpartition(":")
                out.setdefault(r.host.name, []).append((ip.strip("[]"), int(port)))
    elif spec.backend in ("jaccl", "jaccl-ring") and ranks and ranks[0].host.ips:
        out.setdefault(ranks[0].host.name, []).append((ranks[0].host.ips[0], data_port))
    if control and ranks:
        h = ranks[0].host
        out.setdefault(h.name, []).append(contract.control_address(
            h.ips, data_port, all_local=all(r.host.is_local for r in ranks)))
    return out


def run_checks(hostfile: Hostfile, topology=None, *, backend: str | None = None, np: int | None = None,
               data_port: int | None = None, control: bool = False,
               ports: dict[str, list] | None = None, connect_timeout: float = 10.0,
               host_key_check: str | None = None, need_disk_gb: float | None = None,
               blas: str | None = None) -> CheckReport:
    """Probe every host the job would use, in parallel, and judge the answers.

    backend / np / data_port / topology as for `exec` (the same plan decides hosts and ports);
    control=True adds `run`'s control channel (data_port - 1 on rank 0); `ports` adds more
    per host name, as ports or (ip, port) pairs (e.g. the API port on rank 0).
    need_disk_gb: free space the model needs in the caches (an error below it).
    blas: `--blas` (launcher/blas.py); Linux hosts without the BLAS it asks for are told what to install."""
    import dataclasses

    from launcher.backends import plan_launch
    from launcher.backends import host_python
    from launcher.blas import CANDIDATES as blas_paths

    if data_port is not None:
        hostfile = dataclasses.replace(hostfile, port=data_port)
    spec = plan_launch(hostfile, ["python"], backend=backend, topology=topology, np=np)
    hosts: list[Host] = []
    for r in spec.ranks:
        if r.host.name not in [h.name for h in hosts]:
            hosts.append(r.host)
    want = needed_ports(spec, data_port=spec.hostfile.port, control=control)
    span = [p for pairs in want.values() for _, p in pairs]
    # The data-plane ports and the control port below them: what a suggested --data-port must free.
    data = ({"lo": min(span + [spec.hostfile.port - 1]), "hi": max(span), "data_port": spec.hostfile.port}
            if span else None)
    for name, extra in (ports or {}).items():
        for p in extra:
            if isinstance(p, int):
                h = next((h for h in hosts if h.name == name), None)
                p = ((h.ips[0] if h and h.ips else "127.0.0.1"), p)
            want.setdefault(name, []).append(tuple(p))
    rdma_rows = {}
    if spec.backend in ("jaccl", "jaccl-ring"):
        from launcher.topology import Topology

        matrix = (topology or Topology(path=None, links=[])).rdma_matrix(spec.hostfile)
        for h, row in zip(spec.hostfile.hosts, matrix):
            devs = []
            for d in row:
                if d is not None:
                    devs += d if isinstance(d, list) else [d]
            rdma_rows[h.name] = sorted(set(devs))
    sopts = ssh.SshOptions(connect_timeout=connect_timeout, host_key_check=host_key_check,
                           config=hostfile.ssh_config, options=dict(hostfile.ssh_options or {}))

    def one(h: Host) -> HostCheck:
        params = {"packages": list(PACKAGES), "backend": spec.backend, "ports": want.get(h.name, []),
                  "blas": blas, "blas_paths": list(blas_paths),
                  "data": data, "env": {**hostfile.env, **h.env}, "cwd": h.cwd}
        return probe_host(h, host_python(h), params, sopts)

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
        results = list(pool.map(one, hosts))
    report = CheckReport(hosts=results, backend=spec.backend)
    problems = judge(results, {h.name: h for h in hosts}, backend=spec.backend,
                     rdma_devices=rdma_rows, need_disk_gb=need_disk_gb)
    order = {h.name: i for i, h in enumerate(hosts)}
    report.problems = sorted(problems, key=lambda p: order.get(p.host, len(order)))  # stable
    return report


def local_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def judge(results: list[HostCheck], hosts: dict[str, Host], *, backend: str,
          rdma_devices: dict[str, list[str]] | None = None, need_disk_gb: float | None = None,
          local: dict[str, str | None] | None = None) -> list[Problem]:
    """The problems in a set of probe results (pure: no I/O), each with its fix."""
    problems: list[Problem] = []
    add = lambda host, what, fix, sev="error": problems.append(Problem(host, what, fix, sev))  # noqa: E731
    local = local_versions() if local is None else local
    up = [r for r in results if r.probed]

    for r in results:
        if r.probed:
            continue
        err = r.error or ""
        if not r.reachable:
            add(r.name, f"unreachable over SSH ({r.ssh}): {err}",
                _ssh_fix(r.ssh, err, r.ssh_check or f"ssh {shlex.quote(r.ssh)} true"))
        elif "not found" in err or "No such file" in err:
            add(r.name, f"python {r.python} does not run: {err}",
                "set `python:` for this host in the hostfile to an interpreter with mlx and exolaunch "
                "(`command -v python3` on that host shows one)")
        else:
            add(r.name, f"the probe failed under {r.python}: {err}",
                f"{shlex.quote(r.python)} -c 'import json, socket, subprocess' on {r.name} shows why")

    # Versions: python major.minor, mlx, mlx-lm, exolaunch.
    def ref_of(key: str, values: dict[str, str | None]) -> tuple[str | None, str | None]:
        present = [(n, v) for n, v in values.items() if v]
        if not present:
            return None, None
        if key == "exolaunch" and local.get("exolaunch"):
            return local["exolaunch"], "here"
        counts = Counter(v for _, v in present)
        top = max(counts.values())
        for n, v in present:  # first host (rank 0 first) among the most common
            if counts[v] == top:
                return v, n
        return None, None

    pyvers = {r.name: ".".join(r.info.get("python", "").split(".")[:2]) or None for r in up}
    ref, where = ref_of("python", pyvers)
    for r in up:
        if pyvers[r.name] and ref and pyvers[r.name] != ref:
            add(r.name, f"Python {r.info.get('python')}, but {ref} on {where} (every rank must run the same "
                        "Python minor version)",
                f"set `python:` for {r.name} in the hostfile to a Python {ref} interpreter with mlx "
                f"(e.g. python{ref} -m venv ~/.venvs/exo && ~/.venvs/exo/bin/pip install 'mlx-lm=={_ver(up, 'mlx-lm')}')")
    for pkg in PACKAGES:
        values = {r.name: r.info.get("versions", {}).get(pkg) for r in up}
        ref, where = ref_of(pkg, values)
        for r in up:
            v = values[r.name]
            py = shlex.quote(r.info.get("executable") or r.python)
            if pkg == "exolaunch":
                fix = (f"install exolaunch {ref or ''} for {py} on {r.name}: in an exolaunch checkout at the same "
                       f"version there, run PYTHON={py} bash scripts/install.sh").replace("  ", " ")
            else:
                spec_ = _pip_spec(pkg, ref, r.info.get("platform"))
                fix = f"{py} -m pip install {shlex.quote(spec_)}"
            if v is None:
                add(r.name, f"{pkg} is not installed for {r.info.get('executable') or r.python}", fix)
            elif ref and v != ref:
                if pkg == "exolaunch" and where == "here":
                    what = f"exolaunch {v}, but {ref} on this machine (the launcher and its agents must match)"
                else:
                    what = f"{pkg} {v}, but {ref} on {where} (mismatched ranks fail in confusing ways)"
                add(r.name, what, fix)
    for r in up:
        if r.info.get("versions", {}).get("exolaunch") and r.info.get("agent") is False:
            add(r.name, f"exolaunch is installed but `launcher.agent` cannot be imported by {r.python}",
                f"reinstall exolaunch for {shlex.quote(r.python)} (PYTHON={shlex.quote(r.python)} bash scripts/install.sh)")

    for r in up:
        h = hosts.get(r.name)
        i = r.info
        mac = i.get("platform") == "darwin"
        # clock
        if r.skew_s is not None and abs(r.skew_s) > MAX_SKEW_S and not (h and h.is_local):
            add(r.name, f"clock is {abs(r.skew_s):.1f} s {'ahead of' if r.skew_s > 0 else 'behind'} this machine's",
                "sudo sntp -sS time.apple.com" if mac else "sudo chronyc makestep (or: sudo timedatectl set-ntp true)")
        # memory
        mem = i.get("memory", {})
        total = mem.get("total")
        if h is not None and h.memory_gb and total:
            real = total / (1 << 30)
            if h.memory_gb > real * 1.05:
                add(r.name, f"hostfile says memory_gb: {h.memory_gb:g} but the host has {real:.0f} GB",
                    f"set memory_gb: {real:.0f} for {r.name} in the hostfile")
        if mac and total and mem.get("rule") == "macOS default" and total > 36 * (1 << 30):
            n = (total >> 20) - 8192
            add(r.name, f"the GPU may wire only ~{_gb(mem['usable'])} of {_gb(total)} GB (macOS default limit)",
                f"sudo sysctl iogpu.wired_limit_mb={n}  (leaves 8 GB to macOS; resets at reboot)", "warning")
        # disk
        for key, d in i.get("disk", {}).items():
            if "free" not in d:
                continue
            free_gb = d["free"] / (1 << 30)
            if need_disk_gb and free_gb < need_disk_gb:
                add(r.name, f"only {free_gb:.0f} GB free in {d['path']}, the model needs {need_disk_gb:.0f} GB",
                    f"free space there (du -sh {shlex.quote(d['path'])}/* ; huggingface-cli delete-cache), "
                    f"or point {'HF_HOME' if key == 'hf' else 'EXOLAUNCH_CACHE'} at a bigger disk")
            elif free_gb < LOW_DISK_GB:
                add(r.name, f"only {free_gb:.1f} GB free in {d['path']} (models need tens to hundreds of GB)",
                    f"free space (du -sh {shlex.quote(d['path'])}/*) or set "
                    f"{'HF_HOME' if key == 'hf' else 'EXOLAUNCH_CACHE'} to a bigger disk", "warning")
        # ports
        for p in i.get("ports", []):
            where = f"{p['ip']}:{p['port']}"
            if p["status"] == "in use":
                held = f" by pid {p['pid']}" + (f" ({p['process']})" if p.get("process") else "") if p.get("pid") else ""
                stop = f"kill {p['pid']}" if p.get("pid") else f"lsof -nP -iTCP:{p['port']} -sTCP:LISTEN, then stop that process"
                free, span = i.get("free_run"), i.get("data")
                if span and not span["lo"] <= p["port"] <= span["hi"]:  # not a data-plane port: run's API port
                    other = "choose another API port with --port (run)"
                elif free:
                    other = (f"ports {free['first']}-{free['last']} are free on {r.name}: --data-port "
                             f"{free['data_port']} (run) / --port {free['data_port']} (exec, doctor)")
                else:
                    other = "choose other ports with --port (exec) / --data-port (run)"
                add(r.name, f"port {where} is in use{held}", f"{stop}; or {other}")
            elif p["status"] == "no such address":
                add(r.name, f"{p['ip']} is not an address of this host (port {p['port']} cannot be bound there)",
                    f"fix `ips:` for {r.name} in the hostfile ({'ifconfig' if mac else 'ip -brief addr'} on "
                    f"{r.name} lists its addresses)")
            elif p["status"] != "free":
                add(r.name, f"cannot bind {where}: {p.get('error')}", "choose other ports with --port")
        # BLAS of CPU ranks (launcher/blas.py): bundled reference BLAS is 5-30x slower for float32
        b = i.get("blas")
        if b and b["path"] is None and b["mode"] != "bundled":
            from launcher.blas import INSTALL_HINT

            if b["mode"] == "auto":
                add(r.name, "no OpenBLAS: CPU ranks fall back to mlx's bundled reference BLAS (float32 prefill "
                            "5-30x slower)", INSTALL_HINT, "warning")
            else:
                add(r.name, f"--blas {b['mode']}: not found on this host", f"{INSTALL_HINT}, or --blas bundled")
        # backend
        if backend in ("jaccl", "jaccl-ring"):
            if not mac:
                add(r.name, f"backend {backend} needs macOS 26.2+ (RDMA over Thunderbolt 5); this host runs "
                            f"{i.get('os') or i.get('platform')}",
                    "use --backend ring (or mpi) for this cluster")
            else:
                rd = i.get("rdma", {})
                state = _rdma_state(rd.get("status", ""), rd.get("rc"))
                if state == "no rdma_ctl":
                    add(r.name, f"rdma_ctl not found: RDMA over Thunderbolt needs macOS 26.2 or later "
                                f"(this is {i.get('os')})", "sudo softwareupdate --install --all --restart")
                elif state != "enabled":
                    add(r.name, f"RDMA is not enabled (rdma_ctl status: {rd.get('status') or 'no output'!s})",
                        "reboot into Recovery (hold the power button), open Terminal, run `rdma_ctl enable`, reboot")
                devs = rd.get("devices")
                if devs is not None and rdma_devices:
                    missing = [d for d in rdma_devices.get(r.name, []) if d not in devs]
                    if missing:
                        add(r.name, f"RDMA device(s) {', '.join(missing)} from the hostfile/topology are not "
                                    f"present (ibv_devices: {', '.join(devs) or 'none'})",
                            "check the Thunderbolt 5 cables, then fix `rdma:` to the names `ibv_devices` lists")
        if backend == "mpi":
            m = i.get("mpi", {})
            if not any(m.values()):
                add(r.name, "OpenMPI is not on PATH (no mpirun / orted / prted)",
                    "brew install open-mpi" if mac else "sudo apt-get install openmpi-bin")
        if h is not None and h.cwd and i.get("cwd_ok") is False:
            add(r.name, f"working directory {h.cwd} does not exist", f"mkdir -p {shlex.quote(h.cwd)}")
    return problems


def _ver(up: list[HostCheck], pkg: str) -> str:
    vals = [r.info.get("versions", {}).get(pkg) for r in up]
    vals = [v for v in vals if v]
    return Counter(vals).most_common(1)[0][0] if vals else "X"


def _pip_spec(pkg: str, version: str | None, platform: str | None) -> str:
    name = "mlx[cpu]" if pkg == "mlx" and platform == "linux" else pkg
    return f"{name}=={version}" if version else name


def _ssh_fix(dest: str, error: str, try_cmd: str) -> str:
    d = shlex.quote(dest)
    e = error.lower()
    if "permission denied" in e:
        return f"ssh-copy-id {d}  (exolaunch uses BatchMode: key or agent login, no passwords); then {try_cmd}"
    if "host key verification failed" in e or "no matching host key" in e:
        return f"{try_cmd} once, interactively, to accept its host key (or pass --host-key-check accept-new)"
    if "remote host identification has changed" in e:
        return f"ssh-keygen -R {d} (only if the host was really reinstalled), then {try_cmd}"
    if "could not resolve" in e or "name or service not known" in e:
        return f"use the host's IP or add it to ~/.ssh/config, then {try_cmd}"
    if "connection refused" in e:
        return ("turn on Remote Login on that host (macOS: sudo systemsetup -setremotelogin on; "
                f"Linux: sudo systemctl start ssh) and check the ssh port; then {try_cmd}")
    return f"check that the host is up and reachable on the network, then {try_cmd}"
