"""The report side of `exolaunch bench`: bench records (see records.py) -> one summary row per
(sweep point, server) -> summary.csv, summary.md and two PNG plots.

Row fields (also the CSV columns, in this order; see ROW_KEYS):

    point, model, ranks, hosts (joined by ","), backend, sharding, blas (the sweep's mode; empty in
    records from before it), prompt_tokens, gen_tokens, concurrency, server,
    blas_library (what this server's ranks ran, from the records; distinct values joined by "; "),
    repeats (ok runs), failed (not-ok runs),
    decode_tok_s, aggregate_tok_s, prompt_tok_s,               # median over the ok repeats
    ttft_p50, ttft_p90, ttft_p99, tpot_*, itl_*, e2e_*          # SECONDS, as in the records:
                                                                # each run's percentile, median over repeats
    launch_to_first_token_s                                    # median of the non-null ones
    peak_mem_mb_max                                            # max over ranks and repeats
    idle_cpu_pct_max                                           # max over ranks, median over repeats
    ceiling_tok_s, pct_of_ceiling                              # roofline, median over repeats
    decode_ratio, aggregate_ratio, ttft_p50_ratio, launch_ratio  # exolaunch / mlx-lm anchor at the
                                                                # same point; only on exolaunch rows
    errors                                                     # distinct error messages of failed runs

A (point, server) whose runs all failed still gets a row (repeats 0, metrics empty), so failures
are never hidden. Anything missing is None (an empty CSV cell, "—" in markdown).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from launcher.bench.records import point_key

ANCHOR = "mlx-lm"
EXOLAUNCH = "exolaunch"
_SERVER_ORDER = {EXOLAUNCH: 0, ANCHOR: 1}

CONFIG_FIELDS = ("model", "ranks", "hosts", "backend", "sharding", "blas", "prompt_tokens", "gen_tokens",
                 "concurrency")
LATENCIES = ("ttft", "tpot", "itl", "e2e")
PCTS = ("p50", "p90", "p99")
RATE_FIELDS = ("decode_tok_s", "aggregate_tok_s", "prompt_tok_s")
RATIO_FIELDS = ("decode_ratio", "aggregate_ratio", "ttft_p50_ratio", "launch_ratio")

ROW_KEYS = (
    ("point",)
    + CONFIG_FIELDS
    + ("server", "blas_library", "repeats", "failed")
    + RATE_FIELDS
    + tuple(f"{lat}_{p}" for lat in LATENCIES for p in PCTS)
    + ("launch_to_first_token_s", "peak_mem_mb_max", "idle_cpu_pct_max", "ceiling_tok_s", "pct_of_ceiling")
    + RATIO_FIELDS
    + ("errors",)
)

FIGSIZE = (8, 5)
DPI = 120


# -- summary ----------------------------------------------------------------------------------


def _num(v):
    """v as a float when it is a real number, else None (bools, strings, NaN are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if v != v else v


def _median(values):
    vals = [x for x in (_num(v) for v in values) if x is not None]
    return statistics.median(vals) if vals else None


def _dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ratio(a, b):
    a, b = _num(a), _num(b)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _record_config(rec: dict) -> dict:
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    return {k: cfg.get(k) for k in CONFIG_FIELDS}


def _record_point(rec: dict, cfg: dict) -> str:
    if rec.get("point"):
        return str(rec["point"])
    try:
        return point_key({k: v for k, v in cfg.items() if k != "blas" or v is not None})
    except Exception:  # a record too broken to key: group it by its printed config
        return repr(sorted(cfg.items(), key=lambda kv: kv[0]))


def _hosts_str(hosts) -> str | None:
    if hosts is None:
        return None
    if isinstance(hosts, (list, tuple)):
        return ",".join(str(h) for h in hosts)
    return str(hosts)


def _sort_key(row: dict):
    def s(v):
        return "" if v is None else str(v)

    def n(v):
        v = _num(v)
        return float("inf") if v is None else v

    return (
        s(row["model"]), s(row["backend"]), s(row["sharding"]), s(row["blas"]), n(row["ranks"]),
        n(row["prompt_tokens"]), n(row["gen_tokens"]), n(row["concurrency"]), s(row["hosts"]),
        _SERVER_ORDER.get(row["server"], 2), s(row["server"]),
    )


def _summarize_group(point: str, cfg: dict, server: str, recs: list[dict]) -> dict:
    ok = [r for r in recs if r.get("ok") is True]
    bad = [r for r in recs if r.get("ok") is not True]
    row: dict = {k: None for k in ROW_KEYS}
    row.update(cfg)
    row["point"] = point
    row["hosts"] = _hosts_str(cfg.get("hosts"))
    row["server"] = server
    row["repeats"] = len(ok)
    row["failed"] = len(bad)
    libs = [_dig(r, "blas", "library") for r in (ok or recs)]
    row["blas_library"] = "; ".join(sorted({str(x) for x in libs if x})) or None

    mets = [r.get("metrics") if isinstance(r.get("metrics"), dict) else {} for r in ok]
    for f in RATE_FIELDS:
        row[f] = _median(m.get(f) for m in mets)
    for lat in LATENCIES:
        for p in PCTS:
            row[f"{lat}_{p}"] = _median(_dig(m, f"{lat}_s", p) for m in mets)
    row["launch_to_first_token_s"] = _median(m.get("launch_to_first_token_s") for m in mets)

    peaks = [_num(v) for m in mets for v in (m.get("peak_mem_mb") or [])]
    peaks = [v for v in peaks if v is not None]
    row["peak_mem_mb_max"] = max(peaks) if peaks else None

    idle_per_run = []
    for m in mets:
        vals = [x for x in (_num(v) for v in (m.get("idle_cpu_pct") or [])) if x is not None]
        if vals:
            idle_per_run.append(max(vals))
    row["idle_cpu_pct_max"] = _median(idle_per_run)

    roofs = [r.get("roofline") for r in ok if isinstance(r.get("roofline"), dict)]
    row["ceiling_tok_s"] = _median(rf.get("ceiling_tok_s") for rf in roofs)
    row["pct_of_ceiling"] = _median(rf.get("pct_of_ceiling") for rf in roofs)

    errors: list[str] = []
    for r in bad:
        e = str(r.get("error") or "failed (no error given)").strip().replace("\n", " ")
        if e not in errors:
            errors.append(e)
    row["errors"] = " | ".join(errors) if errors else None
    return row


def summarize(records: list[dict]) -> list[dict]:
    """One row per (point, server): medians over its ok repeats, failed counted. See the module
    docstring for the fields. Ratios (exolaunch / anchor) go on the exolaunch row when both servers
    have ok runs at the point."""
    groups: dict[tuple[str, str], list[dict]] = {}
    configs: dict[str, dict] = {}
    for rec in records:
        if not isinstance(rec, dict):
            continue
        cfg = _record_config(rec)
        point = _record_point(rec, cfg)
        configs.setdefault(point, cfg)
        server = str(rec.get("server") or "?")
        groups.setdefault((point, server), []).append(rec)

    rows = {key: _summarize_group(key[0], configs[key[0]], key[1], recs) for key, recs in groups.items()}

    for (point, server), row in rows.items():
        anchor = rows.get((point, ANCHOR))
        if server != EXOLAUNCH or anchor is None or not row["repeats"] or not anchor["repeats"]:
            continue
        row["decode_ratio"] = _ratio(row["decode_tok_s"], anchor["decode_tok_s"])
        row["aggregate_ratio"] = _ratio(row["aggregate_tok_s"], anchor["aggregate_tok_s"])
        row["ttft_p50_ratio"] = _ratio(row["ttft_p50"], anchor["ttft_p50"])
        row["launch_ratio"] = _ratio(row["launch_to_first_token_s"], anchor["launch_to_first_token_s"])

    return sorted(rows.values(), key=_sort_key)


# -- CSV ----------------------------------------------------------------------------------------


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return round(v, 6)  # 1 µs / 1e-6 tok/s: drops float noise (0.052500000000000005), keeps the data
    return v


def write_csv(rows: list[dict], path) -> Path:
    """summary rows -> CSV with the ROW_KEYS header (always written, even with no rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROW_KEYS)
        for row in rows:
            w.writerow([_csv_cell(row.get(k)) for k in ROW_KEYS])
    return path


# -- markdown -----------------------------------------------------------------------------------

_DASH = "—"


def _fmt(v, decimals: int, scale: float = 1.0, suffix: str = "") -> str:
    v = _num(v)
    if v is None:
        return _DASH
    return f"{v * scale:.{decimals}f}{suffix}"


def _fmt_ms(seconds) -> str:
    v = _num(seconds)
    if v is None:
        return _DASH
    ms = v * 1000.0
    return f"{ms:.0f}" if abs(ms) >= 100 else f"{ms:.1f}"


def _fmt_ratios(row: dict) -> str:
    if row["server"] != EXOLAUNCH or all(row.get(k) is None for k in ("decode_ratio", "aggregate_ratio", "ttft_p50_ratio")):
        return ""
    return " / ".join(_fmt(row.get(k), 2, suffix="×") for k in ("decode_ratio", "aggregate_ratio", "ttft_p50_ratio"))


def _fmt_blas(row: dict) -> str:
    """The sweep's mode and the library this server ran: "openblas: libopenblasp-r0.3.21.so"."""
    libs = [lib.rsplit("/", 1)[-1] for lib in (row.get("blas_library") or "").split("; ") if lib]
    mode = row.get("blas")
    return ": ".join(x for x in (mode, ", ".join(libs)) if x) or _DASH


def _cell(v) -> str:
    s = _DASH if v is None else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


# (header, cell function) in table order; the hosts column is inserted when it is needed.
_MD_COLUMNS = (
    ("model", lambda r: r["model"]),
    ("ranks", lambda r: r["ranks"]),
    ("backend", lambda r: r["backend"]),
    ("sharding", lambda r: r["sharding"]),
    ("BLAS", lambda r: _fmt_blas(r)),
    ("prompt / gen tok", lambda r: f"{_cell(r['prompt_tokens'])} / {_cell(r['gen_tokens'])}"),
    ("concurrency", lambda r: r["concurrency"]),
    ("server", lambda r: f"{r['server']} (anchor)" if r["server"] == ANCHOR else r["server"]),
    ("runs ok", lambda r: r["repeats"]),
    ("failed", lambda r: r["failed"]),
    ("decode tok/s", lambda r: _fmt(r["decode_tok_s"], 1)),
    ("aggregate tok/s", lambda r: _fmt(r["aggregate_tok_s"], 1)),
    ("prompt tok/s", lambda r: _fmt(r["prompt_tok_s"], 1)),
    ("TTFT p50 ms", lambda r: _fmt_ms(r["ttft_p50"])),
    ("TTFT p99 ms", lambda r: _fmt_ms(r["ttft_p99"])),
    ("TPOT p50 ms", lambda r: _fmt_ms(r["tpot_p50"])),
    ("ITL p50 ms", lambda r: _fmt_ms(r["itl_p50"])),
    ("ITL p99 ms", lambda r: _fmt_ms(r["itl_p99"])),
    ("E2E p50 s", lambda r: _fmt(r["e2e_p50"], 2)),
    ("launch→1st token s", lambda r: _fmt(r["launch_to_first_token_s"], 1)),
    ("peak MB/rank", lambda r: _fmt(r["peak_mem_mb_max"], 0)),
    ("idle %core/rank", lambda r: _fmt(r["idle_cpu_pct_max"], 1)),
    ("% roofline", lambda r: _fmt(r["pct_of_ceiling"], 1)),
    ("× anchor (decode / agg / TTFT)", _fmt_ratios),
    ("× anchor launch", lambda r: _fmt(r["launch_ratio"], 2, suffix="×") if r["server"] == EXOLAUNCH and r["launch_ratio"] is not None else ""),
)

_TEXT_COLUMNS = {"model", "hosts", "backend", "sharding", "BLAS", "prompt / gen tok", "server"}

_HOW_TO_READ = (
    "How to read: each row is one sweep point on one server; rates and latencies are medians over "
    "the ok repeats (latency percentiles are per run, over its requests). "
    "Ratios are exolaunch / anchor (mlx_lm.server started by mpirun for mpi, mlx.launch for ring) at the same point: "
    ">1 is better for tok/s (decode, aggregate), <1 is better for TTFT and launch time. "
    "Peak MB is the largest rank's peak RSS; idle %core is the busiest rank's CPU use while idle "
    "(% of one core); % roofline is aggregate decode rate / memory-bandwidth ceiling. "
    f"{_DASH} = not measured."
)
_HOW_TO_READ_BLAS = (
    " BLAS is the sweep's --blas for both servers of a point and, after the colon, the library each "
    "server's ranks actually ran (read from their mapped libraries)."
)


def _needs_hosts_column(rows: list[dict]) -> bool:
    seen: dict[tuple, str | None] = {}
    for r in rows:
        key = tuple(r.get(k) for k in CONFIG_FIELDS if k != "hosts") + (r.get("server"),)
        if key in seen and seen[key] != r.get("hosts"):
            return True
        seen[key] = r.get("hosts")
    return False


def markdown_table(rows: list[dict]) -> str:
    """A GitHub markdown table of summary rows (anchor rows right under their exolaunch row), a
    line on how to read it, and the failed runs' errors."""
    if not rows:
        return "_No benchmark records._\n"

    columns = list(_MD_COLUMNS)
    has_blas = any(r.get("blas") or r.get("blas_library") for r in rows)
    if not has_blas:  # records from before the blas axis: the table they always had
        columns = [c for c in columns if c[0] != "BLAS"]
    if _needs_hosts_column(rows):
        columns.insert(2, ("hosts", lambda r: r["hosts"]))

    out: list[str] = []
    n_ok = sum(r["repeats"] or 0 for r in rows)
    n_failed = sum(r["failed"] or 0 for r in rows)
    if n_ok == 0:
        out.append(f"**No successful runs**: all {n_failed} run(s) failed (see below).")
        out.append("")
    if not any(c[0] == "hosts" for c in columns):
        host_sets = sorted({r["hosts"] for r in rows if r.get("hosts")})
        if host_sets:
            out.append("Hosts: " + "; ".join(f"`{h}`" for h in host_sets))
            out.append("")

    out.append("| " + " | ".join(h for h, _ in columns) + " |")
    out.append("|" + "|".join(":---" if h in _TEXT_COLUMNS else "---:" for h, _ in columns) + "|")
    for r in rows:
        out.append("| " + " | ".join(_cell(fn(r)) for _, fn in columns) + " |")
    out.append("")
    out.append(_HOW_TO_READ + (_HOW_TO_READ_BLAS if has_blas else ""))

    failed_rows = [r for r in rows if r.get("failed")]
    if failed_rows:
        out.append("")
        out.append(f"Failed runs ({n_failed}):")
        out.append("")
        for r in failed_rows:
            where = (f"{r['model']}, {r['ranks']} rank(s), {r['backend']}/{r['sharding']}, "
                     + (f"blas {r['blas']}, " if r.get("blas") else "")
                     + f"{r['prompt_tokens']}/{r['gen_tokens']} tok, concurrency {r['concurrency']}, {r['server']}")
            out.append(f"- {_cell(where)}: {r['failed']} failed — {_cell(r.get('errors') or 'no error given')}")
    return "\n".join(out) + "\n"


# -- plots --------------------------------------------------------------------------------------


def _new_figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _style(server: str) -> dict:
    if server == ANCHOR:
        return {"linestyle": "--", "marker": "s"}
    return {"linestyle": "-", "marker": "o"}


def _ok_rows(rows):
    return [r for r in rows if r.get("repeats")]


def _finish(fig, axes, handles_labels, path, *, x_from_zero: bool = False) -> Path:
    handles, labels = handles_labels
    if handles:
        ncol = 1 if len(labels) <= 2 else 2
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize="small", frameon=False)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.08, y=0.1)  # room for the c=N notes at the edges
        ax.set_ylim(bottom=0)
        if x_from_zero:
            ax.set_xlim(left=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _collect_legend(axes):
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


def plot_throughput_vs_ranks(rows: list[dict], path) -> Path | None:
    """Decode tok/s (concurrency 1, else the lowest measured) and aggregate tok/s (highest
    concurrency measured) against rank count; one line per (model, backend, sharding, server),
    anchor dashed. Returns the PNG path, or None (nothing written) when no row has a number."""
    rows = [r for r in _ok_rows(rows) if _num(r.get("ranks")) is not None]
    if not any(_num(r.get(f)) is not None for r in rows for f in ("decode_tok_s", "aggregate_tok_s")):
        return None

    # A line is (model, backend, sharding, server); prompt/gen go into it only if they vary.
    shapes = {(r["prompt_tokens"], r["gen_tokens"]) for r in rows}
    blases = {r.get("blas") for r in rows}
    def line_key(r):
        k = (r["model"], r["backend"], f"{r['sharding']}" + (f" blas {r.get('blas')}" if len(blases) > 1 else ""))
        return k + ((r["prompt_tokens"], r["gen_tokens"]) if len(shapes) > 1 else ())

    fig, axes = _new_figure(2)
    colours = {}
    all_ranks = sorted({int(_num(r["ranks"])) for r in rows})
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((line_key(r), r["server"]), []).append(r)
    for (lk, server), lrows in sorted(lines.items(), key=lambda kv: (str(kv[0][0]), _SERVER_ORDER.get(kv[0][1], 2))):
        colour = colours.setdefault(lk, f"C{len(colours) % 10}")
        label = " ".join(str(x) for x in lk[:3]) + (f" p{lk[3]}/g{lk[4]}" if len(lk) > 3 else "") + f" [{server}]"
        by_ranks: dict[int, list[dict]] = {}
        for r in lrows:
            by_ranks.setdefault(int(_num(r["ranks"])), []).append(r)
        for ax, field, pick, always_note in (
            (axes[0], "decode_tok_s", min, False),
            (axes[1], "aggregate_tok_s", max, True),
        ):
            pts = []
            for rk in sorted(by_ranks):
                cand = [r for r in by_ranks[rk] if _num(r.get(field)) is not None and _num(r.get("concurrency")) is not None]
                if not cand:
                    continue
                conc = pick(_num(r["concurrency"]) for r in cand)
                vals = [_num(r[field]) for r in cand if _num(r["concurrency"]) == conc]
                pts.append((rk, statistics.median(vals), int(conc)))
            if not pts:
                continue
            xs, ys, cs = zip(*pts)
            ax.plot(xs, ys, color=colour, label=label, **_style(server))
            for x, y, c in pts:
                if always_note or c != 1:
                    ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)

    axes[0].set_title("Decode rate, concurrency 1")
    axes[0].set_ylabel("decode tok/s (per stream)")
    axes[1].set_title("Aggregate rate, highest concurrency")
    axes[1].set_ylabel("aggregate tok/s (all streams)")
    for ax in axes:
        ax.set_xlabel("ranks")
        ax.set_xticks(all_ranks)
        if len(all_ranks) == 1:
            ax.set_xlim(all_ranks[0] - 1, all_ranks[0] + 1)
    fig.suptitle("Throughput vs ranks (solid: exolaunch, dashed: mlx-lm anchor)", fontsize="medium")
    return _finish(fig, axes, _collect_legend(axes), path)


def plot_latency_vs_throughput(rows: list[dict], path) -> Path | None:
    """TTFT p50 (ms) and E2E p50 (s) against aggregate tok/s; one line per (model, ranks,
    backend, server) through its concurrency levels, points annotated with the concurrency.
    Returns the PNG path, or None (nothing written) when no row has the numbers."""
    rows = [r for r in _ok_rows(rows) if _num(r.get("aggregate_tok_s")) is not None]
    if not any(_num(r.get(f)) is not None for r in rows for f in ("ttft_p50", "e2e_p50")):
        return None

    shardings = {r["sharding"] for r in rows}
    blases = {r.get("blas") for r in rows}
    shapes = {(r["prompt_tokens"], r["gen_tokens"]) for r in rows}
    def line_key(r):
        k = (r["model"], r["ranks"], r["backend"])
        k += (r["sharding"],) if len(shardings) > 1 else ()
        k += (f"blas {r.get('blas')}",) if len(blases) > 1 else ()
        k += (f"p{r['prompt_tokens']}/g{r['gen_tokens']}",) if len(shapes) > 1 else ()
        return k

    fig, axes = _new_figure(2)
    colours = {}
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((line_key(r), r["server"]), []).append(r)
    for (lk, server), lrows in sorted(lines.items(), key=lambda kv: (str(kv[0][0]), _SERVER_ORDER.get(kv[0][1], 2))):
        colour = colours.setdefault(lk, f"C{len(colours) % 10}")
        label = f"{lk[0]} {lk[1]}r {' '.join(str(x) for x in lk[2:])} [{server}]"
        lrows = sorted(lrows, key=lambda r: (_num(r.get("concurrency")) or 0, str(r.get("hosts"))))
        for ax, field, scale in ((axes[0], "ttft_p50", 1000.0), (axes[1], "e2e_p50", 1.0)):
            pts = [(_num(r["aggregate_tok_s"]), _num(r[field]) * scale, r.get("concurrency"))
                   for r in lrows if _num(r.get(field)) is not None]
            if not pts:
                continue
            xs, ys, _ = zip(*pts)
            ax.plot(xs, ys, color=colour, label=label, **_style(server))
            for x, y, c in pts:
                ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)

    axes[0].set_title("Time to first token")
    axes[0].set_ylabel("TTFT p50 (ms)")
    axes[1].set_title("End-to-end request latency")
    axes[1].set_ylabel("E2E p50 (s)")
    for ax in axes:
        ax.set_xlabel("aggregate tok/s")
    fig.suptitle("Latency vs throughput by concurrency (c=N; solid: exolaunch, dashed: mlx-lm anchor)",
                 fontsize="medium")
    return _finish(fig, axes, _collect_legend(axes), path, x_from_zero=True)


# -- everything ---------------------------------------------------------------------------------


def write_all(records: list[dict], out_dir) -> dict[str, Path]:
    """summary.csv, summary.md, throughput_vs_ranks.png, latency_vs_throughput.png into out_dir.
    Returns {"csv", "md", "throughput_vs_ranks", "latency_vs_throughput": path} for what was
    written; the plots are skipped when there is nothing to plot (e.g. no ok records)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    written: dict[str, Path] = {}
    written["csv"] = write_csv(rows, out_dir / "summary.csv")
    md_path = out_dir / "summary.md"
    md_path.write_text("# Benchmark summary\n\n" + markdown_table(rows))
    written["md"] = md_path
    for kind, fn in (("throughput_vs_ranks", plot_throughput_vs_ranks),
                     ("latency_vs_throughput", plot_latency_vs_throughput)):
        p = fn(rows, out_dir / f"{kind}.png")
        if p is not None:
            written[kind] = p
    return written
