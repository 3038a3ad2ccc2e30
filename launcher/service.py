"""Services: `exolaunch run` kept up by the OS: a launchd agent (macOS) or a systemd user unit
(Linux). What the file says and where it goes; loading it is launcher.cli_service's job.

Both start `exolaunch [--hostfile ABS] run ARGS` in the directory `service install` ran in, with
PATH and the environment exolaunch and the ranks read (EXOLAUNCH_*, HF_*, MLX_*, OMPI_*, the
variables `-x VAR` forwards), restart it when it fails, and append its output to one log file.
Stopping is Ctrl-C's orderly teardown: systemd sends SIGINT to exolaunch only (KillMode=mixed:
whatever is left after TimeoutStopSec gets SIGKILL), launchd sends SIGTERM (handled the same).
The file can hold secrets (EXOLAUNCH_API_KEY): it is written mode 0600, and --print hides them.
"""

from __future__ import annotations

import os
import plistlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PLATFORMS = ("macos", "linux")
# Environment a service needs from the shell that installed it (a service starts with almost none).
ENV_PREFIXES = ("EXOLAUNCH_", "HF_", "HUGGINGFACE_", "MLX_", "OMPI_")
ENV_NAMES = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "LANG", "LC_ALL", "LD_PRELOAD")
ENV_NEVER = ("EXOLAUNCH_JOB_ID",)  # a service is not a detached job
RESTART_SECONDS = 10
STOP_SECONDS = 60  # exolaunch's own teardown (--grace, then kill) ends well within this


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise ConfigError(f"service NAME {name!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit.")
    return name


def host_platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


def exolaunch_command() -> list[str]:
    """An absolute command for this exolaunch: the script beside this Python (not a pyenv or
    venv shim that depends on the shell), else `python -m launcher`."""
    script = Path(sys.executable).parent / "exolaunch"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "launcher"]


def forwarded_names(run_args: list[str]) -> list[str]:
    """Variables `-x VAR` / `--env VAR` forward from exolaunch's own environment."""
    names, it = [], iter(run_args)
    for a in it:
        value = None
        if a in ("-x", "--env"):
            value = next(it, None)
        elif a.startswith("--env="):
            value = a[len("--env="):]
        if value and "=" not in value:
            names.append(value)
    return names


def service_env(run_args: list[str], environ: dict, extra: dict) -> dict[str, str]:
    forwarded = set(forwarded_names(run_args))
    env = {k: v for k, v in environ.items()
           if (k in ENV_NAMES or k.startswith(ENV_PREFIXES) or k in forwarded) and k not in ENV_NEVER}
    env.update(extra)
    return dict(sorted(env.items()))


@dataclass
class Service:
    name: str
    platform: str              # macos | linux
    program: list[str]         # the whole command line
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    home: Path = field(default_factory=Path.home)

    @property
    def label(self) -> str:  # launchd Label; systemd unit exolaunch-NAME.service
        return f"exolaunch.{self.name}"

    @property
    def unit(self) -> str:
        return f"exolaunch-{self.name}.service"

    @property
    def path(self) -> Path:
        if self.platform == "macos":
            return self.home / "Library" / "LaunchAgents" / f"{self.label}.plist"
        config = os.environ.get("XDG_CONFIG_HOME") or str(self.home / ".config")
        return Path(config) / "systemd" / "user" / self.unit

    @property
    def log(self) -> Path:
        if self.platform == "macos":
            return self.home / "Library" / "Logs" / "exolaunch" / f"{self.name}.log"
        state = os.environ.get("XDG_STATE_HOME") or str(self.home / ".local" / "state")
        return Path(state) / "exolaunch" / "services" / f"{self.name}.log"

    def render(self) -> str:
        return plist(self) if self.platform == "macos" else systemd_unit(self)

    def masked(self) -> "Service":
        """The same service with secret values (secret-named variables and flags) hidden: what
        --print shows."""
        from dataclasses import replace

        from launcher.dryrun import HIDDEN, SECRET, SECRET_FLAG

        env = {k: HIDDEN if SECRET.search(k) else v for k, v in self.env.items()}
        program, hide_next = [], False
        for a in self.program:
            flag, eq, _ = a.partition("=")
            if hide_next:
                a, hide_next = HIDDEN, False
            elif SECRET_FLAG.fullmatch(flag):
                a, hide_next = (f"{flag}={HIDDEN}", False) if eq else (a, True)
            program.append(a)
        return replace(self, env=env, program=program)


def plist(s: Service) -> str:
    env = dict(s.env)
    env.setdefault("HOME", str(s.home))
    doc = {
        "Label": s.label,
        "ProgramArguments": s.program,
        "WorkingDirectory": s.cwd,
        "EnvironmentVariables": env,
        "RunAtLoad": True,
        # Restart when it fails (the launchd form of systemd's Restart=on-failure); an orderly
        # stop by launchctl is not restarted.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_SECONDS,
        "ExitTimeOut": STOP_SECONDS,
        "ProcessType": "Standard",
        "StandardOutPath": str(s.log),
        "StandardErrorPath": str(s.log),
    }
    return plistlib.dumps(doc, sort_keys=False).decode()


def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _no_newline(what: str, text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what} {text!r}: a service file cannot hold a line break.")
    return text


def _exec_word(arg: str) -> str:
    """One ExecStart word: % and $ are specifiers and variables there; quote what needs it."""
    arg = _specifiers(_no_newline("argument", arg)).replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@+=:,./%$-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _env_assignment(k: str, v: str) -> str:
    v = _specifiers(_no_newline(f"environment variable {k}", v))
    return '"' + f"{k}={v}".replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(s: Service) -> str:
    lines = [
        "[Unit]",
        f"Description=exolaunch service {s.name}",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_specifiers(_no_newline('directory', s.cwd))}",
        *(f"Environment={_env_assignment(k, v)}" for k, v in s.env.items()),
        "ExecStart=" + " ".join(_exec_word(a) for a in s.program),
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        # Stopping is Ctrl-C: SIGINT to exolaunch alone, which tears every rank down in order.
        "KillSignal=SIGINT",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_SECONDS}",
        f"StandardOutput=append:{_specifiers(str(s.log))}",
        f"StandardError=append:{_specifiers(str(s.log))}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def build(name: str, run_args: list[str], *, platform: str | None = None, hostfile: Path | None = None,
          topology: Path | None = None, setenv: dict | None = None, environ: dict | None = None,
          cwd: str | None = None) -> Service:
    """The service for `exolaunch [--hostfile H] [--topology T] run RUN_ARGS`."""
    check_name(name)
    platform = platform or host_platform()
    if platform not in PLATFORMS:
        raise ConfigError(f"--platform {platform!r}: expected macos or linux.")
    if any(a in ("-d", "--detach") for a in run_args):
        raise ConfigError("-d/--detach in a service's run arguments: launchd or systemd keeps it running; drop -d.")
    cwd = cwd or os.getcwd()
    glob = []
    if hostfile is not None:
        glob += ["--hostfile", str(Path(cwd, hostfile).resolve())]
    if topology is not None:
        glob += ["--topology", str(Path(cwd, topology).resolve())]
    program = [*exolaunch_command(), *glob, "run", *run_args]
    env = service_env(run_args, dict(os.environ if environ is None else environ), setenv or {})
    # The paths are on the command line now, absolute: the variables would only be stale copies.
    if hostfile is not None:
        env.pop("EXOLAUNCH_HOSTFILE", None)
    if topology is not None:
        env.pop("EXOLAUNCH_TOPOLOGY", None)
    return Service(name, platform, program, cwd, env)
