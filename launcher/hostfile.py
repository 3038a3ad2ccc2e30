"""Hosts and ranks: the hostfile models and their three loaders.

Formats (detected from the content, see load_hostfile):
  yaml      exolaunch's own schema (docs/hostfile.md)
  mlx-json  the JSON hostfile of mlx.launch (one entry per rank, rdma as a per-host list)
  openmpi   `host slots=N [max_slots=M]` lines

Every problem in a file becomes one ConfigError that names the file, line and field
(launcher.yamlsource). The field types only a cluster description has (ssh destinations, host
names, IP lists, RDMA devices) are checked here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from launcher.errors import ConfigError
from launcher.yamlsource import (Source, config_error, did_you_mean, format_path, read_text, read_yaml,
                                 read_yaml_mapping, show)
from runtime.contract import BACKENDS, DEFAULT_DATA_PORT

# ssh destinations reach argv of the local `ssh`; this whitelist keeps out option injection
# (leading '-') and anything a shell would interpret. Names may also carry '#' (mlx-json dedupe).
_SSH_RE = re.compile(r"[A-Za-z0-9._@%:\[\]-]+")
_NAME_RE = re.compile(r"[A-Za-z0-9._@%:\[\]#-]+")
_SSH_OPTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*")


# ----------------------------------------------------------------------------- models


def _ip_of_destination(ssh: str) -> str | None:
    """The IP in `[user@]1.2.3.4`, or None when the destination is a host name or alias."""
    host = ssh.rsplit("@", 1)[-1].strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@dataclass(frozen=True)
class Host:
    name: str
    ssh: str
    port: int | None = None
    ips: tuple[str, ...] = ()
    slots: int = 1
    memory_gb: float | None = None
    python: str | None = None
    cwd: str | None = None
    # dicts are left out of hash() so Host (and Rank) stay hashable
    rdma: dict[str, str | list[str]] = field(default_factory=dict, hash=False)
    env: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        ips = tuple(self.ips)
        if not ips:
            if self.is_local:
                ips = ("127.0.0.1",)
            elif ip := _ip_of_destination(self.ssh):
                ips = (ip,)
        object.__setattr__(self, "ips", ips)

    @property
    def is_local(self) -> bool:
        return self.ssh == "local"


@dataclass(frozen=True)
class Rank:
    rank: int
    host: Host
    local_rank: int


@dataclass
class Hostfile:
    path: str | None = None
    format: str = "yaml"
    hosts: list[Host] = field(default_factory=list)
    backend: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = DEFAULT_DATA_PORT
    port_given: bool = False  # `port:` is in the file (else `run` may pick free ports on one host)
    ssh_config: str | None = None
    ssh_options: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How messages name this hostfile."""
        return self.path or "the built-in hostfile"

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    def ranks(self) -> list[Rank]:
        out: list[Rank] = []
        for h in self.hosts:
            out.extend(Rank(len(out), h, i) for i in range(h.slots))
        return out

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        names = [h.name for h in self.hosts]
        raise ConfigError(
            f"{self.label}: unknown host {name!r}{did_you_mean(name, names)}; "
            f"the hosts are: {', '.join(names)}. Fix: use one of those names."
        )

    def reordered(self, names: list[str]) -> Hostfile:
        """Same hosts in the order given (a permutation of all host names)."""
        names = list(names)
        if sorted(names) != sorted(h.name for h in self.hosts):
            raise ConfigError(
                f"{self.label}: cannot reorder hosts to {names}: that is not a permutation of "
                f"{[h.name for h in self.hosts]}. Fix: name every host exactly once."
            )
        return dataclasses.replace(self, hosts=[self.host(n) for n in names])

    def subset(self, names: Iterable[str]) -> Hostfile:
        """Only the named hosts (kept in hostfile order); rdma entries to dropped hosts go too."""
        keep = set(names)
        for n in keep:
            self.host(n)  # raises on an unknown name
        if not keep:
            raise ConfigError(f"{self.label}: an empty subset of hosts. Fix: name at least one host.")
        hosts = [
            dataclasses.replace(h, rdma={p: d for p, d in h.rdma.items() if p in keep})
            for h in self.hosts
            if h.name in keep
        ]
        return dataclasses.replace(self, hosts=hosts)


def builtin_local(slots: int = 2) -> Hostfile:
    """The hostfile used when none is given: this machine, `slots` ranks over loopback."""
    return Hostfile(path=None, format="builtin", hosts=[Host(name="local", ssh="local", slots=slots)])


# ----------------------------------------------------------------------------- cluster field types


def ssh_destination(src: Source, path: tuple, value: Any) -> str:
    fix = 'use "local", a host name, user@host or an alias from ~/.ssh/config (ssh flags go in ssh_options)'
    value = src.string(path, value, fix)
    if value.startswith("-"):
        raise src.error(path, f"{show(value)} starts with '-', which ssh would read as an option", fix)
    if not _SSH_RE.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _SSH_RE.fullmatch(c)}))
        raise src.error(
            path,
            f"{show(value)} is not an ssh destination: characters {bad!r} are not allowed "
            "(only letters, digits and . _ @ % : [ ] -)",
            fix,
        )
    return value


def host_name(src: Source, path: tuple, value: Any) -> str:
    value = src.string(path, value, "use a short label such as m3u-1")
    if not _NAME_RE.fullmatch(value) or value.startswith("-"):
        raise src.error(
            path,
            f"{show(value)} is not a valid host name (only letters, digits and . _ @ % : [ ] # -, "
            "not starting with -)",
            "use a short label such as m3u-1",
        )
    return value


def ip_list(src: Source, path: tuple, value: Any) -> tuple[str, ...]:
    fix = "list the host's data-plane addresses, e.g. ips: [10.0.1.1]"
    if isinstance(value, str):
        value = [value]
        single = True
    else:
        single = False
    if not isinstance(value, list):
        raise src.error(path, f"expected a list of IP addresses, got {show(value)}", fix)
    out = []
    for i, ip in enumerate(value):
        p = path if single else path + (i,)
        try:
            if not isinstance(ip, str):
                raise ValueError
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise src.error(p, f"{show(ip)} is not a valid IP address", fix + " (quote it if needed)") from None
    return tuple(out)


def rdma_devices(src: Source, path: tuple, value: Any) -> str | list[str]:
    fix = "give the RDMA device name(s) on this host, e.g. rdma_en3 or [rdma_en3, rdma_en4]"
    if isinstance(value, list) and value:
        return [rdma_device(src, path + (i,), d, fix) for i, d in enumerate(value)]
    return rdma_device(src, path, value, fix)


def rdma_device(src: Source, path: tuple, value: Any, fix: str) -> str:
    value = src.string(path, value, fix)
    if any(c.isspace() for c in value):
        raise src.error(path, f"{show(value)} contains whitespace", fix)
    return value


# ----------------------------------------------------------------------------- format detection


def load_hostfile(path: str | os.PathLike | None) -> Hostfile:
    """Load any supported hostfile; None gives builtin_local()."""
    if path is None:
        return builtin_local()
    label, text = read_text(path, "hostfile")
    meaningful = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    meaningful = [ln for ln in meaningful if ln]
    if not meaningful:
        raise config_error(
            label, 1, "hostfile", "the file is empty",
            "list at least one host under hosts: (see docs/hostfile.md), or give no hostfile to run on this machine",
        )
    first = text.lstrip()[:1]
    if first in "[{":
        return _load_mlx_json(label, text)
    if _looks_like_openmpi(meaningful):
        return _load_openmpi(label, text)
    return _load_yaml(label, text)


def _looks_like_openmpi(lines: list[str]) -> bool:
    # YAML always has a "key:" or "- item" somewhere; OpenMPI lines are "host k=v ...".
    # (IPv6 host names in OpenMPI files have ':' but never ': ' or a trailing ':'.)
    return not any(re.search(r":(\s|$)", ln) or ln.startswith("- ") or ln == "-" for ln in lines)


# ----------------------------------------------------------------------------- YAML

_TOP_KEYS = ("backend", "port", "env", "ssh_config", "ssh_options", "hosts")
_HOST_KEYS = ("name", "ssh", "port", "ips", "slots", "memory_gb", "python", "cwd", "rdma", "env")


def _load_yaml(label: str, text: str) -> Hostfile:
    data, src = read_yaml_mapping(
        label, text, _TOP_KEYS, empty_fix="list at least one host under hosts: (see docs/hostfile.md)",
        mapping_fix="start the file with top-level keys such as hosts: (see docs/hostfile.md)")

    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise src.error(
            ("hosts",), f"expected a non-empty list of hosts, got {show(raw_hosts)}",
            "add hosts: with one '- ssh: <destination>' entry per machine (ssh: local for this one)",
        )
    fields = [_yaml_host_fields(src, ("hosts", i), h) for i, h in enumerate(raw_hosts)]
    _assign_names(src, fields)
    _check_rdma_peers(src, fields)
    hosts = [Host(**{k: v for k, v in f.items() if not k.startswith("_")}) for f in fields]

    backend = data.get("backend")
    if backend is not None:
        backend = src.choice(("backend",), backend, BACKENDS, "pick a backend, or leave backend out")
    world = sum(h.slots for h in hosts)
    port = DEFAULT_DATA_PORT
    if "port" in data:
        port = src.integer(("port",), data["port"], 1, 65535, "a port number 1..65535",
                           "set port to a free TCP port, e.g. 52600")
    if port + world > 65535:
        raise src.error(
            ("port",), f"ports {port}..{port + world} run past 65535 for {world} rank(s)",
            f"set port to at most {65535 - world}",
        )
    env = src.env(("env",), data["env"]) if data.get("env") is not None else {}
    ssh_config = None
    if data.get("ssh_config") is not None:
        p = ("ssh_config",)
        value = src.string(p, data["ssh_config"], "give the path of an ssh config file")
        ssh_config = os.path.normpath(
            os.path.join(os.path.dirname(os.path.abspath(label)), os.path.expanduser(value))
        )
        if not os.path.isfile(ssh_config):
            raise src.error(p, f"file {ssh_config} does not exist",
                            "paths are relative to the hostfile's directory; fix the path or remove ssh_config")
    ssh_options = _ssh_options(src, data["ssh_options"]) if data.get("ssh_options") is not None else {}
    return Hostfile(
        path=label, format="yaml", hosts=hosts, backend=backend, env=env, port=port, port_given="port" in data,
        ssh_config=ssh_config, ssh_options=ssh_options,
    )


def _yaml_host_fields(src: Source, path: tuple, raw: Any) -> dict:
    """Checked keyword arguments for Host, plus _-prefixed bookkeeping (name given or not)."""
    if isinstance(raw, str):  # shorthand: "- m3u-1.local"
        raw = {"ssh": raw}
    raw = src.mapping(path, raw, "write each host as a mapping with at least ssh: <destination>")
    src.keys(path, raw, _HOST_KEYS)
    if "ssh" not in raw:
        raise src.error(path, "missing ssh", 'add ssh: <destination>, or ssh: local for this machine')
    f: dict[str, Any] = {"ssh": ssh_destination(src, path + ("ssh",), raw["ssh"]), "_path": path}
    if raw.get("name") is not None:
        f["name"] = host_name(src, path + ("name",), raw["name"])
    if raw.get("port") is not None:
        f["port"] = src.integer(path + ("port",), raw["port"], 1, 65535, "an ssh port 1..65535",
                                "set port to the host's sshd port, or leave it out for 22")
    if raw.get("ips") is not None:
        f["ips"] = ip_list(src, path + ("ips",), raw["ips"])
    if "slots" in raw:
        f["slots"] = src.integer(path + ("slots",), raw["slots"], 1, 1 << 16, "a whole number >= 1",
                                 "set slots to the number of ranks to start on this host")
    if raw.get("memory_gb") is not None:
        f["memory_gb"] = src.number(path + ("memory_gb",), raw["memory_gb"], 1e-9, "a number of GB > 0",
                                    "set memory_gb to the host's unified memory, e.g. 512")
    for key in ("python", "cwd"):
        if raw.get(key) is not None:
            f[key] = src.string(path + (key,), raw[key], f"give the {key} path on that host, or leave {key} out")
    if raw.get("env") is not None:
        f["env"] = src.env(path + ("env",), raw["env"])
    if raw.get("rdma") is not None:
        p = path + ("rdma",)
        rdma = src.mapping(p, raw["rdma"], "write rdma as peer-host-name: device lines")
        f["rdma"] = {str(peer): rdma_devices(src, p + (str(peer),), d) for peer, d in rdma.items()}
    return f


def _assign_names(src: Source, fields: list[dict]) -> None:
    """Default names (ssh value, or local, local-2, ...) and the duplicate check."""
    n_local = 0
    for f in fields:
        if "name" not in f:
            if f["ssh"] == "local":
                n_local += 1
                f["name"] = "local" if n_local == 1 else f"local-{n_local}"
            else:
                f["name"] = f["ssh"]
            f["_named_by"] = "ssh"
        else:
            f["_named_by"] = "name"
    first: dict[str, tuple] = {}
    for f in fields:
        path = f["_path"]
        if f["name"] in first:
            raise src.error(
                path + (f["_named_by"],),
                f"duplicate host name {f['name']!r} (also {format_path(first[f['name']])})",
                "give each host a unique name:, or use slots: N on one entry instead of listing a host twice",
            )
        first[f["name"]] = path


def _check_rdma_peers(src: Source, fields: list[dict]) -> None:
    names = [f["name"] for f in fields]
    for f in fields:
        for peer in f.get("rdma", {}):
            p = f["_path"] + ("rdma", peer)
            if peer == f["name"]:
                raise src.error(p, "a host has no RDMA device to itself", f"remove {peer!r} from this rdma map")
            if peer not in names:
                others = [n for n in names if n != f["name"]]
                raise src.error(
                    p, f"unknown peer host {peer!r}{did_you_mean(peer, names)}",
                    f"key rdma by the name of another host: {', '.join(others)}" if others
                    else "remove rdma: there is no other host in this file",
                )


def _ssh_options(src: Source, value: Any) -> dict[str, str]:
    value = src.mapping(("ssh_options",), value, "write ssh_options as Option: value lines")
    out = {}
    for key, v in value.items():
        p = ("ssh_options", str(key))
        if not isinstance(key, str) or not _SSH_OPTION_RE.fullmatch(key):
            raise src.error(p, f"{str(key)!r} is not an ssh option name", "use names from man ssh_config, e.g. ConnectTimeout")
        if isinstance(v, bool):  # ssh spells booleans yes/no
            v = "yes" if v else "no"
        v = src.env_value(p, v)
        if "\n" in v:
            raise src.error(p, "contains a newline", "put the value on one line")
        out[key] = v
    return out


# ----------------------------------------------------------------------------- mlx.launch JSON

_MLX_TOP_KEYS = ("backend", "envs", "hosts")
_MLX_HOST_KEYS = ("ssh", "ips", "rdma")


def _load_mlx_json(label: str, text: str) -> Hostfile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise config_error(label, e.lineno, "JSON", f"syntax error: {e.msg} (column {e.colno})",
                           "fix the JSON (mlx.launch hostfile format), or write the hostfile in YAML") from None
    # JSON is YAML, so the YAML composer gives line numbers for field messages
    try:
        _, src = read_yaml(label, text)
    except ConfigError:
        src = Source(label)
    if isinstance(data, list):  # a bare list of hosts: report paths as hosts[i] all the same
        data = {"hosts": data}
        src.lines = {("hosts",) + k: v for k, v in src.lines.items()}
    src.mapping((), data, 'use a list of hosts or {"backend": ..., "envs": [...], "hosts": [...]}')
    src.keys((), data, _MLX_TOP_KEYS)
    base = ("hosts",)
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise src.error(base, f"expected a non-empty list of hosts, got {show(raw_hosts)}",
                        'add "hosts": [{"ssh": "<hostname>", "ips": [...]}, ...]')

    backend = data.get("backend") or None
    if backend is not None:
        backend = src.choice(("backend",), backend, BACKENDS, "pick a supported backend or remove it")
    env: dict[str, str] = {}
    envs = data.get("envs") or []
    if not isinstance(envs, list):
        raise src.error(("envs",), f"expected a list of \"NAME=value\" strings, got {show(envs)}", 'write "envs": ["FOO=1"]')
    for i, item in enumerate(envs):
        p = ("envs", i)
        if not isinstance(item, str) or "=" not in item:
            raise src.error(p, f"expected \"NAME=value\", got {show(item)}", 'write each entry as "NAME=value"')
        k, v = src.env_entry(p, *item.split("=", 1))
        env[k] = v

    ssh_values, count = [], {}
    for i, h in enumerate(raw_hosts):
        p = base + (i,)
        h = src.mapping(p, h, 'write each host as {"ssh": "<hostname>", "ips": [...], "rdma": [...]}')
        src.keys(p, h, _MLX_HOST_KEYS)
        if "ssh" not in h:
            raise src.error(p, "missing ssh", 'add "ssh": "<hostname>"')
        ssh_values.append(ssh_destination(src, p + ("ssh",), h["ssh"]))
    names = []
    for s in ssh_values:  # mlx repeats a host once per rank; keep names unique
        count[s] = count.get(s, 0) + 1
        names.append(s if count[s] == 1 else f"{s}#{count[s]}")

    hosts = []
    for i, h in enumerate(raw_hosts):
        p = base + (i,)
        ips = ip_list(src, p + ("ips",), h["ips"]) if h.get("ips") else ()
        rdma = _mlx_rdma(src, p + ("rdma",), h.get("rdma") or [], i, names)
        hosts.append(Host(name=names[i], ssh=ssh_values[i], ips=ips, slots=1, rdma=rdma))
    return Hostfile(path=label, format="mlx-json", hosts=hosts, backend=backend, env=env)


def _mlx_rdma(src: Source, path: tuple, raw: Any, i: int, names: list[str]) -> dict:
    """mlx's per-host list (index = peer host, null for self) -> {peer name: device(s)}."""
    n = len(names)
    fix = f"give a list of {n} entries: null at position {i} (this host) and the device reaching each other host"
    if not isinstance(raw, list) or (raw and len(raw) != n):
        raise src.error(path, f"expected a list of {n} entries (one per host), got {show(raw)}"
                        + (f" of length {len(raw)}" if isinstance(raw, list) else ""), fix)
    out = {}
    for j, dev in enumerate(raw):
        if dev is None:
            continue
        if j == i:
            raise src.error(path + (j,), f"entry {j} is this host itself and must be null", fix)
        out[names[j]] = rdma_devices(src, path + (j,), dev)
    return out


# ----------------------------------------------------------------------------- OpenMPI

_MPI_KEYS = ("slots", "max_slots", "max-slots")


def _load_openmpi(label: str, text: str) -> Hostfile:
    slots: dict[str, int] = {}  # OpenMPI adds up the slots of repeated host lines
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        src = Source(label, {(): lineno})
        host, *tokens = line.split()
        ssh_destination(src, (host,), host)
        n, max_n = 1, None
        for tok in tokens:
            key, eq, value = tok.partition("=")
            if not eq or key not in _MPI_KEYS:
                raise src.error((host,), f"unknown token {tok!r}{did_you_mean(key, _MPI_KEYS)}",
                                "write lines as 'hostname slots=N [max_slots=M]'")
            if not value.isdigit() or int(value) < 1:
                raise src.error((host, key), f"expected a whole number >= 1, got {value!r}",
                                f"write {key}=N with N the number of ranks")
            if key == "slots":
                n = int(value)
            else:
                max_n = int(value)
        if max_n is not None and n > max_n:
            raise src.error((host, "slots"), f"slots={n} is more than max_slots={max_n}",
                            "raise max_slots or lower slots")
        slots[host] = slots.get(host, 0) + n
    hosts = [Host(name=h, ssh=h, slots=n) for h, n in slots.items()]
    return Hostfile(path=label, format="openmpi", hosts=hosts)
