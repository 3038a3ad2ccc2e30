"""The anchor: the incumbent stack, mlx_lm.server under mpirun (MPI) or mlx.launch (ring), on the
hosts of our hostfile, so `exolaunch bench --against mlx-lm` measures both the same way.

    with AnchorCluster(model_dir, hostfile, np=2, backend="mpi") as a:
        requests.post(a.base_url + "/completions", json={"model": a.model_name, ...})

Process tree (local side):

    this process
      └─ guard: `python -m launcher.bench.anchor --guard` (own session = own process group)
           └─ mpirun | mlx.launch   (argv/env arrive on the guard's stdin, so neither the
                └─ ranks               guard's command line nor its environment carries the
                                       bench tag or the rank marker)

The guard exists because neither launcher cleans up after itself: mlx.launch leaves its ranks
running when it gets SIGINT or SIGTERM (it only tears down when a rank fails), and mpirun's
ranks live in process groups of their own. The guard notes every descendant as it appears,
and on stop, on a signal, or when its stdin reaches EOF (this process died, even by SIGKILL,
on any OS; on Linux PR_SET_PDEATHSIG also tells it) it SIGTERMs its process group and every
descendant it noted, SIGKILLs what is left after a grace, removes the job's temp directory and
exits. Remote ranks: mlx.launch runs them under `ssh -tt`, so they get SIGHUP when their ssh
dies; mpirun's remote orteds kill their ranks when mpirun goes.

What mlx_lm.server 0.32.2 does that matters here (see also the notes on `start`):
  * rank 0 starts its HTTP server at once and loads the model on its generation thread, so
    `GET /v1/models` answers 200 long before the model is loaded (and its body is empty, with
    a traceback in the log, when ~/.cache/huggingface/hub does not exist). `start` therefore
    waits for /v1/models and then for a one-token completion (the "ready probe").
  * a load failure kills only the generation thread; rank 0 keeps serving HTTP and answers
    completions with 404 {"error": "generation thread died"}.
  * the request's "model" must be exactly the --model string, or the server loads that name
    as a second model (a re-shard on every rank); `model_name` is that string. The ranks get
    HF_HUB_OFFLINE=1 (unless `env` says otherwise), so a wrong name fails at once instead of
    trying the hub.
  * one ring rank is plain `python -m mlx_lm.server` (mlx.launch cannot start one ring rank).
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from launcher.backends.mpi import mpirun_env
from launcher.errors import ConfigError, LaunchError
from launcher.ports import free_port, free_port_run
from runtime.contract import ENV_MPI_LIBNAME, SHARDINGS

RANK_MARKER = "mlx_lm.server"
BACKENDS = ("mpi", "ring")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Exit)|RuntimeError|ValueError)\b.*")


def anchor_version() -> dict:
    """The incumbent's versions on this machine: {"mlx-lm": "...", "mlx": "..."}."""
    from importlib import metadata

    out = {}
    for dist in ("mlx-lm", "mlx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------- commands


def _python_of(host) -> str:
    from launcher.backends import host_python

    return host_python(host)


def _ssh_wrapper(workdir: Path, hostfile) -> str:
    """An `ssh` that applies the hostfile's ssh_config and options (BatchMode, timeouts),
    for launchers that only know how to call plain `ssh` (mlx.launch) or take one agent
    string (mpirun's plm_rsh_agent)."""
    import shlex

    from launcher import ssh

    real = shutil.which("ssh")
    if not real:
        raise LaunchError("the anchor needs ssh for remote hosts and `ssh` is not on PATH. "
                          "Fix: install the OpenSSH client.")
    argv = ssh.base_argv(ssh.SshOptions(config=hostfile.ssh_config, options=dict(hostfile.ssh_options or {})))
    d = workdir / "bin"
    d.mkdir(exist_ok=True)
    path = d / "ssh"
    path.write_text("#!/bin/sh\nexec " + shlex.join([real, *argv[1:]]) + ' "$@"\n')
    path.chmod(0o755)
    return str(path)


def _ssh_destination(host) -> str:
    # mlx.launch passes the destination to `ssh` as is: a URI carries a per-host port.
    return f"ssh://{host.ssh}:{host.port}" if host.port else host.ssh


def _mpi_command(hf, server_args: list[str], env: dict[str, str], workdir: Path,
                 host_env: dict[str, dict[str, str]] | None = None):
    """(argv, env for mpirun itself, cwd). mpirun is run directly, not through `mlx.launch
    --backend mpi`: that passes `--output :raw`, which OpenMPI 4 (4.1.4 here) rejects.
    host_env: more variables for the ranks of one host (by name), set by `env` in front of
    that host's command (mpirun's -x is for every rank)."""
    from launcher.backends import mpi

    try:
        mpirun = mpi.find_mpirun()
    except ConfigError as e:
        raise LaunchError(f"anchor (backend mpi): {e}") from None
    major = mpi.openmpi_major(mpirun)
    (workdir / "mpi-hostfile").write_text(
        "".join(f"{mpi.mpi_hostname(h)} slots={h.slots}\n" for h in hf.hosts))
    argv = [mpirun, "--hostfile", str(workdir / "mpi-hostfile"), "--bind-to", "none"]
    argv += ["--map-by", ":OVERSUBSCRIBE"] if major >= 5 else ["--oversubscribe"]
    if any(not h.is_local for h in hf.hosts):
        agent = _ssh_wrapper(workdir, hf)
        argv += ["--prtemca", "plm_ssh_agent", agent] if major >= 5 else ["--mca", "plm_rsh_agent", agent]
    rank_env = dict(env)
    libname = mpi.mpi_libname()
    if libname:
        rank_env.setdefault(ENV_MPI_LIBNAME, libname)
    for k, v in rank_env.items():
        argv += ["-x", f"{k}={v}"]
    # One app context per host, so every host runs its own interpreter (and cwd).
    for i, h in enumerate(hf.hosts):
        if i:
            argv.append(":")
        argv += ["-np", str(h.slots), "--host", f"{mpi.mpi_hostname(h)}:{h.slots}"]
        if h.cwd:
            argv += ["-wdir", h.cwd]
        extra = (host_env or {}).get(h.name)
        if extra:  # `env` execs the server: the rank process is still python -m mlx_lm.server
            argv += ["env", *(f"{k}={v}" for k, v in extra.items())]
        argv += [_python_of(h), "-m", RANK_MARKER, *server_args]
    own = {k: v for k, v in env.items() if k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    if os.geteuid() == 0:  # OpenMPI refuses root without both of these (containers, CI)
        own.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return argv, own, None


def _find_mlx_launch() -> str:
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise LaunchError("anchor (backend ring): mlx.launch not found next to this Python or on PATH. "
                          "Fix: install mlx in this environment (pip install mlx), which provides mlx.launch.")
    return found


def _ring_command(hf, server_args: list[str], env: dict[str, str], workdir: Path, data_port: int):
    """(argv, env for mlx.launch itself, cwd). Every rank is one entry of mlx.launch's JSON hostfile;
    local ranks are entered as ssh "127.0.0.1", the one name mlx.launch runs without ssh. The
    rank env goes in the hostfile's "envs", not on mlx.launch's command line."""
    pythons = {_python_of(h) for h in hf.hosts}
    if len(pythons) > 1:
        raise LaunchError(f"anchor (backend ring): mlx.launch runs one command on every host, but the hosts "
                          f"name different interpreters ({', '.join(sorted(pythons))}). "
                          "Fix: give every host the same `python:` (or use --backend mpi).")
    python = next(iter(pythons))
    if hf.world_size == 1:
        # mlx.launch cannot start one ring rank (it writes an empty MLX_HOSTFILE, the rank dies
        # parsing it, and mlx.launch exits 0): one rank is plain mlx_lm.server, as a user runs it.
        return _single_rank_command(hf, hf.hosts[0], python, server_args, env, workdir)
    entries = []
    for h in hf.hosts:
        if not h.ips:
            raise LaunchError(f"anchor (backend ring): host {h.name} has no data-plane IP. Fix: add `ips: [ADDRESS]`.")
        ssh_name = "127.0.0.1" if h.is_local else _ssh_destination(h)
        entries += [{"ssh": ssh_name, "ips": list(h.ips)} for _ in range(h.slots)]
    (workdir / "mlx-hostfile.json").write_text(json.dumps(
        {"backend": "ring", "envs": [f"{k}={v}" for k, v in env.items()], "hosts": entries}))
    argv = [_find_mlx_launch(), "--backend", "ring", "--hostfile", str(workdir / "mlx-hostfile.json"),
            "--starting-port", str(data_port)]
    cwd = hf.hosts[0].cwd
    if cwd:
        argv += ["--cwd", cwd]
    argv += ["--", python, "-m", RANK_MARKER, *server_args]
    own = {}
    if any(not h.is_local for h in hf.hosts):
        # mlx.launch calls plain `ssh -tt HOST CMD` (and `ssh HOST` to kill): ours goes first on PATH.
        _ssh_wrapper(workdir, hf)
        own["PATH"] = str(workdir / "bin") + os.pathsep + os.environ.get("PATH", "")
    return argv, own, None


def _single_rank_command(hf, host, python: str, server_args: list[str], env: dict[str, str], workdir: Path):
    """One rank, no launcher: the server itself (its env rides in the spawn env), or over
    `ssh -tt` for a remote host (the tty makes the rank get SIGHUP when its ssh goes)."""
    import shlex

    rank = [python, "-m", RANK_MARKER, *server_args]
    if host.is_local:
        return rank, dict(env), host.cwd
    wrapper = _ssh_wrapper(workdir, hf)
    remote = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *rank])
    if host.cwd:
        remote = f"cd {shlex.quote(host.cwd)} && exec {remote}"
    else:
        remote = "exec " + remote
    argv = [wrapper, *(["-p", str(host.port)] if host.port else []), "-tt", "--", host.ssh, remote]
    return argv, {}, None


# ----------------------------------------------------------------------------- the cluster


class AnchorCluster:
    """mlx_lm.server on `np` ranks (the first np slots of `hostfile`), started by mpirun
    (backend "mpi") or mlx.launch (backend "ring"); rank 0 serves HTTP."""

    def __init__(self, model_path: Path, hostfile, *, np: int, backend: str, sharding: str = "tensor",
                 port: int | None = None, data_port: int | None = None, env: dict[str, str] | None = None,
                 log: Path | None = None, ready_timeout: float = 900.0, echo=None,
                 server_args: list[str] | tuple = (), grace: float = 5.0, blas: str | None = None):
        """server_args: more mlx_lm.server flags, verbatim (e.g. ["--prompt-cache-size", "0"]);
        grace: seconds between SIGTERM and SIGKILL on stop; blas: as `exolaunch run --blas`
        (auto | openblas | bundled | PATH), the ranks then get the environment ours would
        (blas_env.py); None leaves their environment as it is (mlx's bundled BLAS)."""
        from launcher.backends import first_slots

        self.model_path = Path(model_path).expanduser()
        self.backend, self.sharding = backend, sharding
        self.world_size = np
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.blas = blas
        self.blas_env: dict[str, dict[str, str]] = {}  # host name -> what --blas added for its ranks
        # Bad arguments are raised by start() (as ConfigError), so that constructing never fails.
        self._config_error: ConfigError | None = None
        try:
            if backend not in BACKENDS:
                raise ConfigError(f"anchor backend {backend!r}: expected one of {', '.join(BACKENDS)}.")
            if sharding not in SHARDINGS:
                raise ConfigError(f"anchor sharding {sharding!r}: expected one of {', '.join(SHARDINGS)}.")
            if blas is not None:
                from launcher.blas import check_mode

                try:
                    check_mode(blas)
                except ValueError as e:
                    raise ConfigError(f"anchor {e}") from None
            for k in self.env:
                if not _ENV_KEY.fullmatch(k):
                    raise ConfigError(f"anchor env {k!r}: not a valid environment variable name.")
            self.hostfile = first_slots(hostfile, np)  # ConfigError when np > slots
        except ConfigError as e:
            self._config_error = e
            self.hostfile = hostfile
        self.log_path = Path(log) if log else None
        self.ready_timeout = ready_timeout
        self.echo = echo  # callable(line) to show the cluster's output live, or None
        self.server_args = list(server_args)
        self.grace = grace
        self.rank_cmd_marker = RANK_MARKER
        # Exactly the --model string: any other "model" in a request makes the server load that.
        self.model_name = str(self.model_path.resolve()) if self.model_path.exists() else str(self.model_path)
        self.port = port or free_port()
        self.data_port = data_port
        rank0 = self.hostfile.hosts[0]
        if rank0.is_local:
            self.bind = addr = "127.0.0.1"
        else:  # as `exolaunch run --host 0.0.0.0`: reachable from here, shown as its first IP
            self.bind = "0.0.0.0"
            addr = rank0.ips[0] if rank0.ips else rank0.ssh.rsplit("@", 1)[-1]
        self._addr = addr
        self.base_url = f"http://{f'[{addr}]' if ':' in addr else addr}:{self.port}/v1"
        self.started_at = 0.0  # time.perf_counter() at spawn
        self.http_at = 0.0     # when GET /v1/models first answered 200 (model maybe not loaded yet)
        self.ready_at = 0.0    # when the ready probe completed: the model is loaded on every rank
        # The probe is a 1-token completion of this prompt, queued as soon as HTTP answers, so
        # ready_at - started_at is launch to first token for it (the bench sets its own prompt).
        self.ready_prompt = "ready?"
        self.argv: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=80)
        self.proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._pump: threading.Thread | None = None
        self._logf = None
        self._known: dict[int, float] = {}  # descendants of the guard seen (pid -> create time)
        self._dead_thread = threading.Event()  # a rank logged "generation thread died"
        self._code: int | None = None

    # -- start ---------------------------------------------------------------------------
    def server_argv(self) -> list[str]:
        args = ["--model", self.model_name, "--host", self.bind, "--port", str(self.port)]
        if self.sharding == "pipeline":
            args.append("--pipeline")
        return args + self.server_args

    def _check_model(self) -> None:
        if not any(h.is_local for h in self.hostfile.hosts):
            return  # the path is for the hosts; nothing to check here
        p = self.model_path
        if not p.is_dir():
            raise LaunchError(f"anchor: model directory {p} does not exist. Fix: pass the directory of an "
                              "mlx-lm model (config.json, *.safetensors, tokenizer files).")
        if not (p / "config.json").is_file():
            raise LaunchError(f"anchor: {p} has no config.json, so it is not an mlx-lm model directory. "
                              "Fix: pass the directory that holds the model's config.json and weights.")
        if self.sharding == "pipeline" and self.world_size > 1 and not (p / "model.safetensors.index.json").is_file():
            raise LaunchError(f"anchor: {p} has no model.safetensors.index.json, which mlx_lm's pipeline "
                              "sharded_load needs. Fix: use sharding tensor, or add the index.")

    def _commands(self, workdir: Path) -> tuple[list[str], dict[str, str], str | None]:
        env = dict(self.env)
        # We pass a path: never let a typo turn into a hub download that hangs on a closed network.
        env.setdefault("HF_HUB_OFFLINE", "1")
        per_host = self._blas_env()
        distinct = {json.dumps(v, sort_keys=True) for v in per_host.values()}
        common = next(iter(per_host.values()), {}) if len(distinct) <= 1 else None
        if common is not None:
            env.update(common)  # the usual case: every host alike, -x / the hostfile's envs
        if self.backend == "mpi":
            return _mpi_command(self.hostfile, self.server_argv(), env, workdir,
                                None if common is not None else per_host)
        if common is None:
            raise LaunchError(f"anchor (backend ring): --blas {self.blas} needs different variables per host "
                              f"({per_host}), but mlx.launch gives every rank the same environment. "
                              "Fix: --backend mpi, or the same BLAS and cores on every host.")
        if self.data_port is None:
            n = sum(h.slots * len(h.ips) for h in self.hostfile.hosts)
            self.data_port = free_port_run(n)
        return _ring_command(self.hostfile, self.server_argv(), env, workdir, self.data_port)

    def _blas_env(self) -> dict[str, dict[str, str]]:
        """Per host, what `run --blas` would add to its ranks' environment (blas_env.py)."""
        if self.blas is None:
            return {}
        from launcher import ssh
        from launcher.bench.blas_env import host_env

        sopts = ssh.SshOptions(config=self.hostfile.ssh_config, options=dict(self.hostfile.ssh_options or {}))
        self.blas_env = {h.name: host_env(h, self.blas, h.slots, sopts) for h in self.hostfile.hosts}
        return self.blas_env

    def start(self) -> "AnchorCluster":
        """Spawn, wait until rank 0 answers GET /v1/models, then until a one-token completion
        comes back (mlx_lm.server answers HTTP while the model is still loading). LaunchError,
        with the end of the output, if the cluster dies, the model does not load or the
        ready_timeout passes."""
        if self.proc is not None:
            raise LaunchError("anchor: this AnchorCluster was already started.")
        if self._config_error:
            raise self._config_error
        self._check_model()
        self._workdir = Path(tempfile.mkdtemp(prefix="exolaunch-anchor-"))
        try:
            argv, launcher_env, cwd = self._commands(self._workdir)
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.argv = argv
        spec = {"argv": argv, "env": mpirun_env({**os.environ, **launcher_env}), "grace": self.grace,
                "workdir": str(self._workdir), "cwd": cwd or os.getcwd()}
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._logf = open(self.log_path, "a")
            self._logf.write(f"# anchor {self.backend} {self.world_size} rank(s): {' '.join(argv)}\n")
            self._logf.flush()
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.bench.anchor", "--guard"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
            # PR_SET_PDEATHSIG follows the spawning *thread*: start() from a thread that ends
            # early would stop the cluster. The guard's stdin EOF covers the process dying.
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            self.proc.stdin.write((json.dumps(spec) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # the guard is already gone: _wait_ready reports it with its output
        self._pump = threading.Thread(target=self._read_output, daemon=True, name="anchor-output")
        self._pump.start()
        try:
            self._wait_ready()
        except LaunchError:
            self.stop()
            raise
        except BaseException:  # KeyboardInterrupt and the like: never leave the ranks behind
            self.stop()
            raise
        return self

    def _read_output(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.tail.append(line)
            if "generation thread died" in line:
                self._dead_thread.set()
            try:  # whatever happens here, keep draining: a full pipe would block the ranks
                if self._logf:
                    self._logf.write(line)
                    self._logf.flush()
                if self.echo:
                    self.echo(line.rstrip("\n"))
            except Exception:  # noqa: BLE001
                pass

    def _fail(self, what: str) -> LaunchError:
        self.stop()
        if self._pump:
            self._pump.join(timeout=2)
        tail = "".join(self.tail).rstrip()
        errors = [m.group(0).strip() for line in self.tail if (m := _ERROR_LINE.match(line))]
        cause = f" ({errors[-1]})" if errors else ""
        launcher = "mpirun" if self.backend == "mpi" else "mlx.launch"
        return LaunchError(
            f"anchor: mlx_lm.server on {self.world_size} rank(s) ({launcher}, {self.sharding}) {what}{cause}. "
            f"Fix: see its output below (model path, mlx-lm install, ports, hosts).\n"
            f"Command: {' '.join(self.argv)}\nLast output:\n{tail}", status=self._code or 1)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        host, port = self._addr, self.port

        def alive_or_fail():
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode} before it was ready")
            if self._dead_thread.is_set():
                raise self._fail("could not load the model (its generation thread died)")
            if time.monotonic() > deadline:
                raise self._fail(f"was not ready after {self.ready_timeout:g} s")

        while True:  # 1: rank 0's HTTP server
            alive_or_fail()
            if _http(host, port, "GET", "/v1/models", timeout=2.0)[0] == 200:
                self.http_at = time.perf_counter()
                break
            time.sleep(0.02)  # fine-grained: launch-to-first-token is measured through this
        self._snapshot()
        # 2: the model. A queued request waits for the load on every rank, then runs one step.
        result: dict = {}

        def probe():
            body = {"model": self.model_name, "prompt": self.ready_prompt, "max_tokens": 1, "temperature": 0}
            try:
                result["r"] = _http(host, port, "POST", "/v1/completions", body,
                                    timeout=max(1.0, deadline - time.monotonic()))
            except BaseException as e:  # noqa: BLE001 - reported below
                result["e"] = e

        t = threading.Thread(target=probe, daemon=True, name="anchor-ready-probe")
        t.start()
        while t.is_alive():
            alive_or_fail()
            t.join(0.05)
        status, text = result.get("r", (None, ""))
        if status != 200:
            alive_or_fail()
            why = f"HTTP {status}: {text[:300]}" if status else f"{result.get('e')!r}"
            raise self._fail(f"answered HTTP but could not generate ({why})")
        self.ready_at = time.perf_counter()
        self._snapshot()

    def _snapshot(self) -> None:
        """Remember the guard's descendants, to kill them even if the guard itself is gone."""
        try:
            import psutil

            for c in psutil.Process(self.proc.pid).children(recursive=True):
                self._known[c.pid] = c.create_time()
        except Exception:  # noqa: BLE001 - best effort: the guard is the primary cleaner
            pass

    # -- stop ----------------------------------------------------------------------------
    def stop(self) -> int:
        """Tear everything down: the guard SIGTERMs the launcher and every rank, SIGKILLs what is
        left after `grace`; if the guard itself does not finish, this SIGKILLs its process group
        and every process it was seen to have. Returns the launcher's exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self._snapshot()
            try:
                self.proc.stdin.close()  # EOF: the guard's signal to tear down
            except OSError:
                pass
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=self.grace + 10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        _kill_known(self._known, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the guard's group
        except OSError:
            pass
        if self._pump:
            self._pump.join(timeout=5)
        if self._logf:
            self._logf.close()
            self._logf = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.stdout:
            self.proc.stdout.close()
        self._code = self.proc.returncode
        return self._code

    def __enter__(self) -> "AnchorCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _http(host: str, port: int, method: str, path: str, body: dict | None = None,
          timeout: float = 5.0) -> tuple[int | None, str]:
    import http.client

    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = c.getresponse()
            try:
                text = r.read().decode(errors="replace")
            except (OSError, http.client.HTTPException):
                text = ""  # /v1/models sends 200, then may die mid-body (no HF cache dir)
            return r.status, text
        finally:
            c.close()
    except (OSError, http.client.HTTPException):
        return None, ""


def _die_with_parent() -> None:
    from launcher.agent import die_with_parent

    die_with_parent(signal.SIGTERM)


def _kill_known(known: dict[int, float], sig: int) -> list[int]:
    """Signal those of `known` (pid -> create time) that are still the same live process."""
    import psutil

    hit = []
    for pid, created in list(known.items()):
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                known.pop(pid, None)
                continue
            p.send_signal(sig)
            hit.append(pid)
        except (psutil.Error, OSError):
            known.pop(pid, None)
    return hit


# ----------------------------------------------------------------------------- the guard


def _guard() -> int:
    """Run the launcher (argv/env from the first stdin line) and never let it or a rank outlive
    us or our parent. See the module docstring."""
    import psutil

    spec = json.loads(sys.stdin.buffer.readline())
    lifeline = sys.stdin.fileno()
    grace = float(spec.get("grace", 5.0))
    stopping: list[int] = []

    def on_signal(sig, _frame):
        if not stopping:
            stopping.append(sig)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    # The launcher's stdin: a pipe nobody writes and nobody closes. At EOF mlx.launch's main
    # loop would spin (its select on stdin returns at once, forever).
    r, w = os.pipe()
    try:
        child = subprocess.Popen(spec["argv"], env=spec["env"], stdin=r, close_fds=True, cwd=spec.get("cwd"),
                                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    except OSError as e:
        print(f"anchor: cannot run {spec['argv'][0]}: {e}", flush=True)
        return 127
    finally:
        os.close(r)
    me = psutil.Process()
    known: dict[int, float] = {}
    started = time.monotonic()
    next_scan = 0.0

    def scan():
        try:
            for c in me.children(recursive=True):
                known.setdefault(c.pid, c.create_time())
        except psutil.Error:
            pass

    while not stopping and child.poll() is None:
        try:
            ready, _, _ = select.select([lifeline], [], [], 0.2)
        except InterruptedError:
            ready = []
        if ready:
            try:
                data = os.read(lifeline, 4096)
            except OSError:
                data = b""
            if not data:  # our parent closed the pipe or died
                stopping.append(signal.SIGTERM)
        now = time.monotonic()
        if now >= next_scan:  # ranks appear during the first seconds; later they only go
            scan()
            next_scan = now + (0.5 if now - started < 30 else 5.0)

    # -- teardown: the launcher (and, for ring, local ranks) share our process group
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    scan()
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        pass
    t0 = time.monotonic()
    nudged = False
    while time.monotonic() < t0 + grace:
        child.poll()
        if child.returncode is not None and not any(_alive(pid, t) for pid, t in list(known.items())):
            break
        if not nudged and time.monotonic() > t0 + min(2.0, grace / 2):
            # mpirun's ranks sit in process groups of their own: if mpirun has not taken
            # them down by now, do it ourselves.
            _kill_known(known, signal.SIGTERM)
            nudged = True
        time.sleep(0.05)
    _kill_known(known, signal.SIGKILL)
    for p in psutil.process_iter(["pid"]):  # whatever else joined our group
        try:
            if p.pid != os.getpid() and os.getpgid(p.pid) == os.getpgid(0):
                p.kill()
        except (psutil.Error, OSError):
            continue
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    os.close(w)
    if spec.get("workdir"):
        shutil.rmtree(spec["workdir"], ignore_errors=True)
    code = child.returncode
    if stopping:
        return 0
    return code if code is not None and code >= 0 else 128 + (-(code or 0))


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - created) <= 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    if sys.argv[1:] == ["--guard"]:
        sys.exit(_guard())
    sys.exit("usage: python -m launcher.bench.anchor --guard  (internal: started by AnchorCluster)")
