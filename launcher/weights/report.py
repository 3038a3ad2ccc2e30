"""What `pull` did on each host (HostPull, PullReport) and how a host's failure is worded."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher import remote
from launcher.hostfile import Host


@dataclass(kw_only=True)
class HostPull(remote.HostResult):
    dest: str = ""
    method: str = ""  # rsync | stream | in place | none needed | hub
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # partial files continued, not restarted
    bytes: int = 0  # bytes the copy had to add
    wire_bytes: int = 0  # bytes actually sent (rsync's "Total bytes sent", or the stream's payload)
    seconds: float = 0.0


@dataclass(kw_only=True)
class PullReport(remote.Report):
    model: str
    source: str  # local directory staged from, or the repo id
    hosts: list[HostPull] = field(default_factory=list)

    def dest(self, name: str) -> str:
        return self.host(name).dest

    def to_dict(self) -> dict:
        return {"model": self.model, "source": self.source, **super().to_dict()}

    def table(self) -> tuple[list[str], list[list[str]]]:
        head = ["host", "method", "copied", "skipped", "bytes", "sent", "seconds", "status", "destination"]
        rows = [[h.name, h.method or "-", str(len(h.copied)), str(len(h.skipped)), human(h.bytes),
                 human(h.wire_bytes), f"{h.seconds:.1f}", "ok" if h.ok else "FAILED", h.dest]
                for h in self.hosts]
        return head, rows

    def render(self) -> str:
        return "\n".join([*self.table_lines(), *(f"{h.name}: {h.error}" for h in self.failed)])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def stderr_tail(lines: list[str], n: int = 3) -> str:
    """The last n meaningful lines of a process's stderr, on one line."""
    keep = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("Warning: Permanently added")]
    return " | ".join(keep[-n:])


def ssh_failure(host: Host, rc: int | None, err: str, what: str) -> str:
    if rc == 255 and not host.is_local:
        return f"cannot reach {host.ssh} over SSH ({err or 'ssh exit 255'}). Fix: check `exolaunch doctor`."
    return f"{what} failed (exit {rc}): {err or 'no output'}"
