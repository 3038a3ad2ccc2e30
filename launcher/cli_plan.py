"""`exolaunch plan` and `exolaunch models` (registered on the typer app in launcher.cli_common)."""

from __future__ import annotations

import shutil
from typing import List, Optional

import typer

from launcher.cli_common import app, load_cluster
from launcher.errors import ConfigError


def _width() -> int:
    return max(100, shutil.get_terminal_size((140, 40)).columns)


def _bandwidths(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--bandwidth {it!r}: expected HOST=GB_PER_S, e.g. m3u-1=819.") from None
    return out


@app.command("plan", help="Show how MODEL would be laid out on the hosts: per rank the shard, weights, KV cache "
                          "and free memory; the layout and backend chosen and why; the alternatives with a decode "
                          "estimate. Exit status 0 if it fits, 1 if it does not (see docs/planner.md).")
def plan_(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Catalogue name (`exolaunch models`), demo model, directory or HF repo id."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens of context per sequence (default: the "
                                          "model's, capped at 32768)."),
    batch: int = typer.Option(1, "--batch", help="Concurrent sequences (KV cache and estimate)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="ring | jaccl | jaccl-ring | mpi (default: from the topology)."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="tensor | pipeline | hybrid (default: chosen)."),
    np: Optional[int] = typer.Option(None, "-n", "--np", help="Use the first N slots of the hostfile."),
    reserve_gb: Optional[float] = typer.Option(
        None, "--reserve-gb", help="Usable = RAM minus this, for hosts whose GPU wired limit you raised "
                                   "(sudo sysctl iogpu.wired_limit_mb=N). Default: 75% of RAM (2/3 up to 36 GB)."),
    bandwidth: List[str] = typer.Option([], "--bandwidth", help="HOST=GB/s memory bandwidth (repeatable)."),
):
    from launcher.planner import plan_for

    hostfile, topology = load_cluster(ctx.obj)
    plan = plan_for(model, hostfile, topology, context=context, batch=batch, backend=backend, sharding=sharding,
                    np=np, reserve_gb=reserve_gb, bandwidth=_bandwidths(bandwidth))
    typer.echo(plan.render(width=_width()), nl=False)
    return 0 if plan.fits else 1


@app.command("models", help="List the model catalogue (configs/models.yaml) with sizes.")
def models_():
    import io

    from rich.console import Console
    from rich.table import Table

    from launcher.catalogue import GB, canonical_names, load_catalogue

    cat = load_catalogue()
    t = Table(title="exolaunch model catalogue (configs/models.yaml; ~ = approximate)")
    for col in ("name", "repo", "arch", "params", "active", "quant", "disk GB", "context", "sharding"):
        t.add_column(col, justify="right" if col in ("params", "active", "disk GB", "context") else "left")
    for name in canonical_names(cat):
        c = cat[name]
        aliases = [n for n, o in cat.items() if o.alias_of == name]
        t.add_row(name + (f" ({', '.join(aliases)})" if aliases else ""), c.repo or "(built-in demo)",
                  c.architecture, _params(c.params_total), _params(c.params_active), c.quantization,
                  ("~" if "disk_gb" in c.approx or "all" in c.approx else "") +
                  (f"{c.disk_bytes / GB:,.1f}" if c.disk_bytes >= 0.05 * GB else f"{c.disk_bytes / GB:.4f}"),
                  f"{c.context_length:,}", "+".join(c.sharding))
    buf = io.StringIO()
    Console(file=buf, width=max(_width(), 170), color_system=None, highlight=False).print(t)
    typer.echo(buf.getvalue(), nl=False)
    return 0


def _params(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:,.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:,.1f}M"
    return f"{n / 1e3:,.0f}K"
