"""Least privilege and TLS, against real servers this module starts on free ports (never the shared one).

- ACL: a server loads ``ops/acl/users.acl`` as its ACL file, the three users README's "Redis users and TLS"
  documents; each role does its real work through the real code (an ``Ingestor`` fed by the simulator, a
  ``Consumer`` reading through its group and acking, ``market ctl``, ``status``, ``replay``) with nothing
  refused on the way (the server's ACL LOG stays empty), and each is refused what it must not do.  This server
  is the one the suite runs on (``MARKET_REDIS_SERVER``, so CI's second pass runs it on the bundled Valkey).
- TLS: a server with ``--tls-port`` and a certificate from a throwaway CA (``trustme``), the same ACL file
  loaded; the ingestor, the SDK and the CLI reach it over ``rediss://...?ssl_ca_certs=<ca.pem>`` as README's
  Configuration section writes it, and a wrong CA is one line, exit status 2.  The server is the first one
  found that is built with TLS (the suite's own first); none at all fails the tests, naming what was tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
import trustme
from redis.exceptions import NoPermissionError, ResponseError

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import control_state_key, heartbeat_set_key
from consumer_sdk.core.redis import connect_redis
from consumer_sdk.core.server import check_supported
from consumer_sdk.core.urls import validate_redis_url
from distributor.writer import StreamWriter
from ingestor.config import load_settings
from ingestor.service import Ingestor
from ops.redis_server import binary_version, bundled_redis_server, find_redis_server, free_port
from ops.simulator import Simulator, SimulatorConfig

ROOT = Path(__file__).resolve().parents[1]
ACL_FILE = ROOT / "ops" / "acl" / "users.acl"
ROLES = ("ingestor", "consumer", "operator")
TRADE = "md:binance:BTCUSDT:trade"
KLINE = "md:binance:BTCUSDT:kline_1m"
#: redis-py names itself on every connection (``CLIENT SETINFO``, Redis 7.2+ and Valkey) and ignores a refusal;
#: the ACL file cannot allow it, since Redis 7.0 does not know that subcommand (README says so)
IGNORED_REFUSALS = frozenset({"client|setinfo"})


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A private server: its ACL users' passwords, and the CA a client verifies it with (TLS only)."""

    process: subprocess.Popen[bytes]
    port: int
    binary: str
    passwords: dict[str, str]
    ca: str = ""
    wrong_ca: str = ""
    directory: str = ""

    def url(self, role: str | None = None, ca: str | None = None) -> str:
        """The URL a role connects with (``None``: the default user, the test's admin); over TLS the CA is
        ``ca`` when given (``""``: none), else the right one."""
        auth = f"market-{role}:{self.passwords[role]}@" if role else ""
        if not self.ca:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        ca = self.ca if ca is None else ca
        return f"rediss://{auth}127.0.0.1:{self.port}/0" + (f"?ssl_ca_certs={ca}" if ca else "")

    def env(self, role: str | None, ca: str | None = None) -> dict[str, str]:
        return {"MARKET_REDIS_URL": self.url(role, ca)}


def _admin(port: int, ca: str) -> redis.Redis:
    kwargs: dict[str, Any] = {"ssl": True, "ssl_ca_certs": ca} if ca else {}
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2, **kwargs)


@contextlib.contextmanager
def serve(binary: str, *, tls: trustme.CA | None = None, timeout: float = 10.0) -> Iterator[Server]:
    """``binary`` with ``ops/acl/users.acl`` as its ACL file (each user given a fresh password), on a free
    port, plain or (``tls``) TLS only with a certificate ``tls`` issued; stopped and removed at exit.

    :class:`ConfigError` with the server's own words when it exits at start (e.g. built without TLS)."""
    directory = tempfile.mkdtemp(prefix="market-acl-")
    acl, log = os.path.join(directory, "users.acl"), os.path.join(directory, "server.log")
    shutil.copyfile(ACL_FILE, acl)
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory,
            "--daemonize", "no", "--logfile", log, "--loglevel", "warning", "--aclfile", acl]
    ca = wrong_ca = ""
    if tls is None:
        args += ["--port", str(port)]
    else:
        cert = tls.issue_cert("127.0.0.1", "localhost")
        files = {name: os.path.join(directory, name) for name in ("ca.pem", "wrong-ca.pem", "cert.pem", "key.pem")}
        tls.cert_pem.write_to_path(files["ca.pem"])
        trustme.CA().cert_pem.write_to_path(files["wrong-ca.pem"])  # a CA that signed nothing of this server
        cert.cert_chain_pems[0].write_to_path(files["cert.pem"])
        cert.private_key_pem.write_to_path(files["key.pem"])
        ca, wrong_ca = files["ca.pem"], files["wrong-ca.pem"]
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", files["cert.pem"],
                 "--tls-key-file", files["key.pem"], "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = Server(process, port, binary, {r: secrets.token_hex(12) for r in ROLES}, ca, wrong_ca, directory)
    try:
        admin = _admin(port, ca)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    admin.ping()
                    break
                except (redis.RedisError, OSError):
                    if process.poll() is not None:
                        said = Path(log).read_text(errors="replace").strip().splitlines() if os.path.exists(log) else []
                        raise ConfigError(f"{binary} exited at start: {' / '.join(said[-2:])[-300:]}") from None
                    if time.monotonic() > deadline:
                        raise ConfigError(f"{binary} did not answer on port {port} within {timeout:.0f} s") from None
                    time.sleep(0.05)  # poll: a process just started, nothing to wait on instead
            for role, password in server.passwords.items():
                admin.execute_command("ACL", "SETUSER", f"market-{role}", f">{password}")
        finally:
            admin.close()
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


def supported_binaries() -> list[str]:
    """Every supported server binary here, the suite's own first (:func:`find_redis_server`)."""
    found = [find_redis_server(), shutil.which("redis-server"), shutil.which("valkey-server"), bundled_redis_server()]
    out: list[str] = []
    for binary in dict.fromkeys(b for b in found if b):
        version = binary_version(binary)
        if version is None:
            continue
        try:
            check_supported(version)
        except ConfigError:
            continue
        out.append(binary)
    return out


@pytest.fixture(scope="module")
def acl_server() -> Iterator[Server]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no Redis 7.0+ or Valkey 7.2+ server found for the ACL tests")
    with serve(binary) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server() -> Iterator[Server]:
    """The first supported server that starts with TLS; none at all fails, naming each one tried and why."""
    tried: list[str] = []
    for binary in supported_binaries():
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(serve(binary, tls=trustme.CA()))
            except ConfigError as exc:
                tried.append(str(exc))
                continue
            yield server
            return
    pytest.fail("no server built with TLS: " + ("; ".join(tried) or "no supported server found at all"))


@pytest.fixture
async def admin(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """The default user of the test's server (``server`` is parametrized indirectly by each test's module
    fixture): it sets nothing up but reads what the roles did, and empties the server afterwards."""
    server: Server = request.getfixturevalue(request.param)
    client = aioredis.Redis.from_url(server.url())
    await client.flushall()
    await client.acl_log_reset()
    yield client
    await client.flushall()
    await client.aclose()


# ---------------------------------------------------------------------------------------------- helpers


def market(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **env}, cwd=ROOT,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("market: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


async def until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (a function, or one returning an awaitable) until it is true; fail naming ``what``."""
    async def holds() -> bool:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        return bool(value)

    try:
        async with asyncio.timeout(timeout):
            while not await holds():
                await asyncio.sleep(0.05)  # poll
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout} s")


async def refusals(admin: aioredis.Redis) -> list[tuple[str, str]]:
    """``(user, command or key)`` of every refusal in the server's ACL LOG, but those of :data:`IGNORED_REFUSALS`."""
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    out = [(text(e["username"]), text(e["object"])) for e in await admin.acl_log()]
    return [r for r in out if r[1] not in IGNORED_REFUSALS]


@contextlib.asynccontextmanager
async def ingesting(server: Server, sim: Simulator, tmp: Path) -> AsyncIterator[Ingestor]:
    """An ingestor of BTCUSDT trades and 1m klines, as ``market-ingestor``, until the block exits."""
    settings = load_settings(
        {"url": sim.ws_url, "symbols": "BTCUSDT", "channels": "trade,kline_1m", "spill_dir": str(tmp / "spill")},
        {"MARKET_REDIS_URL": server.url("ingestor")},
    )
    ingestor = Ingestor(settings)  # it connects itself, with the URL above
    task = asyncio.create_task(ingestor.run())
    try:
        await until(lambda: ingestor.started.is_set() or task.done(), "the ingestor started")
        assert not task.done(), task.exception()
        yield ingestor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def read_group(server: Server, n: int, group: str = "strategy") -> list[int]:
    """Run a ``Consumer`` as ``market-consumer`` on the trade stream from its start until it handed over
    ``n`` ticks; their seqs."""
    seqs: list[int] = []
    consumer = Consumer(
        redis_url=server.url("consumer"), patterns=["binance:BTCUSDT:trade"], group=group, consumer="c1",
        start_id="0", block_ms=100, claim_idle_ms=None,
    )
    task = asyncio.create_task(consumer.run(lambda tick: seqs.append(tick["seq"])))
    try:
        await until(lambda: len(seqs) >= n or task.done(), f"{n} ticks through the group")
        assert not task.done(), task.exception()
    finally:
        consumer.stop()
        async with asyncio.timeout(10):
            await task
    return seqs


class Lines:
    """The lines a child process writes to a pipe, pumped by a thread, so each read has a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        for line in iter(pipe.readline, b""):
            self._lines.put(line)
        self._lines.put(b"")

    def next(self, timeout: float, what: str) -> bytes:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{what}: no line within {timeout} s") from None

    def close(self, timeout: float = 15.0) -> None:
        """After the child ended: the pump has read everything."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the child's output did not end"


def tick(seq: int) -> dict[str, Any]:
    now_us = time.time_ns() // 1000
    return {"v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": seq, "ts_event": now_us,
            "ts_recv": now_us, "trade_id": seq, "price": "27000.01", "qty": "0.5", "side": "buy"}


# ---------------------------------------------------------------------------------------------- ACL


def test_the_acl_file_is_what_the_readme_documents() -> None:
    """README shows the file's three lines as they are (a change to one without the other fails here)."""
    lines = ACL_FILE.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["user", f"market-{r}"] for r in ROLES]
    readme = (ROOT / "README.md").read_text()
    for line in lines:
        assert line in readme, line


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
async def test_the_file_s_lines_give_the_same_users_as_acl_setuser(acl_server: Server, admin: aioredis.Redis) -> None:
    """README: the rules of a line, given to ``ACL SETUSER`` word by word (as ``redis-cli`` splits them), make
    the user the file makes."""
    for line in ACL_FILE.read_text().splitlines():
        _, user, *rules = line.split()
        assert await admin.execute_command("ACL", "SETUSER", f"copy-{user}", *rules) in (b"OK", "OK")
        loaded, copy = await admin.acl_getuser(user), await admin.acl_getuser(f"copy-{user}")
        loaded.pop("passwords"), copy.pop("passwords")
        assert loaded == copy, user
        await admin.acl_deluser(f"copy-{user}")


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
async def test_each_role_does_its_work_and_nothing_is_refused(
    acl_server: Server, admin: aioredis.Redis, tmp_path: Path
) -> None:
    """The whole deployment with one user per role: ticks stored, heartbeats read, a switch set and applied,
    the history read through a group and acked; the server refused nothing on the way."""
    operator = acl_server.env("operator")
    config = SimulatorConfig(symbols=("BTCUSDT",), rate=400.0, seed=11, kline_update_ms=200)
    async with Simulator(config) as sim, ingesting(acl_server, sim, tmp_path) as ingestor:
        await until(lambda: admin.xlen(TRADE), "trades stored", timeout=30)
        await until(lambda: admin.xlen(KLINE), "klines stored")
        await until(lambda: admin.scard(heartbeat_set_key("md")), "a heartbeat")

        # the operator: a switch set from the CLI, applied by the ingestor (it reads the state, hears the notice)
        proc = await asyncio.to_thread(market, "ctl", "pause", "binance:BTCUSDT:kline_1m", env=operator)
        assert proc.returncode == 0, proc.stderr
        await until(lambda: ingestor.control.state.version >= 1, "the pause applied by the ingestor")
        assert [p.pattern for p in ingestor.control.state.pauses] == ["binance:BTCUSDT:kline_1m"]
        history = await asyncio.to_thread(market, "ctl", "history", env=operator)
        assert history.returncode == 0 and "pause binance:BTCUSDT:kline_1m" in history.stdout, history
        status = await asyncio.to_thread(market, "status", "--json", env=operator)
        assert status.returncode in (0, 1), status.stderr  # 2 would be an error reading it
        report = orjson.loads(status.stdout)
        stages = {s["stage"]: s["level"] for s in report["stages"]}
        assert stages["ingestor"] == stages["redis"] == "ok", report
    stored = await admin.xlen(TRADE)
    assert stored > 0 and await admin.xlen(KLINE) > 0

    # the consumer: the whole trade stream through its group, every entry acked
    seqs = await read_group(acl_server, stored)
    assert len(seqs) == stored and seqs == sorted(set(seqs))
    assert (await admin.xpending(TRADE, "strategy"))["pending"] == 0
    for role in ("consumer", "operator"):  # both read history without a group
        replay = await asyncio.to_thread(market, "replay", TRADE, env=acl_server.env(role))
        assert replay.returncode == 0, replay.stderr
        assert [orjson.loads(line)["tick"]["seq"] for line in replay.stdout.splitlines()] == seqs

    assert await refusals(admin) == []


#: what each role must not do, as raw commands: every one refused with NOPERM
FORBIDDEN: dict[str, list[tuple[str, ...]]] = {
    "consumer": [
        ("SET", control_state_key("md"), "{}"), ("XADD", "md:_ctl:audit", "*", "who", "x"),
        ("PUBLISH", "md:_ctl:changed", "9"), ("XADD", TRADE, "*", "d", "{}"), ("DEL", TRADE),
        ("XTRIM", TRADE, "MAXLEN", "0"), ("XGROUP", "DESTROY", TRADE, "strategy"), ("EVAL", "return 1", "0"),
        ("SET", "md:_hb:ingestor:x", "{}"), ("XREADGROUP", "GROUP", "g", "c", "STREAMS", "other:binance:X:trade", ">"),
    ],
    "ingestor": [
        ("SET", control_state_key("md"), "{}"), ("XADD", "md:_ctl:audit", "*", "who", "x"),
        ("PUBLISH", "md:_ctl:changed", "9"), ("XADD", "other:binance:BTCUSDT:trade", "*", "d", "{}"),
        ("SET", "other:_hb:ingestor:x", "{}"), ("DEL", TRADE), ("XGROUP", "CREATE", TRADE, "g", "$", "MKSTREAM"),
        ("XREADGROUP", "GROUP", "g", "c", "STREAMS", TRADE, ">"), ("SCAN", "0"),
    ],
    "operator": [
        # it runs ctl's change script (EVAL/EVALSHA), but what a script calls is held to the user's key rules
        ("XADD", TRADE, "*", "d", "{}"), ("DEL", TRADE), ("XTRIM", TRADE, "MAXLEN", "0"),
        ("EVALSHA", "0" * 40, "1", TRADE), ("SET", "md:_hb:ingestor:x", "{}"), ("DEL", "md:_hb:ingestors"),
        ("XGROUP", "CREATE", TRADE, "g", "$", "MKSTREAM"), ("XREADGROUP", "GROUP", "g", "c", "STREAMS", TRADE, ">"),
        ("SET", "other:_ctl:state", "{}"),
    ],
}
#: what no role may do
FORBIDDEN_TO_ALL: list[tuple[str, ...]] = [
    ("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1"), ("KEYS", "*"), ("ACL", "SETUSER", "x", "on"),
    ("SCRIPT", "FLUSH"), ("CLIENT", "KILL", "TYPE", "normal"), ("MONITOR",),
    ("SHUTDOWN", "NOSAVE"),
]


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
@pytest.mark.parametrize("role", ROLES)
async def test_each_role_is_refused_the_rest(acl_server: Server, admin: aioredis.Redis, role: str) -> None:
    client = aioredis.Redis.from_url(acl_server.url(role))
    try:
        assert await client.ping()
        for command in FORBIDDEN[role] + FORBIDDEN_TO_ALL:
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
        if role == "operator":  # a script runs with its caller's key rules: its EVAL cannot write a tick stream
            refused = r"(?i)can't access at least one of the keys|no permissions to access a key"  # Redis | Valkey
            with pytest.raises(ResponseError, match=refused):
                await client.eval(f"return redis.call('XADD', '{TRADE}', '*', 'd', '{{}}')", 0)
    finally:
        await client.aclose()
    assert await admin.dbsize() == 0  # nothing written by any of it
    assert {user for user, _ in await refusals(admin)} == {f"market-{role}"}


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
@pytest.mark.parametrize("role", ["consumer", "ingestor"])
async def test_only_the_operator_changes_control_state(acl_server: Server, admin: aioredis.Redis, role: str) -> None:
    """``market ctl`` as another role: one line naming the refusal and the user, exit 2; the state untouched."""
    proc = await asyncio.to_thread(market, "ctl", "pause", "binance:*:trade", env=acl_server.env(role))
    assert_one_line_error(proc, f"market-{role}")  # refused at the read or at the change
    assert "no permissions" in proc.stderr.lower()
    assert acl_server.passwords[role] not in proc.stderr
    assert await admin.get(control_state_key("md")) is None
    reset = await asyncio.to_thread(market, "ctl", "reset", env=acl_server.env(role))
    assert_one_line_error(reset, f"market-{role}")
    assert "no permissions" in reset.stderr.lower()
    assert await admin.exists(control_state_key("md"), "md:_ctl:audit") == 0


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
async def test_an_ingestor_under_another_prefix_is_refused_counted_and_keeps_running(
    acl_server: Server, admin: aioredis.Redis
) -> None:
    """The writer the ingestor runs, given a prefix its user may not write: every attempt refused (NOPERM),
    counted by reason, the ticks held for a retry once the ACL is fixed; the writer's task does not end."""
    client = await connect_redis(acl_server.url("ingestor"))
    writer = StreamWriter(client, prefix="other")
    task = asyncio.create_task(writer.run())
    try:
        assert writer.submit([tick(1), tick(2)])
        await until(lambda: writer.rejected_by_reason.get("noperm", 0) >= 4, "two refused attempts counted")
        assert not task.done()
        assert writer.failing == "noperm" and writer.appended == 0
        assert writer.stats().buffered + len(writer.take_all()) == 2  # held, not dropped
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()
    assert await admin.dbsize() == 0
    assert {obj for _, obj in await refusals(admin)} == {"other:binance:BTCUSDT:trade"}


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
async def test_a_consumer_as_the_operator_is_refused_with_a_config_error(
    acl_server: Server, admin: aioredis.Redis
) -> None:
    """The operator reads streams but owns no group: the SDK says so and stops (retrying cannot help)."""
    consumer = Consumer(redis_url=acl_server.url("operator"), patterns=["binance:BTCUSDT:trade"], group="g",
                        block_ms=100)
    with pytest.raises(ConfigError, match="not allowed"):
        async with asyncio.timeout(30):
            await consumer.run(lambda _tick: None)
    assert await admin.exists(TRADE) == 0


@pytest.mark.parametrize("admin", ["acl_server"], indirect=True)
async def test_a_wrong_password_is_one_line(acl_server: Server, admin: aioredis.Redis) -> None:
    env = {"MARKET_REDIS_URL": acl_server.url("operator").replace(acl_server.passwords["operator"], "not-it")}
    proc = await asyncio.to_thread(market, "status", env=env)
    assert_one_line_error(proc, "refused the credentials", "market-operator:***@")
    assert "not-it" not in proc.stderr


# ---------------------------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("admin", ["tls_server"], indirect=True)
async def test_ingestor_sdk_and_cli_over_tls(tls_server: Server, admin: aioredis.Redis, tmp_path: Path) -> None:
    """Every part over ``rediss://`` with the CA in the URL, each as its own user."""
    assert tls_server.url("consumer").startswith("rediss://") and "ssl_ca_certs=" in tls_server.url("consumer")
    operator, consumer = tls_server.env("operator"), tls_server.env("consumer")
    config = SimulatorConfig(symbols=("BTCUSDT",), rate=400.0, seed=12, kline_update_ms=200)
    async with Simulator(config) as sim, ingesting(tls_server, sim, tmp_path) as ingestor:
        await until(lambda: admin.xlen(TRADE), "trades stored over TLS")
        seqs = await read_group(tls_server, 20)
        assert seqs == sorted(set(seqs)) and len(seqs) >= 20

        status = await asyncio.to_thread(market, "status", "--json", env=operator)
        assert status.returncode in (0, 1), status.stderr
        stages = {s["stage"]: s["level"] for s in orjson.loads(status.stdout)["stages"]}
        assert stages["ingestor"] == stages["redis"] == "ok", status.stdout
        proc = await asyncio.to_thread(market, "ctl", "pause", "binance:BTCUSDT:kline_1m", env=operator)
        assert proc.returncode == 0, proc.stderr
        await until(lambda: ingestor.control.state.version >= 1, "the pause applied over TLS")

        tail = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "tail", TRADE, "--from", "0"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, **consumer}, cwd=ROOT,
        )
        assert tail.stdout is not None and tail.stderr is not None
        lines = Lines(tail.stdout)
        try:
            line = await asyncio.to_thread(lines.next, 30, "market tail over TLS")
        finally:
            tail.terminate()
            tail.wait(15)
            lines.close()
            tail.stdout.close()
            tail.stderr.close()
        assert line, "market tail ended without a line"
        first = orjson.loads(line)
        assert first["key"] == TRADE and first["tick"]["seq"] == seqs[0]
    assert await refusals(admin) == []


#: every command that reaches Redis, as a TLS check meets it
COMMANDS = [
    ("status",), ("tail", TRADE), ("replay", TRADE), ("ctl", "show"),
    ("ingest", "--url", "ws://127.0.0.1:1", "--metrics-port", "0"),
]


@pytest.mark.parametrize("admin", ["tls_server"], indirect=True)
@pytest.mark.parametrize("args", COMMANDS)
@pytest.mark.parametrize("ca", ["wrong", "none"])
async def test_a_wrong_ca_is_one_line_exit_2(
    tls_server: Server, admin: aioredis.Redis, args: tuple[str, ...], ca: str
) -> None:
    """A CA that did not sign the server's certificate, or none (the system's CAs do not know it)."""
    env = tls_server.env("operator", ca=tls_server.wrong_ca if ca == "wrong" else "")
    proc = await asyncio.to_thread(market, *args, env=env)
    assert_one_line_error(proc, "TLS with Redis at rediss://market-operator:***@", "certificate verify failed")
    assert tls_server.passwords["operator"] not in proc.stderr


@pytest.mark.parametrize("args", COMMANDS)
def test_a_missing_ca_file_is_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = str(tmp_path / "nope.pem")
    url = f"rediss://u:hunter2@127.0.0.1:{free_port()}/0?ssl_ca_certs={missing}"
    proc = market(*args, env={"MARKET_REDIS_URL": url})
    assert_one_line_error(proc, "ssl_ca_certs", "no readable file", missing)
    assert "hunter2" not in proc.stderr


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        ("rediss://127.0.0.1:1/0?ssl_ca_cert=/x.pem", ("unknown option 'ssl_ca_cert'", "did you mean ssl_ca_certs")),
        ("redis://127.0.0.1:1/0?ssl_ca_certs=/x.pem", ("ssl_ca_certs needs TLS, a rediss:// URL",)),
        ("redis://u:hunter2@127.0.0.1:1/0?pasword=x", ("unknown option 'pasword'", "u:***@")),
    ],
)
def test_a_bad_url_option_is_one_line(url: str, needles: tuple[str, ...]) -> None:
    """An option redis-py would not take fails before anything connects (it would be a traceback at the first
    command), naming the nearest one it takes."""
    for args in (("status",), ("ctl", "show"), ("tail", TRADE)):
        proc = market(*args, env={"MARKET_REDIS_URL": url})
        assert_one_line_error(proc, "invalid Redis URL", *needles)
        assert "hunter2" not in proc.stderr


@pytest.mark.parametrize(
    "url",
    [
        "rediss://market-ingestor:pw@redis.internal:6380/0?ssl_ca_certs=/etc/market/redis-ca.pem",
        "rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=false",
        "redis://h:6379/0?socket_timeout=3&client_name=ingest-1&max_connections=8&health_check_interval=30",
        "unix:///run/redis.sock?db=2",
        "redis://h:6379/0",
    ],
)
def test_url_options_redis_py_takes_pass(url: str) -> None:
    assert validate_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("rediss://h/0?ssl_ca_cert=/ca.pem", "unknown option 'ssl_ca_cert'; did you mean ssl_ca_certs?"),
        ("redis://h/0?timeout=1", "unknown option 'timeout'; did you mean socket_timeout?"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs needs TLS, a rediss:// URL"),
        ("unix:///run/redis.sock?ssl_certfile=/c.pem", "ssl_certfile needs TLS"),
        ("redis://h/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://h/0?zzz=1", "unknown option 'zzz'"),
    ],
)
def test_url_options_redis_py_would_not_take_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_redis_url(url)
    assert message in str(info.value)
    assert str(info.value).startswith(f"invalid Redis URL {url!r}")
