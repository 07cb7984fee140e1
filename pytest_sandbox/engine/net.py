"""A network for a sandbox that asks for one, of its own: never the host's.

A sandbox with ``network=True`` gets a network namespace of its own, like every other sandbox,
joined to the outside by slirp4netns (user-mode NAT, the uplink rootless podman uses): it can open
connections out and resolve names, and nothing can connect in except through ``expose()``. In the
host's network namespace, sandbox code would reach every service on the host's loopback (a
database, a Docker or Daytona API, a debugger port), the host's abstract Unix sockets, and listen
on the host's ports. slirp4netns runs with ``--disable-host-loopback``, so the gateway address does
not lead to the host's loopback either. slirp4netns connects out as a host process, so what the
host reaches the sandbox would too (a port the host firewalls from the outside, a host-only
network, a cloud metadata service): the sandbox's :class:`~pytest_sandbox.types.Network` policy
is loaded into its namespace first (:mod:`pytest_sandbox._netfilter`), and refuses those.

Commands in such a sandbox have no ``CAP_NET_RAW`` and no ``CAP_NET_ADMIN``: with either, sandbox
code could put a packet for ``127.0.0.1`` on the uplink's interface itself (a raw packet, or a route
of its own), and slirp4netns would deliver it to the host's loopback.

slirp4netns needs ``/dev/net/tun``. Rootless it starts inside the sandbox's user namespace, as
root there (the caller's ids); as root it runs as root (root inside cannot open ``/dev/net/tun``,
which belongs to host root), confined by its own ``--enable-sandbox`` (an empty mount namespace,
no capabilities but binding low ports) and ``--enable-seccomp``, started in a mount namespace whose
mounts are all private (see :meth:`Uplinks.connect`). Where it cannot run (or iptables is
missing), a networked sandbox is refused with what to install: never the host's network.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import shutil
import subprocess
import threading
from collections.abc import Callable

from .._netfilter import Filter
from ..errors import SandboxError
from ..types import Network

__all__ = ["DNS", "MAX_FILES", "RESOLV_CONF", "Uplink", "Uplinks"]

DNS = "10.0.2.3"
RESOLV_CONF = f"nameserver {DNS}\n".encode()
"""The sandbox's ``/etc/resolv.conf``: slirp4netns's DNS address, which forwards to the host's
resolver (a resolver on the host's loopback, such as systemd-resolved's, would be unreachable)."""

_READY_TIMEOUT = 10.0
MAX_FILES = 4096
"""slirp4netns's open files: a socket per TCP connection and per UDP flow of its sandbox."""


class Uplinks:
    """Whether sandboxes of this host can have a network of their own, and how they get one."""

    def __init__(self, *, root: bool, nsenter: str, lockfile: str) -> None:
        self._root = root
        self._nsenter = nsenter
        # util-linux, beside nsenter
        self._unshare, self.setpriv = (_util_linux(nsenter, name) for name in ("unshare", "setpriv"))
        self.slirp = shutil.which("slirp4netns")
        self.filter = Filter(lockfile)
        self.reason = ""
        if self.slirp is None:
            self.reason = "slirp4netns is not installed (apt-get install slirp4netns)"
            return
        if self.filter.reason:
            self.reason = self.filter.reason
            return
        if not self.setpriv or (root and not self._unshare):
            self.reason = "util-linux's unshare and setpriv are needed (apt-get install util-linux)"
            return
        # Opened, not stat'ed: in a container the device may be missing, or denied by its cgroup.
        try:
            os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno == errno.EACCES and not root:
                fix = (
                    "chmod 0666 /dev/net/tun, as the kernel's tuntap documentation has it: opening it "
                    "grants nothing without CAP_NET_ADMIN"
                )
            else:
                fix = "in a container, give it the device: docker run --device /dev/net/tun"
            self.reason = f"/dev/net/tun cannot be opened ({exc.strerror}; {fix})"

    @property
    def usable(self) -> bool:
        """True when a networked sandbox gets a network of its own here."""
        return not self.reason

    def connect(self, pid: int, policy: Network, alive: Callable[[], bool]) -> Uplink:
        """An uplink for the network namespace of the sandbox whose init is ``pid`` (``alive``
        says it still is, once the namespace is open), its ``policy`` loaded first."""
        assert self.slirp is not None
        self.filter.apply(self.enter_netns(pid), policy, dns=[DNS])
        if self._root:
            # --enable-sandbox makes "/" private but not what is mounted below it, then detaches
            # the old root: in the host's mount namespace that unmount travels through shared
            # mounts to the host (every running Docker container lost its root filesystem).
            # unshare gives it a namespace of its own whose mounts are all private first.
            enter = [self._unshare, "--mount", "--propagation", "private", "--"]
        else:  # its namespace then is the sandbox user namespace's: shared mounts come as slaves
            enter = [self._nsenter, "-t", str(pid), "-U", "--preserve-credentials", "--"]
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not alive():
                raise SandboxError("the sandbox died while it was being started; create it again")
            return Uplink([*enter, self.slirp], netns)
        finally:
            os.close(netns)

    def enter_netns(self, pid: int) -> list[str]:
        """The command line prefix that runs a host program in the network namespace of the
        sandbox whose init is ``pid``, with the right to change it (rootless: as root of the
        sandbox's user namespace, which owns it). Nothing else of the sandbox is entered."""
        if self._root:
            return [self._nsenter, "-t", str(pid), "-n", "--"]
        return [self._nsenter, "-t", str(pid), "-U", "--preserve-credentials", "-n", "--"]


def _util_linux(nsenter: str, name: str) -> str:
    """util-linux's ``name``, beside nsenter (by its real path) or on PATH; "" if neither."""
    beside = os.path.join(os.path.dirname(nsenter), name)
    return beside if os.path.exists(beside) else shutil.which(name) or ""


class Uplink:
    """One sandbox's slirp4netns. It exits when :meth:`close` closes its exit pipe, or when the
    runner dies (the kernel closes the pipe then): nothing is left behind after ``kill -9``.

    ``netns`` is an open file of the sandbox's network namespace (a pid could be reused by then);
    slirp4netns gets it at a file descriptor, and at most :data:`MAX_FILES` files of its own (a
    socket per connection and per UDP flow: a sandbox could otherwise hold the host's ports)."""

    def __init__(self, launch: list[str], netns: int) -> None:
        self._lock = threading.Lock()
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, self._exit_w = os.pipe2(os.O_CLOEXEC)
        # A file, not a pipe: a pipe nobody reads would stop slirp4netns once full.
        self._err = os.memfd_create("slirp4netns-stderr", os.MFD_CLOEXEC)
        argv = [
            *launch,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            f"--ready-fd={ready_w}",
            f"--exit-fd={exit_r}",
            "--netns-type=path",
            f"/proc/self/fd/{netns}",
            "tap0",
        ]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._err,
                pass_fds=(ready_w, exit_r, netns),
                start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        except OSError as exc:
            for fd in (ready_r, ready_w, exit_r, self._exit_w, self._err):
                os.close(fd)
            raise SandboxError(f"slirp4netns did not start ({exc}); create the sandbox without network") from exc
        os.close(ready_w)
        os.close(exit_r)
        try:
            with contextlib.suppress(OSError):
                resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (MAX_FILES, MAX_FILES))
            poller = select.poll()
            poller.register(ready_r, select.POLLIN)
            ready = os.read(ready_r, 1) if poller.poll(int(_READY_TIMEOUT * 1000)) else b""
            if ready != b"1":
                self.close()
                why = self._stderr() or "no answer"
                raise SandboxError(f"the sandbox's network did not come up (slirp4netns: {why})")
        except BaseException:  # an interrupt too: nothing of it may outlive this
            self.wait()
            raise
        finally:
            os.close(ready_r)

    def _stderr(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        lines = os.pread(self._err, 65536, 0).decode(errors="replace").splitlines()
        # slirp4netns warns that its seccomp support is experimental; that is not the error
        return "; ".join(line for line in lines if "experimental" not in line)[-500:]

    def close(self) -> None:
        """Stop slirp4netns (it exits on its own; :meth:`wait` reaps it). Idempotent, and safe
        from two threads (a number closed twice could be another sandbox's file by then)."""
        with self._lock:
            fd, self._exit_w = self._exit_w, -1
        if fd >= 0:
            os.close(fd)

    def wait(self) -> None:
        """Reap slirp4netns, killing it if it did not exit within a few seconds of :meth:`close`."""
        self.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with self._lock:
            fd, self._err = self._err, -1
        if fd >= 0:
            os.close(fd)
