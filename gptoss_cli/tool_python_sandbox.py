"""The python tool's kernel launcher: limits and isolation set inside the kernel's own process,
then ipykernel. Run by path (``python tool_python_sandbox.py --scratch DIR ... -- -f CONN``), not
imported: it must not import gptoss (nor torch) into the kernel.

With ``--readonly`` it runs inside fresh mount and network namespaces (``unshare -n -m``, as root):
every mount turns read-only except the scratch and runtime folders, then the process gives up all
its capabilities (so it cannot remount) and may gain none (``PR_SET_NO_NEW_PRIVS``). The network
namespace is new and empty: not even loopback is up. See ``tool_python.isolation``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source: str | None, target: str, flags: int) -> None:
    if libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # field 5 is the mount point, with spaces etc. written as octal escapes (\040)
            points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def read_only_except(writable: list[str]) -> None:
    """Make every mount of this (new) mount namespace read-only except ``writable`` folders."""
    libc = _libc()
    _mount(libc, None, "/", MS_REC | MS_PRIVATE)  # nothing done here propagates back to the host
    for folder in writable:
        _mount(libc, folder, folder, MS_BIND)     # each writable folder becomes its own mount
    for point in _mount_points():
        if point in writable or point == "/proc" or point.startswith(("/proc/", "/sys")):
            continue
        try:
            _mount(libc, None, point, MS_REMOUNT | MS_BIND | MS_RDONLY)
        except OSError as e:
            if e.errno not in (13, 1, 2, 22):  # EACCES/EPERM/ENOENT/EINVAL: a mount we may not touch
                raise
    for cap in range(64):  # give up every capability: no remounting, no writing past permissions
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), ctypes.byref((Data * 2)())) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--memory", type=int, default=0)
    ap.add_argument("--readonly", action="store_true")
    args, kernel_args = ap.parse_known_args(argv)
    if args.readonly:
        read_only_except([args.scratch, args.run])
    if args.memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory, args.memory))
    os.chdir(args.scratch)
    from ipykernel import kernelapp

    sys.argv = [sys.argv[0]] + [a for a in kernel_args if a != "--"]
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main(sys.argv[1:])
