"""Where a child died: a last-words handler for the signals a bad build or a bug raises.

:func:`install` sets an ``SA_SIGINFO`` handler (through libc's ``sigaction``, never Python's
``signal`` module, whose handlers run later in the main thread and would let a faulting
instruction repeat forever) for SIGILL, SIGSEGV, SIGBUS and SIGFPE. On a fault it writes one line

    FAULT {"signal": "SIGILL", "addr": "0x7f…", "library": "/…/libggml-cpu.so", "offset": "0x1234"}

(or, for a signal another process sent, ``"sender_pid": N`` instead of the address) to the
child's handshake channel, so the node can say *which library* could not run on this machine.
The handler is installed with ``SA_RESETHAND``: after writing, it returns, the instruction runs
again (a signal sent by another process is sent again), and the process dies by the same signal with the default action; the exit status the
supervisor sees is unchanged. Linux only (it reads ``/proc/self/maps``); elsewhere it is a no-op.

It runs Python inside a signal handler, which is only safe because the process is about to die:
it must never be used to recover from a fault.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

SIGNALS = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE)
_SA_SIGINFO = 0x4
_SA_RESETHAND = 0x80000000
_PREFIX = "FAULT "


class _Sigaction(ctypes.Structure):
    # glibc's struct sigaction on Linux (x86-64 and aarch64 alike): handler, mask, flags, restorer
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_HANDLER_T = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_keep: list = []  # the callback and the fd must outlive install()


def where(addr: int, maps: str) -> tuple[str, int]:
    """(mapped file or "[anonymous]", offset in it) for ``addr``, from /proc/PID/maps text."""
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        try:
            start, end, off = int(lo, 16), int(hi, 16), int(parts[2], 16)
        except ValueError:
            continue
        if start <= addr < end:
            name = parts[5].strip() if len(parts) > 5 and parts[5].strip() else "[anonymous]"
            return name, addr - start + off
    return "[unmapped]", addr


def describe(info: dict) -> str:
    """One phrase for a FAULT report: where it happened, or who sent the signal."""
    if "sender_pid" in info:
        return f"{info['signal']} was sent by process {info['sender_pid']}"
    library = os.path.basename(info.get("library", "?"))
    return f"{info['signal']} at {library}+{info.get('offset', '?')}"


def parse(line: str) -> dict | None:
    """The report in a ``FAULT {...}`` line (prefix already stripped or not), or None."""
    text = line[len(_PREFIX):] if line.startswith(_PREFIX) else line
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and "signal" in info else None


def install(fd: int) -> bool:
    """Report faults of this process as one ``FAULT`` line on ``fd``. Returns False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    out = os.dup(fd)

    def _on_fault(signum: int, siginfo: int, _ucontext: int) -> None:
        code = 1
        try:
            code = ctypes.c_int.from_address(siginfo + 8).value
            info: dict = {"signal": signal.Signals(signum).name}
            if code <= 0:  # SI_USER, SI_TKILL, SI_QUEUE…: kill() from a process, not a fault
                info["sender_pid"] = ctypes.c_int.from_address(siginfo + 16).value
            else:
                addr = ctypes.c_void_p.from_address(siginfo + 16).value or 0
                with open("/proc/self/maps") as f:
                    library, offset = where(addr, f.read())
                info.update(addr=hex(addr), library=library, offset=hex(offset))
            os.write(out, (_PREFIX + json.dumps(info) + "\n").encode())
        except BaseException:  # nothing may escape a signal handler; the death itself still reports
            pass
        if code <= 0:  # nothing re-executes: send it again, now with the default action (it is
            os.kill(os.getpid(), signum)  # blocked until this handler returns, then kills us)

    handler = _HANDLER_T(_on_fault)
    _keep.extend([handler, out])
    act = _Sigaction()
    act.sa_sigaction = ctypes.cast(handler, ctypes.c_void_p).value
    act.sa_flags = _SA_SIGINFO | _SA_RESETHAND
    ok = True
    for sig in SIGNALS:
        if libc.sigaction(int(sig), ctypes.byref(act), None) != 0:
            ok = False
    return ok
