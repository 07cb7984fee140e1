"""Kills, once its stdin closes (the runner is gone), each process it was told of on it.

stdin: a line "PID START" per process; START (field 22 of /proc/PID/stat) tells the process from
a later one that reused its pid.
"""

import os
import signal
import sys


def main() -> None:
    todo: dict[int, bytes] = {}
    for line in sys.stdin.buffer:
        pid, start = line.split()
        todo[int(pid)] = start
    for pid, start in todo.items():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[19] == start:
                    os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):
            pass


if __name__ == "__main__":
    main()
