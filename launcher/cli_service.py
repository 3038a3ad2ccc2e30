"""`exolaunch service install|status|logs|uninstall|list`: a run kept up by launchd or systemd.

The file is made by launcher.service; here it is written and loaded: `launchctl bootstrap` into
the user's GUI domain on macOS, `systemctl --user daemon-reload` + `enable --now` on Linux.
Where there is no systemd user instance (a container, an SSH session without lingering), the
file stays written and exolaunch says how to start it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from launcher import service as svc
from launcher.cli_common import Globals, app
from launcher.errors import ConfigError

service_app = typer.Typer(
    no_args_is_help=True,
    help="Keep `exolaunch run` up as a launchd agent (macOS) or a systemd user unit (Linux): "
         "started at login or boot, restarted when it fails.")
app.add_typer(service_app, name="service")

EXIT_NOT_RUNNING = 3  # as `systemctl status` and LSB: installed but not running
PLATFORM_OPTION = typer.Option(None, "--platform", hidden=True, help="macos | linux (default: this machine's).")


def _cmd(argv: list[str]) -> tuple[int, str]:
    """Run a service manager command: (status, its output); 127 if it is not installed."""
    if shutil.which(argv[0]) is None:
        return 127, f"{argv[0]}: not found"
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(argv)}: no answer in 60 s"
    return p.returncode, (p.stdout + p.stderr).strip()


def _installed(name: str, platform: Optional[str]) -> svc.Service:
    """The service NAME as installed (only its paths matter here)."""
    if platform not in (None, *svc.PLATFORMS):
        raise ConfigError(f"--platform {platform!r}: expected macos or linux.")
    s = svc.Service(svc.check_name(name), platform or svc.host_platform(), [], "")
    if not s.path.exists():
        raise ConfigError(f"service {name!r}: not installed (no {s.path}; see `exolaunch service list`).")
    return s


def _gui_domain() -> str:
    return f"gui/{os.getuid()}"


def _load(s: svc.Service) -> tuple[bool, str]:
    """Start the installed file with the service manager: (ok, what happened)."""
    if s.platform != svc.host_platform():
        return False, f"not loaded: this is not a {s.platform} machine"
    if s.platform == "macos":
        _cmd(["launchctl", "bootout", f"{_gui_domain()}/{s.label}"])  # a previous version, if loaded
        _cmd(["launchctl", "enable", f"{_gui_domain()}/{s.label}"])
        code, out = _cmd(["launchctl", "bootstrap", _gui_domain(), str(s.path)])
        return code == 0, out or "loaded with launchctl bootstrap"
    code, out = _cmd(["systemctl", "--user", "daemon-reload"])
    if code == 0:
        code, out = _cmd(["systemctl", "--user", "enable", "--now", s.unit])
    if code == 0:
        note = ""
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
        if user and not Path("/var/lib/systemd/linger", user).exists():
            note = (f"; it stops when {user}'s last session ends unless lingering is on "
                    f"(`loginctl enable-linger {user}`)")
        return True, "enabled and started with systemctl --user" + note
    return False, _no_systemd_hint(s, out)


def _no_systemd_hint(s: svc.Service, out: str) -> str:
    if "bus" in out.lower() or "not found" in out or "XDG_RUNTIME_DIR" in out:
        return (f"not started: no systemd user instance here ({out.splitlines()[0] if out else 'systemctl failed'}). "
                f"In a login session run `systemctl --user daemon-reload && systemctl --user enable --now {s.unit}` "
                "(and `loginctl enable-linger` to keep it up without a session)")
    return f"not started: systemctl --user failed: {out}"


def _unload(s: svc.Service) -> str:
    if s.platform != svc.host_platform():
        return ""
    if s.platform == "macos":
        code, out = _cmd(["launchctl", "bootout", f"{_gui_domain()}/{s.label}"])
        return "" if code == 0 else out
    code, out = _cmd(["systemctl", "--user", "disable", "--now", s.unit])
    return "" if code == 0 else out


@service_app.command("install", help="Write the service for `exolaunch run RUN_ARGS` and start it. "
                                     "Global options before `service` (--hostfile, --topology) are kept.")
def install(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME", help="Service name: letters, digits, '.', '_', '-'."),
    run_args: Optional[List[str]] = typer.Argument(None, metavar="-- RUN_ARGS...",
                                                   help="The arguments of `exolaunch run`, after `--`."),
    print_only: bool = typer.Option(False, "--print", help="Show the file (secrets hidden); write nothing."),
    no_start: bool = typer.Option(False, "--no-start", help="Write the file, do not load or start it."),
    setenv: List[str] = typer.Option([], "--setenv", help="KEY=VALUE in the service's environment (repeatable)."),
    platform: Optional[str] = PLATFORM_OPTION,
):
    from launcher.envfile import parse_x

    run_args = list(run_args or [])
    for item in setenv:
        if "=" not in item:
            raise ConfigError(f"--setenv {item!r}: expected KEY=VALUE.")
    extra = parse_x(setenv)
    _check_run_args(ctx, run_args)
    g: Globals = ctx.find_root().obj
    s = svc.build(name, run_args, platform=platform, hostfile=g.hostfile, topology=g.topology, setenv=extra)
    if print_only:
        typer.echo(s.masked().render(), nl=False)
        return 0
    text = s.render()
    s.path.parent.mkdir(parents=True, exist_ok=True)
    s.log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(s.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold EXOLAUNCH_API_KEY
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(s.path, 0o600)
    print(f"exolaunch: wrote {s.path} (log: {s.log})", file=sys.stderr)
    if any(a == "--api-key" or a.startswith("--api-key=") for a in run_args):
        print("exolaunch: warning: --api-key puts the key on the command line (visible in `ps`); "
              "prefer --setenv EXOLAUNCH_API_KEY=…", file=sys.stderr)
    if no_start:
        return 0
    ok, what = _load(s)
    print(f"exolaunch: service {name}: {what}", file=sys.stderr)
    return 0 if ok else 1


def _check_run_args(ctx: typer.Context, run_args: list[str]) -> None:
    """Parse RUN_ARGS as `run` would now, so a typo fails here and not in a service restarting
    every 10 s. (Parsing only: the hostfile and model are read when the service starts.)"""
    if any(a in ("-h", "--help") for a in run_args):
        raise ConfigError("RUN_ARGS: --help is not a run argument (see `exolaunch run --help`).")
    root = ctx.find_root().command
    run_cmd = root.commands["run"] if hasattr(root, "commands") else None
    if run_cmd is not None:
        run_cmd.make_context("run", list(run_args), parent=ctx.find_root())


@service_app.command("status", help="Is the service loaded and running? (exit 3 when not running)")
def status(name: str = typer.Argument(..., metavar="NAME"), platform: Optional[str] = PLATFORM_OPTION):
    s = _installed(name, platform)
    print(f"exolaunch: service {name}: {s.path} (log: {s.log})", file=sys.stderr)
    if s.platform != svc.host_platform():
        print(f"exolaunch: not a {s.platform} machine: cannot ask its service manager", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if s.platform == "macos":
        code, out = _cmd(["launchctl", "print", f"{_gui_domain()}/{s.label}"])
        typer.echo(out)
        return 0 if code == 0 and "state = running" in out else EXIT_NOT_RUNNING
    code, out = _cmd(["systemctl", "--user", "status", "--no-pager", s.unit])
    if code not in (0, 3):
        print(f"exolaunch: {_no_systemd_hint(s, out)}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    typer.echo(out)
    return 0 if code == 0 else EXIT_NOT_RUNNING


@service_app.command("logs", help="Print the service's output (exolaunch's and every rank's).")
def logs(
    name: str = typer.Argument(..., metavar="NAME"),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new output (Ctrl-C to end)."),
    tail: Optional[int] = typer.Option(None, "-n", "--tail", help="Start with only the last N lines."),
    platform: Optional[str] = PLATFORM_OPTION,
):
    from launcher.cli_jobs import print_log

    s = _installed(name, platform)
    if not s.log.exists() and not follow:
        print(f"exolaunch: service {name} has no output yet ({s.log})", file=sys.stderr)
        return 0
    return print_log(s.log, follow=follow, tail=tail, running=lambda: True)


@service_app.command("uninstall", help="Stop the service (orderly, as Ctrl-C), unload it and delete its file.")
def uninstall(name: str = typer.Argument(..., metavar="NAME"), platform: Optional[str] = PLATFORM_OPTION):
    s = _installed(name, platform)
    problem = _unload(s)
    s.path.unlink()
    if s.platform == "linux" and s.platform == svc.host_platform():
        _cmd(["systemctl", "--user", "daemon-reload"])
    note = f" (unloading said: {problem.splitlines()[0]})" if problem else ""
    print(f"exolaunch: removed service {name}: {s.path}{note}; its log stays at {s.log}", file=sys.stderr)
    return 0


@service_app.command("list", help="Installed exolaunch services.")
def list_(platform: Optional[str] = PLATFORM_OPTION):
    s = svc.Service("x", platform or svc.host_platform(), [], "")
    d = s.path.parent
    pattern = "exolaunch.*.plist" if s.platform == "macos" else "exolaunch-*.service"
    for p in sorted(d.glob(pattern)) if d.is_dir() else []:
        stem = p.name[len("exolaunch."):-len(".plist")] if s.platform == "macos" else p.name[len("exolaunch-"):-len(".service")]
        typer.echo(f"{stem}  {p}")
    return 0
