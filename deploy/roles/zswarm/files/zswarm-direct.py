"""Run zswarm nodes without systemd: start in the background with a pidfile, stop, restart.

For hosts where systemd is not PID 1 (containers, CI, the deploy tests). Ansible runs this
with the virtualenv's python (``zswarm_service_manager: direct``); it does for one node what
its systemd unit does:

    ensure   start the node unless it is running with the same configuration (idempotent)
    restart  stop, then start
    stop     SIGTERM to the node alone; after --timeout-s, SIGKILL to what is left of its
             process group (systemd's KillMode=mixed: the node stops its own children)
    status   running or not

A node's configuration is its command, its environment files (systemd's EnvironmentFile=
format, read in order, later ones win) and the installed zswarm package (its RECORD). A digest
of these is kept beside the pidfile; ``ensure`` restarts the node when it differs.

Each command prints one JSON object (``changed``, ``action``, ``pid``) for Ansible's
``changed_when`` and exits 0, or prints a reason on stderr and exits 1. Files, for a node ID
in RUN_DIR: ``ID.pid`` (the pid alone, as pidfiles go) and ``ID.json`` (pid, start time,
digest). The node's output is appended to --log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The node's own environment, as its unit gives it; the environment files add the rest.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
}


def read_env_file(path: str, required: bool) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; one level of quotes removed."""
    env: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if required:
            raise SystemExit(f"zswarm-direct: environment file {path} not found")
        return env
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def installed_record() -> str:
    """The installed zswarm's file list with hashes: changes whenever the package does."""
    from importlib import metadata

    try:
        return metadata.distribution("zswarm").read_text("RECORD") or ""
    except metadata.PackageNotFoundError:
        return ""


class Node:
    def __init__(self, args: argparse.Namespace):
        self.id = args.id
        self.run_dir = Path(args.run_dir)
        self.pidfile = self.run_dir / f"{args.id}.pid"
        self.statefile = self.run_dir / f"{args.id}.json"
        self.argv = [args.exec, args.role]
        self.env_files = args.env or []
        self.log = args.log
        self.timeout_s = args.timeout_s
        self.wait_s = args.wait_s

    # -- what is running ------------------------------------------------------------------
    def recorded(self) -> dict:
        try:
            return json.loads(self.statefile.read_text())
        except (FileNotFoundError, ValueError):
            pass
        try:  # a bare pidfile (written by something else): no start time, no digest
            return {"pid": int(self.pidfile.read_text().split()[0])}
        except (FileNotFoundError, ValueError, IndexError):
            return {}

    @staticmethod
    def start_time(pid: int) -> str | None:
        """The process's start time in clock ticks, or None if it is gone (zombies count as gone)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        return fields[19]

    def running_pid(self) -> int | None:
        """The node's pid if the recorded process is alive and is this node (not a reused pid)."""
        rec = self.recorded()
        pid = rec.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return None
        started = self.start_time(pid)
        if started is None:
            return None
        if rec.get("start_time") not in (None, started):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if self.argv[1].encode() not in cmdline or not any(a.endswith(b"zswarm") for a in cmdline):
            return None
        return pid

    # -- configuration ----------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        env = dict(BASE_ENV)
        env["PATH"] = f"{os.path.dirname(self.argv[0])}:{env['PATH']}"
        env["HOME"] = os.environ.get("HOME", "/")
        for path in self.env_files:
            env.update(read_env_file(path.lstrip("-"), required=not path.startswith("-")))
        return env

    def digest(self, env: dict[str, str]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"argv": self.argv, "env": env}, sort_keys=True).encode())
        h.update(installed_record().encode())
        return h.hexdigest()

    # -- actions ----------------------------------------------------------------------------
    def start(self, env: dict[str, str], digest: str) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        state_dir = env.get("ZSWARM_STATE_DIR")
        if state_dir:
            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.log, "ab") as log:
            log.write(f"--- zswarm-direct: starting {' '.join(self.argv)} at {time.ctime()}\n".encode())
            log.flush()
            # A session of its own: the node outlives this helper and Ansible, and its children
            # (engine, gunicorn) share its process group, which stop() can then kill as one.
            proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                    cwd=state_dir or "/")
        started = self.start_time(proc.pid)
        tmp = self.statefile.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "start_time": started, "digest": digest,
                                   "argv": self.argv}) + "\n")
        os.replace(tmp, self.statefile)
        self.pidfile.write_text(f"{proc.pid}\n")
        self.wait_ready(proc, state_dir)
        return proc.pid

    def wait_ready(self, proc: subprocess.Popen, state_dir: str | None) -> None:
        """Until the node's admin socket answers; fail if the node exits first."""
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.forget()
                raise SystemExit(f"zswarm-direct: {self.id} exited with status {proc.returncode} at start; "
                                 f"the end of {self.log}:\n{tail(self.log)}")
            if state_dir is None:
                return
            try:
                from zswarm.admin_client import call

                call(state_dir, "status", timeout_s=1.0)
                return
            except Exception:  # not up yet: no socket, or no answer
                time.sleep(0.2)
        raise SystemExit(f"zswarm-direct: {self.id} did not answer on its admin socket within "
                         f"{self.wait_s} s; the end of {self.log}:\n{tail(self.log)}")

    def stop(self) -> bool:
        pid = self.running_pid()
        if pid is None:
            self.forget()
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.timeout_s
        while self.start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)  # the node, if it hung, and whatever it left behind
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 5
        while self.start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.forget()
        return True

    def forget(self) -> None:
        for f in (self.pidfile, self.statefile):
            try:
                f.unlink()
            except FileNotFoundError:
                pass


def tail(path: str, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zswarm-direct", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["ensure", "restart", "stop", "status"])
    p.add_argument("--id", required=True, help="the node's name on this host: server, federated, worker-NAME")
    p.add_argument("--role", default="", help="server, federated or worker")
    p.add_argument("--exec", default="", help="the zswarm command (in the virtualenv)")
    p.add_argument("--env", action="append", metavar="FILE",
                   help="an environment file (repeatable; a leading - means it may be missing)")
    p.add_argument("--run-dir", required=True, help="where the pidfile lives")
    p.add_argument("--log", default="/dev/null", help="the node's output is appended here")
    p.add_argument("--timeout-s", type=float, default=45.0, help="SIGTERM grace before SIGKILL [45]")
    p.add_argument("--wait-s", type=float, default=60.0, help="how long a start may take [60]")
    args = p.parse_args(argv)
    if args.action in ("ensure", "restart") and not (args.role and args.exec):
        p.error(f"{args.action} needs --role and --exec")
    node = Node(args)

    if args.action == "status":
        pid = node.running_pid()
        out = {"changed": False, "action": "running" if pid else "stopped", "pid": pid}
    elif args.action == "stop":
        out = {"changed": node.stop(), "action": "stopped", "pid": None}
    else:
        env = node.environment()
        digest = node.digest(env)
        pid = node.running_pid()
        if args.action == "ensure" and pid and node.recorded().get("digest") == digest:
            out = {"changed": False, "action": "unchanged", "pid": pid}
        else:
            action = "restarted" if pid else "started"
            node.stop()
            out = {"changed": True, "action": action, "pid": node.start(env, digest)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
