"""A networked sandbox's reach (:class:`~pytest_sandbox.types.Network`), held where its code
cannot change it: packet filter rules in the OUTPUT chain of the sandbox's own network namespace,
loaded from the host before any of its code runs.

Sandbox processes have neither ``CAP_NET_ADMIN`` (which would let them change the rules) nor
``CAP_NET_RAW`` (whose packet sockets write frames past the filter). A connection the rules refuse
fails at once (TCP: reset; others: an ICMP error), as a firewall's REJECT does.

Refused whatever the policy says, unless an ``allow`` entry covers them (see ``Network``):
link-local addresses (the metadata services of AWS, GCP, Azure, OpenStack and ECS answer on
169.254.169.254 and 169.254.170.2 with the machine's credentials), Alibaba Cloud's metadata
address, "this host" (0.0.0.0/8), every address of the host itself (a host process that the
sandbox's traffic leaves through, such as slirp4netns, would reach services a firewall keeps from
the outside), and the networks only the host reaches: those of its interfaces that carry no
default route (a Docker bridge, libvirt, a veth).

IPv4 only: neither the local engine's uplink nor Docker's default bridge gives a sandbox IPv6.
Used by the local engine and the docker backend. Imports only the core.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import ConfigError, EngineUnavailableError, SandboxError
from .types import Network

__all__ = ["ALWAYS_REFUSED", "Filter", "host_addresses", "host_only_networks", "rules"]

Net = ipaddress.IPv4Network

ALWAYS_REFUSED = ("0.0.0.0/8", "169.254.0.0/16", "100.100.100.200/32")
""""This host", link-local (cloud metadata services), and Alibaba Cloud's metadata address."""

_SEARCH = "/usr/sbin:/sbin:/usr/bin:/bin"
_ENV = {"PATH": _SEARCH}


def host_addresses(fib_trie: str | None = None) -> list[Net]:
    """Every IPv4 address of this host's interfaces (the kernel's table of local addresses)."""
    if fib_trie is None:
        try:
            fib_trie = Path("/proc/net/fib_trie").read_text()
        except OSError:
            fib_trie = ""
    found: set[Net] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            last = text[3:].strip()
        elif text.endswith("host LOCAL") and text.startswith("/32") and last:
            found.add(Net(f"{last}/32"))
    return sorted(net for net in found if not net.is_loopback)  # a sandbox's loopback is its own


def host_only_networks(route: str | None = None) -> list[Net]:
    """The IPv4 networks of this host's interfaces that no default route leaves by: what only
    the host reaches (a Docker bridge, libvirt's network, a veth pair)."""
    if route is None:
        try:
            route = Path("/proc/net/route").read_text()
        except OSError:
            route = ""
    rows = [line.split() for line in route.splitlines()[1:] if line.strip()]
    uplinks = {r[0] for r in rows if len(r) >= 8 and int(r[1], 16) == 0 and int(r[7], 16) == 0}
    found: set[Net] = set()
    for r in rows:
        if len(r) < 8 or r[0] in uplinks or r[0] == "lo" or int(r[2], 16) != 0:
            continue
        dest, mask = (socket.inet_ntoa(int(x, 16).to_bytes(4, "little")) for x in (r[1], r[7]))
        if mask != "0.0.0.0":
            found.add(Net(f"{dest}/{mask}", strict=False))
    return sorted(found)


def _resolve(entries: Iterable[str], where: str) -> list[Net]:
    """Entries of a policy as IPv4 networks: host names looked up now, on the host."""
    out: list[Net] = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            try:
                infos = socket.getaddrinfo(entry, None, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                raise ConfigError(
                    f"Network({where}=...): cannot resolve {entry!r} on this host ({exc}); give its address or CIDR"
                ) from None
            out.extend(Net(f"{info[4][0]}/32") for info in infos)
            continue
        if isinstance(net, Net):
            out.append(net)
    return out


def rules(policy: Network, *, dns: Sequence[str], refused: Sequence[Net]) -> str:
    """The ``iptables-restore`` input for ``policy``: the filter table of a sandbox's network
    namespace, with DNS to ``dns`` open and ``refused`` (what this host keeps for itself)
    refused unless ``allow`` covers it. Only checked values reach the text: networks and
    addresses, never a string of the caller's."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines.append("-A OUTPUT -o lo -j ACCEPT")
    for server in dns:
        addr = ipaddress.IPv4Address(server)
        lines += [f"-A OUTPUT -d {addr}/32 -p {proto} --dport 53 -j ACCEPT" for proto in ("udp", "tcp")]

    def reject(net: Net) -> list[str]:
        return [
            f"-A OUTPUT -d {net} -p tcp -j REJECT --reject-with tcp-reset",
            f"-A OUTPUT -d {net} -j REJECT --reject-with icmp-admin-prohibited",
        ]

    for net in _resolve(policy.deny, "deny"):
        lines += reject(net)
    for net in _resolve(policy.allow, "allow"):
        lines.append(f"-A OUTPUT -d {net} -j ACCEPT")
    for net in sorted({*refused, *(Net(x) for x in ALWAYS_REFUSED)}):
        lines += reject(net)
    if policy.allow:
        lines += reject(Net("0.0.0.0/0"))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class Filter:
    """Loads a policy's rules into sandboxes' network namespaces with the host's
    ``iptables-restore``: the legacy flavour first (it takes about 1 ms where the nftables one
    takes 15), the nftables one where the kernel has no legacy tables; the first that works is
    kept. ``lockfile`` is a file of ours for the legacy flavour's lock (``/run/xtables.lock`` is
    the host's, and root's)."""

    def __init__(self, lockfile: str) -> None:
        names = ("iptables-legacy-restore", "iptables-nft-restore", "iptables-restore")
        found = (shutil.which(name, path=_SEARCH) for name in names)
        self._tools = list(dict.fromkeys(p for p in found if p))
        self._env = {**_ENV, "XTABLES_LOCKFILE": lockfile}
        self.restore = self._tools[0] if self._tools else None
        self.reason = "" if self._tools else "iptables is not installed (apt-get install iptables)"

    def refused(self) -> list[Net]:
        """What this host keeps for itself, read now: its addresses and host-only networks."""
        return sorted({*host_addresses(), *host_only_networks()})

    def apply(self, enter: Sequence[str], policy: Network, *, dns: Sequence[str]) -> None:
        """Load ``policy`` into the network namespace that ``enter`` (a command line ending in
        ``--``, such as ``nsenter -t PID -n --``) runs a command in."""
        if self.restore is None:
            raise EngineUnavailableError(
                f"a networked sandbox's reach is held by packet filter rules, and {self.reason}"
            )
        text = rules(policy, dns=dns, refused=self.refused()).encode()
        failures = []
        for tool in [self.restore, *(t for t in self._tools if t != self.restore)]:
            try:
                res = subprocess.run(
                    [*enter, tool], input=text, capture_output=True, env=self._env, timeout=30, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SandboxError(f"could not set the sandbox's network rules: {exc}") from exc
            if res.returncode == 0:
                self.restore = tool
                return
            why = res.stderr.decode(errors="replace").strip()[-300:] or f"exit code {res.returncode}"
            failures.append(f"{os.path.basename(tool)}: {why}")
        raise SandboxError(f"could not set the sandbox's network rules ({'; '.join(failures)})")
