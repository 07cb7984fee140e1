"""Adversarial tests of the local engine: each one is an attack a test in a sandbox (or a sandbox's
files) could make on the host, the caller or the cache, and checks that it fails.

Like the other local tests these run as root and, in CI, again as an unprivileged user. Where the
two modes promise different things the test says so (``ROOT``). Tests that damage a cache, or
that need one in a particular place, open their own LocalBackend on a private cache directory.
Calls that could eat the host's memory or disk if the engine regressed (reading /dev/zero, 3 GB
of output) run in a child process with resource limits, so a failure is cheap and bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import queue
import re
import secrets
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import ConfigError, Image, Limits, SandboxError, SandboxFileError, Snapshot
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.store import rmtree
from tests.conftest import run_py, wait_for

ROOT = os.geteuid() == 0
X86_64 = platform.machine() in ("x86_64", "AMD64")
MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------
def host_pids_with_cmdline(prefix: list[bytes]) -> list[int]:
    """Host pids whose argv starts with ``prefix``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[: len(prefix)] == prefix:
            found.append(int(entry))
    return found


def run_as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the unprivileged host user nobody (needs root)."""
    return subprocess.run(argv, user=65534, group=65534, extra_groups=[], capture_output=True, text=True, timeout=30)


def regular_files(top: Path) -> Iterator[Path]:
    """Every regular file below ``top`` (symlinks are not followed)."""
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            p = Path(dirpath) / name
            if stat.S_ISREG(p.lstat().st_mode):
                yield p


def tree_size(top: Path) -> int:
    """Bytes in ``top`` if it is a regular file, else in the regular files below it (no symlink followed)."""
    if not os.path.lexists(top):
        return 0
    st = top.lstat()
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return sum(p.lstat().st_size for p in regular_files(top)) if stat.S_ISDIR(st.st_mode) else 0


def bounded_fs_call(cache_dir: Path, snap: Snapshot, setup: str, call: str, timeout: float = 25) -> str:
    """Run ``setup`` in a fresh sandbox of ``snap``, then the statement ``call`` (using ``sb``), in a
    child process whose address space and file sizes are capped: a read of an endless file ends in
    MemoryError, an endless download in EFBIG, a hang in the timeout, never in a host that runs
    out of memory or disk. Returns how the call ended: "returned", "SandboxFileError ...",
    another exception's name and message, or "hung"."""
    code = f"""
        import resource, signal, time
        resource.setrlimit(resource.RLIMIT_AS, ({2 << 30}, {2 << 30}))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({64 * MiB}, {64 * MiB}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from pytest_sandbox import SandboxFileError
        from pytest_sandbox.backends.local import LocalBackend
        with LocalBackend() as b, b.create(b.get_snapshot({snap.key!r})) as sb:
            sb.exec({setup!r}).check()
            start = time.monotonic()
            try:
                {call}
                outcome = "returned"
            except SandboxFileError as exc:
                outcome = f"SandboxFileError {{exc}}"
            except BaseException as exc:
                outcome = f"{{type(exc).__name__}} {{exc}}"
            print(f"OUTCOME {{time.monotonic() - start:.1f}}s", outcome, flush=True)
        """
    try:
        out = run_py(code, cache_dir, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"hung (still running after {timeout}s)"
    lines = [line for line in out.stdout.splitlines() if line.startswith("OUTCOME ")]
    assert lines, f"the child failed before the call:\n{out.stdout}\n{out.stderr}"
    return lines[-1].split(" ", 2)[2]


# -- 1. host kernel settings -------------------------------------------------------------------
def test_host_sysctls_cannot_be_changed_from_inside(backend: LocalBackend, base: Snapshot) -> None:
    # /proc/sys writes act on the host kernel: as root with uid 0 mapped to host root, a writable
    # /proc/sys would let any test retune the machine (or set core_pattern to run a program as root).
    lease = Path("/proc/sys/fs/lease-break-time")
    core = Path("/proc/sys/kernel/core_pattern")
    lease_before, core_before = lease.read_text(), core.read_text()
    try:
        with backend.create(base) as sb:
            r = sb.exec("v=$(cat /proc/sys/fs/lease-break-time) && echo $((v+1)) > /proc/sys/fs/lease-break-time")
            assert r.exit_code != 0, "a sandbox changed the host's fs.lease-break-time"
            assert "Read-only file system" in r.stderr, r.stderr
            assert lease.read_text() == lease_before
            r = sb.exec("echo core.pytest-sandbox-probe > /proc/sys/kernel/core_pattern")
            assert r.exit_code != 0, "a sandbox changed the host's kernel.core_pattern"
            assert "Read-only file system" in r.stderr, r.stderr
            assert core.read_text() == core_before
            if os.path.exists("/proc/sysrq-trigger"):
                # Opening it for writing and writing nothing: no sysrq action even if it opens.
                assert sb.exec(": > /proc/sysrq-trigger").exit_code != 0, "/proc/sysrq-trigger is writable"
    finally:
        for path, before in ((lease, lease_before), (core, core_before)):
            if path.read_text() != before:
                with contextlib.suppress(OSError):
                    path.write_text(before)


def test_kernel_secrets_in_proc_read_as_empty(backend: LocalBackend, base: Snapshot) -> None:
    # /proc/keys lists the host's keyrings, /proc/timer_list host processes and kernel addresses.
    present = [p for p in ("/proc/keys", "/proc/timer_list") if os.path.exists(p)]
    if not present:
        pytest.skip("this kernel has neither /proc/keys nor /proc/timer_list")
    with backend.create(base) as sb:
        for path in present:
            r = sb.exec(f"cat {path} 2>/dev/null | wc -c")
            assert r.stdout.strip() == "0", f"{path} shows {r.stdout.strip()} bytes inside the sandbox"


def test_sys_is_there_but_read_only(backend: LocalBackend, base: Snapshot) -> None:
    # Tools need /sys (lscpu, udev-less hardware probes), but its attributes tune the host kernel.
    with backend.create(base) as sb:
        listing = sb.exec("ls -A /sys").stdout.split()
        assert "class" in listing or "devices" in listing, f"/sys inside holds only {listing}"
        r = sb.exec("touch /sys/pytest-sandbox-probe")
        assert r.exit_code != 0, "a file could be created in /sys"
        assert "Read-only file system" in r.stderr, r.stderr
        attrs = ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/ksm/run", "/sys/power/state")
        attr = next((a for a in attrs if os.path.isfile(a)), None)
        if attr is not None:
            # Opened for writing, nothing written: harmless even if the open succeeded.
            r = sb.exec(f": > {attr}")
            assert r.exit_code != 0, f"{attr} is writable inside the sandbox"
            assert "Read-only file system" in r.stderr, r.stderr


# -- 2. uid mapping ------------------------------------------------------------------------
def test_root_inside_is_not_root_on_the_host(backend: LocalBackend, base: Snapshot) -> None:
    # As root, a sandbox whose uid 0 is the host's uid 0 owns every host file it can reach
    # (through any escape, a kernel bug, or files it leaves in the cache): map it elsewhere.
    token = secrets.token_hex(8)
    with backend.create(base) as sb:
        assert sb.exec("id -u").check().stdout == "0\n"
        sb.exec(f"sh -c 'sleep 1000; : {token}' >/dev/null 2>&1 &").check()
        argv = [b"sh", b"-c", f"sleep 1000; : {token}".encode()]
        assert wait_for(lambda: bool(host_pids_with_cmdline(argv))), "the sandbox's process is not visible on the host"
        # Between its fork and the exec of sleep, the shell's child still shows the same command line.
        seen = 0
        for pid in host_pids_with_cmdline(argv):
            with contextlib.suppress(FileNotFoundError):
                owner = os.stat(f"/proc/{pid}").st_uid
                # Read from the host, the map is in host ids, through every namespace in between
                # (rootless a sandbox's namespace is inside the backend's).
                inside, outside = Path(f"/proc/{pid}/uid_map").read_text().split()[:2]
                seen += 1
                assert inside == "0"
                if ROOT:
                    assert owner != 0, "a process running as root inside runs as root on the host"
                    assert outside != "0", "uid 0 inside is uid 0 on the host"
                else:
                    assert owner == os.geteuid() and outside == str(os.geteuid())
        assert seen


WATCH_ENTRIES = r"""
import os, sys, time
me, seen, end = os.getpid(), set(), time.time() + float(sys.argv[1])
while time.time() < end and not os.path.exists("/tmp/stop"):
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != me:
            try:
                uid = open(f"/proc/{p}/status").read().split("Uid:")[1].split()[0]
            except (OSError, IndexError):
                continue
            if uid != "0":  # a host id not mapped inside (host root shows as the overflow id)
                seen.add(uid)
open("/tmp/seen", "w").write(" ".join(sorted(seen)))
"""


def test_a_command_entering_the_sandbox_never_shows_a_host_identity_inside(
    backend: LocalBackend, host: Snapshot
) -> None:
    # As root, nsenter is started as host root. Were it to fork into the sandbox's pid namespace
    # before dropping to root *inside*, sandbox code could see it there, still host uid 0, and
    # ptrace it (its user namespace is the sandbox's already): host root, from inside. Every
    # process that ever appears inside must already be root inside (uid 0 there).
    with backend.create(host) as sb:
        sb.fs.write("/tmp/watch.py", WATCH_ENTRIES)
        sb.exec("python3 /tmp/watch.py 60 >/dev/null 2>&1 &").check()
        for _ in range(300):
            sb.exec(["/bin/true"]).check()
        sb.exec("touch /tmp/stop").check()
        wait_for(lambda: sb.fs.exists("/tmp/seen"), timeout=10)
        assert sb.fs.read_text("/tmp/seen") == "", "a process inside ran as an unmapped (host) user"
        if ROOT:  # and by construction: the user namespace is entered (and root taken) in a stage of its own
            argv = sb.nsenter_argv(["true"])[0]
            first = argv.index(backend.host.nsenter)
            assert argv[first : argv.index("--", first)] == [backend.host.nsenter, "-t", str(sb.pid), "-U"]


def test_the_sandboxs_init_and_holder_are_under_its_limits(backend: LocalBackend, host: Snapshot) -> None:
    # bwrap starts pid 1 (its init) and pid 2 (the holder) from the runner. Sandbox code may
    # ptrace them, as its own processes: were they outside the sandbox's cgroup (or, rootless,
    # its rlimits), a child forced out of either would fork and allocate past every limit.
    limits = Limits(pids=64, memory="512M")
    with backend.create(host, limits=limits) as sb:
        view = 'for p in 1 2 self; do echo "$(cat /proc/$p/cgroup | sort | tr "\\n" " ")'
        view += '$(grep -E "^Max (processes|address space)" /proc/$p/limits | tr -s " " | tr "\\n" " ")"; done'
        lines = sb.exec(view).check().stdout.splitlines()
        assert len(lines) == 3 and lines[0] == lines[2] and lines[1] == lines[2], lines
        enforced = {name for name, status in sb.limits.items() if status.enforced}
        assert {"pids", "memory"} <= enforced, sb.limits


# -- 3. capabilities and syscalls ------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        "mknod /tmp/sda b 8 0",  # a block device node: raw access to a host disk
        "mount -t tmpfs none /mnt",  # mounting: the door to overlay/fuse/... kernel attack surface
        "unshare -U true",  # a nested user namespace gets a fresh full set of capabilities
        "unshare -m true",  # a new mount namespace: mounts out of the engine's control
    ],
)
def test_privileged_operations_are_refused(backend: LocalBackend, base: Snapshot, command: str) -> None:
    with backend.create(base) as sb:
        r = sb.exec(command)
        assert r.exit_code != 0, f"`{command}` succeeded inside the sandbox"
        assert sb.exec("test -b /tmp/sda").exit_code != 0


@pytest.mark.skipif(not X86_64, reason="the syscall numbers in this test are x86_64's")
def test_dangerous_syscalls_are_refused(backend: LocalBackend, debian: Snapshot) -> None:
    # Syscalls with a long record of kernel exploits, or that act on the whole host: a seccomp
    # filter refuses them whatever their arguments (here all NULL/0: harmless even if let through).
    calls = {"kexec_load": 246, "bpf": 321, "keyctl": 250, "perf_event_open": 298, "userfaultfd": 323}
    calls["init_module"] = 175
    code = f"""
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
out = {{}}
for name, nr in {calls!r}.items():
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(0)] * 5)
    out[name] = [ret, ctypes.get_errno()]
print(json.dumps(out))
"""
    with backend.create(debian) as sb:
        results = json.loads(sb.exec(["python3", "-c", code]).check().stdout)
    allowed = {
        name: (ret, errno.errorcode.get(err, str(err)))
        for name, (ret, err) in results.items()
        if ret != -1 or err not in (errno.EPERM, errno.ENOSYS)
    }
    assert not allowed, f"syscalls not refused with EPERM/ENOSYS (return value, errno): {allowed}"


def test_build_steps_and_the_cli_shell_are_filtered_too(backend: LocalBackend, host: Snapshot, cache_dir: Path) -> None:
    # Commands enter a sandbox from outside (nsenter), not as children of its filtered init: the
    # filter must reach them by another way, for build steps and for `pytest-sandbox shell` alike.
    probe = "unshare -U true 2>/dev/null && echo ESCAPED || echo refused"
    snap = backend.build(Image.host().run(f"{probe} > /probe"))
    with backend.create(snap) as sb:
        assert sb.fs.read_text("/probe") == "refused\n"
    shell = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_sandbox.cli",
            "--cache-dir",
            str(cache_dir),
            "shell",
            host.key,
            "sh",
            "-c",
            probe,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.stdout == "refused\n", shell


def test_no_descriptor_of_the_runner_leaks_inside(backend: LocalBackend, base: Snapshot) -> None:
    # An inherited fd of a host directory (the store, a layer), the seccomp program, the user
    # namespace, a pipe to the runner or the command helper's socket (a command holding it could
    # have the helper start anything, outside the sandbox) would be a way out: every fd inside is
    # the sandbox's own.
    with backend.create(base) as sb:
        sb.exec("sleep 60 >/dev/null 2>&1 </dev/null &").check()
        listing = sb.exec('for f in /proc/[0-9]*/fd/*; do echo "$f $(readlink $f)"; done').check().stdout
    leaks = [
        line
        for line in listing.splitlines()
        if any(
            word in line
            for word in ("seccomp", "user:[", "mnt:[", "pid:[", "socket:[", str(backend.store.root), "/tmp/l/")
        )
    ]
    assert not leaks, leaks
    targets = {line.split(" ", 1)[1] for line in listing.splitlines() if " " in line}
    assert not [t for t in targets if t.startswith("/") and not t.startswith(("/dev/", "/proc/", "/memfd:"))], targets


def test_the_sandbox_environment_never_reaches_a_host_program(
    backend: LocalBackend, base: Snapshot, tmp_path: Path
) -> None:
    # A sandbox's environment comes from recipes, callers and pulled or imported records (which
    # a registry controls). Were it the environment of the host's prlimit or nsenter, their loader
    # would act on it on the host: LD_PRELOAD of a library a pulled layer put in the store runs
    # host code. LD_DEBUG_OUTPUT shows the same without a compiler: the loader of any program
    # that sees it writes a log file there, and tmp_path exists on the host only.
    log = tmp_path / "ld"
    env = {"LD_DEBUG": "files", "LD_DEBUG_OUTPUT": str(log)}
    with backend.create(base, env=env) as sb:
        seen = sb.exec(["/bin/sh", "-c", 'echo "$LD_DEBUG $LD_DEBUG_OUTPUT $MORE"'], env={"MORE": "x y"}).check()
        # The command itself still gets all of it (its own loader logs to stdout: no such file inside).
        assert f"files {log} x y" in seen.stdout.splitlines()
        sb.exec("true", env={"LD_PRELOAD": str(log)}).check()
    assert list(tmp_path.iterdir()) == [], "a host program ran with the sandbox's environment"


def test_the_sandbox_environment_is_not_shown_to_other_host_users(backend: LocalBackend, host: Snapshot) -> None:
    # Every host user can read a process's arguments (ps): an environment (a token, say) must
    # not travel in the command lines that enter the sandbox. It travels in an inherited file,
    # which the command does not keep either.
    secret = secrets.token_hex(8)
    with backend.create(host, env={"TOKEN": secret}) as sb:
        running = threading.Thread(target=sb.exec, args=("sleep 2",), kwargs={"env": {"MORE": secret[::-1]}})
        running.start()
        seen = []
        end = time.monotonic() + 1.5
        while time.monotonic() < end and not seen:
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                with contextlib.suppress(OSError):
                    args = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if secret.encode() in args or secret[::-1].encode() in args:
                        seen.append(args.replace(b"\0", b" ").decode(errors="replace"))
        running.join()
        assert not seen, seen
        fds = sb.exec("echo $TOKEN; ls /proc/self/fd").check().stdout.split()
        assert fds[0] == secret and sorted(fds[1:]) == ["0", "1", "2", "3"]  # 3: ls reading the directory


def test_environment_values_reach_the_command_exactly_even_where_sh_is_bash(
    backend: LocalBackend, debian: Snapshot
) -> None:
    # The environment is exported by the sandbox's /bin/sh: quotes, newlines and $ in values
    # must arrive as they are, bytes that are not UTF-8 too, and where /bin/sh is bash (Fedora,
    # UBI), a name bash keeps read-only (UID) must not stop every command.
    with backend.create(debian) as sb:
        sb.exec("ln -sf bash /bin/sh").check()
        env = {"UID": "1000", "SHELLOPTS": "x", "Q": "a'b\"c $d `e`\nf", "B": os.fsdecode(b"\xff\xfe")}
        r = sb.exec(["python3", "-c", "import os; print(ascii(os.environb[b'Q'] + os.environb[b'B']))"], env=env)
        assert r.exit_code == 0, r
        assert r.stdout == ascii(b"a'b\"c $d `e`\nf\xff\xfe") + "\n"
    with pytest.raises(ConfigError, match="lone surrogate"):
        Image.host().env(X="\ud800")


@pytest.mark.parametrize("name", ["a.b", "1ST", "A B", "A-B", ""])
def test_environment_names_a_shell_cannot_set_are_refused(backend: LocalBackend, host: Snapshot, name: str) -> None:
    with pytest.raises(ConfigError, match=r"environment variable name .* is not valid"):
        Image.host().env(**{name: "1"})
    with pytest.raises(ConfigError, match=r"environment variable name .* is not valid"):
        backend.create(host, env={name: "1"})
    with backend.create(host) as sb, pytest.raises(ConfigError, match="is not valid"):
        sb.exec("true", env={name: "1"})


def test_host_processes_are_invisible(backend: LocalBackend, base: Snapshot) -> None:
    # Whatever a sandbox can see it can signal or ptrace: the runner's own pid must not exist inside.
    me = os.getpid()
    with backend.create(base) as sb:
        pids = sorted(int(p) for p in sb.exec("ls /proc").check().stdout.split() if p.isdigit())
        assert pids and len(pids) < 20 and max(pids) < 1000, f"host processes visible inside: {pids}"
        if me not in pids:
            assert sb.exec(f"kill -0 {me}").exit_code != 0, "the runner's pid can be signalled from inside"
            assert not sb.fs.exists(f"/proc/{me}")


@pytest.mark.skipif(not ROOT, reason="rootless sandboxes map only the caller's uid: there is no other user")
def test_switching_to_another_user_inside_works_as_root(backend: LocalBackend, base: Snapshot) -> None:
    # The confinement must not break what package managers need: apt drops to _apt, postgres
    # refuses to run as root, dpkg chowns files to system users.
    with backend.create(base) as sb:
        r = sb.exec("setpriv --reuid=65534 --regid=65534 --clear-groups id -u")
        assert r.stdout == "65534\n", r.output
        r = sb.exec("su nobody -s /bin/sh -c 'id -u'")
        assert r.stdout == "65534\n", r.output
        r = sb.exec("touch /tmp/owned && chown 65534:65534 /tmp/owned && stat -c %u:%g /tmp/owned")
        assert r.stdout == "65534:65534\n", r.output


# -- 4. snapshot() racing the sandbox ---------------------------------------------------------
def test_snapshot_of_a_busy_sandbox_succeeds(backend: LocalBackend, host: Snapshot) -> None:
    # A test snapshots while a server it started keeps writing: files and directories vanish
    # under the copy, which must not fail.
    writer = (
        "echo $$ > /tmp/writer.pid; while :; do for i in 1 2 3 4 5 6 7 8; do echo x > /tmp/f$i; "
        "mkdir -p /tmp/d$i/e; echo y > /tmp/d$i/e/g; rm -f /tmp/f$i; rm -rf /tmp/d$i; done; done"
    )
    made: list[Snapshot] = []
    try:
        with backend.create(host) as sb:
            sb.exec(["sh", "-c", 'sh -c "$1" >/dev/null 2>&1 &', "sh", writer]).check()
            assert wait_for(lambda: sb.fs.exists("/tmp/writer.pid"))
            deadline = time.monotonic() + 120
            for _ in range(40):
                assert time.monotonic() < deadline, f"only {len(made)} snapshots in 120 s"
                made.append(sb.snapshot())
            assert sb.exec("kill -0 $(cat /tmp/writer.pid)").exit_code == 0, "the writer stopped: nothing was raced"
    finally:
        for snap in made:
            backend.remove_snapshot(snap)


SWAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/work/d", exist_ok=True)
with open("/work/d/file", "w") as f:
    f.write("harmless\\n")
os.symlink(sys.argv[1], "/work/l")
if libc.renameat2(-100, b"/work/d", -100, b"/work/l", 2) != 0:
    with open("/tmp/swap-error", "w") as f:
        f.write(os.strerror(ctypes.get_errno()))
    sys.exit(1)
open("/tmp/swapping", "w").close()
end = time.monotonic() + 90
while time.monotonic() < end:
    libc.renameat2(-100, b"/work/d", -100, b"/work/l", 2)
"""


def test_snapshot_never_copies_through_a_symlink_swapped_in(
    backend: LocalBackend, host: Snapshot, tmp_path: Path
) -> None:
    # The sandbox swaps a directory and a symlink to a host directory with RENAME_EXCHANGE while
    # the host copies its writable layer: a copy that looks at /work/d and then descends into it
    # by path follows the link and copies the host's files into the snapshot.
    token = secrets.token_hex(16)
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{token}\n")
    secret.chmod(0o600)
    made: list[Snapshot] = []
    store = backend.store
    try:
        with backend.create(host) as sb:
            sb.exec(["sh", "-c", 'python3 -c "$1" "$2" >/dev/null 2>&1 &', "sh", SWAPPER, str(tmp_path)]).check()
            assert wait_for(lambda: sb.fs.exists("/tmp/swapping") or sb.fs.exists("/tmp/swap-error"))
            assert not sb.fs.exists("/tmp/swap-error"), sb.fs.read_text("/tmp/swap-error")
            deadline = time.monotonic() + 30
            while len(made) < 60 and time.monotonic() < deadline:
                snap = sb.snapshot()
                made.append(snap)
                top = store.layer_path(snap.layers[-1])
                leaked = [str(p.relative_to(top)) for p in regular_files(top) if token.encode() in p.read_bytes()]
                assert not leaked, f"snapshot {len(made)} copied the host's secret into {leaked}"
                with backend.create(snap) as fork:
                    r = fork.exec(f"grep -r -l {token} /work")
                    assert r.exit_code == 1, f"snapshot {len(made)} holds the host's secret: {r.output}"
            assert len(made) >= 10, f"only {len(made)} snapshots in 30 s"
    finally:
        for snap in made:
            backend.remove_snapshot(snap)


def test_fs_calls_never_follow_a_symlink_swapped_in(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # The same swap, raced against fs from the host: each call resolves its path inside the
    # sandbox in one step, so it sees the directory or the link, and the link leads nowhere.
    token = secrets.token_hex(16)
    (tmp_path / "secret.txt").write_text(f"{token}\n")
    dest = tmp_path / "out"
    with backend.create(host) as sb:
        sb.exec(["sh", "-c", 'python3 -c "$1" "$2" >/dev/null 2>&1 &', "sh", SWAPPER, str(tmp_path)]).check()
        assert wait_for(lambda: sb.fs.exists("/tmp/swapping") or sb.fs.exists("/tmp/swap-error"))
        assert not sb.fs.exists("/tmp/swap-error"), sb.fs.read_text("/tmp/swap-error")
        deadline, i = time.monotonic() + 20, 0  # well inside the swapper's 90 s, even on a loaded machine
        while i < 150 and time.monotonic() < deadline:
            i += 1
            for call in (
                lambda: sb.fs.read("/work/l/secret.txt"),
                lambda: sb.fs.read("/work/d/secret.txt"),
                lambda i=i: sb.fs.write(f"/work/l/planted-{i}", "x"),
                lambda i=i: sb.fs.write(f"/work/d/planted-{i}", "x"),
                lambda: sb.fs.download("/work", dest),
            ):
                with contextlib.suppress(SandboxFileError):
                    data = call()
                    assert not (isinstance(data, bytes) and token.encode() in data), "fs read a host file"
        assert i >= 10, f"only {i} rounds in 20 s"
        assert not list(tmp_path.glob("planted-*")), "fs wrote into the host directory"
        assert not [p for p in regular_files(dest) if token.encode() in p.read_bytes()], "download copied the host file"
        # Still swapping: one of the two is the link (looked at a few times, since each look
        # at the pair can fall between two swaps and see neither).
        still = "for i in $(seq 50); do if [ -L /work/l ] || [ -L /work/d ]; then exit 0; fi; done; exit 1"
        assert sb.exec(still).exit_code == 0, "the swap stopped: nothing was raced"


# -- 5. fs: special files, size limits, host symlinks, setuid --------------------------------
SPECIAL_FILES = {
    # name: (setup inside the sandbox, the path fs.read is given)
    "symlink-to-dev-zero": ("ln -s /dev/zero /tmp/target", "/tmp/target"),
    "dev-zero": ("true", "/dev/zero"),
    "fifo": ("mkfifo /tmp/target", "/tmp/target"),
    "unix-socket": ("python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('/tmp/target')\"", "/tmp/target"),
}


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_fs_read_of_a_special_file_fails_fast(host: Snapshot, cache_dir: Path, kind: str) -> None:
    # A sandbox plants an endless file (or one that blocks on open) where the test reads a result
    # file: the read must fail with SandboxFileError, not hang the run or eat the host's memory.
    setup, path = SPECIAL_FILES[kind]
    outcome = bounded_fs_call(cache_dir, host, setup, f"sb.fs.read({path!r})")
    assert outcome.startswith("SandboxFileError"), f"fs.read of a {kind}: {outcome}"


def test_fs_download_of_special_files_is_bounded(host: Snapshot, cache_dir: Path, tmp_path: Path) -> None:
    # Same attack on download: /dev/zero behind a symlink would fill the host's disk.
    setup = (
        "ln -s /dev/zero /tmp/z && mkdir /tmp/dir && mkfifo /tmp/dir/fifo && ln -s /dev/zero /tmp/dir/zero"
        " && echo ok > /tmp/dir/plain"
    )
    single = tmp_path / "z"
    outcome = bounded_fs_call(cache_dir, host, setup, f"sb.fs.download('/tmp/z', {str(single)!r})")
    assert outcome.startswith("SandboxFileError"), f"download of a symlink to /dev/zero: {outcome}"
    assert tree_size(single) < MiB
    tree = tmp_path / "dir"
    outcome = bounded_fs_call(cache_dir, host, setup, f"sb.fs.download('/tmp/dir', {str(tree)!r})")
    assert outcome == "returned" or outcome.startswith("SandboxFileError"), f"download of a tree: {outcome}"
    assert tree_size(tree) < MiB, f"the download wrote {tree_size(tree)} bytes"
    if outcome == "returned":
        assert (tree / "plain").read_text() == "ok\n"
        zero = tree / "zero"
        assert not os.path.lexists(zero) or zero.is_symlink(), "a link to /dev/zero became a host file"


def test_fs_read_and_download_honour_max_size(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # A test reading a log the code under test writes must be able to bound what it loads.
    with backend.create(host) as sb:
        sb.exec(f"head -c {3 * MiB} /dev/urandom > /tmp/big").check()
        with pytest.raises(SandboxFileError) as info:
            sb.fs.read("/tmp/big", max_size=MiB)
        assert re.search(r"max_size|limit|1048576|1(\.0)? ?MiB", str(info.value), re.IGNORECASE), str(info.value)
        data = sb.fs.read("/tmp/big", max_size=4 * MiB)
        assert len(data) == 3 * MiB
        dest = tmp_path / "big"
        with pytest.raises(SandboxFileError):
            sb.fs.download("/tmp/big", dest, max_size=MiB)
        assert tree_size(dest) <= MiB, f"download left {tree_size(dest)} bytes past its limit"


def test_download_never_writes_through_a_host_symlink(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # A first download plants a symlink to a host directory in the destination; the sandbox then
    # turns the link into a directory, and a second download into the same destination must not
    # write into the directory the host symlink points at.
    victim = tmp_path / "victim"
    victim.mkdir()
    victim_file = tmp_path / "victim.txt"
    victim_file.write_text("original\n")
    dest = tmp_path / "dest"
    with backend.create(host) as sb:
        sb.exec(f"mkdir /out && ln -s {victim} /out/link && ln -s {victim_file} /out/link2").check()
        sb.fs.download("/out", dest)
        for name, target in (("link", victim), ("link2", victim_file)):
            planted = dest / name
            assert not os.path.lexists(planted) or planted.is_symlink(), f"{name} was not kept as a symlink"
            if not os.path.lexists(planted):  # the engine skips links: plant one as an earlier run could have
                planted.symlink_to(target)
        sb.exec("rm /out/link /out/link2 && mkdir /out/link && echo x > /out/link/pwned && echo x > /out/link2").check()
        try:
            sb.fs.download("/out", dest)
            refused = False
        except SandboxFileError:
            refused = True
    assert os.listdir(victim) == [], "the download wrote through a host symlink into the victim directory"
    assert victim_file.read_text() == "original\n", "the download wrote through a host symlink into a host file"
    if not refused:
        assert (dest / "link").is_dir() and not (dest / "link").is_symlink()
        assert (dest / "link" / "pwned").read_text() == "x\n"
        assert not (dest / "link2").is_symlink() and (dest / "link2").read_text() == "x\n"


def test_fs_never_reads_or_writes_kernel_files_for_the_sandbox(backend: LocalBackend, base: Snapshot) -> None:
    # The runner may be host root: through a symlink the sandbox made, a read of /proc/kallsyms
    # gave the real kernel addresses (the sandbox itself sees zeros), /proc/kmsg consumed the
    # host's log, and a write chmod-ed a /proc file the sandbox may not touch.
    with backend.create(base) as sb:
        sb.exec(
            "ln -s /proc/kallsyms /tmp/syms; ln -s /proc/kmsg /tmp/kmsg; ln -s /proc/slabinfo /tmp/slab;"
            " ln -s /proc /tmp/procdir; ln -s /sys/kernel /tmp/sysdir"
        ).check()
        mode_before = sb.exec("stat -L -c %a /tmp/slab").stdout
        for path in ("/tmp/syms", "/tmp/kmsg", "/tmp/slab", "/proc/1/status"):
            with pytest.raises(SandboxFileError, match="kernel's proc filesystem"):
                sb.fs.read(path)
        # (rootless, the kernel refuses the open itself: the runner has the sandbox's rights there)
        with pytest.raises(SandboxFileError, match="kernel's proc filesystem" if ROOT else "kernel's proc|denied"):
            sb.fs.write("/tmp/slab", "")
        assert sb.exec("stat -L -c %a /tmp/slab").stdout == mode_before
        for path, kind in (("/tmp/procdir", "proc"), ("/tmp/sysdir", "sysfs")):
            with pytest.raises(SandboxFileError, match=f"kernel's {kind} filesystem"):
                sb.fs.download(path, tempfile.mkdtemp())
        assert sb.fs.read("/etc/hostname")  # ordinary files still read


@pytest.mark.skipif(not ROOT, reason="rootless, the runner's ids are the sandbox root's: it reads nothing more")
def test_fs_reads_only_what_root_inside_may_read(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # The host base shows the host's /etc, where root inside is not the files' owner: it cannot
    # read /etc/shadow. The runner, as host root, must not read it for the sandbox either.
    assert (Path("/etc/shadow").stat().st_mode & 0o004) == 0, "this test needs a private /etc/shadow"
    with backend.create(host) as sb:
        assert sb.exec("cat /etc/shadow").exit_code != 0
        sb.exec("ln -s /etc/shadow /tmp/s").check()
        for path in ("/etc/shadow", "/tmp/s"):
            with pytest.raises(SandboxFileError, match="root inside the sandbox may not read it"):
                sb.fs.read(path)
        sb.fs.download("/etc", tmp_path / "etc")  # a tree leaves out what the sandbox cannot read
        assert (tmp_path / "etc" / "passwd").is_file() and not (tmp_path / "etc" / "shadow").exists()


def test_download_drops_setuid_and_setgid_bits(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # A setuid copy of a shell downloaded as root is a root shell for whoever can reach it.
    with backend.create(host) as sb:
        sb.exec("cp /bin/sh /tmp/suid && chmod 6755 /tmp/suid && mkdir /tmp/d && cp -p /tmp/suid /tmp/d/s").check()
        assert sb.exec("stat -c %a /tmp/suid").stdout == "6755\n"
        sb.fs.download("/tmp/suid", tmp_path / "suid")
        sb.fs.download("/tmp/d", tmp_path / "d")
    for path in (tmp_path / "suid", tmp_path / "d" / "s"):
        mode = os.stat(path).st_mode
        assert mode & 0o6000 == 0, f"{path} was downloaded with mode {stat.S_IMODE(mode):o}"
        assert mode & 0o111, "the executable bits are kept"


# -- 6. exec output --------------------------------------------------------------------------
def test_exec_output_is_bounded_and_says_so(backend: LocalBackend, host: Snapshot) -> None:
    # A chatty or hostile command must not make the caller hold all of its output.
    with backend.create(host) as sb:
        r = sb.exec("head -c 50000000 /dev/zero | tr '\\0' x", max_output=MiB)
        assert r.truncated is True
        assert len(r.stdout) <= int(1.1 * MiB), len(r.stdout)
        assert "truncated" in r.stdout.lower(), "no visible marker says the output was cut"
        small = sb.exec("echo hi", max_output=MiB)
        assert small.stdout == "hi\n" and small.truncated is False
        assert sb.exec("echo hi").truncated is False


def test_huge_output_does_not_grow_the_callers_memory(host: Snapshot, cache_dir: Path) -> None:
    # 3 GB of output with the default max_output: measured in a fresh process, whose address
    # space is capped so that an engine holding it all fails with MemoryError instead of
    # taking the host's memory.
    code = f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({2 << 30}, {2 << 30}))
        from pytest_sandbox.backends.local import LocalBackend
        with LocalBackend() as b, b.create(b.get_snapshot({host.key!r})) as sb:
            sb.exec("true").check()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                r = sb.exec("head -c 3000000000 /dev/zero", timeout=240)
                outcome = f"returned {{len(r.stdout)}} characters, truncated={{getattr(r, 'truncated', None)}}"
            except BaseException as exc:
                outcome = f"{{type(exc).__name__}}: {{str(exc)[:300]}}"
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print("RSS", before, after, outcome, flush=True)
        """
    out = run_py(code, cache_dir, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RSS ")]
    assert lines, out.stdout + out.stderr
    _, before, after, outcome = lines[0].split(" ", 3)
    assert outcome.startswith("returned"), outcome
    assert "truncated=True" in outcome, outcome
    grew = (int(after) - int(before)) * 1024
    assert grew < 150 * MiB, f"peak RSS grew by {grew // MiB} MiB for 3 GB of output ({outcome})"


def test_background_writer_does_not_hang_exec(backend: LocalBackend, host: Snapshot) -> None:
    # A daemon the command starts inherits its stdout and floods it after the command returned
    # (started a moment later, so "done" is what the command itself printed): reading until EOF
    # would never end, and buffering it would grow without bound.
    with backend.create(host) as sb:
        start = time.monotonic()
        r = sb.exec("(sleep 0.3; exec yes) & echo done", timeout=60)
        assert time.monotonic() - start < 10, f"exec took {time.monotonic() - start:.1f}s"
        assert "done" in r.stdout
        again = sb.exec("echo again", timeout=30)
        assert again.stdout == "again\n", again.output[:200]


COLLECT_PIPES = r"""
import array, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/tmp/collect.sock")
if os.fork():
    os._exit(0)
os.setsid()
kept = []
while True:  # every exec's stdout and stderr, held open for ever
    fds = array.array("i")
    _, anc, _, _ = s.recvmsg(16, socket.CMSG_LEN(8))
    for _, _, data in anc:
        fds.frombytes(data[: len(data) - len(data) % 4])
    kept += list(fds)
"""
SEND_PIPES = (
    "import array, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendmsg([b'x'],"
    " [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(array.array('i', [1, 2])))], 0, '/tmp/collect.sock')"
)


def test_output_pipes_kept_open_inside_cost_the_runner_a_bounded_number_of_fds(
    backend: LocalBackend, host: Snapshot
) -> None:
    # Each exec's output pipes stay open while something inside holds them, and the runner
    # drains them so that writer never blocks. A sandbox process collecting every exec's pipes
    # would cost the runner two fds per exec, until it could open nothing (EMFILE).
    with backend.create(host) as sb:
        sb.fs.write("/tmp/collect.py", COLLECT_PIPES)
        sb.exec("python3 /tmp/collect.py </dev/null >/dev/null 2>&1; sleep 0.3").check()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(300):
            sb.exec(["python3", "-c", SEND_PIPES]).check()
        grew = len(os.listdir("/proc/self/fd")) - before
        assert grew <= 256 + 16, f"the runner holds {grew} more fds after 300 execs"
        assert sb.exec("echo alive").stdout == "alive\n"


def test_a_command_too_large_to_start_is_a_sandbox_error(backend: LocalBackend, host: Snapshot) -> None:
    # Hostile or generated input can make an argv the kernel refuses: a SandboxError that says
    # what to do, not an OSError from the runner's plumbing; the sandbox goes on.
    with backend.create(host) as sb:
        with pytest.raises(SandboxError, match="more than the kernel takes"):
            sb.exec(["echo", "x" * (3 << 20)])
        assert sb.exec("echo ok").stdout == "ok\n"


WAIT_STOPPED = """
import os, time
def wait_stopped(init, more_than=0, timeout=20):
    # Until more_than processes of the sandbox whose init is `init` are stopped (state T).
    ns, end = os.readlink(f"/proc/{init}/ns/pid"), time.monotonic() + timeout
    while time.monotonic() < end:
        stopped = 0
        for p in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == ns:
                    stopped += open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
            except OSError:
                pass
        if stopped > more_than:
            return
        time.sleep(0.01)
    raise SystemExit("nothing in the sandbox stopped")
"""


def test_a_command_that_stops_itself_does_not_hang_close(host: Snapshot, cache_dir: Path) -> None:
    # `kill -STOP $$` stops the command's first shell, and the host's nsenter, which passes a
    # child's stop on to itself, with it: it never reaps the shell, so the sandbox's pid namespace
    # could never die, and close(), the backend's close and the process's exit waited forever.
    # close() must end the running command (its caller gets SandboxClosedError) and everything
    # after it must finish. In a child process, so a regression is a bounded failure.
    code = f"""
        import threading, time
        from pytest_sandbox.backends.local import LocalBackend
        outcome = []
        with LocalBackend() as b:
            sb = b.create(b.get_snapshot({host.key!r}))

            def run():
                try:
                    sb.exec("kill -STOP $$; echo resumed")
                    outcome.append("returned")
                except Exception as exc:
                    outcome.append(type(exc).__name__)

            t = threading.Thread(target=run)
            t.start()
            wait_stopped(sb.pid)
            sb.close()
            t.join(20)
            print("EXEC", outcome or ["still running"], flush=True)
        print("BACKEND CLOSED", flush=True)
        """
    try:
        out = run_py(WAIT_STOPPED + textwrap.dedent(code), cache_dir, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("closing a sandbox whose command stopped itself hung")
    assert "EXEC ['SandboxClosedError']" in out.stdout and "BACKEND CLOSED" in out.stdout, out.stdout + out.stderr


def test_a_sandbox_dies_with_its_runner_even_with_its_lifeline_stopped(host: Snapshot, cache_dir: Path) -> None:
    # The holder inside (pid 2) ends the sandbox when the runner's pipe closes, but sandbox code
    # can stop it; and a command that stopped itself keeps the host's nsenter from reaping it.
    # After the runner's kill -9, neither may keep the sandbox (or a process in it) alive.
    token = f"{secrets.randbelow(10**6):06d}"
    code = f"""
        import threading, time
        from pytest_sandbox.backends.local import LocalBackend
        b = LocalBackend()
        sb = b.create(b.get_snapshot({host.key!r}))
        sb.exec("kill -STOP 2; (setsid sleep 5000.{token} >/dev/null 2>&1 &)").check()
        threading.Thread(target=sb.exec, args=("kill -STOP $$",), daemon=True).start()
        wait_stopped(sb.pid, more_than=1)  # the holder and the command
        print("READY", sb.pid, flush=True)
        time.sleep(600)
        """
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    script = WAIT_STOPPED + textwrap.dedent(code)
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("READY"), line
        init = int(line.split()[1])
    finally:
        child.kill()
        child.wait()
    leftover = [b"sleep", f"5000.{token}".encode()]
    wait_for(lambda: not os.path.exists(f"/proc/{init}") and not host_pids_with_cmdline(leftover), 20)
    assert not os.path.exists(f"/proc/{init}"), "the sandbox outlived its runner"
    assert not host_pids_with_cmdline(leftover), "a process of the sandbox outlived its runner"


# -- 7. the cache directory ------------------------------------------------------------------
def test_cache_directory_is_private(tmp_path: Path) -> None:
    # Layers hold whatever sandboxes wrote (tokens, keys, setuid files): other host users must
    # not read them.
    with LocalBackend(tmp_path / "c") as b:
        mode = stat.S_IMODE(b.store.root.stat().st_mode)
        assert mode & 0o007 == 0, f"the store is open to other users: mode {mode:o}"


@pytest.mark.skipif(not ROOT, reason="as root: another user's directory is one root would follow them into")
def test_root_follows_no_link_another_user_planted_in_the_cache_path(tmp_path: Path) -> None:
    # Before: with the cache under a directory another user controls and v2 a symlink, root
    # chmod/chowned the link's target (a root-owned 0755 directory became 0710 root:<group>)
    # and filled it.
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 54321, 54321)  # a directory of another user's
    (theirs / "cache").mkdir()
    os.chown(theirs / "cache", 54321, 54321)
    (theirs / "cache" / "v2").symlink_to(victim)
    os.lchown(theirs / "cache" / "v2", 54321, 54321)
    for cache in (theirs / "cache", theirs / "fresh"):
        with pytest.raises(ConfigError, match="another user controls"):
            LocalBackend(cache)
    st = victim.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, os.listdir(victim)) == (0o755, 0, 0, [])
    assert not (theirs / "fresh").exists()


def test_no_link_is_followed_where_the_cache_is_made_and_no_other_user_can_write_the_way(tmp_path: Path) -> None:
    # As any user: a directory on the way that others can write (not sticky) lets them swap what
    # comes next; a link planted where the store's own directories go is never followed.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=f"reached through {shared}, which another user controls"):
        LocalBackend(shared / "cache")
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    (own / "v2").symlink_to(target)
    with pytest.raises(ConfigError, match="cannot use cache directory"):
        LocalBackend(own)
    (own / "v2").unlink()
    (own / "CACHEDIR.TAG").symlink_to(target / "written")
    with LocalBackend(own) as b:
        assert b.store.root.is_dir() and not b.store.root.is_symlink()
    assert not (target / "written").exists() and os.listdir(target) == []
    # Links on the way that only root or the user could have made are followed as usual.
    (tmp_path / "link").symlink_to(own)
    with LocalBackend(tmp_path / "link") as b:
        assert b.store.root == tmp_path / "link" / "v2"


def test_the_sandboxs_mounts_name_no_path_of_the_cache(backend: LocalBackend, host: Snapshot) -> None:
    with backend.create(host) as sb:
        mounts = sb.exec("cat /proc/self/mountinfo").stdout
    if ROOT:
        assert str(backend.store.cache_dir) not in mounts and "/tmp/l/" in mounts
    else:  # rootless: overlayfs shows its layers' paths, as rootless podman's does (see the README)
        assert str(backend.store.root / "l") in mounts


@pytest.mark.parametrize(
    "call",
    [
        lambda sb: sb.exec(["echo", "a\0b"]),
        lambda sb: sb.exec("echo a\0b"),
        lambda sb: sb.exec("true", cwd="/tmp\0/x"),
        lambda sb: sb.exec("true", env={"A": "a\0b"}),
    ],
    ids=["argv", "command", "cwd", "env"],
)
def test_a_nul_in_a_command_is_a_config_error_at_the_call(backend: LocalBackend, host: Snapshot, call: Any) -> None:
    # Before: a NUL in argv killed the spawn helper's thread ("the spawn helper died").
    with backend.create(host) as sb:
        with pytest.raises(ConfigError, match="NUL"):
            call(sb)
        assert sb.exec("echo still").stdout == "still\n"


@pytest.mark.skipif(not ROOT, reason="needs root to switch to another host user")
@pytest.mark.usefixtures("mmdebstrap")
def test_setuid_file_in_the_store_is_out_of_reach_of_other_users() -> None:
    # A setuid-root shell frozen into a snapshot sits in the cache: an unprivileged host user who
    # can reach it is root. The cache is put under a world-traversable directory (as ~/.cache is
    # under a 0755 home), so that only the store's own protection stands in the way.
    parent = Path(tempfile.mkdtemp(prefix="pytest-sandbox-security-"))
    try:
        parent.chmod(0o755)
        with LocalBackend(parent / "c") as b:
            with b.create(b.build(Image.host())) as sb:
                sb.exec("cp /bin/sh /tmp/s && chmod 4755 /tmp/s").check()
                snap = sb.snapshot()
            found = [
                p
                for p in regular_files(b.store.layer_path(snap.layers[-1]))
                if p.name == "s" and p.stat().st_mode & stat.S_ISUID
            ]
            assert found, "the setuid file is not in the snapshot's layer"
            suid = found[0]
            try:
                r = run_as_nobody([str(suid), "-c", "echo executed"])
                ran = f"exit {r.returncode}: {r.stdout}{r.stderr}"
            except PermissionError:
                ran = ""
            assert "executed" not in ran, f"user nobody ran the setuid shell stored in the cache: {ran}"
            probe = run_as_nobody(["stat", "-c", "%a", str(suid)])
            assert probe.returncode != 0, f"user nobody can reach the stored setuid file: {probe.stdout}"
            assert "Permission denied" in probe.stderr, probe.stderr
            assert suid.stat().st_uid != 0, "a setuid file made inside is owned by root on the host"
    finally:
        rmtree(parent)


# -- 8. a damaged cache ----------------------------------------------------------------------
def test_a_damaged_layer_is_rebuilt_not_used(tmp_path: Path) -> None:
    # A layer emptied by a disk cleaner, a full disk or a hand edit must not be served as if intact.
    token = secrets.token_hex(8)
    image = Image.host().run(f"mkdir -p /data && echo {token} > /data/f")
    with LocalBackend(tmp_path / "c") as b:
        snap = b.build(image)
        top = b.store.layer_path(snap.layers[-1])
        assert (top / "data" / "f").is_file()
        mode = stat.S_IMODE(top.stat().st_mode)
        top.chmod(mode | stat.S_IRWXU)  # layers may be made read-only; rootless we need to write here
        for child in list(top.iterdir()):
            if child.is_dir() and not child.is_symlink():
                rmtree(child)
            else:
                child.unlink()
        top.chmod(mode)
        logs: list[str] = []
        again = b.build(image, on_log=logs.append)
        assert again.layers != snap.layers or logs, "the damaged snapshot was reused silently"
        with b.create(again) as sb:
            assert sb.exec("cat /data/f").stdout == f"{token}\n"


def test_a_record_with_a_damaged_layer_keeps_its_other_layers_until_it_goes(tmp_path: Path) -> None:
    # gc decides what is referenced on records as written: a damaged layer makes its snapshot
    # rebuilt on next use, but must not make gc delete the intact layers below it meanwhile.
    image = Image.host().run("echo one > /one").run("echo two > /two")
    with LocalBackend(tmp_path / "c") as b:
        snap = b.build(image)
        assert len(snap.layers) >= 2
        b.store.forget_layer(snap.layers[-1])  # what a failed check does to a damaged layer
        assert b.store.get(snap.key) is None  # treated as absent: built again on next use
        b.store.gc()
        for layer in snap.layers:
            assert b.store.layer_path(layer).is_dir(), f"layer {layer} of a record still there was deleted"
        b.store.remove([snap.key])  # the layers below are its parent's (one record per step) and stay
        assert not b.store.layer_path(snap.layers[-1]).exists()


def test_cli_verify_reports_damage(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    verify = [sys.executable, "-m", "pytest_sandbox.cli", "--cache-dir", str(cache), "verify"]
    with LocalBackend(cache) as b:
        snap = b.build(Image.host().run("mkdir -p /data/a/b/c && echo deep > /data/a/b/c/f"))
        ok = subprocess.run(verify, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        layer = snap.layers[-1]
        deep = b.store.layer_path(layer) / "data" / "a" / "b" / "c"
        mode = stat.S_IMODE(deep.stat().st_mode)
        deep.chmod(mode | stat.S_IRWXU)  # layers may be made read-only; rootless we need to write here
        (deep / "f").unlink()
        deep.chmod(mode)
    bad = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out
    assert layer in out or snap.short in out, f"the report names neither layer {layer} nor snapshot {snap.short}: {out}"


# -- 10. the Daytona-compatible endpoint -----------------------------------------------------
def _read_assignments(stream: object, names: set[str], timeout: float, rest: float = 5) -> dict[str, str]:
    """NAME=value lines for ``names`` from a text stream, until all are found, ``timeout`` passes
    before the first, or ``rest`` seconds pass after it (they are printed together)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while names - found.keys():
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        name, sep, value = line.strip().partition("=")
        if sep and name in names:
            found[name] = value
            deadline = min(deadline, time.monotonic() + rest)
    return found


def _status(url: str, key: str | None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=15) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("given_key", [None, "secret"], ids=["generated-key", "given-key"])
def test_daytona_endpoint_requires_its_key(tmp_path: Path, given_key: str | None) -> None:
    # Any local process (or a web page through DNS rebinding) can reach 127.0.0.1: an endpoint
    # that accepts any key lets it run commands in sandboxes and read their files.
    try:
        import daytona_api_client  # noqa: F401
    except ImportError:
        pytest.skip("pip install 'pytest-sandbox[daytona]'")
    argv = [sys.executable, "-m", "pytest_sandbox.cli", "--cache-dir", str(tmp_path / "c"), "serve", "--daytona"]
    argv += ["--port", "0", "--until-stdin-closes"]
    if given_key is not None:
        argv += ["--api-key", given_key]
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        found = _read_assignments(proc.stdout, {"DAYTONA_API_URL", "DAYTONA_API_KEY"}, timeout=30)
        assert "DAYTONA_API_URL" in found, f"no DAYTONA_API_URL line: {found}\n{log.read_text()}"
        assert "DAYTONA_API_KEY" in found, f"the endpoint printed no DAYTONA_API_KEY line: {found}\n{log.read_text()}"
        url, key = found["DAYTONA_API_URL"], found["DAYTONA_API_KEY"]
        assert key, "the printed key is empty"
        if given_key is not None:
            assert key == given_key
        snapshots = f"{url}/snapshots"
        assert _status(snapshots, None) == 401, "a request without a key was answered"
        for wrong in ("wrong", "local"):
            if wrong != key:
                assert _status(snapshots, wrong) == 401, f"the key {wrong!r} was accepted"
        assert _status(snapshots, key) == 200
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
