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

from .token import Token, TokenError, validate_endpoint


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
    # The value, or the file it names, gives access to the cluster or the API: no child process
    # inherits any of its variables (SECRET_ENVS; apply_secret_files warns of one in argv).
    secret: bool = False
    shown_default: str = ""  # how --help shows the default, when not as the value itself (1TiB)

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


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ConfigError(f"expected a positive number, got {text!r}")
    return value


NODE_OPTIONS: list[Opt] = [
    Opt("token", ("--token",), ("ZSWARM_TOKEN", "LOCALAI_P2P_TOKEN", "P2P_TOKEN", "TOKEN"), None,
        "cluster token (`zswarm token new` makes one); never logged. On the command line every local "
        "user can read it (ps): prefer ZSWARM_TOKEN or --token-file", metavar="TOKEN", secret=True),
    Opt("token_file", ("--token-file",), ("ZSWARM_TOKEN_FILE",), None,
        "read the cluster token from this file (keep it mode 0600); instead of --token",
        metavar="PATH", secret=True),
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
    # What one member can make a node hold (trust.py): forged identities are cheap for a token
    # holder, descriptors and routing entries are not.
    Opt("max_nodes", ("--max-nodes",), ("ZSWARM_MAX_NODES",), 256,
        "nodes this node holds at most; more are refused and counted (members_capped)",
        parse=parse_positive_int, metavar="N"),
    Opt("max_introduced", ("--max-introduced",), ("ZSWARM_MAX_INTRODUCED",), 64,
        "nodes one peer may make this node learn of before they are heard from directly",
        parse=parse_positive_int, metavar="N"),
    Opt("name", ("--name",), ("ZSWARM_NAME",), None,
        "a name for this node (default: the host name and the start of the node id, e.g. vm-3f2a)",
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


def parse_size_or_zero(text: str) -> int:
    from .sharding import parse_size

    value = parse_size(text)
    if value < 0:
        raise ConfigError(f"expected a size, got {text!r}")
    return value


SERVE_OPTIONS: list[Opt] = [
    Opt("model", ("--model",), ("ZSWARM_MODEL", "MODEL_PATH"), None,
        "GGUF model file to serve, or the name (or sha256) of a model a peer holds: with --p2p it is "
        "fetched from the peers into the models directory (default: the embedded SmolLM2-135M-Instruct)",
        metavar="PATH|NAME"),
    Opt("ctx_size", ("--ctx-size",), ("ZSWARM_CTX_SIZE", "CONTEXT_SIZE"), 2048,
        "context size in tokens, per request slot", parse=parse_positive_int, metavar="N"),
    Opt("threads", ("--threads",), ("ZSWARM_THREADS", "THREADS"), 0,
        "CPU threads for inference (0: one per core)", parse=int, metavar="N"),
    Opt("parallel", ("--parallel",), ("ZSWARM_PARALLEL", "LLAMACPP_PARALLEL"), 1,
        "requests generated at once (each slot holds its own context)", parse=parse_positive_int, metavar="N"),
    # KV states of recent prompts, kept so that a conversation's next turn (or an agent's fixed
    # system prompt) is not evaluated again; prefix-affinity routing sends those requests here
    Opt("prompt_cache", ("--prompt-cache",), ("ZSWARM_PROMPT_CACHE",), 256 << 20,
        "memory for saved prompt states, over all slots (0: each slot keeps only its last prompt)",
        parse=parse_size_or_zero, metavar="SIZE", shown_default="256MiB"),
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
                 "memory this node lends to the model, e.g. 2GiB",
                 parse=parse_size_opt, metavar="SIZE", shown_default="what is available")

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
    # A worker's memory claim decides how many layers it gets: a liar or a typo (--mem 2TiB)
    # would take every layer. Claims are also clamped to what the worker's RPC server reports.
    Opt("max_worker_mem", ("--max-worker-mem",), ("ZSWARM_MAX_WORKER_MEM",), 1 << 40,
        "worker mode: the most memory one worker's claim counts for in the split", parse=parse_size_opt,
        metavar="SIZE", shown_default="1TiB"),
]

# Models travel (depot/): what a server fetched from its peers, and what it gives them.
MODELS_OPTIONS: list[Opt] = [
    Opt("models_dir", ("--models-dir",), ("ZSWARM_MODELS_DIR",), None,
        "where models fetched from peers are kept", metavar="DIR", shown_default="STATE_DIR/models"),
    Opt("models_max", ("--models-max",), ("ZSWARM_MODELS_MAX",), 0,
        "the most the models directory may hold; a fetch that would pass it is refused (0: no cap)",
        parse=parse_size_or_zero, metavar="SIZE"),
    # A peer's fetch must not starve this node's inference: CURVE at full speed takes a core here.
    Opt("share_rate", ("--share-rate",), ("ZSWARM_SHARE_RATE",), 64 << 20,
        "bytes per second this node sends to peers fetching a model from it, all of them together "
        "(0: no limit)", parse=parse_size_or_zero, metavar="SIZE", shown_default="64MiB"),
]

WORKER_OPTIONS: list[Opt] = [
    MEM_OPTION,
    SERVE_OPTIONS[2],  # --threads
    Opt("cache_dir", ("--cache-dir",), ("ZSWARM_CACHE_DIR",), None,
        "the tensor cache, so a reload does not resend large tensors", metavar="DIR",
        shown_default="STATE/tensor-cache"),
    Opt("cache_max", ("--cache-max",), ("ZSWARM_CACHE_MAX",), 4 << 30,
        "the tensor cache's bound: its oldest files go at each start (0: no tensor cache)",
        parse=parse_size_or_zero, metavar="SIZE", shown_default="4GiB"),
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
        parse=parse_list, metavar="KEY", extra={"action": "append"}, secret=True),
    Opt("api_key_file", ("--api-key-file",), ("ZSWARM_API_KEY_FILE",), None,
        "also accept the keys in this file: one a line, blank lines and # comments ignored (keep it "
        "mode 0600)", metavar="PATH", secret=True),
    Opt("policy", ("--policy",), ("ZSWARM_POLICY",), "prefix",
        "how to pick a node: prefix (the node whose engine has the prompt's start cached, unless it is "
        "busier; else by expected time to answer), p2c (least in flight of two random nodes), least-busy, "
        "round-robin, random",
        metavar="POLICY", extra={"choices": ["prefix", "p2c", "least-busy", "round-robin", "random"]}),
    Opt("target_node", ("--target-node",), ("ZSWARM_TARGET_NODE", "LOCALAI_TARGET_WORKER"), "",
        "send every request to this node (id or name)", metavar="ID"),
    Opt("http_workers", ("--http-workers",), ("ZSWARM_HTTP_WORKERS",), 1,
        "gunicorn worker processes for the API", parse=parse_positive_int, metavar="N"),
    Opt("request_timeout_s", ("--request-timeout",), ("ZSWARM_REQUEST_TIMEOUT_S",), DEFAULT_REQUEST_TIMEOUT_S,
        "seconds a request may take, queueing included, before the client gets 504 (a request may "
        "ask for another with the X-Zswarm-Timeout header)", parse=parse_seconds, metavar="SECONDS"),
]


ALL_OPTIONS: list[Opt] = (NODE_OPTIONS + SERVER_OPTIONS + SERVE_OPTIONS + SHARD_OPTIONS + MODELS_OPTIONS
                           + WORKER_OPTIONS + HTTP_OPTIONS)

# Every variable that can carry the token or an API key (or name a file of them): stripped from
# the environment every child inherits (actors/supervisor.py). Derived from the declarations
# above, so a new alias of a secret option is stripped too.
SECRET_ENVS: frozenset[str] = frozenset(e for o in ALL_OPTIONS if o.secret for e in o.envs)


def add_options(parser: argparse.ArgumentParser, opts: list[Opt]) -> None:
    for o in opts:
        envs = ", ".join(o.envs)
        shown = "off" if o.is_switch else (o.shown_default or (o.default if o.default not in (None, []) else "none"))
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


# --- secrets given by file -------------------------------------------------------------------

# A token is under 100 bytes and a key file a few lines: reading more than this means the path
# names something else (a device such as /dev/zero, a log file), not a forgotten long key.
MAX_SECRET_FILE_BYTES = 64 * 1024
_KEY_CHARS = re.compile(r"^[^\s,]+$")  # the HTTP child gets the keys comma-separated


def read_secret_file(path: str, what: str) -> str:
    """The text of ``path``; ConfigError (one line, naming the file, never its content) if it
    cannot be read or holds nothing."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"the {what} file {path} is over {MAX_SECRET_FILE_BYTES // 1024} KiB: "
                          "is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} file {path} is not text") from None
    return text


def parse_token_file(path: str) -> str:
    """The token text in ``path``: the whole file, surrounding whitespace stripped."""
    text = read_secret_file(path, "token").strip()
    if not text:
        raise ConfigError(f"the token file {path} is empty")
    try:
        Token.parse(text)
    except TokenError as e:
        raise ConfigError(f"the token file {path} holds no valid token: {e}") from None
    return text


def parse_api_key_file(path: str) -> list[str]:
    """The keys in ``path``: one a line; blank lines and lines starting with # are skipped."""
    keys = []
    for n, line in enumerate(read_secret_file(path, "API key").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _KEY_CHARS.match(line):  # never show the line: it may be a key with a typo
            raise ConfigError(f"the API key file {path}, line {n}: a key has no spaces or commas")
        keys.append(line)
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key")
    return keys


def open_to_others(path: str) -> str:
    """A warning if other users than the owner may read or change ``path``; "" if not."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return ""
    if not mode & 0o077:
        return ""
    return f"{path} is open to other users (mode {mode:04o}): chmod 600 {path}"


def _given(ns: argparse.Namespace, o: Opt, environ: dict[str, str]) -> str | None:
    """Where option ``o`` was given: its flag, the first of its variables that is set, or None."""
    if getattr(ns, o.dest, None) is not None:
        return o.flags[0]
    return next((e for e in o.envs if environ.get(e, "") != ""), None)


def given(ns: argparse.Namespace, dest: str, environ: dict[str, str] | None = None) -> str | None:
    """Where option ``dest`` was given (its flag or variable), or None: its default."""
    return _given(ns, _opt(dest), os.environ if environ is None else environ)


def _opt(dest: str) -> Opt:
    return next(o for o in ALL_OPTIONS if o.dest == dest)


def apply_secret_files(ns: argparse.Namespace, cfg: dict[str, Any],
                       environ: dict[str, str] | None = None) -> list[str]:
    """Complete ``cfg`` (from :func:`resolve`) with the token and API keys given by file, and set
    ``cfg["token_source"]`` (what the token came from, for error lines). Returns the warnings to
    show (a file open to other users, a secret on the command line). Raises ConfigError.

    The token is given one way: --token and --token-file together, or ZSWARM_TOKEN (or an
    alias) and ZSWARM_TOKEN_FILE together, are an error; a flag beats the environment, as for
    every option. The keys of --api-key-file are added to those of --api-key."""
    environ = os.environ if environ is None else environ
    warnings: list[str] = []
    if "token" in cfg:
        by_value, by_file = _given(ns, _opt("token"), environ), _given(ns, _opt("token_file"), environ)
        if by_value and by_file and by_value.startswith("--") == by_file.startswith("--"):
            raise ConfigError(f"{by_value} and {by_file} both give the token: give it one way")
        cfg["token_source"] = by_value or by_file or "--token"
        if by_file and (not by_value or by_file.startswith("--")):
            path = cfg["token_file"]
            cfg["token"], cfg["token_source"] = parse_token_file(path), f"{by_file} {path}"
            if w := open_to_others(path):
                warnings.append(f"the token file {w}")
        elif by_value == "--token":
            warnings.append("the token given with --token is visible to every local user in the process "
                            "list (ps, /proc/PID/cmdline): set ZSWARM_TOKEN or use --token-file instead")
    if cfg.get("api_key_file"):
        path = cfg["api_key_file"]
        cfg["api_keys"] = list(dict.fromkeys([*cfg.get("api_keys", []), *parse_api_key_file(path)]))
        if w := open_to_others(path):
            warnings.append(f"the API key file {w}")
    if getattr(ns, "api_keys", None) is not None:
        warnings.append("API keys given with --api-key are visible to every local user in the process "
                        "list (ps, /proc/PID/cmdline): set ZSWARM_API_KEYS or use --api-key-file instead")
    return warnings
