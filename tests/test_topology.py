"""Topology: loading, RDMA matrix, ring order and the per-backend checks."""

from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile, load_hostfile
from launcher.topology import LINK_KINDS, Link, Topology, check_backend, load_topology

ROOT = Path(__file__).resolve().parent.parent


def hostfile(*hosts: Host, path: str = "hostfiles/x.yaml") -> Hostfile:
    return Hostfile(path=path, hosts=list(hosts))


def host(name: str, ip: str | None = "10.0.0.1", slots: int = 1, **rdma) -> Host:
    return Host(name=name, ssh=name, ips=(ip,) if ip else (), slots=slots, rdma=rdma)


def topo(*links: tuple) -> Topology:
    """links as (a, b, kind) or (a, b, kind, bandwidth) tuples"""
    return Topology(links=[Link(a, b, kind, {}, *rest) for a, b, kind, *rest in links])


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as exc:
        fn(*args)
    return str(exc.value)


# ------------------------------------------------------------------ examples


def test_tb5_example_topology_matches_hostfile():
    hf = load_hostfile(ROOT / "hostfiles" / "tb5.yaml")
    t = load_topology(ROOT / "configs" / "topology-tb5.yaml")
    assert len(t.links) == 6 and all(ln.kind == "tb5" for ln in t.links)
    t.check_hosts(hf)
    # the cables' devices agree with the hostfile's rdma maps, entry for entry
    assert t.rdma_matrix(Hostfile(hosts=[Host(h.name, h.ssh) for h in hf.hosts])) == Topology().rdma_matrix(hf)
    check_backend(hf, "jaccl", t)
    check_backend(hf, "jaccl", None)
    check_backend(hf, "jaccl-ring", t)
    assert t.ring_order(hf) == [h.name for h in hf.hosts]  # all links equal: file order kept


def test_ethernet_example_topology():
    hf = load_hostfile(ROOT / "hostfiles" / "ethernet.yaml")
    t = load_topology(ROOT / "configs" / "topology-ethernet.yaml")
    t.check_hosts(hf)
    assert {ln.kind for ln in t.links} == {"ethernet", "tb4"}
    fast = t.link("mbp", "studio")
    assert fast.kind == "tb4" and fast.bandwidth_gbps == LINK_KINDS["tb4"].bandwidth_gbps and fast.latency_us == 40
    assert t.link("mini", "mbp").bandwidth_gbps == 1
    check_backend(hf, "ring", t)
    assert t.ring_order(hf)[0] == "studio"


def test_link_defaults_and_lookup():
    t = topo(("a", "b", "ethernet"), ("b", "a", "tb5"), ("a", "c", "wifi", 2.5))
    assert t.link("a", "b").kind == "tb5" and t.link("b", "a").kind == "tb5"
    assert t.link("a", "c").bandwidth_gbps == 2.5 and t.link("a", "c").latency_us == LINK_KINDS["wifi"].latency_us
    assert t.link("b", "c") is None and t.link("a", "a") is None
    for kind, (bw, lat) in LINK_KINDS.items():
        assert bw > 0 and lat > 0, kind


# ------------------------------------------------------------------ rdma matrix


def test_rdma_matrix_merges_and_hostfile_wins():
    hf = hostfile(host("a", b="hf_ab"), host("b"), host("c"))
    t = Topology(links=[
        Link("a", "b", "tb5", {"a": "topo_ab", "b": "topo_ba"}),
        Link("b", "c", "tb4", {"c": "topo_cb"}),
        Link("a", "x", "tb5", {"a": "ignored"}),  # host not in this hostfile
    ])
    assert t.rdma_matrix(hf) == [
        [None, "hf_ab", None],
        ["topo_ba", None, None],
        [None, "topo_cb", None],
    ]


def test_rdma_matrix_keeps_device_lists():
    hf = hostfile(host("a", b=["rdma_en2", "rdma_en3"]), host("b", a="rdma_en2"))
    assert Topology().rdma_matrix(hf) == [[None, ["rdma_en2", "rdma_en3"]], ["rdma_en2", None]]


# ------------------------------------------------------------------ ring order


def test_ring_order_picks_fast_links():
    # fast cycle a-c-b-d-a; the file order a,b,c,d would use the two slow links a-b and c-d
    hf = hostfile(host("a"), host("b"), host("c"), host("d"))
    t = topo(("a", "c", "tb5"), ("c", "b", "tb5"), ("b", "d", "tb5"), ("d", "a", "tb5"),
             ("a", "b", "ethernet"), ("c", "d", "ethernet"))
    order = t.ring_order(hf)
    assert order in (["a", "c", "b", "d"], ["a", "d", "b", "c"])
    hops = {frozenset((order[i], order[(i + 1) % 4])) for i in range(4)}
    assert all(t.link(*pair).kind == "tb5" for pair in hops)


def test_ring_order_keeps_host0_first_and_uses_latency_to_break_ties():
    hf = hostfile(host("z"), host("y"), host("x"), host("w"))
    # equal bandwidth everywhere: only latency differs; the low-latency cycle is z-x-y-w
    t = Topology(links=[
        Link("z", "x", "tb5", latency_us=1), Link("x", "y", "tb5", latency_us=1),
        Link("y", "w", "tb5", latency_us=1), Link("w", "z", "tb5", latency_us=1),
        Link("z", "y", "tb5", latency_us=50), Link("x", "w", "tb5", latency_us=50),
    ])
    assert t.ring_order(hf) in (["z", "x", "y", "w"], ["z", "w", "y", "x"])


def test_ring_order_without_links_keeps_file_order():
    hf = hostfile(host("c"), host("a"), host("b"))
    assert Topology().ring_order(hf) == ["c", "a", "b"]
    assert topo(("x", "y", "tb5")).ring_order(hf) == ["c", "a", "b"]  # links to other hosts only


def test_ring_order_greedy_beyond_eight_hosts():
    names = [f"h{i}" for i in range(10)]
    hidden = ["h0", "h7", "h2", "h9", "h4", "h1", "h8", "h3", "h6", "h5"]  # the fast cycle
    links = [(hidden[i], hidden[(i + 1) % 10], "tb5") for i in range(10)]
    hf = hostfile(*(host(n) for n in names))
    order = topo(*links).ring_order(hf)
    assert order[0] == "h0" and sorted(order) == sorted(names)
    assert order in (hidden, [hidden[0], *reversed(hidden[1:])])


def test_reordered_hostfile_follows_ring_order():
    hf = hostfile(host("a"), host("b"), host("c"), host("d"))
    t = topo(("a", "c", "tb5"), ("c", "b", "tb5"), ("b", "d", "tb5"), ("d", "a", "tb5"))
    ring = hf.reordered(t.ring_order(hf))
    assert [r.host.name for r in ring.ranks()] == t.ring_order(hf)


# ------------------------------------------------------------------ backend checks


def full_mesh(names: list[str], skip: set[tuple[str, str]] = frozenset()) -> Hostfile:
    hosts = [host(n, **{p: f"rdma_{n}{p}" for p in names if p != n and (n, p) not in skip}) for n in names]
    return hostfile(*hosts)


def test_jaccl_full_mesh_ok_and_missing_pairs_named_exactly():
    check_backend(full_mesh(["a", "b", "c"]), "jaccl", None)
    hf = full_mesh(["m3u-1", "m3u-2", "m3u-3"], skip={("m3u-1", "m3u-3"), ("m3u-3", "m3u-1")})
    msg = error_of(check_backend, hf, "jaccl", None)
    assert "backend jaccl needs an RDMA device between every pair of hosts" in msg
    assert "missing: m3u-1 -> m3u-3, m3u-3 -> m3u-1. Fix:" in msg, msg
    assert "m3u-2 ->" not in msg and "-> m3u-2" not in msg
    assert "rdma: {m3u-3: rdma_enX} to host m3u-1" in msg and "hostfiles/x.yaml" in msg
    assert "tb5 link with rdma devices in the topology" in msg


def test_jaccl_missing_one_direction_and_topology_fills_it():
    hf = full_mesh(["a", "b"], skip={("b", "a")})
    msg = error_of(check_backend, hf, "jaccl", None)
    assert "missing: b -> a. Fix:" in msg, msg
    check_backend(hf, "jaccl", Topology(links=[Link("a", "b", "tb5", {"b": "rdma_en3"})]))


def test_jaccl_ring_needs_only_neighbours():
    names = ["a", "b", "c", "d"]
    diagonals = {("a", "c"), ("c", "a"), ("b", "d"), ("d", "b")}
    hf = full_mesh(names, skip=diagonals)
    check_backend(hf, "jaccl-ring", None)
    msg = error_of(check_backend, hf, "jaccl", None)
    assert "missing: a -> c, b -> d, c -> a, d -> b. Fix:" in msg, msg

    hf = full_mesh(names, skip=diagonals | {("d", "a")})
    msg = error_of(check_backend, hf, "jaccl-ring", None)
    assert "each host and its two ring neighbours" in msg and "missing: d -> a. Fix:" in msg, msg
    assert "a -> c" not in msg and "b -> d" not in msg


def test_jaccl_ring_suggests_ring_order_when_it_would_work():
    # cabled as a ring a-c-b-d but listed a,b,c,d
    pairs = [("a", "c"), ("c", "b"), ("b", "d"), ("d", "a")]
    t = Topology(links=[Link(x, y, "tb5", {x: "rdma_en2", y: "rdma_en3"}) for x, y in pairs])
    hf = hostfile(host("a"), host("b"), host("c"), host("d"))
    msg = error_of(check_backend, hf, "jaccl-ring", t)
    assert "missing: a -> b, b -> a, c -> d, d -> c." in msg and "reorder the hosts as a, c, b, d" in msg, msg
    check_backend(hf.reordered(t.ring_order(hf)), "jaccl-ring", t)


def test_jaccl_refuses_several_slots_and_needs_coordinator_ip():
    hf = hostfile(host("a", b="rdma_en2"), host("b", slots=2, a="rdma_en2"))
    for backend in ("jaccl", "jaccl-ring"):
        msg = error_of(check_backend, hf, backend, None)
        assert "exactly one rank per host" in msg and "b (slots 2)" in msg and "Fix: set slots: 1" in msg, msg
    hf = hostfile(host("a", ip=None, b="rdma_en2"), host("b", a="rdma_en2"))
    msg = error_of(check_backend, hf, "jaccl", None)
    assert "needs an IP on a (host 0, the coordinator)" in msg and "Fix: add ips:" in msg, msg


def test_ring_needs_an_ip_per_host_and_mpi_needs_nothing():
    hf = hostfile(host("a"), host("b", ip=None), host("c"))
    msg = error_of(check_backend, hf, "ring", None)
    assert "none on: b." in msg and "Fix: add ips: [<address>] to host b in hostfiles/x.yaml" in msg, msg
    check_backend(hf, "mpi", None)
    check_backend(hostfile(host("a", slots=4, ip=None)), "mpi", None)


def test_unknown_backend():
    msg = error_of(check_backend, hostfile(host("a")), "jacl", None)
    assert "unknown backend 'jacl'" in msg and "did you mean 'jaccl'" in msg, msg


# ------------------------------------------------------------------ topology file errors


def write(tmp_path: Path, text: str, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_topology_fields(tmp_path):
    t = load_topology(write(tmp_path, """\
links:
  - hosts: [a, b]
    kind: tb4
    rdma: {a: rdma_en2}
    bandwidth_gbps: 32
    latency_us: 0
  - {hosts: [b, c], kind: ethernet}
"""))
    a, b = t.links
    assert (a.a, a.b, a.kind, a.rdma, a.bandwidth_gbps, a.latency_us) == ("a", "b", "tb4", {"a": "rdma_en2"}, 32, 0)
    assert (b.bandwidth_gbps, b.latency_us) == tuple(LINK_KINDS["ethernet"])
    assert t.path.endswith("topo.yaml")


def test_topology_link_to_unknown_host(tmp_path):
    t = load_topology(write(tmp_path, "links:\n  - {hosts: [a, b], kind: tb5}\n\n  - hosts: [b, m3u-9]\n    kind: tb5\n"))
    msg = error_of(t.check_hosts, hostfile(host("a"), host("b"), host("m3u-1")))
    assert "topo.yaml:4: links[1].hosts: unknown host 'm3u-9'" in msg and "did you mean 'm3u-1'" in msg, msg
    assert "Fix: use host names from the hostfile" in msg


BAD_TOPOLOGY = {
    "unknown-key": ("links:\n  - hosts: [a, b]\n    knd: tb5\n", 3, "links[0].knd", ["did you mean 'kind'", "Fix: use only these keys"]),
    "unknown-top": ("link:\n  - {hosts: [a, b], kind: tb5}\n", 1, "link", ["did you mean 'links'"]),
    "bad-kind": ("links:\n  - hosts: [a, b]\n    kind: tb6\n", 3, "links[0].kind", ["got 'tb6'", "did you mean", "tb5, tb4, ethernet, wifi", "Fix:"]),
    "missing-kind": ("links:\n  - hosts: [a, b]\n", 2, "links[0]", ["missing kind", "Fix: add kind"]),
    "one-host": ("links:\n  - kind: tb5\n    hosts: [a]\n", 3, "links[0].hosts", ["two different host names", "Fix:"]),
    "same-host": ("links:\n  - {hosts: [a, a], kind: tb5}\n", 2, "links[0].hosts", ["two different host names"]),
    "rdma-on-ethernet": ("links:\n  - hosts: [a, b]\n    kind: ethernet\n    rdma: {a: rdma_en2}\n", 4, "links[0].rdma", ["ethernet link has no RDMA", "Fix: remove rdma"]),
    "rdma-not-an-end": ("links:\n  - hosts: [a, b]\n    kind: tb5\n    rdma:\n      c: rdma_en2\n", 5, "links[0].rdma.c", ["not an end of this link", "Fix:"]),
    "bad-bandwidth": ("links:\n  - hosts: [a, b]\n    kind: tb5\n    bandwidth_gbps: fast\n", 4, "links[0].bandwidth_gbps", ["got 'fast'", "Fix:"]),
    "links-type": ("links: {a: b}\n", 1, "links", ["expected a list of links", "Fix:"]),
}


@pytest.mark.parametrize("case", BAD_TOPOLOGY, ids=list(BAD_TOPOLOGY))
def test_topology_errors(tmp_path, case):
    text, line, field, parts = BAD_TOPOLOGY[case]
    msg = error_of(load_topology, write(tmp_path, text))
    assert f"topo.yaml:{line}: {field}: " in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


def test_topology_syntax_empty_and_missing(tmp_path):
    msg = error_of(load_topology, write(tmp_path, "links:\n  - {hosts: [a, b], kind: tb5\n"))
    assert "topo.yaml:3: YAML syntax error" in msg or "topo.yaml:2: YAML syntax error" in msg, msg
    msg = error_of(load_topology, write(tmp_path, "# nothing\n"))
    assert "topo.yaml:1: top level: the file is empty" in msg, msg
    msg = error_of(load_topology, tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "cannot read the topology" in msg, msg
