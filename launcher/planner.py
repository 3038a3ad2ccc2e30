"""Model card + hosts + links -> Plan: layout, backend, memory per rank, decode estimate.

    plan = plan_for("kimi-k2", hostfile, topology, context=32768, batch=1)
    plan.fits, plan.sharding, plan.backend, plan.split, print(plan.render())

docs/planner.md describes the memory rule and the estimate formula; the constants below are
the model's knobs (all rough, all documented).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from launcher.catalogue import GB, ModelCard, resolve_card
from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile, Rank
from launcher.topology import RDMA_KINDS, Link, Topology, check_backend

# Peak memory bandwidth per chip, GB/s (Apple's published figures).
CHIP_BANDWIDTH_GBS = {
    "m1": 68, "m1-pro": 200, "m1-max": 400, "m1-ultra": 800,
    "m2": 100, "m2-pro": 200, "m2-max": 400, "m2-ultra": 800,
    "m3": 100, "m3-pro": 150, "m3-max": 400, "m3-ultra": 819,
    "m4": 120, "m4-pro": 273, "m4-max": 546, "m5": 153,
}
DEFAULT_BANDWIDTH_GBS = 400.0   # a host we know nothing about
EFFICIENCY = 0.70               # fraction of peak bandwidth a decode step achieves
LAYER_OVERHEAD_US = 20.0        # per layer per step: kernel launches, synchronisation
BACKEND_OVERHEAD_US = {"jaccl": 3.0, "jaccl-ring": 3.0, "ring": 30.0, "mpi": 30.0}  # per message, software
SPLIT_SUPPORT = {"mpi": True, "ring": False, "jaccl": False, "jaccl-ring": False}  # mx Group.split
LOOPBACK = Link("-", "-", "loopback", bandwidth_gbps=100.0, latency_us=10.0)
FAST_GBPS = 40.0                # a link at least this fast (with RDMA kind) counts as "fast" for TP
HEADROOM_FIXED_GB = 2.0         # per rank: Python, mlx, Metal buffers, prefill activations
HEADROOM_FRACTION = 0.03        # ... plus this fraction of the rank's weights
DEFAULT_CONTEXT_CAP = 32768     # default --context: the model's context length, capped here
ACT_BYTES = 2                   # activations on the wire are bf16


def usable_fraction(ram_gb: float) -> float:
    """macOS lets the GPU wire about 2/3 of RAM up to 36 GB, about 3/4 above (the default
    iogpu.wired_limit_mb = 0). Raise it with `sudo sysctl iogpu.wired_limit_mb=N`."""
    return 2 / 3 if ram_gb <= 36 else 0.75


def guess_chip(ram_gb: float | None) -> str | None:
    """The likeliest chip for a memory size (only M3 Ultra ships 256/512 GB, ...)."""
    if ram_gb is None:
        return None
    if ram_gb >= 256:
        return "m3-ultra"
    if ram_gb >= 192:
        return "m2-ultra"
    if ram_gb >= 96:
        return "m4-max"
    if ram_gb >= 48:
        return "m4-pro"
    return "m4"


# ----------------------------------------------------------------------------- data


@dataclass
class HostInfo:
    host: Host
    ram_gb: float | None          # None: unknown (remote host without memory_gb)
    usable_gb: float | None
    usable_note: str
    bandwidth_gbs: float
    bandwidth_note: str


PREFIX_CACHE_SHARE = 0.25  # of the spare memory (after weights and headroom) for the prefix KV cache
PREFIX_CACHE_MAX_GB = 16.0


def kv_scale(kv_bits: int | None, group_size: int = 64) -> float:
    """KV bytes per token with --kv-bits, as a share of float16's: bits/8 per value plus a
    float16 scale and bias per group of values (runtime/kv_quant.py)."""
    if not kv_bits:
        return 1.0
    return (kv_bits / 8 + 4 / group_size) / 2


@dataclass
class RankPlan:
    rank: int
    host: str
    shard: str                    # "layers 0-29", "TP 1/4", "TP 1/2 of layers 0-30"
    layers: tuple[int, int]       # [start, end)
    weights_gb: float
    kv_gb: float
    headroom_gb: float
    usable_gb: float | None       # the host's usable memory (shared by its ranks)
    free_gb: float | None         # usable minus what every rank on that host needs
    fits: bool
    kv_bytes_per_token: float = 0.0  # this rank's KV for one token of one sequence

    @property
    def need_gb(self) -> float:
        return self.weights_gb + self.kv_gb + self.headroom_gb


@dataclass
class Layout:
    name: str                     # "tensor", "pipeline", "pipeline (by memory)", "hybrid", "single"
    sharding: str                 # tensor | pipeline | hybrid
    tensor_size: int
    stages: list[list[int]]       # rank ids per stage, pipeline order
    split: list[int]              # layers per stage
    ranks: list[RankPlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # why this layout cannot run
    tok_s: float = 0.0
    step_ms: float = 0.0
    comm_ms: float = 0.0
    note: str = ""

    @property
    def memory_fits(self) -> bool:
        return all(r.fits for r in self.ranks)

    @property
    def ok(self) -> bool:
        return not self.problems and self.memory_fits


@dataclass
class Plan:
    model: ModelCard
    hostfile: Hostfile
    hosts: dict[str, HostInfo]
    context: int
    batch: int
    backend: str
    backend_reason: str
    layout: Layout
    alternatives: list[Layout]
    reasons: list[str]
    warnings: list[str]

    def _spare_gb(self) -> dict[str, tuple[float, list[RankPlan]]]:
        """Per host whose memory is known: (usable GB once weights and headroom are placed, its ranks)."""
        out = {}
        for name, info in self.hosts.items():
            mine = [r for r in self.ranks if r.host == name]
            if info.usable_gb is not None and mine:
                out[name] = (info.usable_gb - sum(r.weights_gb + r.headroom_gb for r in mine), mine)
        return out

    def prefix_cache_gb(self) -> float:
        """`run`'s default --prefix-cache-gb (per rank): PREFIX_CACHE_SHARE of the tightest host's
        spare memory, split among its ranks, at most PREFIX_CACHE_MAX_GB; 1 GB when no host's
        memory is known."""
        shares = [max(0.0, spare) * PREFIX_CACHE_SHARE / len(mine) for spare, mine in self._spare_gb().values()]
        return round(min(min(shares), PREFIX_CACHE_MAX_GB), 3) if shares else 1.0

    def kv_budget_tokens(self, prefix_cache_gb: float = 0.0) -> int | None:
        """Tokens of KV cache (summed over all running sequences) the tightest host holds once
        weights, headroom and each rank's prefix cache are placed; None when no host's memory is
        known."""
        budgets = []
        for spare, mine in self._spare_gb().values():
            per_token = sum(r.kv_bytes_per_token for r in mine)
            if per_token <= 0:
                continue
            spare -= prefix_cache_gb * len(mine)
            budgets.append(max(0, int(spare * GB / per_token)))
        return min(budgets) if budgets else None

    def max_total_tokens(self, max_num_seqs: int, prefix_cache_gb: float = 0.0) -> int:
        """What `run` gives the ranks as their KV budget (--max-total-tokens): the memory's, at
        most max_num_seqs full-context sequences."""
        cap = max_num_seqs * self.context
        budget = self.kv_budget_tokens(prefix_cache_gb)
        return cap if budget is None else min(budget, cap)

    @property
    def sharding(self) -> str:
        return self.layout.sharding

    @property
    def fits(self) -> bool:
        """Every rank's share fits its host's usable memory, and the layout can run."""
        return self.layout.ok

    @property
    def memory_fits(self) -> bool:
        return self.layout.memory_fits

    @property
    def ranks(self) -> list[RankPlan]:
        return self.layout.ranks

    @property
    def split(self) -> list[int]:
        """Layers per pipeline stage, in pipeline order (stage 0 runs the first layers)."""
        return self.layout.split

    @property
    def tensor_size(self) -> int:
        return self.layout.tensor_size

    @property
    def tok_s(self) -> float:
        return self.layout.tok_s

    def render(self, width: int = 120) -> str:
        return render(self, width)


# ----------------------------------------------------------------------------- hosts and links


def host_info(h: Host, *, reserve_gb: float | None = None, bandwidth: dict[str, float] | None = None) -> HostInfo:
    ram = h.memory_gb
    ram_note = ""
    if ram is None and h.is_local:
        try:
            import psutil

            ram = psutil.virtual_memory().total / 2**30
            ram_note = "this machine's RAM"
        except Exception:
            ram = None
    if ram is None:
        usable, note = None, "unknown (no memory_gb)"
    elif reserve_gb is not None:
        usable, note = max(ram - reserve_gb, 0.0), f"{ram:.0f} GB - {reserve_gb:g} GB reserved (raised wired limit)"
    else:
        f = usable_fraction(ram)
        usable, note = ram * f, f"{f:.0%} of {ram:.0f} GB{' (' + ram_note + ')' if ram_note else ''}"
    bw = (bandwidth or {}).get(h.name)
    if bw:
        bw_note = "given"
    elif getattr(h, "memory_bandwidth_gbs", None):
        bw, bw_note = float(h.memory_bandwidth_gbs), "host field"
    elif getattr(h, "chip", None) and str(h.chip).lower().replace(" ", "-") in CHIP_BANDWIDTH_GBS:
        chip = str(h.chip).lower().replace(" ", "-")
        bw, bw_note = float(CHIP_BANDWIDTH_GBS[chip]), chip
    elif h.memory_gb is not None and guess_chip(h.memory_gb):
        chip = guess_chip(h.memory_gb)
        bw, bw_note = float(CHIP_BANDWIDTH_GBS[chip]), f"{chip}? (guessed from {h.memory_gb:g} GB)"
    else:
        bw, bw_note = DEFAULT_BANDWIDTH_GBS, "default"
    return HostInfo(h, ram, usable, note, float(bw), bw_note)


class Links:
    """Link lookup between hosts: topology first, then the hostfile's rdma maps, else assumed Ethernet."""

    def __init__(self, hostfile: Hostfile, topology: Topology | None):
        self.hostfile = hostfile
        self.topology = topology or Topology()
        self.matrix = self.topology.rdma_matrix(hostfile)
        self.index = {h.name: i for i, h in enumerate(hostfile.hosts)}
        self.assumed: set[frozenset] = set()

    def rdma(self, a: str, b: str) -> bool:
        i, j = self.index[a], self.index[b]
        return self.matrix[i][j] is not None and self.matrix[j][i] is not None

    def link(self, a: str, b: str) -> Link:
        if a == b:
            return LOOPBACK
        ln = self.topology.link(a, b)
        if ln is not None:
            return ln
        if self.rdma(a, b):
            return Link(a, b, "tb5")
        self.assumed.add(frozenset((a, b)))
        return Link(a, b, "ethernet")

    def fast(self, a: str, b: str) -> bool:
        if a == b:
            return True
        ln = self.link(a, b)
        return (ln.kind in RDMA_KINDS and ln.bandwidth_gbps >= FAST_GBPS) or self.rdma(a, b)

    def islands(self) -> list[list[str]]:
        """Groups of hosts where every pair is joined by a fast link (greedy, hostfile order)."""
        out: list[list[str]] = []
        for h in self.hostfile.hosts:
            for isl in out:
                if all(self.fast(h.name, o) for o in isl):
                    isl.append(h.name)
                    break
            else:
                out.append([h.name])
        return out


def choose_backend(hostfile: Hostfile, topology: Topology | None, requested: str | None) -> tuple[str, str]:
    if requested:
        return requested, "requested"
    if hostfile.backend:
        return hostfile.backend, f"set in {hostfile.label}"
    hosts = hostfile.hosts
    if len(hosts) == 1:
        h, cores = hosts[0], os.cpu_count() if hosts[0].is_local else None
        if cores and h.slots > cores and shutil.which("mpirun"):
            # both backends' collectives poll while they wait; only OpenMPI can be told to yield
            # (launcher/oversubscription.py): 3 ranks on 2 cores ran 13 s on mpi, 50 s on ring
            return "mpi", f"{h.slots} ranks on {cores} cores: mpi's waiting ranks yield their core, ring's poll"
        return "ring", "one host: ranks talk over loopback"
    try:
        check_backend(hostfile, "jaccl", topology)
        return "jaccl", "every pair of hosts has an RDMA link (full Thunderbolt mesh)"
    except ConfigError:
        pass
    try:
        check_backend(hostfile, "jaccl-ring", topology)
        return "jaccl-ring", "RDMA links between ring neighbours, not a full mesh"
    except ConfigError:
        pass
    return "ring", "no full RDMA mesh or RDMA ring: TCP ring"


# ----------------------------------------------------------------------------- memory


def _tp_split(card: ModelCard, t: int):
    """(TensorSplit or None, problem or None): each rank's heads and widths, as the runtime cuts them."""
    if t == 1:
        return None, None
    from runtime.contract import ModelError, check_sharding

    try:
        return check_sharding(Path("."), card.tp_config(), t, "tensor", card.name), None
    except ModelError as e:
        return None, str(e).split(". Fix:")[0]


def _tp_problem(card: ModelCard, t: int) -> str | None:
    return _tp_split(card, t)[1]


def tp_route(card: ModelCard, t: int) -> str | None:
    """Which tensor-parallel path the ranks take (mlx-lm shard, generic, uneven) and why."""
    split = _tp_split(card, t)[0]
    if split is None:
        return None
    route, why = split.route(card.architecture, "tensor" in card.sharding)
    return f"{route}: {why}"


def _pp_problem(card: ModelCard, p: int) -> str | None:
    if p == 1:
        return None
    if "pipeline" not in card.sharding:
        return f"mlx-lm's {card.architecture} has no pipeline parallelism (no PipelineMixin)"
    if card.layers < p:
        return f"{card.name}: {card.layers} layers cannot be split into {p} pipeline stages"
    return None


def split_layers(layers: int, weights: list[float]) -> list[int]:
    """Layers per stage proportional to `weights`, each >= 1, summing to `layers`. With fewer
    layers than stages, the first stages get one each and the rest none (_pp_problem refuses it)."""
    n = len(weights)
    if n == 0:
        return []
    if layers < n:
        return [1] * layers + [0] * (n - layers)
    total = sum(weights) or n
    raw = [layers * w / total if total else layers / n for w in weights]
    out = [max(1, int(math.floor(x))) for x in raw]
    while sum(out) < layers:  # largest remainder first
        i = max(range(n), key=lambda k: raw[k] - out[k])
        out[i] += 1
    while sum(out) > layers:
        i = max((k for k in range(n) if out[k] > 1), key=lambda k: out[k] - raw[k])
        out[i] -= 1
    return out


def _head_split(card: ModelCard, t: int) -> bool:
    """exolaunch splits an untied lm_head by vocabulary over the tensor group when it divides."""
    return t > 1 and not card.tie_embeddings and card.head_bytes > 0 and card.vocab_size % t == 0


def _memory(card: ModelCard, layout: Layout, ranks: list[Rank], infos: dict[str, HostInfo],
            context: int, batch: int, kv_share: float = 1.0, rank0_gb: float = 0.0) -> None:
    """Each rank's need; rank0_gb more on rank 0 (a --draft model it holds whole)."""
    t = layout.tensor_size
    rep = min(card.embed_bytes + card.head_bytes / (t if _head_split(card, t) else 1), card.disk_bytes)
    kv_tok = card.kv_bytes_per_token(t if not _tp_problem(card, t) else 1, context) * kv_share
    split = _tp_split(card, t)[0]  # uneven splits: rank k holds split.share(k) of each layer
    start = 0
    plans: list[RankPlan] = []
    for s, (stage, n_layers) in enumerate(zip(layout.stages, layout.split)):
        for k, r in enumerate(stage):
            w = rep + card.layer_bytes * n_layers * (split.share(k) if split else 1 / t)
            w += rank0_gb * GB if ranks[r].rank == 0 else 0.0
            kv = kv_tok * context * batch * n_layers / card.layers
            head = HEADROOM_FIXED_GB + HEADROOM_FRACTION * w / GB
            if layout.sharding == "tensor":
                shard = f"TP {k + 1}/{t}" if t > 1 else "all layers"
            elif layout.sharding == "hybrid":
                shard = f"TP {k + 1}/{t} of layers {start}-{start + n_layers - 1}"
            else:
                shard = f"layers {start}-{start + n_layers - 1}" if len(layout.stages) > 1 else "all layers"
            rk = ranks[r]
            plans.append(RankPlan(rk.rank, rk.host.name, shard, (start, start + n_layers), w / GB, kv / GB,
                                  head, infos[rk.host.name].usable_gb, None, True,
                                  kv_tok * n_layers / card.layers))
        start += n_layers
    plans.sort(key=lambda p: p.rank)
    for name, info in infos.items():
        mine = [p for p in plans if p.host == name]
        if info.usable_gb is None:
            continue
        free = info.usable_gb - sum(p.need_gb for p in mine)
        for p in mine:
            p.free_gb = free
            p.fits = free >= 0
    layout.ranks = plans


# ----------------------------------------------------------------------------- estimate


def _allreduce_s(n: int, msg: float, link: Link, backend: str) -> float:
    """One all-reduce of `msg` bytes over n ranks: a full mesh does reduce-scatter + all-gather in
    2 steps, a ring in 2(n-1) steps; each step moves msg/n bytes over the slowest link."""
    if n <= 1:
        return 0.0
    alpha = (link.latency_us + BACKEND_OVERHEAD_US.get(backend, 30.0)) * 1e-6
    beta = link.bandwidth_gbps * 1e9 / 8
    steps = 2 if backend == "jaccl" else 2 * (n - 1)
    return steps * (alpha + msg / n / beta)


def _estimate(card: ModelCard, layout: Layout, ranks: list[Rank], infos: dict[str, HostInfo],
              links: Links, backend: str, batch: int, est_context: int, kv_share: float = 1.0) -> None:
    """Decode step time = sum over pipeline stages of (slowest rank's bytes / bandwidth + per-layer
    overhead + TP all-reduces) + one activation send per stage boundary."""
    used: dict[str, int] = {}
    for r in ranks:
        used[r.host.name] = used.get(r.host.name, 0) + 1
    frac = card.touched_fraction(batch)
    head = card.head_bytes or card.embed_bytes
    t = layout.tensor_size
    kv_tok = card.kv_bytes_per_token(t if not _tp_problem(card, t) else 1, est_context) * kv_share
    msg = batch * card.hidden_size * ACT_BYTES
    split = _tp_split(card, t)[0]
    total = comm = 0.0
    for s, (stage, n_layers) in enumerate(zip(layout.stages, layout.split)):
        last = s == len(layout.stages) - 1
        worst = 0.0
        for k, r in enumerate(stage):
            name = ranks[r].host.name
            bw = infos[name].bandwidth_gbs * 1e9 * EFFICIENCY / max(used.get(name, 1), 1)
            read = card.layer_bytes * n_layers * frac * (split.share(k) if split else 1 / t) + kv_tok * est_context * batch * n_layers / card.layers
            if last:  # the head: split across the TP group when untied (runtime.loader.GatheredHead)
                read += head / (t if _head_split(card, t) else 1)
            worst = max(worst, read / bw)
        total += worst + n_layers * LAYER_OVERHEAD_US * 1e-6
        if t > 1:
            names = [ranks[r].host.name for r in stage]
            slow = min((links.link(a, b) for i, a in enumerate(names) for b in names[i + 1:]),
                       key=lambda ln: (ln.bandwidth_gbps, -ln.latency_us))
            ar = 2 * n_layers * _allreduce_s(t, msg, slow, backend)
            total += ar
            comm += ar
        if not last:
            a, b = ranks[stage[0]].host.name, ranks[layout.stages[s + 1][0]].host.name
            ln = links.link(a, b)
            send = (ln.latency_us + BACKEND_OVERHEAD_US.get(backend, 30.0)) * 1e-6 + msg / (ln.bandwidth_gbps * 1e9 / 8)
            total += send
            comm += send
    layout.step_ms = total * 1e3
    layout.comm_ms = comm * 1e3
    layout.tok_s = batch / total if total > 0 else 0.0


# ----------------------------------------------------------------------------- planning


def plan_for(model: str | ModelCard, hostfile: Hostfile, topology: Topology | None = None, *,
             context: int | None = None, batch: int = 1, backend: str | None = None,
             sharding: str | None = None, np: int | None = None, reserve_gb: float | None = None,
             bandwidth: dict[str, float] | None = None, est_context: int = 1024, kv_share: float = 1.0,
             draft: str | None = None) -> Plan:
    """Plan serving `model` on every rank of `hostfile` (or its first `np`). kv_share: KV bytes
    per token as a share of float16's (kv_scale(--kv-bits, --kv-group-size)). draft: --draft's
    model, which rank 0 holds whole, with one sequence's KV."""
    card = resolve_card(model)
    if sharding not in (None, "tensor", "pipeline", "hybrid"):
        raise ConfigError(f"--sharding {sharding!r}: expected tensor, pipeline or hybrid.")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: expected at least 1.")
    if np is not None:
        from launcher.backends import first_slots

        hostfile = first_slots(hostfile, np)  # the same -n rule as exec and run
    ranks = hostfile.ranks()
    if context is None:
        context = min(card.context_length, DEFAULT_CONTEXT_CAP)
    if context < 1:
        raise ConfigError(f"--context {context}: expected at least 1 token.")
    world = len(ranks)
    draft_warning, rank0_gb = None, 0.0
    if draft:
        try:
            d = resolve_card(draft)
            rank0_gb = (d.disk_bytes + d.kv_bytes_per_token(1, context) * context) / GB
        except ConfigError as e:
            draft_warning = f"--draft {draft}: its size is unknown ({e}); rank 0's memory leaves it out."
    infos = {h.name: host_info(h, reserve_gb=reserve_gb, bandwidth=bandwidth) for h in hostfile.hosts}
    links = Links(hostfile, topology)
    chosen_backend, backend_reason = choose_backend(hostfile, topology, backend)
    warnings: list[str] = []
    reasons: list[str] = []
    for name, info in infos.items():
        if info.usable_gb is None:
            warnings.append(f"{name}: memory unknown (no memory_gb in {hostfile.label}); assumed to fit. "
                            "Fix: add memory_gb to the host.")
    if context > card.context_length:
        warnings.append(f"--context {context} is beyond {card.name}'s context length {card.context_length}.")

    # per-host memory for proportional splits: usable, else RAM, else equal
    def weight(r: Rank) -> float:
        info = infos[r.host.name]
        return (info.usable_gb or 1.0) / max(r.host.slots, 1)

    candidates: list[Layout] = []
    all_ranks = list(range(world))
    if world == 1:
        candidates.append(Layout("single", "tensor", 1, [[0]], [card.layers]))
    else:
        candidates.append(Layout("tensor", "tensor", world, [all_ranks], [card.layers]))
        even = split_layers(card.layers, [1.0] * world)
        candidates.append(Layout("pipeline", "pipeline", 1, [[r] for r in all_ranks], even,
                                 note="even split"))
        by_mem = split_layers(card.layers, [weight(ranks[r]) for r in all_ranks])
        if by_mem != even:
            w = [f"{weight(ranks[r]):.0f}" for r in all_ranks]
            candidates.append(Layout("pipeline (by memory)", "pipeline", 1, [[r] for r in all_ranks], by_mem,
                                     note=f"split proportional to usable memory {'/'.join(w)} GB"))
        islands = links.islands()
        if 1 < len(islands) < len(hostfile.hosts):
            isl_ranks = [[r.rank for r in ranks if r.host.name in isl] for isl in islands]
            sizes = {len(x) for x in isl_ranks}
            if len(sizes) == 1 and sizes != {1}:
                t = sizes.pop()
                mem = [sum(weight(ranks[r]) for r in grp) for grp in isl_ranks]
                hy = Layout("hybrid", "hybrid", t, isl_ranks, split_layers(card.layers, mem),
                            note=f"TP-{t} within {' | '.join('+'.join(i) for i in islands)}, pipeline across")
                candidates.append(hy)
    for c in candidates:
        p = _tp_problem(card, c.tensor_size)
        if p:
            c.problems.append(p)
        p = _pp_problem(card, len(c.stages))
        if p:
            c.problems.append(p)
        if c.sharding == "hybrid" and not SPLIT_SUPPORT.get(chosen_backend, False):
            c.problems.append(f"{chosen_backend} does not support split (mx.distributed Group.split), "
                              "which tensor-within-island groups need; --backend mpi does")
        _memory(card, c, ranks, infos, context, batch, kv_share, rank0_gb)
        _estimate(card, c, ranks, infos, links, chosen_backend, batch, min(est_context, context), kv_share)

    by = {c.name: c for c in candidates}
    fabric_fast = all(links.fast(a.name, b.name) for i, a in enumerate(hostfile.hosts)
                      for b in hostfile.hosts[i + 1:])
    pipes = [c for c in candidates if c.sharding == "pipeline"]
    uneven = len({round(weight(r)) for r in ranks}) > 1
    best_pipe = (by.get("pipeline (by memory)") if uneven and "pipeline (by memory)" in by else by.get("pipeline"))

    def first_ok(*cs):
        for c in cs:
            if c is not None and c.ok:
                return c
        return None

    chosen: Layout | None = None
    if world == 1:
        chosen = candidates[0]
        reasons.append("one rank: the whole model on one host")
    elif sharding is not None:
        if sharding == "tensor":
            chosen = by["tensor"]
        elif sharding == "hybrid":
            chosen = by.get("hybrid")
            if chosen is None:
                raise ConfigError("--sharding hybrid: the hosts do not form two or more equal-sized islands of "
                                  "fast (Thunderbolt/RDMA) links. Fix: use tensor or pipeline.")
        else:
            chosen = best_pipe
        reasons.append(f"--sharding {sharding} requested")
    else:
        tp, hy = by["tensor"], by.get("hybrid")
        if fabric_fast and tp.ok:
            chosen = tp
            reasons.append(f"tensor parallel over {world} ranks: every pair of hosts is on a fast link "
                           f"({'RDMA mesh' if chosen_backend == 'jaccl' else 'Thunderbolt'}), so each rank reads "
                           f"1/{world} of the weights per token")
        else:
            if not fabric_fast:
                reasons.append("not tensor parallel over everything: some hosts are joined only by slow links "
                               f"({_slow_pairs(links, hostfile)})")
            elif tp.problems:
                reasons.append("no tensor parallel: " + "; ".join(tp.problems))
            elif not tp.memory_fits:
                reasons.append("tensor parallel does not fit: its even shares overflow a host")
            if hy is not None:
                if hy.ok:
                    chosen = hy
                    reasons.append(f"hybrid: {hy.note}")
                else:
                    reasons.append("no hybrid: " + "; ".join(hy.problems or ["does not fit"]))
            if chosen is None:
                chosen = first_ok(best_pipe, *pipes)
                if chosen is not None:
                    if tp.problems and fabric_fast is False:
                        reasons.append("no tensor parallel either: " + "; ".join(tp.problems))
                    reasons.append(f"pipeline over {world} stages ({chosen.note}): one activation send per "
                                   "stage boundary crosses the slow links")
            if chosen is None and tp.ok:
                chosen = tp
                reasons.append("tensor parallel despite slow links: no pipeline layout can run "
                               f"({'; '.join(best_pipe.problems) if best_pipe and best_pipe.problems else 'none fits'})")
            if chosen is None:
                runnable = [c for c in candidates if not c.problems]
                # the runnable layout closest to fitting (largest worst-case free memory)
                chosen = (max(runnable, key=lambda c: min((r.free_gb or 0.0) for r in c.ranks)) if runnable
                          else (best_pipe or tp))
                reasons.append("no layout fits: " + "; ".join(
                    f"{c.name}: {'; '.join(c.problems) or 'needs more memory than the hosts have'}" for c in candidates))
    route = tp_route(card, chosen.tensor_size) if chosen.sharding in ("tensor", "hybrid") else None
    if route:
        reasons.append(f"tensor split, {route}")
    if chosen.sharding == "hybrid" and not _RUNTIME_HYBRID:
        warnings.append("exolaunch's runtime does not build tensor-within-pipeline groups yet: `run` cannot "
                        "serve a hybrid plan; use --sharding pipeline or tensor to run now.")
    if chosen.problems:
        reasons.append("cannot run as planned: " + "; ".join(chosen.problems))
    if not chosen.memory_fits:
        short = [f"{r.host} short by {-r.free_gb:.1f} GB" for r in chosen.ranks if r.free_gb is not None and r.free_gb < 0]
        reasons.append("does not fit: " + ", ".join(dict.fromkeys(short)) +
                       ". Fix: more hosts, a smaller quantization, a shorter --context, or raise the GPU wired "
                       "limit (`sudo sysctl iogpu.wired_limit_mb=N`, then --reserve-gb)")
    if draft_warning:
        warnings.append(draft_warning)
    if links.assumed:
        warnings.append("no link described between " + ", ".join(sorted("-".join(sorted(p)) for p in links.assumed))
                        + ": assumed 10 GbE. Fix: pass --topology.")
    return Plan(card, hostfile, infos, context, batch, chosen_backend, backend_reason, chosen,
                [c for c in candidates if c is not chosen], reasons, warnings)


_RUNTIME_HYBRID = False  # flip when runtime/group.py builds tensor-within-pipeline subgroups


def _slow_pairs(links: Links, hostfile: Hostfile) -> str:
    out = []
    for i, a in enumerate(hostfile.hosts):
        for b in hostfile.hosts[i + 1:]:
            if not links.fast(a.name, b.name):
                ln = links.link(a.name, b.name)
                out.append(f"{a.name}-{b.name} {ln.kind} {ln.bandwidth_gbps:g} Gb/s")
    return ", ".join(out[:4]) + (", ..." if len(out) > 4 else "")


# ----------------------------------------------------------------------------- rendering


def _gb(x: float | None) -> str:
    return "unknown" if x is None else f"{x:,.1f}"


def render(plan: Plan, width: int = 120) -> str:
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False, color_system=None, highlight=False)
    c = plan.model
    con.print(f"Plan: {c.name}" + (f" ({c.repo})" if c.repo else "") +
              f" - {c.architecture}, {c.params_total / 1e9:,.1f}B params ({c.params_active / 1e9:,.1f}B active), "
              f"{c.quantization}, {c.disk_bytes / GB:,.1f} GB; context {plan.context:,} x batch {plan.batch}")
    con.print(f"Layout: {plan.layout.name}" + (f" ({plan.layout.note})" if plan.layout.note else "") +
              f"; backend: {plan.backend} ({plan.backend_reason})")
    t = Table(show_lines=False)
    for col in ("rank", "host", "shard", "weights GB", "KV GB", "headroom GB", "usable GB", "free GB", "fits"):
        t.add_column(col, justify="right" if "GB" in col or col == "rank" else "left")
    for r in plan.ranks:
        t.add_row(str(r.rank), r.host, r.shard, f"{r.weights_gb:,.1f}", f"{r.kv_gb:,.1f}", f"{r.headroom_gb:,.1f}",
                  _gb(r.usable_gb), _gb(r.free_gb),
                  "unknown" if r.usable_gb is None else ("yes" if r.fits else "NO"))
    con.print(t)
    for name, info in plan.hosts.items():
        con.print(f"  {name}: usable {_gb(info.usable_gb)} GB ({info.usable_note}); "
                  f"memory bandwidth {info.bandwidth_gbs:g} GB/s ({info.bandwidth_note})")
    con.print("Why:")
    for r in plan.reasons:
        con.print(f"  - {r}")
    for w in plan.warnings:
        con.print(f"  warning: {w}")
    a = Table(title="Layouts considered (decode estimate, see docs/planner.md)")
    for col in ("layout", "split", "tok/s", "step ms", "comm ms", "fits", "why not"):
        a.add_column(col, justify="right" if col in ("tok/s", "step ms", "comm ms") else "left")
    for lay in [plan.layout, *plan.alternatives]:
        fits = "yes" if lay.memory_fits else "NO"
        split = "/".join(map(str, lay.split)) if len(lay.split) > 1 else f"TP-{lay.tensor_size}"
        if lay.sharding == "hybrid":
            split = f"TP-{lay.tensor_size} x {'/'.join(map(str, lay.split))}"
        a.add_row(("* " if lay is plan.layout else "  ") + lay.name, split, f"{lay.tok_s:,.1f}",
                  f"{lay.step_ms:,.2f}", f"{lay.comm_ms:,.2f}", fits, "; ".join(lay.problems))
    con.print(a)
    prefix_gb = plan.prefix_cache_gb()
    budget = plan.kv_budget_tokens(prefix_gb)
    if budget is not None:
        con.print(f"KV budget: {budget:,} tokens across all running sequences on the tightest host "
                  f"({budget / plan.context:,.1f} x context {plan.context:,}) beside a prefix cache of "
                  f"{prefix_gb:g} GB per rank; `run` admits requests within it (--max-total-tokens) and "
                  "queues the rest.")
    verdict = "fits" if plan.fits else "DOES NOT FIT" if not plan.memory_fits else "CANNOT RUN"
    con.print(f"Verdict: {verdict}. Estimated decode {plan.tok_s:,.1f} tok/s "
              f"(batch {plan.batch}, short context; rough, see docs/planner.md).")
    return buf.getvalue()


def summary(plan: Plan, topology: Topology | None = None) -> dict:
    """The plan as plain JSON for rank 0's dashboard and /exolaunch/status (contract.ENV_PLAN):
    per rank its host, shard and memory budget; per pair of hosts used, the link."""
    used = list(dict.fromkeys(r.host for r in plan.ranks))
    links = Links(plan.hostfile, topology)
    pairs = [(a, b) for i, a in enumerate(used) for b in used[i + 1:]]
    return {
        "model": plan.model.name, "backend": plan.backend, "sharding": plan.sharding, "context": plan.context,
        "ranks": [{"rank": r.rank, "host": r.host, "shard": r.shard, "weights_gb": round(r.weights_gb, 4),
                   "kv_gb": round(r.kv_gb, 4), "need_gb": round(r.need_gb, 4), "usable_gb": r.usable_gb}
                  for r in plan.ranks],
        "links": [{"a": a, "b": b, "kind": ln.kind, "gbps": ln.bandwidth_gbps, "latency_us": ln.latency_us}
                  for a, b in pairs for ln in [links.link(a, b)]],
    }
