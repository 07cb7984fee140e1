"""The sandbox's seccomp filter: the system calls docker's default profile refuses, refused here too.

A classic-BPF program is small enough to write out directly, which keeps the engine free of a
native dependency (libseccomp's Python bindings are not on PyPI as wheels). The filter is a
deny list, like docker's in effect: kernel modules, kexec, bpf, perf events, keyrings,
userfaultfd, io_uring, mounting, new namespaces, raw handles to host files, other processes'
memory, clocks, swap, reboot and the kernel log answer EPERM; ``clone3`` answers ENOSYS (so libc
falls back to ``clone``, whose flags can be checked); the x32 ABI answers ENOSYS.

``setns`` stays allowed: ``nsenter`` enters a sandbox under this filter, and inside a sandbox
there is nothing to join that its own user namespace does not already own.

bwrap installs the program for the sandbox's init (``--seccomp FD``); :func:`install` installs it
in a command that enters the sandbox, between fork and exec.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

__all__ = ["DENIED", "install", "program"]

DENIED = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "settimeofday",
    "stime",
    "swapon",
    "swapoff",
    "syslog",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
]

# Numbers from the kernel's uapi headers; absent names do not exist on that ABI.
_X86_64 = dict(
    acct=163, add_key=248, bpf=321, clock_adjtime=305, clock_settime=227, create_module=174,
    delete_module=176, finit_module=313, get_kernel_syms=177, init_module=175, ioperm=173, iopl=172,
    io_uring_enter=426, io_uring_register=427, io_uring_setup=425, kcmp=312, kexec_file_load=320,
    kexec_load=246, keyctl=250, lookup_dcookie=212, mount=165, move_mount=429, open_tree=428,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, name_to_handle_at=303,
    nfsservctl=180, open_by_handle_at=304, perf_event_open=298, pivot_root=155, process_vm_readv=310,
    process_vm_writev=311, query_module=178, quotactl=179, quotactl_fd=443, reboot=169,
    request_key=249, settimeofday=164, swapon=167, swapoff=168, syslog=103, sysfs=139, _sysctl=156,
    umount2=166, unshare=272, uselib=134, userfaultfd=323, ustat=136, clone=56, clone3=435,
)  # fmt: skip
_I386 = dict(
    acct=51, add_key=286, bpf=357, clock_adjtime=343, clock_settime=264, create_module=127,
    delete_module=129, finit_module=350, get_kernel_syms=130, init_module=128, ioperm=101, iopl=110,
    io_uring_enter=426, io_uring_register=427, io_uring_setup=425, kcmp=349, kexec_load=283,
    keyctl=288, lookup_dcookie=253, mount=21, move_mount=429, open_tree=428, fsopen=430,
    fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, name_to_handle_at=341, nfsservctl=169,
    open_by_handle_at=342, perf_event_open=336, pivot_root=217, process_vm_readv=347,
    process_vm_writev=348, query_module=167, quotactl=131, quotactl_fd=443, reboot=88,
    request_key=287, settimeofday=79, stime=25, swapon=87, swapoff=115, syslog=103, sysfs=135,
    _sysctl=149, umount=22, umount2=52, unshare=310, uselib=86, userfaultfd=374, ustat=62, vm86=166,
    vm86old=113, clone=120, clone3=435,
)  # fmt: skip
_GENERIC = dict(  # asm-generic: aarch64, riscv64, loongarch64
    acct=89, add_key=217, bpf=280, clock_adjtime=266, clock_settime=112, delete_module=106,
    finit_module=273, init_module=105, io_uring_enter=426, io_uring_register=427,
    io_uring_setup=425, kcmp=272, kexec_file_load=294, kexec_load=104, keyctl=219,
    lookup_dcookie=18, mount=40, move_mount=429, open_tree=428, fsopen=430, fsconfig=431,
    fsmount=432, fspick=433, mount_setattr=442, name_to_handle_at=264, nfsservctl=42,
    open_by_handle_at=265, perf_event_open=241, pivot_root=41, process_vm_readv=270,
    process_vm_writev=271, quotactl=60, quotactl_fd=443, reboot=142, request_key=218,
    settimeofday=170, swapon=224, swapoff=225, syslog=116, umount2=39, unshare=97,
    userfaultfd=282, clone=220, clone3=435,
)  # fmt: skip

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_AUDIT_ARCH_AARCH64 = 0xC00000B7
_AUDIT_ARCH_RISCV64 = 0xC00000F3
_X32_BIT = 0x40000000
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (NEWTIME's 0x80 is part of
# clone()'s exit-signal byte, so it cannot be tested here; unshare, the way to use it, is refused).
_CLONE_NEW_MASK = 0x7E020000

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _arch_body(table: dict[str, int], x32: bool) -> list[bytes]:
    """Instructions for one ABI, starting with the syscall number not yet loaded."""
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    out = [_ins(_LD_W_ABS, 0)]  # seccomp_data.nr
    if x32:
        out += [_ins(_JGE_K, _X32_BIT, 0, 1), _ins(_RET_K, enosys)]
    for name in DENIED:
        if name in table:
            out += [_ins(_JEQ_K, table[name], 0, 1), _ins(_RET_K, eperm)]
    out += [_ins(_JEQ_K, table["clone3"], 0, 1), _ins(_RET_K, enosys)]
    # clone(flags, ...): refuse the flags that make namespaces. args[0]'s low word is at 16.
    out += [
        _ins(_JEQ_K, table["clone"], 0, 3),
        _ins(_LD_W_ABS, 16),
        _ins(_JSET_K, _CLONE_NEW_MASK, 0, 1),
        _ins(_RET_K, eperm),
        _ins(_RET_K, _ALLOW),
    ]
    return out


def program(machine: str | None = None) -> bytes:
    """The filter as bytes of ``struct sock_filter``, for this machine's architecture."""
    machine = machine or platform.machine()
    if machine == "x86_64":
        abis = [(_AUDIT_ARCH_X86_64, _X86_64, True), (_AUDIT_ARCH_I386, _I386, False)]
    elif machine in ("aarch64", "arm64"):
        abis = [(_AUDIT_ARCH_AARCH64, _GENERIC, False)]
    elif machine == "riscv64":
        abis = [(_AUDIT_ARCH_RISCV64, _GENERIC, False)]
    else:
        raise OSError(errno.ENOTSUP, f"no seccomp filter for the {machine} architecture yet")
    bodies = [(arch, _arch_body(table, x32)) for arch, table, x32 in abis]
    out = [_ins(_LD_W_ABS, 4)]  # seccomp_data.arch
    # Dispatch: one jeq per ABI to its body; an unknown ABI is refused outright.
    offset = len(bodies) + 1  # past the dispatch jumps and the final refusal
    for i, (arch, body) in enumerate(bodies):
        jump = offset - (i + 1)
        if jump > 255:
            raise AssertionError("seccomp dispatch jump out of range")
        out.append(_ins(_JEQ_K, arch, jump, 0))
        offset += len(body)
    out.append(_ins(_RET_K, _ERRNO | errno.ENOSYS))
    for _, body in bodies:
        out += body
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_libc = ctypes.CDLL(None, use_errno=True)
_prog = program() if platform.machine() in ("x86_64", "aarch64", "arm64", "riscv64") else b""
_buf = ctypes.create_string_buffer(_prog, len(_prog))
_fprog = _SockFprog(len(_prog) // 8, ctypes.cast(_buf, ctypes.c_void_p))
_prctl = _libc.prctl


def install() -> None:
    """Set no_new_privs and install the filter in this process (a child between fork and exec).

    Everything is prepared at import time, so this only makes two system calls: it must not
    allocate or take locks after a fork in a threaded parent.
    """
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        os._exit(126)
    if _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(_fprog), 0, 0) != 0:
        os._exit(126)
