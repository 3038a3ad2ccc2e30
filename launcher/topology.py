"""Physical links between hosts: the RDMA matrix, ring order and backend checks.

A topology file is optional. It says which hosts are cabled together and how fast, so the
launcher can order a ring along the fastest links and tell, before starting anything, whether
jaccl has the RDMA devices it needs (docs/hostfile.md describes the format).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from launcher.errors import ConfigError
from launcher.hostfile import BACKENDS, Hostfile, rdma_device
from launcher.yamlsource import Source, did_you_mean, read_text, read_yaml_mapping, show


class LinkKind(NamedTuple):
    bandwidth_gbps: float
    latency_us: float


# Rough defaults, only used to rank links against each other; set bandwidth_gbps / latency_us on
# a link when you have measured it. TB figures are the signalling rate with RDMA-class latency;
# Ethernet assumes 10GbE (Mac Studio), Wi-Fi a good 802.11ax link.
LINK_KINDS: dict[str, LinkKind] = {
    "tb5": LinkKind(80.0, 5.0),
    "tb4": LinkKind(40.0, 10.0),
    "ethernet": LinkKind(10.0, 100.0),
    "wifi": LinkKind(0.5, 3000.0),
}
RDMA_KINDS = ("tb5", "tb4")


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    kind: str
    rdma: dict[str, str] = field(default_factory=dict, hash=False)
    bandwidth_gbps: float | None = None  # None: the kind's default
    latency_us: float | None = None
    line: int | None = field(default=None, compare=False)  # where it was defined, for messages

    def __post_init__(self):
        default = LINK_KINDS.get(self.kind, LinkKind(0.0, 0.0))
        if self.bandwidth_gbps is None:
            object.__setattr__(self, "bandwidth_gbps", default.bandwidth_gbps)
        if self.latency_us is None:
            object.__setattr__(self, "latency_us", default.latency_us)


def _speed(link: Link | None) -> tuple[float, float]:
    """Sort key: higher is better (bandwidth first, then lower latency)."""
    return (link.bandwidth_gbps, -link.latency_us) if link else (0.0, float("-inf"))


@dataclass
class Topology:
    path: str | None = None
    links: list[Link] = field(default_factory=list)

    def link(self, a: str, b: str) -> Link | None:
        """The fastest link between a and b (either direction), or None."""
        found = [ln for ln in self.links if {ln.a, ln.b} == {a, b} and a != b]
        return max(found, key=_speed, default=None)

    def check_hosts(self, hostfile: Hostfile) -> None:
        names = [h.name for h in hostfile.hosts]
        for i, ln in enumerate(self.links):
            for end in (ln.a, ln.b):
                if end not in names:
                    raise ConfigError(
                        f"{self.path or 'topology'}:{ln.line or 1}: links[{i}].hosts: unknown host "
                        f"{end!r}{did_you_mean(end, names)}; {hostfile.label} has: {', '.join(names)}. "
                        "Fix: use host names from the hostfile (name:, or the ssh value when no name is set)."
                    )

    def rdma_matrix(self, hostfile: Hostfile) -> list[list[str | list[str] | None]]:
        """Row i, column j: the device on host i that reaches host j (None if none / diagonal).

        The hostfile's per-host rdma map wins over the topology's links."""
        names = [h.name for h in hostfile.hosts]
        matrix: list[list[Any]] = [[None] * len(names) for _ in names]
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i == j:
                    continue
                # the fastest link between the pair that has a device on a's side
                with_dev = [ln for ln in self.links if {ln.a, ln.b} == {a, b} and a in ln.rdma]
                if with_dev:
                    matrix[i][j] = max(with_dev, key=_speed).rdma[a]
                dev = hostfile.hosts[i].rdma.get(b)
                if dev is not None:
                    matrix[i][j] = dev
        return matrix

    def ring_order(self, hostfile: Hostfile) -> list[str]:
        """Host names ordered so ring neighbours (cyclically) sit on the fastest links.

        Host 0 stays first: it is rank 0 and serves the API. Exhaustive for <= 8 hosts,
        greedy nearest-fastest-neighbour beyond."""
        names = [h.name for h in hostfile.hosts]
        best = {}
        for a, b in itertools.combinations(names, 2):
            best[frozenset((a, b))] = self.link(a, b)
        if len(names) <= 2 or not any(best.values()):
            return names

        def score(order: list[str]) -> tuple[float, float]:
            # maximise the slowest hop, then minimise summed latency; no link = unknown = 0 Gb/s
            links = [best[frozenset((order[k], order[(k + 1) % len(order)]))] for k in range(len(order))]
            bottleneck = min(ln.bandwidth_gbps if ln else 0.0 for ln in links)
            latency = sum(ln.latency_us if ln else 1e9 for ln in links)
            return (bottleneck, -latency)

        if len(names) <= 8:
            order, top = names, score(names)  # the file order wins ties
            for rest in itertools.permutations(names[1:]):
                cand = [names[0], *rest]
                s = score(cand)
                if s > top:
                    order, top = cand, s
            return order

        order, left = [names[0]], names[1:]
        while left:
            nxt = max(left, key=lambda n: _speed(best[frozenset((order[-1], n))]))  # max keeps file order on ties
            order.append(nxt)
            left.remove(nxt)
        return order


# ----------------------------------------------------------------------------- loading

_TOP_KEYS = ("links",)
_LINK_KEYS = ("hosts", "kind", "rdma", "bandwidth_gbps", "latency_us")


def load_topology(path: str | os.PathLike) -> Topology:
    label, text = read_text(path, "topology")
    data, src = read_yaml_mapping(label, text, _TOP_KEYS, mapping_fix="start the file with links:",
                                  empty_fix="add links: with one entry per cable (see docs/hostfile.md)")
    raw = data.get("links")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise src.error(("links",), f"expected a list of links, got {show(raw)}",
                        "write one '- hosts: [a, b]' entry per link")
    return Topology(path=label, links=[_link(src, ("links", i), r) for i, r in enumerate(raw)])


def _link(src: Source, path: tuple, raw: Any) -> Link:
    raw = src.mapping(path, raw, "write each link as hosts: [a, b] and kind: tb5|tb4|ethernet|wifi")
    src.keys(path, raw, _LINK_KEYS)
    p = path + ("hosts",)
    hosts = raw.get("hosts")
    if (not isinstance(hosts, list) or len(hosts) != 2 or not all(isinstance(h, str) and h for h in hosts)
            or hosts[0] == hosts[1]):
        raise src.error(p, f"expected two different host names, got {show(hosts)}", "write hosts: [host-a, host-b]")
    if "kind" not in raw:
        raise src.error(path, "missing kind", f"add kind: one of {', '.join(LINK_KINDS)}")
    kind = src.choice(path + ("kind",), raw["kind"], LINK_KINDS, "set kind to the cable type")
    rdma: dict[str, str] = {}
    if raw.get("rdma") is not None:
        rp = path + ("rdma",)
        value = src.mapping(rp, raw["rdma"], "write rdma as host: device lines")
        if kind not in RDMA_KINDS:
            raise src.error(rp, f"a {kind} link has no RDMA", "remove rdma:, or set kind: tb5 / tb4")
        for end, dev in value.items():
            if end not in hosts:
                raise src.error(rp + (str(end),), f"{str(end)!r} is not an end of this link ({hosts[0]}, {hosts[1]})",
                                "key rdma by one of the link's two hosts")
            rdma[end] = rdma_device(src, rp + (end,), dev, "give the RDMA device on that host, e.g. rdma_en3")
    bw = lat = None  # None: the kind's default
    if raw.get("bandwidth_gbps") is not None:
        bw = src.number(path + ("bandwidth_gbps",), raw["bandwidth_gbps"], 1e-9, "a bandwidth in Gb/s > 0",
                        "set the measured bandwidth, or leave it out for the kind's default")
    if raw.get("latency_us") is not None:
        lat = src.number(path + ("latency_us",), raw["latency_us"], 0.0, "a latency in microseconds >= 0",
                         "set the measured latency, or leave it out for the kind's default")
    return Link(hosts[0], hosts[1], kind, rdma, bw, lat, line=src.line(p))


# ----------------------------------------------------------------------------- backend checks


def check_backend(hostfile: Hostfile, backend: str, topology: Topology | None) -> None:
    """Refuse, before anything starts, a backend the hosts cannot run."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}{did_you_mean(backend, BACKENDS)}. "
                          f"Fix: use one of {', '.join(BACKENDS)}.")
    hosts, where = hostfile.hosts, hostfile.label
    if backend == "ring":
        no_ip = [h.name for h in hosts if not h.ips]
        if no_ip:
            raise ConfigError(
                f"backend ring needs a data-plane IP on every host; none on: {', '.join(no_ip)}. "
                f"Fix: add ips: [<address>] to {'host' if len(no_ip) == 1 else 'hosts'} {', '.join(no_ip)} in {where}."
            )
    if backend not in ("jaccl", "jaccl-ring"):
        return

    multi = [f"{h.name} (slots {h.slots})" for h in hosts if h.slots != 1]
    if multi:
        raise ConfigError(f"backend {backend} runs exactly one rank per host; more on: {', '.join(multi)}. "
                          f"Fix: set slots: 1 on those hosts in {where}, or use backend ring or mpi.")
    if not hosts[0].ips:
        raise ConfigError(f"backend {backend} needs an IP on {hosts[0].name} (host 0, the coordinator). "
                          f"Fix: add ips: [<address reachable from all hosts>] to host {hosts[0].name} in {where}.")
    missing = _missing_rdma(hostfile, backend, topology or Topology())
    if not missing:
        return
    names = [h.name for h in hosts]
    mesh = "every pair of hosts" if backend == "jaccl" else "each host and its two ring neighbours"
    wanted: dict[str, list[str]] = {}
    for a, b in missing:
        wanted.setdefault(a, []).append(b)
    adds = " and ".join(
        f"rdma: {{{', '.join(f'{b}: rdma_enX' for b in peers)}}} to host {a}" for a, peers in wanted.items()
    )
    hint = ""
    if backend == "jaccl-ring" and topology is not None:
        order = topology.ring_order(hostfile)
        if order != names and not _missing_rdma(hostfile.reordered(order), backend, topology):
            hint = f", or reorder the hosts as {', '.join(order)}"
    raise ConfigError(
        f"backend {backend} needs an RDMA device between {mesh}; missing: "
        f"{', '.join(f'{a} -> {b}' for a, b in missing)}. "
        f"Fix: add {adds} in {where}, or a tb5 link with rdma devices in the topology{hint}."
    )


def _missing_rdma(hostfile: Hostfile, backend: str, topology: Topology) -> list[tuple[str, str]]:
    """(from, to) host pairs lacking a device on the `from` side, in hostfile order.

    jaccl-ring only needs each host's ring neighbours, in hostfile order (the order ranks start in)."""
    names = [h.name for h in hostfile.hosts]
    n = len(names)
    matrix = topology.rdma_matrix(hostfile)
    out = []
    for i in range(n):
        peers = range(n) if backend == "jaccl" else sorted({(i - 1) % n, (i + 1) % n})
        out.extend((names[i], names[j]) for j in peers if j != i and matrix[i][j] is None)
    return out
