"""A child's last words: the FAULT line names the signal and the library that faulted.

Real faults in a real child process: an illegal instruction (ud2, x86-64 only) and a read of
address 0; and a SIGILL that another process sends, which must be told apart from a fault.
"""

import os
import platform
import signal
import subprocess
import sys

import pytest

from cluster import REPO
from zswarm.actors.supervisor import explain
from zswarm.engine import fault

CHILD = r"""
import ctypes, mmap, sys, time
from zswarm.engine import fault
assert fault.install(1)
what = sys.argv[1]
if what == "ud2":
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(b"\x0f\x0b")
    ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
elif what == "null":
    ctypes.string_at(0)
else:
    print("waiting", flush=True)
    time.sleep(30)
"""

KINDS = ["null", "ud2"] if platform.machine() in ("x86_64", "AMD64") else ["null"]


def run_child(what: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", CHILD, what], capture_output=True, text=True, timeout=30,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return p.returncode, p.stdout


@pytest.mark.parametrize("what", KINDS)
def test_a_fault_is_reported_once_and_the_child_still_dies_by_it(what):
    rc, out = run_child(what)
    expected = signal.SIGILL if what == "ud2" else signal.SIGSEGV
    assert rc == -expected, (rc, out)
    lines = [line for line in out.splitlines() if line.startswith("FAULT ")]
    assert len(lines) == 1, out
    info = fault.parse(lines[0])
    assert info["signal"] == expected.name
    assert int(info["addr"], 16) == 0 if what == "null" else int(info["addr"], 16) > 0
    if what == "ud2":  # an anonymous executable page: the map names no library file
        assert info["library"] in ("/dev/zero (deleted)", "[anonymous]"), info
    assert expected.name in fault.describe(info)


def test_a_signal_sent_by_another_process_names_the_sender():
    p = subprocess.Popen([sys.executable, "-c", CHILD, "wait"], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "waiting"
    os.kill(p.pid, signal.SIGILL)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == -signal.SIGILL
    info = fault.parse(out.strip().splitlines()[-1])
    assert info == {"signal": "SIGILL", "sender_pid": os.getpid()}
    assert fault.describe(info) == f"SIGILL was sent by process {os.getpid()}"


def test_where_maps_an_address_to_its_library():
    maps = ("7f0000000000-7f0000100000 r-xp 00002000 08:01 123 /usr/lib/libggml-cpu.so\n"
            "7f0000200000-7f0000201000 rw-p 00000000 00:00 0\n")
    assert fault.where(0x7F0000000010, maps) == ("/usr/lib/libggml-cpu.so", 0x2010)
    assert fault.where(0x7F0000200008, maps) == ("[anonymous]", 8)
    assert fault.where(0x10, maps) == ("[unmapped]", 0x10)


def test_explain_gives_the_remedy_for_sigill_and_the_last_words_for_an_exit():
    report = {"signal": "SIGILL", "addr": "0x7f01", "library": "/x/libggml-cpu.so", "offset": "0x1234"}
    text = explain("engine", -signal.SIGILL, "proving", report, "")
    assert "killed by SIGILL before it was ready during its test computation" in text
    assert "libggml-cpu.so+0x1234" in text
    assert "cannot execute" in text and "-m zswarm.install --rebuild" in text
    text = explain("engine", 2, "loading", None, "cannot load the model: bad magic")
    assert text == ("the engine exited with status 2 before it was ready while loading the model: "
                    "cannot load the model: bad magic")
