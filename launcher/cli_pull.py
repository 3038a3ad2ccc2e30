"""`exolaunch pull` (registered on the typer app in launcher.cli_common)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from launcher.cli_common import app, check_host_key_check, load_cluster
from launcher.errors import ConfigError

EXIT_FAILED = 1  # some host failed: the summary names it and why


def _classify(model: str) -> tuple[str, str]:
    """("dir", model) for demo models, local directories and GGUF files (imported here), ("hub",
    repo id) otherwise."""
    from runtime.contract import classify_model

    ref = classify_model(model)
    if ref is not None and ref.kind in ("demo", "dir", "gguf"):
        return "dir", model
    try:  # a catalogue name (`exolaunch models`) stands for its repo
        from launcher.catalogue import load_catalogue

        card = load_catalogue().get(model)
        if card is not None and getattr(card, "repo", None):
            return "hub", card.repo
    except Exception:
        pass
    if ref is not None:
        return "hub", model
    raise ConfigError(f"model {model!r}: no such directory, demo model, catalogue name or Hugging Face repo id "
                      "(owner/name). Fix: check the name (`exolaunch models` lists the catalogue).")


def _resolve_here(model: str) -> Path:
    from runtime.contract import ModelError, resolve_model

    try:
        return resolve_model(model)[0]
    except ModelError as e:
        raise ConfigError(str(e)) from None


@app.command(
    "pull",
    help="Put MODEL's files on every host. A Hugging Face repo (or catalogue name): each host downloads what "
         "its ranks need from the hub (resumable; pipeline ranks only their layers' files). --stage, local "
         "directories and demo models: fetched or found here once and copied to each host over SSH (rsync, "
         "resumable), skipping files already there with the same size and sha256. Free disk is checked first. "
         "Destination: --dest, else $EXOLAUNCH_MODELS/<name> from the host's env in the hostfile, else the same "
         "path as here. Exit 0 if every host has the files, 1 if any failed (named, with the reason).",
)
def pull_(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face repo id, catalogue name, demo model or local directory."),
    stage: bool = typer.Option(False, "--stage", help="Fetch once here and copy to each host over SSH "
                                                     "(for hosts without internet)."),
    dest: Optional[str] = typer.Option(None, "--dest", help="The model directory on every host (absolute, or ~/… "
                                                           "for each host's home)."),
    sharding: str = typer.Option("tensor", "--sharding", help="tensor (every rank needs every file) or pipeline "
                                                             "(each host only its stages' layers)."),
    np: Optional[int] = typer.Option(None, "-n", "--np", help="Use the first N slots of the hostfile."),
    method: str = typer.Option("auto", "--method", help="How to copy when staging: auto (rsync >= 3.1 on both "
                                                       "ends, else stream), rsync or stream."),
    bwlimit: Optional[int] = typer.Option(None, "--bwlimit", help="Staging: at most KiB/s per host."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", help="SSH connect timeout, seconds."),
    host_key_check: Optional[str] = typer.Option(None, "--host-key-check", help="yes | accept-new | no."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-host progress, only the summary."),
):
    from launcher import ssh, weights
    from launcher.backends import first_slots

    check_host_key_check(host_key_check)
    if sharding not in ("tensor", "pipeline"):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor or pipeline.")
    if method not in ("auto", "rsync", "stream"):
        raise ConfigError(f"--method {method!r}: expected auto, rsync or stream.")
    if dest is not None and not (dest.startswith("/") or dest == "~" or dest.startswith("~/")):
        raise ConfigError(f"--dest {dest!r}: expected an absolute path, or ~/… for each host's home directory.")
    if bwlimit is not None and bwlimit <= 0:
        raise ConfigError(f"--bwlimit {bwlimit}: expected KiB/s greater than 0.")
    hostfile, _ = load_cluster(ctx.obj)
    if np is not None:
        hostfile = first_slots(hostfile, np)
    sopts = ssh.SshOptions(connect_timeout=connect_timeout, host_key_check=host_key_check,
                           config=hostfile.ssh_config, options=dict(hostfile.ssh_options or {}))
    kind, ref = _classify(model)
    with weights.Progress(enabled=not quiet) as progress:
        if kind == "hub" and not stage:
            report = weights.hub_pull(ref, hostfile, sharding=sharding, dest=dest, revision=revision,
                                      sopts=sopts, progress=progress)
        else:
            if kind == "hub":
                print(f"exolaunch: fetching {ref} here once, to stage it to {len(hostfile.hosts)} host(s)",
                      file=sys.stderr, flush=True)
            model_dir = _resolve_here(ref)
            ranks_files = weights.files_for_ranks(model_dir, hostfile, sharding)
            report = weights.stage(model_dir, hostfile, dest=dest, ranks_files=ranks_files, method=method,
                                   bwlimit=bwlimit, sopts=sopts, progress=progress)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    print(report.render(), file=sys.stderr)
    if not report.ok:
        names = ", ".join(h.name for h in report.failed)
        print(f"exolaunch: pull failed on {len(report.failed)} host(s): {names}", file=sys.stderr)
        return EXIT_FAILED
    return 0
