"""A transparent TCP proxy that delays every byte by a fixed time, each way: a slow link for a
lab host, since the kernel here has no netem.

Run it inside the host's namespace (``python delayproxy.py PORT DELAY_MS``) and install
:func:`rules` there: nftables then redirects the host's TCP connections on the given ports, in
and out, to PORT; the proxy finds each connection's real destination (``SO_ORIGINAL_DST``) and
dials it with its own sockets marked ``MARK``, which the rules let through untouched. Each chunk
read on one side is written on the other ``DELAY_MS`` later, in order, so the host's round trips
grow by twice the delay and nothing else changes (no throughput cap, no loss: loss is
:meth:`netns.NetnsLab.lossy`).

Only connections opened after the rules are in place are redirected (NAT is decided at a
connection's first packet): reset older ones (``ss -K``) to move them onto the slow path.

Prints ``ready`` once listening; on SIGTERM prints how many connections it carried and exits
(the connections it carried end with it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys

MARK = 0x5A  # SO_MARK of the proxy's own outgoing sockets: the rules leave them alone
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def rules(own_addr: str, ports: list[int], proxy_port: int) -> str:
    """The nft script that sends the host's connections on ``ports`` (either way) to the proxy."""
    plist = ", ".join(str(p) for p in ports)
    return f"""table ip zs_delay {{
  chain inbound {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname != "lo" tcp dport {{ {plist} }} redirect to :{proxy_port}
  }}
  chain outbound {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK} return
    ip daddr != {{ 127.0.0.0/8, {own_addr} }} tcp dport {{ {plist} }} redirect to :{proxy_port}
  }}
}}
"""


class Proxy:
    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.carried = 0
        self.failed = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        dest = (socket.inet_ntoa(packed), port)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        up.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(up, dest), 10)
            up_reader, up_writer = await asyncio.open_connection(sock=up)
        except (OSError, asyncio.TimeoutError):
            self.failed += 1
            up.close()
            writer.close()
            return
        self.carried += 1
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk ``delay_s`` after it was read; EOF and errors too."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(65536):
                    queue.put_nowait((loop.time() + self.delay_s, data))
            except OSError:
                pass
            queue.put_nowait((loop.time() + self.delay_s, b""))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        except OSError:
            writer.close()  # the far side is gone: so is this connection, both ways
        finally:
            reading.cancel()


async def main(port: int, delay_ms: int) -> None:
    proxy = Proxy(delay_ms / 1000)
    server = await asyncio.start_server(proxy.handle, "0.0.0.0", port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    print(f"carried {proxy.carried} failed {proxy.failed}", flush=True)
    os._exit(0)  # the connections it carries end with it, as a link does; no task teardown noise


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
