"""launcher.bench.report: bench records -> summary rows, CSV, markdown, PNG plots."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from launcher.bench import records as rec_mod
from launcher.bench import report

MODEL = "demo-llama"
SERVERS = ("exolaunch", "mlx-lm")
RANKS = (1, 2)
CONCURRENCY = (1, 4)
REPEATS = 2
REPEATS_RANGE = range(REPEATS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pcts(base: float) -> dict:
    return {"p50": base, "p90": base * 1.5, "p99": base * 2.0, "mean": base * 1.1}


def make_record(server="exolaunch", ranks=1, concurrency=1, repeat=0, ok=True, *, launch=None,
                prompt_tokens=128, gen_tokens=32, error=None, roofline=True):
    """One record following records.py's schema; every number depends on the inputs (and differs
    per repeat) so the expected summary can be computed from them."""
    hosts = [f"h{i + 1}" for i in range(ranks)]
    config = {"model": MODEL, "ranks": ranks, "hosts": hosts, "backend": "ring", "sharding": "pipeline",
              "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "concurrency": concurrency}
    rec = {"schema": rec_mod.SCHEMA, "sweep": "test", "point": rec_mod.point_key(config), "repeat": repeat,
           "server": server, "config": config, "ok": ok, "error": None if ok else (error or "boom"),
           "env": {"hosts": hosts, "versions": {}, "git_commit": None, "machine": "test",
                   "started": "2025-01-01T00:00:00Z"}}
    if not ok:
        rec["roofline"] = None
        return rec
    s = 1.0 if server == "exolaunch" else 0.8          # the anchor is a bit slower here
    r = 1.0 + 0.1 * repeat                             # repeats differ
    decode = 50.0 * s * ranks * r
    rec["metrics"] = {
        "ttft_s": _pcts(0.05 * concurrency / s * r),
        "tpot_s": _pcts(0.02 / s * r),
        "itl_s": _pcts(0.021 / s * r),
        "e2e_s": _pcts(0.7 * concurrency / s * r),
        "prompt_tok_s": 1000.0 * s * r,
        "decode_tok_s": decode,
        "aggregate_tok_s": decode * concurrency * 0.9,
        "requests": concurrency * 2, "completed": concurrency * 2, "tokens_generated": concurrency * 2 * gen_tokens,
        "prompt_tokens_seen": prompt_tokens,
        "launch_to_first_token_s": launch,
        "peak_mem_mb": [100.0 * (i + 1) + 10 * repeat + (5 if server == "mlx-lm" else 0) for i in range(ranks)],
        "idle_cpu_pct": [1.0 + i + repeat * 0.5 for i in range(ranks)],
    }
    rec["roofline"] = ({"bandwidth_gbs": {h: 100.0 for h in hosts}, "bytes_per_token": {h: 1e9 for h in hosts},
                        "ceiling_tok_s": 100.0 * concurrency * ranks,
                        "pct_of_ceiling": 40.0 + 5 * repeat + ranks} if roofline else None)
    return rec


@pytest.fixture
def recs():
    out = []
    for server in SERVERS:
        for ranks in RANKS:
            for conc in CONCURRENCY:
                for rep in REPEATS_RANGE:
                    # launch time only on the first run after a cluster start (conc 1, repeat 0)
                    launch = (10.0 if server == "exolaunch" else 20.0) * ranks if (conc == 1 and rep == 0) else None
                    out.append(make_record(server, ranks, conc, rep, launch=launch))
    out.append(make_record("exolaunch", 2, 4, REPEATS, ok=False, error="rank 1 died"))
    return out


def _ok(recs, server, ranks, conc):
    return [r for r in recs if r["ok"] and r["server"] == server and r["config"]["ranks"] == ranks
            and r["config"]["concurrency"] == conc]


def _row(rows, server, ranks, conc):
    (row,) = [r for r in rows if r["server"] == server and r["ranks"] == ranks and r["concurrency"] == conc]
    return row


def test_summary_medians_and_ratios(recs):
    rows = report.summarize(recs)
    assert len(rows) == len(SERVERS) * len(RANKS) * len(CONCURRENCY)
    for server in SERVERS:
        for ranks in RANKS:
            for conc in CONCURRENCY:
                row = _row(rows, server, ranks, conc)
                src = _ok(recs, server, ranks, conc)
                ms = [r["metrics"] for r in src]
                assert row["model"] == MODEL and row["hosts"] == ",".join(src[0]["config"]["hosts"])
                assert row["point"] == src[0]["point"]
                assert row["repeats"] == REPEATS
                assert row["failed"] == (1 if (server, ranks, conc) == ("exolaunch", 2, 4) else 0)
                for f in ("decode_tok_s", "aggregate_tok_s", "prompt_tok_s"):
                    assert row[f] == pytest.approx(statistics.median(m[f] for m in ms))
                for lat in ("ttft", "tpot", "itl", "e2e"):
                    for p in ("p50", "p90", "p99"):
                        assert row[f"{lat}_{p}"] == pytest.approx(statistics.median(m[f"{lat}_s"][p] for m in ms))
                launches = [m["launch_to_first_token_s"] for m in ms if m["launch_to_first_token_s"] is not None]
                assert row["launch_to_first_token_s"] == (pytest.approx(statistics.median(launches)) if launches else None)
                assert row["peak_mem_mb_max"] == max(v for m in ms for v in m["peak_mem_mb"])
                assert row["idle_cpu_pct_max"] == pytest.approx(statistics.median(max(m["idle_cpu_pct"]) for m in ms))
                assert row["ceiling_tok_s"] == pytest.approx(statistics.median(r["roofline"]["ceiling_tok_s"] for r in src))
                assert row["pct_of_ceiling"] == pytest.approx(statistics.median(r["roofline"]["pct_of_ceiling"] for r in src))

                if server == "mlx-lm":
                    assert all(row[k] is None for k in report.RATIO_FIELDS)
                    continue
                anchor = _row(rows, "mlx-lm", ranks, conc)
                a = [r["metrics"] for r in _ok(recs, "mlx-lm", ranks, conc)]
                med = lambda xs: statistics.median(xs)  # noqa: E731
                assert row["decode_ratio"] == pytest.approx(med(m["decode_tok_s"] for m in ms) / med(m["decode_tok_s"] for m in a))
                assert row["aggregate_ratio"] == pytest.approx(
                    med(m["aggregate_tok_s"] for m in ms) / med(m["aggregate_tok_s"] for m in a))
                assert row["ttft_p50_ratio"] == pytest.approx(
                    med(m["ttft_s"]["p50"] for m in ms) / med(m["ttft_s"]["p50"] for m in a))
                if conc == 1:
                    assert row["launch_ratio"] == pytest.approx(row["launch_to_first_token_s"] / anchor["launch_to_first_token_s"])
                else:
                    assert row["launch_ratio"] is None


def test_summary_sorted_anchor_after_exolaunch(recs):
    rows = report.summarize(list(reversed(recs)))
    keys = [(r["ranks"], r["concurrency"], r["server"]) for r in rows]
    assert keys == [(rk, c, s) for rk in RANKS for c in CONCURRENCY for s in SERVERS]


def test_summary_robust_to_missing_metrics_and_failures():
    a = make_record("exolaunch", 1, 1, 0)
    a["metrics"]["ttft_s"] = None
    a["metrics"]["peak_mem_mb"] = []
    del a["metrics"]["decode_tok_s"]
    a["roofline"] = None
    b = make_record("exolaunch", 1, 1, 1)
    only_failed = make_record("mlx-lm", 1, 1, 0, ok=False, error="server did not start")
    rows = report.summarize([a, b, only_failed])
    exo, anchor = rows
    assert exo["server"] == "exolaunch" and anchor["server"] == "mlx-lm"
    assert exo["ttft_p50"] == pytest.approx(b["metrics"]["ttft_s"]["p50"])  # only b had it
    assert exo["decode_tok_s"] == pytest.approx(b["metrics"]["decode_tok_s"])
    assert exo["peak_mem_mb_max"] == max(b["metrics"]["peak_mem_mb"])
    assert exo["ceiling_tok_s"] == pytest.approx(b["roofline"]["ceiling_tok_s"])
    # the anchor has no ok runs: its row is there (failures are not hidden), and no ratios
    assert anchor["repeats"] == 0 and anchor["failed"] == 1 and anchor["decode_tok_s"] is None
    assert anchor["errors"] == "server did not start"
    assert all(exo[k] is None for k in report.RATIO_FIELDS)
    md = report.markdown_table(rows)
    assert "server did not start" in md


def test_csv_round_trip(recs, tmp_path):
    rows = report.summarize(recs)
    path = report.write_csv(rows, tmp_path / "s.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        back = list(reader)
        assert tuple(reader.fieldnames) == report.ROW_KEYS
    assert len(back) == len(rows)
    assert all(len(r) == len(report.ROW_KEYS) and None not in r for r in back)
    row = _row(rows, "exolaunch", 2, 1)
    (crow,) = [r for r in back if r["server"] == "exolaunch" and r["ranks"] == "2" and r["concurrency"] == "1"]
    assert float(crow["decode_tok_s"]) == pytest.approx(row["decode_tok_s"])
    assert float(crow["decode_ratio"]) == pytest.approx(row["decode_ratio"])
    assert crow["hosts"] == "h1,h2"
    anchor = [r for r in back if r["server"] == "mlx-lm"][0]
    assert anchor["decode_ratio"] == ""  # None -> empty cell


def test_markdown_table(recs):
    rows = report.summarize(recs)
    md = report.markdown_table(rows)
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(rows)
    header, sep = table[0], table[1]
    ncols = header.count("|") - 1
    assert set(sep.replace("|", "").replace("-", "").replace(":", "")) == set()
    assert all(ln.count("|") - ln.count("\\|") - 1 == ncols for ln in table)
    for h in ("decode tok/s", "aggregate tok/s", "TTFT p50 ms", "ITL p99 ms", "peak MB/rank",
              "idle %core/rank", "% roofline", "× anchor (decode / agg / TTFT)", "failed"):
        assert h in header
    # each exolaunch row carries its ratios (2 decimals) and the anchor row is right under it
    body = table[2:]
    for i, row in enumerate(rows):
        if row["server"] == "exolaunch":
            assert f"{row['decode_ratio']:.2f}×" in body[i]
            assert f"{row['aggregate_ratio']:.2f}×" in body[i]
            assert f"{row['ttft_p50_ratio']:.2f}×" in body[i]
            assert f"{row['decode_tok_s']:.1f}" in body[i]
            assert "mlx-lm" in body[i + 1] and rows[i + 1]["point"] == row["point"]
    # the line on how to read it, and the failed run
    tail = md.split(table[-1], 1)[1]
    assert "exolaunch / anchor" in tail and ">1" in tail and "<1" in tail
    assert "rank 1 died" in tail
    failed_col = [c.strip() for c in header.strip("|").split("|")].index("failed")
    failed_cells = [ln.strip("|").split("|")[failed_col].strip() for ln in body]
    assert failed_cells.count("1") == 1


def _check_png(path):
    import matplotlib.image as mpimg

    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] > 0 and img.shape[1] > 0
    return img


def test_write_all(recs, tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    loaded = rec_mod.load(tmp_path / "results.jsonl")
    out = report.write_all(loaded, tmp_path / "report")
    assert set(out) == {"csv", "md", "throughput_vs_ranks", "latency_vs_throughput"}
    assert out["csv"].name == "summary.csv" and out["md"].name == "summary.md"
    assert "× anchor" in out["md"].read_text()
    for kind in ("throughput_vs_ranks", "latency_vs_throughput"):
        img = _check_png(out[kind])
        assert img.shape[:2] == (5 * report.DPI, 8 * report.DPI)


def test_plots_with_one_rank_count(recs, tmp_path):
    rows = report.summarize([r for r in recs if r["config"]["ranks"] == 1])
    p = report.plot_throughput_vs_ranks(rows, tmp_path / "t.png")
    q = report.plot_latency_vs_throughput(rows, tmp_path / "l.png")
    _check_png(p)
    _check_png(q)


def test_no_ok_records(tmp_path):
    failed = [make_record("exolaunch", 1, 1, 0, ok=False, error="no hosts reachable"),
              make_record("mlx-lm", 1, 1, 0, ok=False, error="mlx.launch not found")]
    out = report.write_all(failed, tmp_path)
    assert set(out) == {"csv", "md"}
    assert not (tmp_path / "throughput_vs_ranks.png").exists()
    assert not (tmp_path / "latency_vs_throughput.png").exists()
    md = out["md"].read_text()
    assert "No successful runs" in md and "no hosts reachable" in md
    with open(out["csv"], newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["repeats"] for r in back] == ["0", "0"] and [r["failed"] for r in back] == ["1", "1"]

    empty = report.write_all([], tmp_path / "empty")
    assert set(empty) == {"csv", "md"}
    assert "No benchmark records" in empty["md"].read_text()
    with open(empty["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert list(reader) == [] and tuple(reader.fieldnames) == report.ROW_KEYS
