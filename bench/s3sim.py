"""A scaled-down S3 in front of a real object store: each connection is capped and slow to answer.

S3 serves each connection at roughly 85-90 MB/s and answers every request after a first-byte
latency; total throughput grows with the number of connections a client keeps busy. This TCP
proxy reproduces that shape at a scale a small machine can carry: every client connection
gets its own upstream connection, each direction of it is paced to `--rate-mib` MiB/s, and
each response waits `--latency-ms` before its first byte. It does not parse HTTP: a response
starts when the server speaks after the client has (HTTP/1.1 clients do not pipeline), and an
interim `100 Continue` is passed on at once, as S3's is a round trip, not a full request.

    python bench/s3sim.py --upstream 127.0.0.1:8333 --port 9000 --rate-mib 4 --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from seaweed import free_port, stop, wait_for_port

CHUNK = 64 * 1024
INTERIM = b"HTTP/1.1 100"


@dataclass(frozen=True)
class Shape:
    rate_bytes: float
    latency: float


class Pace:
    """One direction of one connection: at most `rate` bytes per second on average."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_free = 0.0

    async def after_sending(self, nbytes: int) -> None:
        now = asyncio.get_running_loop().time()
        self.next_free = max(self.next_free, now) + nbytes / self.rate
        await asyncio.sleep(self.next_free - now)


class Link:
    """One client connection and its upstream connection."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.request_sent = False  # the client spoke since the last response began

    async def client_to_server(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        pace = Pace(self.shape.rate_bytes)
        while chunk := await reader.read(CHUNK):
            self.request_sent = True
            writer.write(chunk)
            await writer.drain()
            await pace.after_sending(len(chunk))
        writer.write_eof()

    async def server_to_client(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        pace = Pace(self.shape.rate_bytes)
        while chunk := await reader.read(CHUNK):
            if self.request_sent and not chunk.startswith(INTERIM):
                self.request_sent = False
                await asyncio.sleep(self.shape.latency)
            writer.write(chunk)
            await writer.drain()
            await pace.after_sending(len(chunk))
        writer.close()


async def relay(shape: Shape, upstream: tuple[str, int], client_reader: asyncio.StreamReader,
                client_writer: asyncio.StreamWriter) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    link = Link(shape)
    try:
        await asyncio.gather(link.client_to_server(client_reader, server_writer),
                             link.server_to_client(server_reader, client_writer))
    except (ConnectionError, OSError):
        pass  # either side hung up; the other is closed below
    finally:
        server_writer.close()
        client_writer.close()


async def serve(shape: Shape, upstream: tuple[str, int], port: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(shape, upstream, r, w), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


@contextmanager
def s3_simulation(upstream_url: str, rate_mib: float, latency_ms: float,
                  log: Path) -> Iterator[str]:
    """Runs the proxy as its own process (its CPU is the machine's, not a client's)."""
    host, port = upstream_url.removeprefix("http://").split(":")
    listen = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, "--upstream", f"{host}:{port}", "--port", str(listen),
             "--rate-mib", str(rate_mib), "--latency-ms", str(latency_ms)],
            stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(listen, process, log)
        yield f"http://127.0.0.1:{listen}"
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the object store")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate-mib", type=float, required=True,
                        help="MiB/s per connection and direction")
    parser.add_argument("--latency-ms", type=float, required=True,
                        help="wait before each response's first byte")
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    shape = Shape(rate_bytes=args.rate_mib * 2**20, latency=args.latency_ms / 1000)
    asyncio.run(serve(shape, (host, int(port)), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
