"""Command-line options, their environment variables, and how a value is chosen.

Each option is declared once, in :data:`NODE_OPTIONS` (or a command's own list): its flag, the
environment variables that may set it (``ZSWARM_*`` first, then LocalAI's names so a LocalAI
user's scripts keep working), its default and why. Precedence: flag, then the first variable
that is set, then the default. ``--help`` prints all three.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from .token import TokenError, validate_endpoint


class ConfigError(ValueError):
    """A setting that cannot be used; one line for the user."""


TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in TRUE:
        return True
    if t in FALSE:
        return False
    raise ConfigError(f"expected a boolean (true/false), got {text!r}")


_MULTIADDR = re.compile(r"^/(ip4|ip6|dns4|dns6|dns)/([^/]+)/(tcp|udp)/(\d+)")


def parse_hostport(text: str, allow_port_zero: bool = False) -> str:
    """``HOST:PORT``, or a libp2p multiaddr such as LocalAI takes (``/ip4/1.2.3.4/tcp/4001``)."""
    text = text.strip()
    m = _MULTIADDR.match(text)
    if m:
        host = f"[{m.group(2)}]" if m.group(1) == "ip6" else m.group(2)
        text = f"{host}:{m.group(4)}"
    try:
        return validate_endpoint(text, allow_port_zero)
    except TokenError as e:
        raise ConfigError(str(e)) from None


def parse_hostport_list(text: str) -> list[str]:
    return [parse_hostport(p) for p in re.split(r"[,\s]+", text) if p.strip()]


def parse_list(text: str) -> list[str]:
    return [p for p in re.split(r"[,\s]+", text) if p]


@dataclass
class Opt:
    dest: str
    flags: tuple[str, ...]
    envs: tuple[str, ...]
    default: Any
    help: str
    parse: Callable[[str], Any] | None = str  # None: a switch (store_true)
    metavar: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_switch(self) -> bool:
        return self.parse is None


def default_state_dir(role: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "zswarm", role)


DEFAULT_P2P_PORT = 7340
# The longest a request may be given (a day): a typo such as 6e9 would make a hung request live forever.
MAX_REQUEST_TIMEOUT_S = 86400.0
# A request's default timeout: the official OpenAI clients wait 600 s by default, so the cluster
# stops working on an answer about when its client stops waiting for it.
DEFAULT_REQUEST_TIMEOUT_S = 600.0


def parse_seconds(text: str) -> float:
    """A positive number of seconds, at most MAX_REQUEST_TIMEOUT_S."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_REQUEST_TIMEOUT_S:
        raise ConfigError(f"expected seconds between 0 and {MAX_REQUEST_TIMEOUT_S:g}, got {text!r}")
    return value


def parse_seconds_or_off(text: str) -> float:
    """A bound in seconds, 0 meaning "no bound"."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number of seconds >= 0 (0: off), got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise ConfigError(f"expected a number of seconds >= 0 (0: off), got {text!r}")
    return value


NODE_OPTIONS: list[Opt] = [
    Opt("token", ("--token",), ("ZSWARM_TOKEN", "LOCALAI_P2P_TOKEN", "P2P_TOKEN", "TOKEN"), None,
        "cluster token (`zswarm token new` makes one); never logged", metavar="TOKEN"),
    Opt("state_dir", ("--state-dir",), ("ZSWARM_STATE_DIR",), None,
        "where the node keeps its id and admin socket (default: ~/.local/state/zswarm/ROLE)", metavar="DIR"),
    Opt("p2p_listen", ("--p2p-listen",), ("ZSWARM_P2P_LISTEN", "LOCALAI_P2P_LISTEN_MADDRS"),
        f"0.0.0.0:{DEFAULT_P2P_PORT}",
        "where the node's ZeroMQ sockets bind; port 0 picks free ports; later sockets take the next ports",
        parse=lambda s: parse_hostport(s, allow_port_zero=True), metavar="HOST:PORT"),
    Opt("advertise", ("--p2p-advertise",), ("ZSWARM_P2P_ADVERTISE", "LOCALAI_P2P_DHT_ANNOUNCE_MADDRS"), None,
        "address peers should dial (default: the listen host, or this host's first non-loopback IPv4 "
        "address when listening on 0.0.0.0)", metavar="HOST"),
    Opt("bootstrap", ("--bootstrap",), ("ZSWARM_BOOTSTRAP", "LOCALAI_P2P_BOOTSTRAP_PEERS_MADDRS"), [],
        "peers to dial at start, comma-separated (added to those the token carries)",
        parse=parse_hostport_list, metavar="HOST:PORT[,...]"),
    Opt("no_mdns", ("--no-mdns",), ("ZSWARM_NO_MDNS",), False,
        "do not announce or browse on mDNS (multicast DNS)", parse=None),
    Opt("mdns_interfaces", ("--mdns-interface",), ("ZSWARM_MDNS_INTERFACES",), [],
        "only announce and browse mDNS on the interfaces with these IPv4 addresses (default: all)",
        parse=parse_list, metavar="ADDR[,...]"),
    Opt("local_only", ("--local-only",), ("ZSWARM_LOCAL_ONLY", "LOCALAI_P2P_DISABLE_DHT"), False,
        "local discovery only: find peers by mDNS, ignore bootstrap peers and those in the token",
        parse=None),
    Opt("name", ("--name",), ("ZSWARM_NAME",), None, "a name for this node (default: the host name)",
        metavar="NAME"),
    Opt("log_level", ("--log-level",), ("ZSWARM_LOG_LEVEL", "LOCALAI_P2P_LOGLEVEL"), "info",
        "debug, info, warning or error", parse=lambda s: s.strip().lower(), metavar="LEVEL"),
    # A healthy child beats every second from a thread of its own, whatever it is doing (model
    # code releases the GIL); 10 s of silence is ten missed beats, which a loaded 2-core machine
    # never produced here, and a frozen engine holds requests no longer than that.
    Opt("child_hang_s", ("--child-hang",), ("ZSWARM_CHILD_HANG_S",), 10.0,
        "seconds without a heartbeat after which the engine or RPC server child counts as hung and "
        "is killed and restarted (0: never)", parse=parse_seconds_or_off, metavar="SECONDS"),
    # The engine's progress is counted per batch of up to 512 prompt tokens, or per generated
    # token; one batch of a 7B model on two slow cores takes tens of seconds, so the bound is
    # minutes, not seconds. Raise it for bigger models on small machines.
    Opt("child_stuck_s", ("--child-stuck",), ("ZSWARM_CHILD_STUCK_S",), 120.0,
        "seconds the engine may hold requests without evaluating a token before it counts as stuck "
        "and is killed and restarted (0: never)", parse=parse_seconds_or_off, metavar="SECONDS"),
]

SERVER_OPTIONS: list[Opt] = [
    Opt("p2p", ("--p2p",), ("ZSWARM_P2P", "LOCALAI_P2P"), False,
        "join a cluster (without --token, a new token is generated and printed)", parse=None),
    Opt("federated", ("--federated",), ("ZSWARM_FEDERATED", "LOCALAI_FEDERATED"), False,
        "also serve requests routed from the cluster (federated mode)", parse=None),
]


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ConfigError(f"expected a positive number, got {text!r}")
    return value


SERVE_OPTIONS: list[Opt] = [
    Opt("model", ("--model",), ("ZSWARM_MODEL", "MODEL_PATH"), None,
        "GGUF model file to serve (default: the embedded SmolLM2-135M-Instruct)", metavar="PATH"),
    Opt("ctx_size", ("--ctx-size",), ("ZSWARM_CTX_SIZE", "CONTEXT_SIZE"), 2048,
        "context size in tokens, per request slot", parse=parse_positive_int, metavar="N"),
    Opt("threads", ("--threads",), ("ZSWARM_THREADS", "THREADS"), 0,
        "CPU threads for inference (0: one per core)", parse=int, metavar="N"),
    Opt("parallel", ("--parallel",), ("ZSWARM_PARALLEL", "LLAMACPP_PARALLEL"), 1,
        "requests generated at once (each slot holds its own context)", parse=parse_positive_int, metavar="N"),
]

def parse_rpc_listen(text: str) -> str:
    """``IPV4:PORT`` for llama.cpp's RPC server, which binds a literal IPv4 address only
    (``localhost`` is taken as 127.0.0.1): anything else would only fail later, in its child."""
    hostport = parse_hostport(text)
    host, port = hostport.rsplit(":", 1)
    host = "127.0.0.1" if host == "localhost" else host
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"{host} is not an IPv4 address: llama.cpp's RPC server binds IPv4 only "
                          f"(for this machine alone, use 127.0.0.1)") from None
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Does ``host`` (an address, [v6] or not, or "localhost") name this machine only?"""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_size_opt(text: str) -> int:
    from .sharding import parse_size

    value = parse_size(text)
    if value <= 0:
        raise ConfigError(f"expected a positive size, got {text!r}")
    return value


MEM_OPTION = Opt("mem", ("--mem",), ("ZSWARM_MEM",), 0,
                 "memory this node lends to the model, e.g. 2GiB (default: what is available)",
                 parse=parse_size_opt, metavar="SIZE")

SHARD_OPTIONS: list[Opt] = [
    Opt("rpc_servers", ("--rpc-servers",), ("ZSWARM_RPC_SERVERS", "LLAMACPP_GRPC_SERVERS"), [],
        "static worker mode: split the model over these llama.cpp RPC servers (no token needed)",
        parse=parse_hostport_list, metavar="HOST:PORT[,...]"),
    Opt("no_local_layers", ("--no-local-layers",), ("ZSWARM_NO_LOCAL_LAYERS",), False,
        "worker mode: put every layer on the workers, none in this server's memory", parse=None),
    MEM_OPTION,
    Opt("reshard_settle_s", ("--reshard-settle",), ("ZSWARM_RESHARD_SETTLE_S",), 5.0,
        "worker mode: seconds between re-shards at most (joins and leaves come in bursts)",
        parse=float, metavar="SECONDS"),
]

WORKER_OPTIONS: list[Opt] = [
    MEM_OPTION,
    SERVE_OPTIONS[2],  # --threads
    Opt("cache_dir", ("--cache-dir",), ("ZSWARM_CACHE_DIR",), None,
        "keep a tensor cache here so a reload does not resend the weights", metavar="DIR"),
    Opt("no_p2p", ("--no-p2p",), ("ZSWARM_NO_P2P",), False,
        "static mode: no cluster; the RPC server listens on --listen for a server's --rpc-servers",
        parse=None),
    Opt("listen", ("--listen",), ("ZSWARM_RPC_LISTEN",), "127.0.0.1:50052",
        "static mode: where the RPC server listens, an IPv4 address (it has no authentication: keep it "
        "on a trusted network)", parse=parse_rpc_listen, metavar="HOST:PORT"),
]

HTTP_OPTIONS: list[Opt] = [
    Opt("address", ("--address",), ("ZSWARM_ADDRESS", "LOCALAI_ADDRESS", "ADDRESS"), "127.0.0.1:8080",
        "where the OpenAI API listens", parse=parse_hostport, metavar="HOST:PORT"),
    Opt("api_keys", ("--api-key",), ("ZSWARM_API_KEYS", "LOCALAI_API_KEY", "API_KEY"), [],
        "require one of these keys (Authorization: Bearer KEY); repeat or comma-separate for several",
        parse=parse_list, metavar="KEY", extra={"action": "append"}),
    Opt("policy", ("--policy",), ("ZSWARM_POLICY",), "p2c",
        "how to pick a node: p2c (least in flight of two random nodes), least-busy, round-robin, random",
        metavar="POLICY", extra={"choices": ["p2c", "least-busy", "round-robin", "random"]}),
    Opt("target_node", ("--target-node",), ("ZSWARM_TARGET_NODE", "LOCALAI_TARGET_WORKER"), "",
        "send every request to this node (id or name)", metavar="ID"),
    Opt("http_workers", ("--http-workers",), ("ZSWARM_HTTP_WORKERS",), 1,
        "gunicorn worker processes for the API", parse=parse_positive_int, metavar="N"),
    Opt("request_timeout_s", ("--request-timeout",), ("ZSWARM_REQUEST_TIMEOUT_S",), DEFAULT_REQUEST_TIMEOUT_S,
        "seconds a request may take, queueing included, before the client gets 504 (a request may "
        "ask for another with the X-Zswarm-Timeout header)", parse=parse_seconds, metavar="SECONDS"),
]


def add_options(parser: argparse.ArgumentParser, opts: list[Opt]) -> None:
    for o in opts:
        envs = ", ".join(o.envs)
        shown = "off" if o.is_switch else (o.default if o.default not in (None, []) else "none")
        help_text = f"{o.help} [default: {shown}; env: {envs}]".replace("%", "%%")
        if o.is_switch:
            parser.add_argument(*o.flags, dest=o.dest, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(*o.flags, dest=o.dest, default=None, metavar=o.metavar, help=help_text, **o.extra)


def resolve(ns: argparse.Namespace, opts: list[Opt], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Pick each option's value: flag, then environment, then default. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for o in opts:
        raw = getattr(ns, o.dest, None)
        source = o.flags[0]
        if raw is None:
            for env in o.envs:
                if environ.get(env, "") != "":
                    raw, source = environ[env], env
                    break
        try:
            if raw is None:
                value = o.default
            elif o.is_switch:
                value = raw if isinstance(raw, bool) else parse_bool(raw)
            elif isinstance(raw, list):  # a repeatable flag
                value = [v for item in raw for v in o.parse(item)]
            else:
                value = o.parse(raw) if isinstance(raw, str) else raw
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
        out[o.dest] = value
    return out


def hostname() -> str:
    return socket.gethostname() or "node"
