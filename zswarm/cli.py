"""The ``zswarm`` command: server, federated, worker, token, admin, doctor.

User errors (a malformed token, a bad flag value, a port in use) print one line on stderr and
exit with status 2 (bad input) or 1 (could not run); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from . import __version__
from .config import (HTTP_OPTIONS, MODELS_OPTIONS, NODE_OPTIONS, SERVE_OPTIONS, SERVER_OPTIONS, SHARD_OPTIONS,
                     WORKER_OPTIONS, ConfigError, add_options, apply_secret_files, default_state_dir, given, hostname,
                     is_loopback, resolve)
from .token import Token, TokenError
from .trust import Limits

ROLES = {
    "server": "run a node that serves a model (and, with --p2p --federated, takes cluster requests)",
    "federated": "run a model-less entry point that routes each request to a federated node",
    "worker": "run a worker that lends its memory to a server's model",
}


class UserError(Exception):
    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def role_options(role: str) -> list:
    if role == "server":
        return NODE_OPTIONS + SERVER_OPTIONS + SERVE_OPTIONS + SHARD_OPTIONS + MODELS_OPTIONS + HTTP_OPTIONS
    if role == "federated":
        return NODE_OPTIONS + HTTP_OPTIONS
    return NODE_OPTIONS + WORKER_OPTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zswarm", description="A private LLM inference cluster.")
    p.add_argument("--version", action="version", version=f"zswarm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for role, text in ROLES.items():
        sp = sub.add_parser(role, help=text, description=text)
        add_options(sp, role_options(role))

    tp = sub.add_parser("token", help="make or inspect a cluster token")
    tsub = tp.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    tn = tsub.add_parser("new", help="print a new token")
    tn.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT",
                    help="an endpoint the token carries, so a node can join with the token alone (repeatable)")
    tn.add_argument("--operator-key", metavar="FILE", default=None,
                    help="write the operator key (it revokes machines and rotates the token; keep it) here "
                         "[default: ~/.config/zswarm/operator-FINGERPRINT.key, where `zswarm admin revoke` looks]")
    ti = tsub.add_parser("inspect", help="show what a token holds (never its secret)")
    ti.add_argument("token", metavar="TOKEN")
    ti.add_argument("--json", action="store_true", help="print JSON")

    dp = sub.add_parser("doctor", help="check this machine for running a node: llama.cpp, model, ports, token…",
                        description="Check this machine for running a node of ROLE (default server) with "
                                    "the given settings (the same flags and environment as the role takes). "
                                    "One line per check; exit status 1 if any check fails.")
    dsub = dp.add_subparsers(dest="doctor_role", metavar="ROLE")
    for role in ROLES:
        rp = dsub.add_parser(role, help=f"check for `zswarm {role}`")
        add_options(rp, role_options(role))
        rp.add_argument("--json", action="store_true", help="print JSON")

    ap = sub.add_parser("admin", help="talk to a running node through its admin socket")
    ap.add_argument("--state-dir", metavar="DIR", default=None,
                    help="the node's state directory [default: ~/.local/state/zswarm/ROLE; env: ZSWARM_STATE_DIR]")
    ap.add_argument("--role", choices=sorted(ROLES), default="server",
                    help="which default state directory to use when --state-dir is not given [default: server]")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer [default: 5]")
    ap.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for a node that is still starting [default: 0]")
    ap.add_argument("admin_command", metavar="COMMAND",
                    help="status, peers, ledger, help, log-level, token, models, pull MODEL, revoke NODE_ID, "
                         "rotate-token ...")
    ap.add_argument("admin_args", nargs="*", metavar="KEY=VALUE", help="arguments of the command")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--operator-key", metavar="FILE", default=None,
                    help="revoke, rotate-token: the operator key [default: the one `zswarm token new` wrote]")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"] and (len(argv) == 1 or argv[1] not in (*ROLES, "-h", "--help")):
        argv.insert(1, "server")  # `zswarm doctor [--flags]` checks for a server
    args = build_parser().parse_args(argv)
    try:
        if args.command == "token":
            return cmd_token(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "admin":
            return cmd_admin(args)
        return cmd_node(args)
    except UserError as e:
        print(f"zswarm: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


def cmd_token(args: argparse.Namespace) -> int:
    try:
        if args.token_command == "new":
            token = new_token(args.bootstrap, args.operator_key)
            print(token.encode())
            return 0
        token = Token.parse(args.token)
    except TokenError as e:
        raise UserError(str(e)) from None
    from .operator import fingerprint

    info = {"network_id": token.derive().network_id, "bootstrap": list(token.bootstrap),
            "operator": fingerprint(token.operator) if token.operator else None}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"network id: {info['network_id']}")
        print(f"bootstrap:  {', '.join(info['bootstrap']) or '(none)'}")
        print(f"operator:   {info['operator'] or '(none: this cluster cannot revoke)'}")
    return 0


def new_token(bootstrap: list[str], key_path: str | None = None, state_dir: str | None = None) -> Token:
    """A new token and its operator key, written (0600) where ``zswarm admin revoke`` finds it:
    ``key_path``, the state directory of the server that generated it, or the default place.
    The path goes to stderr (stdout is the token alone, for scripts)."""
    from .operator import OperatorKey, OperatorKeyError, generated_key_path

    key = OperatorKey.generate()
    token = Token.generate(bootstrap, key.public)  # TokenError for a bad endpoint, before any file
    try:
        path = key.save(key_path or (generated_key_path(state_dir, key.public) if state_dir else None))
    except OperatorKeyError as e:
        raise UserError(str(e), 1) from None
    print(f"zswarm: the operator key (it revokes machines: keep it safe) is in {path}", file=sys.stderr)
    return token


def _resolve(args: argparse.Namespace, role: str) -> tuple[dict[str, Any], list[str]]:
    """The settings of ``role`` from flags, environment, files and defaults, and the warnings to
    show about them; a bad value is one line."""
    try:
        cfg = resolve(args, role_options(role))
        return cfg, apply_secret_files(args, cfg)
    except ConfigError as e:
        raise UserError(str(e)) from None


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import FAIL, as_json, run_checks

    role = args.doctor_role
    cfg, _ = _resolve(args, role)
    checks = run_checks(role, cfg)
    if args.json:
        print(json.dumps(as_json(checks)))
    else:
        for c in checks:
            print(c.line(), flush=True)
    return 1 if any(c.status == FAIL for c in checks) else 0


def cmd_admin(args: argparse.Namespace) -> int:
    import os

    from .admin_client import AdminFailed, AdminUnavailable, call

    state_dir = args.state_dir or os.environ.get("ZSWARM_STATE_DIR") or default_state_dir(args.role)
    kwargs: dict[str, Any] = {}
    if args.admin_command in ("revoke", "rotate-token"):
        return cmd_rotate(args, state_dir)
    for item in args.admin_args:
        key, sep, value = item.partition("=")
        if not sep and args.admin_command == "pull" and "model" not in kwargs:
            key, sep, value = "model", "=", item  # zswarm admin pull NAME
        if not sep:
            raise UserError(f"admin arguments are KEY=VALUE, got {item!r}")
        kwargs[key] = value
    try:
        result = _call_waiting(call, AdminUnavailable, state_dir, args, kwargs)
    except AdminUnavailable as e:
        raise UserError(str(e), 1) from None
    except AdminFailed as e:
        raise UserError(str(e), 1) from None
    if args.json:
        print(json.dumps(result, indent=None, sort_keys=True))
    else:
        print(render(args.admin_command, result))
    return 0


def cmd_rotate(args: argparse.Namespace, state_dir: str) -> int:
    """``revoke NODE_ID...`` and ``rotate-token``: made here with the operator key (revoke.py)."""
    from .admin_client import AdminFailed, AdminUnavailable
    from .revoke import RevokeError, rotate

    ids = list(args.admin_args)
    if args.admin_command == "revoke" and not ids:
        raise UserError("zswarm admin revoke NODE_ID: name the node (its id or name; see `zswarm admin peers`)")
    if args.admin_command == "rotate-token" and ids:
        raise UserError("zswarm admin rotate-token takes no arguments (revoke NODE_ID rotates too)")
    try:
        result = rotate(state_dir, ids, args.operator_key, args.timeout)
    except (AdminUnavailable, AdminFailed, RevokeError) as e:
        raise UserError(str(e), 1) from None
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    for node_id in result["revoked_now"]:
        print(f"revoked {node_id}")
    print(f"the cluster moves to a new token (network {result['network']}, rotation {result['epoch']}), "
          f"sealed to {result['delivered']} member(s); `zswarm admin token` prints it")
    if result["left_out"]:
        print(f"not sealed to (no CURVE key in their record): {', '.join(result['left_out'])}; give them the new "
              "token by hand")
    return 0


def _call_waiting(call: Any, unavailable: type, state_dir: str, args: argparse.Namespace,
                  kwargs: dict[str, Any]) -> Any:
    """The admin command; with ``--wait``, tried again while no node answers yet (it is starting)."""
    import time

    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            return call(state_dir, args.admin_command, kwargs, timeout_s=args.timeout)
        except unavailable:
            if time.monotonic() + 0.2 > deadline:
                raise
            time.sleep(0.2)


def render(command: str, result: Any) -> str:
    if command == "peers" and isinstance(result, list):
        rows = [("ID", "NAME", "ROLE", "STATE", "LAST SEEN", "GOSSIP")]
        for p in result:
            rows.append((p["id"], p["name"], p["role"], p["state"], f"{p['last_seen_s']:.1f}s",
                         p.get("endpoints", {}).get("gossip", "")))
        return _table(rows)
    if command == "models" and isinstance(result, list):
        return render_models(result)
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        return "\n".join(f"{k.ljust(width)}  {json.dumps(v) if not isinstance(v, str) else v}"
                         for k, v in result.items())
    return json.dumps(result, indent=2) if not isinstance(result, str) else result


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_models(files: list[dict]) -> str:
    """``zswarm admin models``: one line per copy of each model file."""
    if not files:
        return "no node announces a model file"
    rows = [("MODEL", "SHA256", "SIZE", "NODE", "STATE", "COPY", "SERVING")]
    for f in files:
        for c in f["copies"]:
            rows.append((f["name"], f["sha256"][:12], f"{f['size'] / 1e6:.1f} MB", c["node_name"] or c["node"],
                         c["state"], "whole" if c["have"] == f["size"] else f"{c['percent']:.0f}%",
                         "yes" if c["serving"] else "no"))
    return _table(rows)


def cmd_node(args: argparse.Namespace) -> int:
    from .node import HttpSettings, NodeSettings, ServeSettings, WorkerSettings, run

    role = args.command
    cfg, warnings = _resolve(args, role)
    _setup_logging(cfg["log_level"])
    generated = False
    token = None
    if cfg["token"] and not cfg.get("no_p2p"):
        try:
            token = Token.parse(cfg["token"])
        except TokenError as e:
            raise UserError(f"{cfg['token_source']}: {e}") from None
    elif role == "server" and cfg["p2p"]:
        # its operator key goes in the state directory, where `zswarm admin revoke` looks too
        token, generated = new_token([], state_dir=cfg["state_dir"] or default_state_dir(role)), True
    elif role == "worker" and cfg["no_p2p"]:
        pass  # static mode: no cluster
    elif role != "server":
        raise UserError(f"zswarm {role} needs a cluster token: ZSWARM_TOKEN, --token-file or --token "
                        "(make one with `zswarm token new`)")
    for w in warnings:  # once the settings are known good: a mistake stays one line of error
        logging.getLogger("zswarm.cli").warning("%s", w)
    serve = http = None
    if role == "server":
        serve = ServeSettings(model=cfg["model"], ctx_size=cfg["ctx_size"], threads=cfg["threads"],
                              parallel=cfg["parallel"], prompt_cache=cfg["prompt_cache"],
                              rpc_servers=cfg["rpc_servers"],
                              local_layers=not cfg["no_local_layers"], mem=cfg["mem"],
                              reshard_settle_s=cfg["reshard_settle_s"], max_worker_mem=cfg["max_worker_mem"],
                              models_dir=cfg["models_dir"], models_max=cfg["models_max"],
                              share_rate=cfg["share_rate"])
    worker = None
    if role == "worker":
        worker = WorkerSettings(mem=cfg["mem"], threads=cfg["threads"], cache_dir=cfg["cache_dir"],
                                cache_max=cfg["cache_max"],
                                listen=cfg["listen"] if cfg["no_p2p"] else None)
        if worker.listen and not is_loopback(worker.listen.rsplit(":", 1)[0]):
            print(f"zswarm: WARNING: the RPC server will listen on {worker.listen} with NO authentication "
                  "and NO encryption; anyone who reaches it can run code on this machine. Use it only on a "
                  "trusted network, or use p2p mode (a token) where it is tunnelled over CURVE.",
                  file=sys.stderr)
    if role in ("server", "federated"):
        http = HttpSettings(address=cfg["address"], api_keys=cfg["api_keys"], workers=cfg["http_workers"],
                            request_timeout_s=cfg["request_timeout_s"])
    p2p_listen = cfg["p2p_listen"]
    if token is not None and given(args, "p2p_listen") is None:
        from .startup import free_p2p_listen

        p2p_listen = free_p2p_listen(p2p_listen)
        if p2p_listen != cfg["p2p_listen"]:
            logging.getLogger("zswarm.cli").warning(
                "port %s is in use (another node on this machine?): listening on %s instead; a node on another "
                "machine joins with --bootstrap HOST:%s", cfg["p2p_listen"].rsplit(":", 1)[1], p2p_listen,
                p2p_listen.rsplit(":", 1)[1])
    settings = NodeSettings(
        role=role, token=token, state_dir=cfg["state_dir"] or default_state_dir(role),
        p2p_listen=p2p_listen, advertise=cfg["advertise"], bootstrap=cfg["bootstrap"],
        mdns=not cfg["no_mdns"], mdns_interfaces=cfg["mdns_interfaces"], local_only=cfg["local_only"],
        name=cfg["name"] or hostname(), name_is_host=not cfg["name"], federated=bool(cfg.get("federated")),
        policy=cfg.get("policy") or "prefix", target_node=cfg.get("target_node") or "", serve=serve, http=http,
        worker=worker, child_hang_s=cfg["child_hang_s"], child_stuck_s=cfg["child_stuck_s"],
        limits=Limits(max_nodes=cfg["max_nodes"], per_sender=cfg["max_introduced"]))
    ready = None
    if generated:
        t = token.encode()
        # The token goes in the environment, not the command line, where every local user could read it.
        ready = ("zswarm: generated a new cluster token; join this cluster with:\n"
                 f"  ZSWARM_TOKEN={t} zswarm worker --bootstrap {{gossip_hostport}}\n"
                 f"  ZSWARM_TOKEN={t} zswarm server --p2p --federated --bootstrap {{gossip_hostport}}\n"
                 f"  ZSWARM_TOKEN={t} zswarm federated --bootstrap {{gossip_hostport}}\n"
                 "(or write the token to a file of mode 0600 and give it with --token-file FILE)")
    return run(settings, ready)


def _setup_logging(level: str) -> None:
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise UserError(f"--log-level: unknown level {level!r}")
    logging.basicConfig(level=value, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zeroconf").setLevel(max(value, logging.WARNING))
    # pykka logs, with a traceback, every exception it hands back to an ask()er; the asker
    # (node start-up) turns those into one clear line, so only show them when debugging.
    logging.getLogger("pykka").setLevel(max(value, logging.WARNING))
