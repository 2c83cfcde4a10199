"""Server helpers shared by the benchmark scripts: a free port, and waiting for a start."""

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path | None, timeout: float) -> None:
    """Poll `url` until it responds below 500, for at most `timeout` seconds.

    Raises RuntimeError, with the end of `log` if there is one, when the process
    exits first or the time runs out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with status {process.returncode} before responding{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not respond within {timeout:g} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None:
        return ""
    return ":\n" + log.read_text(errors="replace")[-2000:]
