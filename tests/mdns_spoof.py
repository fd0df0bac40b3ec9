"""An mDNS attacker for the tests, run inside a test's own network namespace.

``python mdns_spoof.py ADDR PORT``: zeroconf bound to ``ADDR`` only (the namespace's address,
never a real interface), and a TCP listener on ``ADDR:PORT`` that counts who connects (a node
tricked into dialling the attacker would). Commands are JSON lines on stdin, one JSON line of
answer each on stdout:

* ``{"op": "capture", "name": N}``: resolve service ``N``; its port and TXT properties (hex).
* ``{"op": "register", "name": N, "port": P, "addresses": [...], "properties": {...}}``: announce
  ``N`` (host name ``N`` too) with those records, the properties as ``capture`` gave them.
* ``{"op": "connections"}``: how many TCP connections the listener has accepted.

Needs only zeroconf: it imports nothing from zswarm.
"""

import json
import socket
import sys
import threading

from zeroconf import IPVersion, ServiceInfo, Zeroconf

SERVICE_TYPE = "_zswarm._tcp.local."


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    listener = socket.create_server((addr, port))
    accepted = []

    def accept() -> None:
        while True:
            conn, peer = listener.accept()
            accepted.append(peer)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    zc = Zeroconf(interfaces=[addr], ip_version=IPVersion.V4Only)
    try:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "capture":
                info = zc.get_service_info(SERVICE_TYPE, cmd["name"], timeout=5000)
                out = {"port": info.port, "addresses": info.parsed_addresses(),
                       "properties": {k.hex(): None if v is None else v.hex() for k, v in info.properties.items()}
                       } if info else {"error": "not found"}
            elif cmd["op"] == "register":
                props = {bytes.fromhex(k): None if v is None else bytes.fromhex(v)
                         for k, v in cmd["properties"].items()}
                zc.register_service(ServiceInfo(SERVICE_TYPE, cmd["name"], port=cmd["port"], properties=props,
                                                server=cmd["name"], parsed_addresses=cmd["addresses"]))
                out = {"ok": True}
            elif cmd["op"] == "connections":
                out = {"connections": len(accepted)}
            else:
                out = {"error": f"unknown op {cmd['op']!r}"}
            print(json.dumps(out), flush=True)
    finally:
        zc.close()


if __name__ == "__main__":
    main()
