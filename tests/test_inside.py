"""The exec fast path (engine/inside.py): each sandbox's own command helper, attacked from inside
the sandbox, and the runner's side of its protocol against a helper that answers nonsense, with
another process's pid, or never."""

from __future__ import annotations

import encodings
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pytest_sandbox import ExecTimeoutError, Limits, Snapshot, _proc
from pytest_sandbox.backends.local import LocalBackend, LocalSandbox
from pytest_sandbox.engine.spawn import Child
from tests.conftest import wait_for

ROOT = os.geteuid() == 0


def status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def host_pid_of(argv: list[str]) -> int | None:
    """The host pid of the process whose argv is exactly ``argv``."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == want:
                    return int(entry)
            except OSError:
                continue
    return None


def all_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped."""
    states = [
        (Path(f"/proc/{pid}/task") / t / "stat").read_text().rsplit(")", 1)[1].split()[0]
        for t in os.listdir(f"/proc/{pid}/task")
    ]
    return all(state == "T" for state in states)


def running(sb: LocalSandbox, argv: list[str]) -> tuple[threading.Thread, int]:
    """``argv`` running in ``sb`` (an exec in a thread) and its host pid."""
    t = threading.Thread(target=lambda: sb.exec(argv, timeout=60), daemon=True)
    t.start()
    assert wait_for(lambda: host_pid_of(argv) is not None, timeout=30)
    pid = host_pid_of(argv)
    assert pid is not None
    return t, pid


def test_commands_start_from_a_helper_sandbox_code_cannot_reach(backend: LocalBackend, host: Snapshot) -> None:
    """The helper that starts the commands is outside the sandbox's pid namespace, not dumpable
    (no ptrace, no /proc files of it for the sandbox's root), root inside and nothing more on the
    host; killing everything the sandbox can see leaves it, and the next command starts through it."""
    tok = f"{secrets.randbelow(10**6):06d}"
    with backend.create(host) as sb:
        helper = sb._sb.inside()
        assert helper is not None, "no exec fast path here"
        t, pid = running(sb, ["sleep", f"60.{tok}"])
        agent = int(status(pid)["PPid"])
        assert len(status(pid)["NSpid"].split()) == 2  # the command: in the sandbox's pid namespace
        assert len(status(agent)["NSpid"].split()) == 1  # its helper: not
        real_uid = int(status(agent)["Uid"].split()[0])
        assert real_uid != 0  # host root is given up (root inside is the range's, or the caller)
        # A process's /proc files are root's (the host's) only when it is not dumpable.
        assert os.stat(f"/proc/{agent}/mem").st_uid == 0, "the helper is dumpable: the sandbox's root could ptrace it"
        assert sb.exec(["grep", "PPid", "/proc/self/status"]).stdout == "PPid:\t0\n"
        os.kill(pid, 9)
        t.join(30)
        # Everything it can see, it kills (all but itself, its init and the holder, whose end is the
        # sandbox's): the helper is not among them.
        sb.exec(
            "for p in /proc/[0-9]*; do p=${p#/proc/}; [ $p -gt 2 ] && [ $p != $$ ] && kill -9 $p; done; true"
        ).check()
        assert sb.exec("echo alive").stdout == "alive\n"
        assert sb._sb.inside() is helper


def test_a_sandbox_stopping_every_new_process_holds_the_runner_only_to_the_timeout(
    backend: LocalBackend, host: Snapshot
) -> None:
    """Sandbox code that stops every process it sees, the commands the runner starts included
    (before their exec, when it is fast enough): an exec returns at its timeout, the sandbox
    closes, and nothing is left."""
    tok = f"{secrets.randbelow(10**6):06d}"
    stopper = (
        "import os, signal\nme = os.getpid()\nwhile True:\n    for p in os.listdir('/proc'):\n"
        "        if p.isdigit() and int(p) not in (1, me):\n"
        "            try:\n                os.kill(int(p), signal.SIGSTOP)\n            except OSError:\n"
        "                pass\n"
    )
    sb = backend.create(host, limits=Limits(pids=128))
    try:
        sb.fs.write("/tmp/stop.py", stopper)
        with pytest.raises(ExecTimeoutError):  # the stopper stops the shell that starts it too
            sb.exec(f"exec python3 /tmp/stop.py {tok} >/dev/null 2>&1 & sleep 30", timeout=3)
        for _ in range(5):
            start = time.monotonic()
            with pytest.raises(ExecTimeoutError):
                sb.exec(["sleep", f"9.{tok}"], timeout=1)
            assert time.monotonic() - start < 20
    finally:
        start = time.monotonic()
        sb.close()
        assert time.monotonic() - start < 20
    assert wait_for(lambda: host_pid_of(["python3", "/tmp/stop.py", tok]) is None, timeout=30)
    assert wait_for(lambda: host_pid_of(["sleep", f"9.{tok}"]) is None, timeout=30)


def test_when_the_helper_is_gone_commands_enter_the_other_way(backend: LocalBackend, host: Snapshot) -> None:
    """A helper that died (only the host can kill it): the command it was running counts as
    killed, and the next ones enter with nsenter."""
    tok = f"{secrets.randbelow(10**6):06d}"
    with backend.create(host) as sb:
        t, pid = running(sb, ["sleep", f"60.{tok}"])
        agent = int(status(pid)["PPid"])
        os.kill(agent, 9)
        t.join(30)
        assert not t.is_alive()
        assert sb.exec("echo still works").stdout == "still works\n"
        assert sb._sb.inside() is None
        assert sb.exec(["sh", "-c", "echo $0", "again"]).stdout == "again\n"
    assert wait_for(lambda: host_pid_of(["sleep", f"60.{tok}"]) is None, timeout=30)


def test_a_command_the_helper_died_before_taking_runs_the_other_way(backend: LocalBackend, host: Snapshot) -> None:
    """The socket of a helper killed lives on for a moment, so a command can be sent to a helper
    already dead; one it never took off its socket (here: it was stopped, then killed) is started
    with nsenter, exactly once. CI saw this race as an exec that came back "killed"."""
    with backend.create(host) as sb:
        helper = sb._sb.inside()
        assert helper is not None
        t, pid = running(sb, ["sleep", f"60.{secrets.randbelow(10**6):06d}"])
        agent = int(status(pid)["PPid"])
        out: list[object] = []
        sender = threading.Thread(target=lambda: out.append(sb.exec("echo once >> /tmp/runs; cat /tmp/runs")))
        try:
            os.kill(agent, signal.SIGSTOP)
            # Every thread of it stopped before the send: one still waking could take the command.
            assert wait_for(lambda: all_stopped(agent), timeout=30)
            sender.start()
            ctl = helper._ctl
            assert ctl is not None
            # Sent, not taken: bytes wait in the socket's queue (SIOCOUTQ).
            assert wait_for(lambda: fcntl.ioctl(ctl.fileno(), termios.TIOCOUTQ, b"\0" * 4) != b"\0" * 4, timeout=30)
        finally:  # never a stopped helper left behind: its sandbox could not end
            os.kill(agent, signal.SIGKILL)
        sender.join(60)
        t.join(60)
        assert not sender.is_alive() and not t.is_alive()
        assert [r.stdout for r in out] == ["once\n"]  # type: ignore[attr-defined]
        assert sb._sb.inside() is None


def test_commands_start_with_every_signal_at_its_default_either_way(backend: LocalBackend, host: Snapshot) -> None:
    """The runner and its helpers are Python, which ignores SIGPIPE and SIGXFSZ: a command must
    not inherit that (``yes | head`` would end in write errors), through the helper or nsenter.
    glibc's posix_spawn leaves its own two signals (32, 33) ignored; a glibc program sets them again."""
    pipeline = "yes | head -n 1; grep -E '^Sig(Ign|Blk)' /proc/self/status"
    with backend.create(host) as sb:
        helper = sb._sb.inside()
        assert helper is not None
        fast = sb.exec(pipeline)
        sb._sb.lost_inside(helper)
        assert sb._sb.inside() is None
        slow = sb.exec(pipeline)
    glibc = (1 << 31) | (1 << 32)
    for res in (fast, slow):
        first, blocked, ignored = res.stdout.splitlines()
        assert (first, blocked, res.stderr) == ("y", "SigBlk:\t0000000000000000", "")
        assert int(ignored.split()[1], 16) & ~glibc == 0, ignored


def test_commands_never_wait_for_one_another_and_few_idle_threads_stay(backend: LocalBackend, host: Snapshot) -> None:
    """Six commands that each wait for all six to run (a barrier inside the sandbox): the helper
    serves each in a thread of its own, at once. Afterwards it keeps two idle threads at most:
    threads count against the sandbox's pids limit."""
    barrier = 'touch /tmp/b.$0; while [ "$(ls /tmp/b.* | wc -l)" -lt 6 ]; do sleep 0.05; done; echo $0'
    with backend.create(host) as sb:
        t, pid = running(sb, ["sleep", f"60.{secrets.randbelow(10**6):06d}"])
        agent = int(status(pid)["PPid"])
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: sb.exec(["sh", "-c", barrier, str(i)], timeout=60), range(6)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
        assert [r.exit_code for r in results] == [0] * 6
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert wait_for(lambda: int(status(agent)["Threads"]) <= 3, timeout=30), status(agent)["Threads"]


# A command that makes its parent, the sandbox's helper, its tracer (PTRACE_TRACEME), then gets a
# signal: the helper's wait sees a trace stop. It used to end the helper's worker thread with a
# traceback, whose printing read the "source" of the helper's modules by their host paths, which
# after the chroot are the sandbox's files.
TRACEME = (
    "import ctypes, os, signal\n"
    "signal.signal(signal.SIGUSR1, lambda *_: print('got usr1', flush=True))\n"
    "ctypes.CDLL(None).ptrace(0, 0, 0, 0)\n"
    "os.kill(os.getpid(), signal.SIGUSR1)\n"
    "print('went on', flush=True)\n"
)


def test_a_command_that_makes_the_helper_its_tracer_is_let_go(backend: LocalBackend, host: Snapshot) -> None:
    with backend.create(host) as sb:
        helper = sb._sb.inside()
        res = sb.exec(["python3", "-c", TRACEME], timeout=30)
        assert (res.exit_code, res.stdout, res.stderr) == (0, "got usr1\nwent on\n", "")
        assert sb._sb.inside() is helper  # the same helper, still serving
        assert sb.exec("echo next").stdout == "next\n"


def test_sandbox_files_never_become_code_of_the_helper(backend: LocalBackend, debian: Snapshot) -> None:
    """The exploit the trace stop made possible, for real: a coding cookie planted in the sandbox
    at the path of the helper's threading.py, and the codec it names planted where the helper's
    ``encodings`` package looks (a host path, which resolves in the sandbox after the chroot). The
    helper's traceback would read the first and import the second: code of the sandbox's running
    in the helper, outside the sandbox's pid namespace, with the runner's environment."""
    enc = encodings.__path__[0]
    with backend.create(debian) as sb:
        sb.exec(["mkdir", "-p", os.path.dirname(threading.__file__), enc]).check()
        sb.fs.write(threading.__file__, b"# coding: pwnenc\nx = 1\n" * 2000)
        sb.fs.write(f"{enc}/pwnenc.py", b"open('/tmp/pwned', 'w').write('the helper ran sandbox code')\n")
        sb.exec(["python3", "-c", TRACEME], timeout=30)
        time.sleep(0.5)
        assert sb.exec("cat /tmp/pwned 2>/dev/null").stdout == ""


def test_once_inside_the_helper_imports_nothing_and_prints_nothing(tmp_path: Path) -> None:
    """What the helper seals itself with once inside, on its own: a codec planted on the path the
    ``encodings`` package searches is not imported, and a thread that fails prints no traceback
    (printing one opens each frame's source file)."""
    (tmp_path / "pwnenc.py").write_text("import os\nos.write(2, b'PLANTED CODE RAN')\n")
    code = (
        "import codecs, encodings, threading\n"
        f"encodings.__path__.insert(0, {str(tmp_path)!r})\n"
        "from pytest_sandbox.engine import spawn_helper\n"
        "spawn_helper._seal()\n"
        "try:\n"
        "    codecs.lookup('pwnenc')\n"
        "except LookupError:\n"
        "    print('no such codec')\n"
        "t = threading.Thread(target=lambda: 1 / 0)\n"
        "t.start()\n"
        "t.join()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (0, "no such codec\n", "")


@pytest.mark.skipif(not ROOT, reason="steering the next pid (ns_last_pid) needs root")
def test_closing_a_sandbox_that_ended_itself_kills_no_process_that_took_its_pid(
    backend: LocalBackend, host: Snapshot
) -> None:
    sb = backend.create(host)
    pid = sb.pid
    sb.exec("kill -KILL -1")  # everything inside but init: the holder then ends the sandbox
    assert wait_for(lambda: not sb.alive() and not os.path.exists(f"/proc/{pid}"))
    other = None
    try:
        for _ in range(50):  # another process of the host takes the pid the sandbox's init had
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
            proc = subprocess.Popen(["sleep", "60"])
            if proc.pid == pid:
                other = proc
                break
            proc.kill()
            proc.wait()
        if other is None:
            pytest.skip("the pid was taken by someone else each time (a busy machine)")
        sb.close()
        time.sleep(0.5)
        assert other.poll() is None
    finally:
        sb.close()
        if other is not None:
            other.kill()
            other.wait()


def test_a_live_fork_has_a_helper_of_its_own(backend: LocalBackend, host: Snapshot) -> None:
    """A fork restored from a live snapshot (its processes continued) starts its commands from a
    helper that entered it, not its parent's."""
    from tests.test_live import needs_live

    needs_live(backend)
    with backend.create(host) as sb:
        sb.exec("sleep 1000 >/dev/null 2>&1 &").check()
        with sb.fork(live=True) as fork:
            helper = fork._sb.inside()
            assert helper is not None and helper is not sb._sb.inside()
            assert fork.exec("pgrep -x sleep >/dev/null && echo continued", cwd="/tmp").stdout == "continued\n"
            assert fork.exec(["grep", "PPid", "/proc/self/status"]).stdout == "PPid:\t0\n"


# -- the runner's side, against a helper of pure data ------------------------------------------
class FakeHelper:
    """A spawner whose helper answers what the test says, then stays silent (or, ``hang_up``,
    dies); the sandbox it stands for is in ``pidns`` (by default ours)."""

    def __init__(self, answers: list[bytes], *, pidns: str = "", hang_up: bool = False) -> None:
        self.answers = answers
        self.pidns = pidns or os.readlink("/proc/self/ns/pid")
        self.hang_up = hang_up
        self.peers: list[socket.socket] = []

    def spawn(self, start: _proc.Start) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for answer in self.answers:
            theirs.send(answer)
        if self.hang_up:
            theirs.close()
        else:
            self.peers.append(theirs)
        return Child(ours, None, told=False, pidns=self.pidns)

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids the runner would kill a tree of (none is killed)."""
    seen: list[int] = []
    monkeypatch.setattr(_proc, "kill_tree", seen.append)
    return seen


@pytest.mark.parametrize(
    "pid",
    [None, 1, 0, -1, True, "7", 2**40, os.getpid(), os.getppid()],
    ids=["none", "init", "zero", "minus-one", "bool", "string", "huge", "the-runner", "its-parent"],
)
def test_a_pid_the_helper_tells_is_acted_on_only_inside_the_sandbox(kills: list[int], pid: object) -> None:
    """Here the "sandbox" is told to be another pid namespace than ours, so no pid of this machine's
    namespace may be killed: the runner itself, its parent, init, a group."""
    helper = FakeHelper([json.dumps({"pid": pid}).encode()], pidns="pid:[1]")  # no process here is in it
    start = time.monotonic()
    try:
        res = _proc.run(["x"], env={}, spawner=helper, timeout=0.3)
    finally:
        helper.close()
    assert res.timed_out and res.returncode == 137
    assert kills == []
    assert time.monotonic() - start < 10


def test_a_told_pid_that_leaves_between_reads_is_never_acted_on_as_none(kills: list[int]) -> None:
    """A told pid is checked at each read, so the process may be gone at the next one (a command
    that ended as the sandbox closed): the kill reads it once (CI failed once with kill_tree(None))."""

    class Leaving(Child):
        reads = 0

        @property
        def pid(self) -> int | None:
            self.reads += 1
            return 4242 if self.reads <= 2 else None

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        _proc._kill(Leaving(ours, None))
    assert kills == [4242]


def test_a_pid_in_the_sandbox_is_killed_on_timeout(kills: list[int]) -> None:
    helper = FakeHelper([json.dumps({"pid": os.getpid()}).encode()])
    try:
        res = _proc.run(["x"], env={}, spawner=helper, timeout=0.3)
    finally:
        helper.close()
    assert res.timed_out and kills == [os.getpid()]


@pytest.mark.parametrize(
    "answers",
    [[], [b"x" * 100_000], [b"[]"], [json.dumps({"pid": None}).encode(), b'{"code": "no"}']],
    ids=["never", "endless", "not-an-object", "bad-code"],
)
def test_a_helper_answering_nonsense_or_never_leaves_the_runner_bounded(kills: list[int], answers: list[bytes]) -> None:
    helper = FakeHelper(answers)
    start = time.monotonic()
    try:
        try:
            res = _proc.run(["x"], env={}, spawner=helper, timeout=0.5)
        except OSError as exc:
            assert "nonsense" in str(exc) or "exit code" in str(exc)
        else:
            assert res.timed_out and res.returncode == 137
    finally:
        helper.close()
    assert kills == []
    assert time.monotonic() - start < 10


TOOK = json.dumps({"took": True}).encode()


@pytest.mark.parametrize(
    "answers", [[TOOK], [TOOK, json.dumps({"pid": None}).encode()]], ids=["taken", "taken-and-told"]
)
def test_a_helper_that_dies_mid_command_counts_as_a_kill(kills: list[int], answers: list[bytes]) -> None:
    """Once the helper has taken the command, it may have started it: never started again."""
    helper = FakeHelper(answers, hang_up=True)
    res = _proc.run(["x"], env={}, spawner=helper, timeout=5)
    assert res.returncode == 137 and not res.timed_out and kills == []


def test_a_helper_that_dies_before_taking_the_command_says_it_never_started(kills: list[int]) -> None:
    """The caller can then start it another way (the sandbox does, with nsenter)."""
    with pytest.raises(ConnectionResetError, match="before it took the command"):
        _proc.run(["x"], env={}, spawner=FakeHelper([], hang_up=True), timeout=5)
    assert kills == []


def test_a_helper_telling_it_took_the_command_twice_is_refused(kills: list[int]) -> None:
    helper = FakeHelper([TOOK, TOOK])
    try:
        with pytest.raises(OSError, match="spawn failed"):
            _proc.run(["x"], env={}, spawner=helper, timeout=5)
    finally:
        helper.close()
    assert kills == []
