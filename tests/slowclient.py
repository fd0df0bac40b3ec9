"""A slow HTTP client: half a request, then one more header byte per ``trickle_s``. Used by
tests/test_http_security.py and benchmarks/slow_clients.py."""

from __future__ import annotations

import socket
import threading
import time


class SlowHeaders(threading.Thread):
    """Notes when it connected and how long after that the server cut it off (None: never)."""

    def __init__(self, port: int, stop: threading.Event, trickle_s: float = 1.0):
        super().__init__(daemon=True)
        self.port, self.stop, self.trickle_s = port, stop, trickle_s
        self.connected: float | None = None
        self.cut_after_s: float | None = None

    def run(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            return  # never connected: ``connected`` stays None
        self.connected = time.monotonic()
        try:
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nX-Slow: ".encode())
            s.settimeout(self.trickle_s)
            while not self.stop.is_set():
                try:
                    if s.recv(1) == b"":
                        break  # the server closed it
                except socket.timeout:
                    pass
                s.send(b"a")
            else:
                return
        except OSError:
            pass  # reset by the server
        finally:
            s.close()
        self.cut_after_s = time.monotonic() - self.connected
