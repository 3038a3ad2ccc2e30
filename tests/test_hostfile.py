"""Hostfile loading: the examples, the three formats, and one precise error per bad input."""

from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.hostfile import Host, Hostfile, builtin_local, load_hostfile

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["localhost.yaml", "tb5.yaml", "ethernet.yaml", "example-mlx.json", "example-openmpi.txt"]


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_hostfile(path)
    return str(exc.value)


# ------------------------------------------------------------------ examples and models


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_load(name):
    hf = load_hostfile(ROOT / "hostfiles" / name)
    assert hf.hosts and hf.world_size == len(hf.ranks())


def test_localhost_example():
    hf = load_hostfile(ROOT / "hostfiles" / "localhost.yaml")
    assert hf.format == "yaml" and hf.backend is None
    (host,) = hf.hosts
    assert host.is_local and host.name == "local" and host.slots == 2 and host.ips == ("127.0.0.1",)


def test_tb5_example():
    hf = load_hostfile(ROOT / "hostfiles" / "tb5.yaml")
    assert hf.backend == "jaccl" and hf.world_size == 4
    assert [h.name for h in hf.hosts] == ["m3u-1", "m3u-2", "m3u-3", "m3u-4"]
    for h in hf.hosts:
        assert h.memory_gb == 512 and h.slots == 1 and len(h.ips) == 1
        assert set(h.rdma) == {n.name for n in hf.hosts} - {h.name}
    assert hf.env == {"MLX_METAL_FAST_SYNCH": "1"}


def test_ethernet_example():
    hf = load_hostfile(ROOT / "hostfiles" / "ethernet.yaml")
    assert hf.backend == "ring" and hf.port == 52600
    assert [h.memory_gb for h in hf.hosts] == [192, 128, 64]
    assert hf.ssh_options == {"ConnectTimeout": "5"}
    assert hf.host("mini").port == 22 and hf.host("mini").env == {"MLX_RING_VERBOSE": "0"}


def test_builtin_local():
    hf = load_hostfile(None)
    assert hf.format == "builtin" and hf.path is None and hf.world_size == 2
    ranks = hf.ranks()
    assert [(r.rank, r.local_rank) for r in ranks] == [(0, 0), (1, 1)]
    assert all(r.host.is_local and r.host.ips == ("127.0.0.1",) for r in ranks)
    assert builtin_local(3).world_size == 3


def test_ranks_fill_hosts_in_order(tmp_path):
    hf = load_hostfile(write(tmp_path, "hosts:\n  - {ssh: a, slots: 2}\n  - {ssh: b}\n  - {ssh: c, slots: 3}\n"))
    assert hf.world_size == 6
    assert [(r.rank, r.host.name, r.local_rank) for r in hf.ranks()] == [
        (0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "c", 0), (4, "c", 1), (5, "c", 2)]


def test_defaults_names_and_ips(tmp_path):
    text = """\
hosts:
  - ssh: local
  - ssh: local
  - ssh: me@10.0.0.7
  - ssh: studio.lan
  - m3u-1.local
"""
    hf = load_hostfile(write(tmp_path, text))
    assert [h.name for h in hf.hosts] == ["local", "local-2", "me@10.0.0.7", "studio.lan", "m3u-1.local"]
    assert [h.ips for h in hf.hosts] == [("127.0.0.1",), ("127.0.0.1",), ("10.0.0.7",), (), ()]
    assert hf.port == 52600 and hf.backend is None and hf.env == {}
    assert all(h.slots == 1 for h in hf.hosts)


def test_all_fields(tmp_path):
    (tmp_path / "ssh_config").write_text("Host *\n")
    text = """\
backend: jaccl-ring
port: 40000
env: {A: 1, B: true, C: 1.5, D: "x"}
ssh_config: ./ssh_config
ssh_options: {ConnectTimeout: 5, BatchMode: true}
hosts:
  - name: one
    ssh: u@one.lan
    port: 2222
    ips: 10.0.0.1
    slots: 1
    memory_gb: 64.5
    python: /opt/py/bin/python
    cwd: /work
    rdma: {two: [rdma_en2, rdma_en3]}
    env: {FOO: bar}
  - {name: two, ssh: two, ips: ["fe80::1", 10.0.0.2], rdma: {one: rdma_en2}}
"""
    hf = load_hostfile(write(tmp_path, text, "full.yaml"))
    one, two = hf.hosts
    assert hf.backend == "jaccl-ring" and hf.port == 40000
    assert hf.env == {"A": "1", "B": "1", "C": "1.5", "D": "x"}
    assert hf.ssh_config == str(tmp_path / "ssh_config")
    assert hf.ssh_options == {"ConnectTimeout": "5", "BatchMode": "yes"}
    assert (one.port, one.ips, one.memory_gb, one.python, one.cwd) == (2222, ("10.0.0.1",), 64.5, "/opt/py/bin/python", "/work")
    assert one.rdma == {"two": ["rdma_en2", "rdma_en3"]} and one.env == {"FOO": "bar"}
    assert two.ips == ("fe80::1", "10.0.0.2") and not two.is_local


def test_shell_characters_kept_verbatim_in_env_python_cwd(tmp_path):
    nasty = "$(touch /tmp/pwned); `id` && echo 'hi' \"there\" | cat > /dev/null"
    text = f"""\
env: {{TOP: '{nasty.replace("'", "''")}'}}
hosts:
  - ssh: a
    python: '/x/$(id)/`whoami`;ls/python'
    cwd: '/tmp/a b;$(rm -rf /)'
    env:
      X: '{nasty.replace("'", "''")}'
"""
    hf = load_hostfile(write(tmp_path, text, "ok.yaml"))
    assert hf.env["TOP"] == nasty
    host = hf.hosts[0]
    assert host.env["X"] == nasty
    assert host.python == "/x/$(id)/`whoami`;ls/python"
    assert host.cwd == "/tmp/a b;$(rm -rf /)"


def test_host_is_hashable_and_helpers():
    hf = Hostfile(hosts=[Host("a", "a", rdma={"b": "rdma_en2"}), Host("b", "b", rdma={"a": "rdma_en2"}), Host("c", "c")])
    assert len({r.host for r in hf.ranks()}) == 3
    assert [h.name for h in hf.reordered(["c", "a", "b"]).hosts] == ["c", "a", "b"]
    sub = hf.subset(["c", "a"])
    assert [h.name for h in sub.hosts] == ["a", "c"] and sub.host("a").rdma == {}
    with pytest.raises(ConfigError, match="unknown host 'd'"):
        hf.host("d")
    with pytest.raises(ConfigError, match="permutation"):
        hf.reordered(["a", "b"])


# ------------------------------------------------------------------ YAML errors

# (text, line, field path, substrings of the what / fix)
BAD_YAML = {
    "unknown-key": ("hosts:\n  - ssh: a\n    slot: 2\n", 3, "hosts[0].slot", ["unknown key 'slot'", "did you mean 'slots'", "Fix: use only these keys", "memory_gb"]),
    "unknown-top-key": ("hosts: [a]\nbakend: ring\n", 2, "bakend", ["did you mean 'backend'", "Fix:"]),
    "wrong-type": ("hosts:\n  - ssh: a\n    memory_gb: lots\n", 3, "hosts[0].memory_gb", ["expected a number of GB", "'lots'", "Fix: set memory_gb"]),
    "ips-type": ("hosts:\n  - ssh: a\n    ips: {x: 1}\n", 3, "hosts[0].ips", ["expected a list of IP addresses", "Fix:"]),
    "slots-word": ("hosts:\n  - ssh: a\n  - ssh: b\n\n    slots: two\n", 5, "hosts[1].slots", ["expected a whole number >= 1, got 'two'", "Fix: set slots to the number of ranks"]),
    "slots-zero": ("hosts:\n  - ssh: a\n    slots: 0\n", 3, "hosts[0].slots", ["got 0", "Fix: set slots"]),
    "host-port": ("hosts:\n  - ssh: a\n    port: 70000\n", 3, "hosts[0].port", ["1..65535", "got 70000", "Fix:"]),
    "data-port": ("port: 0\nhosts: [a]\n", 1, "port", ["1..65535", "Fix: set port"]),
    "data-port-overflow": ("port: 65534\nhosts:\n  - {ssh: a, slots: 4}\n", 1, "port", ["run past 65535", "Fix: set port to at most 65531"]),
    "duplicate-name": ("hosts:\n  - {name: x, ssh: a}\n  - ssh: b\n    name: x\n", 4, "hosts[1].name", ["duplicate host name 'x'", "also hosts[0]", "Fix: give each host a unique name"]),
    "duplicate-ssh": ("hosts:\n  - ssh: a\n  - ssh: a\n", 3, "hosts[1].ssh", ["duplicate host name 'a'", "slots: N"]),
    "bad-ip": ("hosts:\n  - ssh: a\n    ips:\n      - 10.0.0.1\n      - 10.0.0.300\n", 5, "hosts[0].ips[1]", ["'10.0.0.300' is not a valid IP address", "Fix: list"]),
    "bad-env-key": ("hosts:\n  - ssh: a\n    env:\n      OK: 1\n      1BAD: x\n", 5, "hosts[0].env.1BAD", ["not a valid environment variable name", "Fix: use letters"]),
    "bad-env-key-top": ("env: {BAD-KEY: x}\nhosts: [a]\n", 1, "env.BAD-KEY", ["not a valid environment variable name"]),
    "env-null": ("env:\n  X:\nhosts: [a]\n", 2, "env.X", ["got nothing", "Fix: quote"]),
    "rdma-unknown-peer": ("hosts:\n  - ssh: a\n    rdma: {b: rdma_en2, c: rdma_en3}\n  - ssh: b\n", 3, "hosts[0].rdma.c", ["unknown peer host 'c'", "Fix: key rdma by the name of another host: b"]),
    "rdma-self": ("hosts:\n  - ssh: a\n    rdma:\n      a: rdma_en2\n  - ssh: b\n", 4, "hosts[0].rdma.a", ["no RDMA device to itself", "Fix: remove"]),
    "bad-backend": ("hosts: [a]\nbackend: rign\n", 2, "backend", ["got 'rign'", "did you mean 'ring'", "ring, jaccl, jaccl-ring, mpi", "Fix:"]),
    "ssh-subshell": ("hosts:\n  - ssh: a\n  - ssh: $(touch /tmp/x)\n", 3, "hosts[1].ssh", ["not an ssh destination", "'$(touch /tmp/x)'", "Fix: use \"local\""]),
    "ssh-backticks": ("hosts:\n  - ssh: '`id`'\n", 2, "hosts[0].ssh", ["not an ssh destination", "'`'", "Fix:"]),
    "ssh-semicolon": ("hosts:\n  - ssh: a;reboot\n", 2, "hosts[0].ssh", ["not an ssh destination", "';'", "Fix:"]),
    "ssh-space": ("hosts:\n  - ssh: a b\n", 2, "hosts[0].ssh", ["not an ssh destination", "Fix:"]),
    "ssh-dash": ("hosts:\n  - ssh: -oProxyCommand=touch\n", 2, "hosts[0].ssh", ["starts with '-'", "read as an option", "Fix:"]),
    "ssh-missing": ("hosts:\n  - name: a\n    slots: 1\n", 2, "hosts[0]", ["missing ssh", "Fix: add ssh:"]),
    "ssh-empty": ("hosts:\n  - ssh: ''\n", 2, "hosts[0].ssh", ["non-empty string", "Fix:"]),
    "empty-hosts": ("backend: ring\nhosts: []\n", 2, "hosts", ["non-empty list of hosts", "Fix: add hosts:"]),
    "no-hosts": ("backend: ring\n", 1, "hosts", ["non-empty list of hosts", "Fix:"]),
    "top-list": ("- ssh: a\n", 1, "top level", ["expected a mapping", "Fix:"]),
    "duplicate-key": ("hosts:\n  - ssh: a\n    slots: 1\n    slots: 2\n", 4, "hosts[0].slots", ["appears twice", "Fix: keep only one"]),
    "ssh-config-missing": ("ssh_config: nope.conf\nhosts: [a]\n", 1, "ssh_config", ["does not exist", "Fix:"]),
    "ssh-option-name": ("ssh_options: {'-o': x}\nhosts: [a]\n", 1, "ssh_options.-o", ["not an ssh option name", "Fix:"]),
}


@pytest.mark.parametrize("case", BAD_YAML, ids=list(BAD_YAML))
def test_yaml_errors(tmp_path, case):
    text, line, field, parts = BAD_YAML[case]
    msg = error_of(write(tmp_path, text))
    assert f"bad.yaml:{line}: {field}: " in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    assert "Fix:" in msg and "Traceback" not in msg


def test_yaml_syntax_error(tmp_path):
    msg = error_of(write(tmp_path, "hosts:\n  - ssh: a\n    slots: 1\n   bad: [\n"))
    assert "bad.yaml:4: YAML syntax error" in msg and "Fix:" in msg, msg


def test_yaml_tab_indent_error(tmp_path):
    msg = error_of(write(tmp_path, "hosts:\n  - ssh: a\n\tslots: 1\n"))
    assert "bad.yaml:3: YAML syntax error" in msg, msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    msg = error_of(write(tmp_path, text, "empty.yaml"))
    assert "empty.yaml:1:" in msg and "empty" in msg and "Fix:" in msg, msg


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "cannot read" in msg and "Fix:" in msg, msg


def test_directory_is_not_a_hostfile(tmp_path):
    msg = error_of(tmp_path)
    assert str(tmp_path) in msg and "cannot read" in msg, msg


# ------------------------------------------------------------------ mlx.launch JSON


def test_mlx_json_example():
    hf = load_hostfile(ROOT / "hostfiles" / "example-mlx.json")
    assert hf.format == "mlx-json" and hf.backend == "jaccl" and hf.world_size == 3
    assert hf.env == {"MLX_METAL_FAST_SYNCH": "1"}
    first = hf.hosts[0]
    assert first.name == first.ssh == "m3u-1.local" and first.ips == ("10.10.0.1",)
    assert first.rdma == {"m3u-2.local": "rdma_en2", "m3u-3.local": "rdma_en3"}
    assert hf.hosts[2].rdma == {"m3u-1.local": "rdma_en2", "m3u-2.local": "rdma_en3"}


def test_mlx_json_list_repeats_and_localhost(tmp_path):
    text = """[
  {"ssh": "localhost", "ips": ["127.0.0.1"], "rdma": [null, ["rdma_en2", "rdma_en3"], null]},
  {"ssh": "localhost", "rdma": ["rdma_en4", null, null]},
  {"ssh": "10.0.0.9"}
]"""
    hf = load_hostfile(write(tmp_path, text, "h.json"))
    assert hf.backend is None and hf.env == {}
    assert [h.name for h in hf.hosts] == ["localhost", "localhost#2", "10.0.0.9"]
    assert all(h.ssh != "local" and not h.is_local for h in hf.hosts)
    assert hf.hosts[0].rdma == {"localhost#2": ["rdma_en2", "rdma_en3"]}
    assert hf.hosts[1].rdma == {"localhost": "rdma_en4"} and hf.hosts[1].ips == ()
    assert hf.hosts[2].ips == ("10.0.0.9",)
    assert [r.rank for r in hf.ranks()] == [0, 1, 2]


def test_mlx_json_empty_backend_is_unset(tmp_path):
    hf = load_hostfile(write(tmp_path, '{"backend": "", "envs": [], "hosts": [{"ssh": "a"}]}', "h.json"))
    assert hf.backend is None


def test_mlx_json_syntax_error_line(tmp_path):
    msg = error_of(write(tmp_path, '{\n  "hosts": [\n    {"ssh": "a"},\n    {"ssh": "b",}\n  ]\n}\n', "h.json"))
    assert "h.json:4: JSON: syntax error" in msg and "Fix:" in msg, msg


BAD_JSON = {
    "unknown-key": ('{"hosts": [\n {"ssh": "a",\n  "ip": ["1.2.3.4"]}]}', 3, "hosts[0].ip", ["unknown key 'ip'", "did you mean 'ips'"]),
    "rdma-length": ('[{"ssh": "a", "rdma": [null, "x"]},\n {"ssh": "b",\n  "rdma": ["x", null, "y"]}]', 3, "hosts[1].rdma", ["list of 2 entries", "Fix:"]),
    "rdma-self": ('[{"ssh": "a", "rdma": ["rdma_en1", "rdma_en2"]},\n {"ssh": "b"}]', 1, "hosts[0].rdma[0]", ["must be null", "Fix:"]),
    "bad-ssh": ('[{"ssh": "a"},\n {"ssh": "$(reboot)"}]', 2, "hosts[1].ssh", ["not an ssh destination", "Fix:"]),
    "bad-env": ('{"envs": ["NOEQUALS"],\n "hosts": [{"ssh": "a"}]}', 1, "envs[0]", ["NAME=value", "Fix:"]),
    "bad-backend": ('{"backend": "nccl",\n "hosts": [{"ssh": "a"}]}', 1, "backend", ["got 'nccl'", "Fix:"]),
    "bad-ip": ('{"hosts": [{"ssh": "a",\n  "ips": ["a.b.c.d"]}]}', 2, "hosts[0].ips[0]", ["not a valid IP address"]),
}


@pytest.mark.parametrize("case", BAD_JSON, ids=list(BAD_JSON))
def test_mlx_json_errors(tmp_path, case):
    text, line, field, parts = BAD_JSON[case]
    msg = error_of(write(tmp_path, text, "h.json"))
    assert f"h.json:{line}: {field}: " in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


def test_mlx_json_env_values_verbatim(tmp_path):
    hf = load_hostfile(write(tmp_path, '{"envs": ["X=$(id); `w`=1"], "hosts": [{"ssh": "a"}]}', "h.json"))
    assert hf.env == {"X": "$(id); `w`=1"}


# ------------------------------------------------------------------ OpenMPI


def test_openmpi_example():
    hf = load_hostfile(ROOT / "hostfiles" / "example-openmpi.txt")
    assert hf.format == "openmpi" and hf.backend is None
    assert [(h.name, h.ssh, h.slots) for h in hf.hosts] == [("studio.lan", "studio.lan", 2), ("mbp.lan", "mbp.lan", 1), ("mini.lan", "mini.lan", 1)]
    assert hf.world_size == 4


def test_openmpi_localhost_repeats_and_ipv6(tmp_path):
    hf = load_hostfile(write(tmp_path, "localhost slots=2\n\n# c\n10.0.0.5 max_slots=4\nfe80::1\nlocalhost slots=1\n", "hosts"))
    assert hf.format == "openmpi"
    assert [(h.name, h.slots) for h in hf.hosts] == [("localhost", 3), ("10.0.0.5", 1), ("fe80::1", 1)]
    assert not hf.hosts[0].is_local and hf.hosts[0].ips == ()
    assert hf.hosts[1].ips == ("10.0.0.5",)


@pytest.mark.parametrize(
    "text, line, parts",
    [
        ("a slots=2\n# c\nb cpus=4\n", 3, ["b: unknown token 'cpus=4'", "Fix: write lines as"]),
        ("a\nb slot=2\n", 2, ["unknown token 'slot=2'", "did you mean 'slots'"]),
        ("a\nb\nc slots=x\n", 3, ["c.slots: expected a whole number >= 1, got 'x'", "Fix:"]),
        ("a slots=4 max_slots=2\n", 1, ["slots=4 is more than max_slots=2", "Fix:"]),
        ("a\n-oProxyCommand=x slots=1\n", 2, ["starts with '-'", "Fix:"]),
        ("a\n`id` slots=1\n", 2, ["not an ssh destination", "Fix:"]),
    ],
)
def test_openmpi_errors(tmp_path, text, line, parts):
    msg = error_of(write(tmp_path, text, "hosts.txt"))
    assert f"hosts.txt:{line}: " in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
