"""Client for a node's admin socket: a DEALER that matches replies by id, with a timeout."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import zmq

from . import wire
from .state import StateDir

_ids = itertools.count(1)


class AdminUnavailable(RuntimeError):
    pass


class AdminFailed(RuntimeError):
    def __init__(self, code: int, message: str):
        super().__init__(f"error {code}: {message}")
        self.code = code


def call(state_dir: str, command: str, args: dict[str, Any] | None = None, timeout_s: float = 5.0) -> Any:
    """Run one admin command on the node whose state directory is ``state_dir``."""
    state = StateDir(state_dir)
    if not os.path.exists(state.admin_socket):
        raise AdminUnavailable(f"no node is running with state directory {state.path}")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(state.admin_endpoint)
        req_id = next(_ids)
        sock.send(wire.encode_json(wire.AdminRequest(command, req_id, args or {})))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(int(left * 1000)):
                break
            reply = wire.decode_admin_reply(sock.recv())
            if reply.id not in (req_id, 0):
                continue  # a late answer to an earlier request
            if not reply.ok:
                raise AdminFailed(reply.error.code if reply.error else 0, reply.error.message if reply.error else "")
            return reply.result
        raise AdminUnavailable(f"the node at {state.path} did not answer within {timeout_s} s")
    finally:
        sock.close()
