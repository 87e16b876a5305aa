"""Rate-limited network namespaces for the bench scripts: hosts joined through a hub by shaped veth links.

Host ``i`` of a :class:`Star` is the namespace ``<prefix>-r<i>`` with the address ``<subnet>.<i+1>/24`` on
its interface ``<prefix><i>``; a hub namespace (``<prefix>-hub``) bridges the hosts' veth peers. Every veth
pair is shaped with ``tc qdisc ... tbf rate R`` on both ends, so each host has an R full-duplex link, like
one NIC per machine. Processes of one host that talk to each other use the host's own address, which
Linux routes over the namespace's loopback: that traffic is never shaped and never shows in the host
interface's ``tx_bytes``. Only private addresses inside the namespaces are used; the host's network is
untouched. :meth:`Star.teardown` kills what still runs inside and deletes the namespaces.

Scripts that may run at the same time use different prefixes, subnets and ports (``comm_bench.py`` and
``async_bench.py``: the default ``lpb``; ``overlap_bench.py``: ``lpo``).

Example::

    star = Star()
    star.teardown(2)          # leftovers of an interrupted run
    star.setup(2, "100mbit")
    try:
        ...                   # ip netns exec star.namespace(0) python worker.py ...
    finally:
        star.teardown(2)
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Star", "rate_bytes", "tx_bytes"]


def rate_bytes(rate: str) -> int:
    """Bytes per second of a tc rate such as ``100mbit`` or ``1gbit``.

    Raises:
        SystemExit: ``rate`` is not a number followed by kbit, mbit or gbit.
    """
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, scale in units.items():
        if rate.endswith(suffix):
            try:
                return int(float(rate[: -len(suffix)]) * scale / 8)
            except ValueError:
                break
    raise SystemExit(f"--rates: {rate!r} is not like 100mbit or 1gbit")


def tx_bytes(interface: str) -> int:
    """Bytes sent so far by ``interface`` of the calling process's namespace."""
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Star:
    """Hosts (network namespaces) joined through a hub bridge by rate-limited veth links.

    Args:
        prefix: names of the namespaces and interfaces.
        subnet: the first three octets of the hosts' /24.
        port: the rendezvous port (``MASTER_PORT``) the scripts use on host 0.
    """

    prefix: str = "lpb"
    subnet: str = "10.213.0"
    port: int = 29555

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def namespace(self, host: int) -> str:
        return f"{self.prefix}-r{host}"

    def interface(self, host: int) -> str:
        """The host's shaped link, as seen inside its namespace (what ``GLOO_SOCKET_IFNAME`` names)."""
        return f"{self.prefix}{host}"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host + 1}"

    def teardown(self, hosts: int) -> None:
        """Kill whatever still runs in the namespaces, then delete them (a namespace outlives its deletion
        while a process holds it, and so would its shaped links)."""
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in [self.hub, *(self.namespace(h) for h in range(hosts))]:
            if name in existing:
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, ValueError):
                        pass
                subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def setup(self, hosts: int, rate: str) -> None:
        """Create ``hosts`` namespaces, each with an ``rate`` full-duplex link to the hub."""
        # tbf needs a bucket of at least one timer tick of traffic; 10 ms of it keeps TCP smooth.
        shape = ["root", "tbf", "rate", rate, "burst", str(max(32 * 1024, rate_bytes(rate) // 100)), "latency", "50ms"]
        bridge = f"{self.prefix}br"
        _sh("ip", "netns", "add", self.hub)
        _sh("ip", "-n", self.hub, "link", "add", bridge, "type", "bridge")
        _sh("ip", "-n", self.hub, "link", "set", bridge, "up")
        for h in range(hosts):
            ns, dev, peer = self.namespace(h), self.interface(h), f"{self.prefix}h{h}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.hub)
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(h)}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", self.hub, "link", "set", peer, "master", bridge)
            _sh("ip", "-n", self.hub, "link", "set", peer, "up")
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *shape)
            _sh("ip", "netns", "exec", self.hub, "tc", "qdisc", "add", "dev", peer, *shape)
