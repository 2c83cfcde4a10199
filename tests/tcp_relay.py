"""A TCP relay on 127.0.0.1 that tests switch between forwarding and failing.

The relay runs on the test's event loop, between the app and the moto server, so
a test can make a real S3 endpoint refuse connections or stop responding, then
bring it back, without touching the app.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

# Modes of the relay.
FORWARD = "forward"
# Nothing listens on the port, so connects are refused (ECONNREFUSED).
REFUSE = "refuse"
# Connections are accepted and read, but no byte is ever sent back.
STALL = "stall"

CHUNK_BYTES = 64 * 1024

# Upper bound for closing the listener and the connections on a mode switch or
# at teardown, in seconds.
CLOSE_TIMEOUT = 5.0


class TcpRelay:
    """Relay TCP connections from a free 127.0.0.1 port to `target_host:target_port`.

    The port stays the same across mode switches: `refuse` closes the listening
    socket and `forward` or `stall` bind it again. Switching to `refuse` closes
    every open connection. Switching to `stall` keeps open connections but stops
    relaying on them, as a hung server would. `connection_count` is the number of
    connections accepted since the start, so a test can count a client's attempts.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0
        self.mode = FORWARD
        self.connection_count = 0
        self._stall_prefix: bytes | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._listen()

    async def set_mode(self, mode: str) -> None:
        if mode not in (FORWARD, REFUSE, STALL):
            raise ValueError(f"unknown relay mode {mode!r}; use {FORWARD}, {REFUSE} or {STALL}")
        self.mode = mode
        if mode == REFUSE:
            await self._shut_down()
        elif self._server is None:
            await self._listen()

    def stall_on(self, prefix: bytes) -> None:
        """Switch to `stall` when a client sends a chunk that starts with `prefix`.

        The chunk is dropped, so a request that starts with it, such as
        `b"PUT "`, never reaches the server.
        """
        self._stall_prefix = prefix

    async def close(self) -> None:
        await self._shut_down()

    async def _listen(self) -> None:
        # Port 0 picks a free port the first time. Later binds reuse that port,
        # which asyncio allows right after a close because it sets SO_REUSEADDR.
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shut_down(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        if server is not None:
            # From Python 3.12, wait_closed also waits for the connections to
            # end, so it comes after they are closed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connection_count += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if self.mode == STALL:
                await _discard(reader)
            else:
                await self._relay(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            # The cancel comes from _shut_down. It stops here, because asyncio's
            # stream server (Python 3.11) logs a cancelled handler as an error.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer, from_client=True)),
            asyncio.create_task(self._pump(upstream_reader, client_writer, from_client=False)),
        ]
        try:
            # An error in either direction ends the whole connection.
            await asyncio.gather(*pumps)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.wait(pumps, timeout=CLOSE_TIMEOUT)
            upstream_writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        """Copy bytes until end of stream, dropping them while the relay stalls."""
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                break
            # A request starts a new chunk, because an HTTP/1.1 client without
            # pipelining sends it only after the previous response has arrived.
            if from_client and self._stall_prefix is not None and data.startswith(self._stall_prefix):
                self._stall_prefix = None
                self.mode = STALL
            if self.mode != FORWARD:
                continue
            writer.write(data)
            await writer.drain()
        # Half-close, so the other side receives the end of stream. The connection is
        # closed for good when the other direction ends too.
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(CHUNK_BYTES):
        pass


@contextlib.asynccontextmanager
async def running_relay(target_url: str) -> AsyncIterator[TcpRelay]:
    """Start a relay to the `http://host:port` server and close it on exit."""
    host, _, port = target_url.removeprefix("http://").rstrip("/").rpartition(":")
    relay = TcpRelay(host, int(port))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()
