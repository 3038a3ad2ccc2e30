"""A real OpenSSH server on loopback aliases, for tests.

``SshCluster`` starts ONE ``sshd`` daemon (foreground, ``-D -e``) that listens
on several loopback addresses (127.0.0.2, 127.0.0.3, ...) with the same port.
Each address is exposed as a "host" alias (h1, h2, ...) in a generated
``ssh_config`` so tests can run ``ssh -F <ssh_config> h1 ...`` against a real
SSH server with strict host key checking and throwaway keys.

Only loopback addresses are ever used.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")


class SshdError(RuntimeError):
    """sshd could not be set up or started."""


def missing_binaries() -> list[str]:
    """Names of the binaries required by SshCluster that are not available."""
    missing = []
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    for exe in (SSH, SSH_KEYGEN):
        if not (os.path.isabs(exe) and os.access(exe, os.X_OK)):
            missing.append(os.path.basename(exe))
    return missing


@dataclass(frozen=True)
class SshHost:
    alias: str  # "h1"
    ip: str  # "127.0.0.2"
    port: int


def _port_free_on(ips: list[str], port: int) -> bool:
    socks = []
    try:
        for ip in ips:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def _pick_port(ips: list[str], attempts: int = 20) -> int:
    """A TCP port currently free on every one of ``ips``."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        if _port_free_on(ips, port):
            return port
    raise SshdError(f"could not find a TCP port free on all of {ips}")


def _become_subreaper() -> None:  # runs in the child, before exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass


_PR_SET_CHILD_SUBREAPER = 36


def _descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_tree(root: psutil.Process, term_grace: float = 1.0, grace: float = 5.0) -> None:
    """Kill every descendant of ``root``, then terminate ``root`` itself.

    ``root`` (the sshd daemon) is a child subreaper, so processes orphaned by
    a dropped session (even double-forked ones) stay in its tree.

    1. freeze (SIGSTOP) the daemon and, top-down until the set is stable,
       every descendant, so nothing can fork while we look;
    2. SIGTERM + SIGCONT them all and give them ``term_grace`` seconds (so
       e.g. shell EXIT traps can remove their lock files);
    3. SIGKILL whatever is left, repeatedly, until nothing below the daemon
       is alive;
    4. resume the daemon so it reaps the dead, then SIGTERM it.
    """
    try:
        root.suspend()
    except psutil.Error:
        return
    frozen: dict[int, psutil.Process] = {}
    while True:
        new = [p for p in _descendants(root) if p.pid not in frozen]
        for p in new:
            frozen[p.pid] = p
            try:
                p.suspend()
            except psutil.Error:
                pass
        if not new:
            break
    for p in frozen.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    for p in frozen.values():
        try:
            p.resume()
        except psutil.Error:
            pass
    deadline = time.monotonic() + term_grace
    while time.monotonic() < deadline and any(_alive(p) for p in _descendants(root)):
        time.sleep(0.02)
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in _descendants(root) if _alive(p)]
        if not alive or time.monotonic() > deadline:
            break
        for p in alive:
            try:
                p.kill()  # SIGKILL also works on stopped processes
            except psutil.Error:
                pass
        time.sleep(0.02)
    try:
        root.resume()  # let it reap (it is the subreaper of all of them)
    except psutil.Error:
        return
    deadline = time.monotonic() + grace
    while _descendants(root) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        root.terminate()
    except psutil.Error:
        pass


class SshCluster:
    """One sshd daemon serving ``n_hosts`` loopback "hosts" h1..hN.

    h<i> is 127.0.0.<i+1> (h1 -> 127.0.0.2), all on the same port.
    """

    def __init__(
        self,
        n_hosts: int = 2,
        workdir: Path | str | None = None,
        *,
        start_timeout: float = 10.0,
        keep_workdir: bool | None = None,
    ) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError("n_hosts must be in 1..250")
        self.n_hosts = n_hosts
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="exl-ssh-", dir="/tmp")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # By default, remove the workdir on stop() only if we created it.
        self.keep_workdir = (not self._own_workdir) if keep_workdir is None else keep_workdir
        self.start_timeout = start_timeout

        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"
        self.sshd_config = self.workdir / "sshd_config"
        self.sshd_log = self.workdir / "sshd.log"
        self.pid_file = self.workdir / "sshd.pid"

        self.user = pwd.getpwuid(os.geteuid()).pw_name  # root on the test machines
        self.hosts: list[SshHost] = []
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._ps: psutil.Process | None = None
        self._stopped = False

    # ------------------------------------------------------------------ info
    @property
    def sshd_pid(self) -> int:
        if self._proc is None:
            raise SshdError("sshd is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def host(self, alias: str) -> SshHost:
        for h in self.hosts:
            if h.alias == alias:
                return h
        raise KeyError(alias)

    @property
    def aliases(self) -> list[str]:
        return [h.alias for h in self.hosts]

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes (children of the daemon).

        Killing one with SIGKILL drops that connection: the ssh client exits
        255 and the remote command is orphaned (it keeps running, re-parented
        to the daemon, which is a child subreaper, exactly like a real host
        would re-parent it to init). Orphans are not listed here.
        """
        if self._ps is None:
            return []
        pids = []
        try:
            kids = self._ps.children(recursive=False)
        except psutil.Error:
            return []
        for p in kids:
            try:
                if p.name() == "sshd" and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p.pid)
            except psutil.Error:
                pass
        return sorted(pids)

    def session_tree_pids(self) -> list[int]:
        """PIDs of every process below the daemon (sessions, what they run, orphans)."""
        if self._ps is None:
            return []
        try:
            return sorted(p.pid for p in self._ps.children(recursive=True))
        except psutil.Error:
            return []

    def log_text(self) -> str:
        try:
            return self.sshd_log.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.running:
            return
        if self._stopped:
            raise SshdError("SshCluster cannot be restarted after stop()")
        missing = missing_binaries()
        if missing:
            raise SshdError(f"missing binaries: {', '.join(missing)}")
        try:  # sshd's privilege-separation dir
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise SshdError(f"cannot create {PRIVSEP_DIR}: {e}") from e
        self._make_keys()
        ips = [f"127.0.0.{i + 2}" for i in range(self.n_hosts)]
        last_err = ""
        for attempt in range(5):
            # one log per attempt: sshd.log, then sshd.retry1.log, ...
            self.sshd_log = self.workdir / ("sshd.log" if attempt == 0 else f"sshd.retry{attempt}.log")
            port = _pick_port(ips)
            self.port = port
            self.hosts = [SshHost(f"h{i + 1}", ip, port) for i, ip in enumerate(ips)]
            self._write_configs()
            try:
                self._launch_and_wait()
                atexit.register(self.stop)
                return
            except _BindRace as e:
                last_err = str(e)
                self._kill_daemon()
                continue
            except BaseException:
                self._kill_daemon()
                raise
        raise SshdError(f"sshd could not bind a port after 5 attempts: {last_err}")

    def stop(self) -> None:
        """Kill every session process and the daemon. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        self._kill_daemon()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SshCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------- helpers
    def ssh_argv(self, alias: str, *cmd: str, options: list[str] = ()) -> list[str]:
        argv = [SSH, "-F", str(self.ssh_config)]
        for o in options:
            argv += ["-o", o]
        return [*argv, alias, *cmd]

    def ssh(self, alias: str, *cmd: str, timeout: float = 10, check: bool = False,
            input: str | None = None, options: list[str] = ()) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``alias`` via ``ssh -F ssh_config``; text output captured."""
        return subprocess.run(
            self.ssh_argv(alias, *cmd, options=options),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    # -------------------------------------------------------------- internal
    def _make_keys(self) -> None:
        for key, comment in ((self.host_key, "exl-test-hostkey"), (self.client_key, "exl-test-client")):
            if key.exists():
                continue
            r = subprocess.run(
                [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            )
            if r.returncode != 0:
                raise SshdError(f"ssh-keygen failed for {key}: {r.stderr.strip()}")
            os.chmod(key, 0o600)
        pub = Path(str(self.client_key) + ".pub").read_text().strip()
        self.authorized_keys.write_text(pub + "\n")

    def _write_configs(self) -> None:
        host_pub = Path(str(self.host_key) + ".pub").read_text().split()
        key_type, key_b64 = host_pub[0], host_pub[1]
        self.known_hosts.write_text(
            "".join(f"[{h.ip}]:{h.port} {key_type} {key_b64}\n" for h in self.hosts)
        )
        listen = "".join(f"ListenAddress {h.ip}:{h.port}\n" for h in self.hosts)
        # Each "host" gets its own TMPDIR, as separate machines have their own /tmp: tools
        # that key temp paths by hostname (OpenMPI's session directory) would otherwise
        # race between hosts that are all this one machine.
        per_host = ""
        for h in self.hosts:
            tmp = self.workdir / f"tmp-{h.alias}"
            tmp.mkdir(exist_ok=True)
            per_host += f"Match LocalAddress {h.ip}\n    SetEnv SHLVL=1 TMPDIR={tmp}\n"
        self.sshd_config.write_text(
            f"""# generated by tests/sshd.py
{listen}AddressFamily inet
HostKey {self.host_key}
PidFile {self.pid_file}
AuthorizedKeysFile {self.authorized_keys}
PermitRootLogin yes
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
MaxStartups 200:30:400
MaxSessions 200
MaxAuthTries 6
LoginGraceTime 30
ClientAliveInterval 0
LogLevel VERBOSE
# bash sources ~/.bashrc for commands run by sshd only when SHLVL < 2; root's
# .bashrc runs `pyenv init` (a slow `pyenv rehash` with a global lock file
# that a killed session leaves behind). Keep sessions minimal, like a
# non-interactive ssh command on a fresh host: SetEnv SHLVL=1 in the per-host blocks below.
Subsystem sftp internal-sftp
{per_host}"""
        )
        blocks = "".join(f"Host {h.alias}\n    HostName {h.ip}\n    Port {h.port}\n\n" for h in self.hosts)
        self.ssh_config.write_text(
            f"""# generated by tests/sshd.py
{blocks}Host *
    User {self.user}
    IdentityFile {self.client_key}
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    CheckHostIP no
    BatchMode yes
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    ConnectTimeout 10
    LogLevel ERROR
"""
        )

    def _launch_and_wait(self) -> None:
        # sshd refuses to start with a config it cannot parse: check first.
        r = subprocess.run([SSHD, "-t", "-f", str(self.sshd_config)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SshdError(f"sshd -t rejected {self.sshd_config}: {r.stderr.strip()}")
        log = open(self.sshd_log, "wb")
        try:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.sshd_config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True,
                # Orphans of dropped sessions get re-parented to the daemon
                # (not to pid 1) so stop() can still find and reap them.
                preexec_fn=_become_subreaper,
            )
        finally:
            log.close()
        self._ps = psutil.Process(self._proc.pid)

        deadline = time.monotonic() + self.start_timeout
        pending = {h.ip for h in self.hosts}
        while True:
            text = self.log_text()
            for ip in list(pending):
                if f"Server listening on {ip} port {self.port}." in text:
                    pending.discard(ip)
            if "Bind to port" in text or "Cannot bind any address" in text or "Address already in use" in text:
                raise _BindRace(text.strip().splitlines()[-1])
            rc = self._proc.poll()
            if rc is not None:
                raise SshdError(f"sshd exited with status {rc} during start-up; log {self.sshd_log}:\n{text}")
            if not pending and all(self._banner_ok(h) for h in self.hosts):
                return
            if time.monotonic() > deadline:
                raise SshdError(
                    f"sshd did not accept connections within {self.start_timeout:.0f}s "
                    f"(still waiting for {sorted(pending) or 'banner'}); log {self.sshd_log}:\n{text}"
                )
            time.sleep(0.05)

    @staticmethod
    def _banner_ok(h: SshHost) -> bool:
        try:
            with socket.create_connection((h.ip, h.port), timeout=2) as s:
                s.settimeout(2)
                data = b""
                while b"\n" not in data and len(data) < 256:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"SSH-2.0-")
        except OSError:
            return False

    def _kill_daemon(self) -> None:
        proc, ps = self._proc, self._ps
        if proc is None:
            return
        if proc.poll() is None and ps is not None:
            _kill_tree(ps)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    ps.kill()
                except psutil.Error:
                    pass
                proc.wait(timeout=5)
        else:
            proc.wait()
        self._ps = None
        try:
            self.pid_file.unlink()
        except OSError:
            pass


class _BindRace(SshdError):
    """The picked port was taken before sshd could bind it."""
