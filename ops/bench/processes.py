"""Processes and the machine: the bench's children, their CPU and memory, ports, and what the machine is.

Thin I/O over ``/proc``, ``ss``, ``git`` and asyncio subprocesses; every wait is bounded
(:data:`~ops.bench.profiles.STOP_TIMEOUT_S`, :data:`~ops.bench.profiles.HTTP_TIMEOUT_S`, a few seconds for
``ss`` and ``git``).  A figure that cannot be read is ``None``, never an error: the report says it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final

from consumer_sdk.core.errors import ConfigError, TransientError
from ops.bench.profiles import HTTP_TIMEOUT_S, STOP_TIMEOUT_S

__all__ = [
    "ROOT",
    "Child",
    "check_port_free",
    "cpu_seconds",
    "free_port",
    "git_state",
    "http_get",
    "listener_pid",
    "machine",
    "machine_busy_seconds",
    "memory_kib",
    "spawn",
    "version",
]

#: the repository's root: the children's working directory and the commit the report names
ROOT: Final = Path(__file__).resolve().parents[2]
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_proc(pid: int, name: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (None when it is gone or not readable)."""
    text = _read_proc(pid, "stat")
    if text is None:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS of a process in KiB."""
    text = _read_proc(pid, "status") or ""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            with contextlib.suppress(ValueError, IndexError):
                out[key] = int(rest.split()[0])
    return out


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent not idle since boot (all cores)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        values = [int(x) for x in first[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLK_TCK


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (``ss``, else ``/proc/net/tcp`` and the fd tables)."""
    ss = shutil.which("ss")
    if ss:
        try:
            out = subprocess.run([ss, "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"pid=(\d+)", out)
        if m:
            return int(m.group(1))
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (:func:`ops.redis_server.free_port`)."""
    from ops.redis_server import free_port as pick

    return pick()


def check_port_free(port: int) -> None:
    """:class:`ConfigError` with one line when ``port`` on 127.0.0.1 is taken."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"port {port} on 127.0.0.1 is in use: {exc.strerror or exc}") from None


@dataclass
class Child:
    """A ``market`` child process, its output appended to ``log_path``."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]

    def last_line(self) -> str:
        """Its last error line (else its last line) for a one-line message, at most 300 characters."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        errors = [ln for ln in lines if ln.startswith("market: error:")]
        line = errors[-1] if errors else (lines[-1] if lines else "")
        return line.removeprefix("market: error: ")[:300]

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; its log closed.  Bounded: twice that at most."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        self.log_file.close()


async def spawn(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Child:
    """Start ``python -m ops.cli *args`` from :data:`ROOT` with ``env``; its output goes to ``workdir/name.log``."""
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - closed by Child.stop; opened once per child
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
            stderr=log_file, env=env, cwd=str(ROOT),
        )
    except BaseException:
        log_file.close()
        raise
    return Child(name, proc, log_path, log_file)


async def http_get(port: int, path: str, *, limit_s: float = HTTP_TIMEOUT_S) -> bytes:
    """GET ``http://127.0.0.1:port/path`` -> the body of a 200 answer; :class:`TransientError` otherwise."""
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                length = headers.get("content-length")
                body = await (reader.readexactly(int(length)) if length else reader.read(-1))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise TransientError(f"GET 127.0.0.1:{port}{path}: {type(exc).__name__}: {exc}") from None
    parts = status_line.split()
    if len(parts) < 2 or parts[1] != "200":
        raise TransientError(f"GET 127.0.0.1:{port}{path}: {status_line}")
    return body


def machine() -> dict[str, Any]:
    """CPU model, cores (and how many this process may use), memory, kernel, platform, load average now."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model or platform.processor() or "unknown", "cores": os.cpu_count(), "cpus_usable": usable,
        "memory_gib": mem, "kernel": platform.release(), "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``; None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """``{"commit": HEAD, "dirty": uncommitted changes}`` of :data:`ROOT`; None for what git cannot tell."""
    git = shutil.which("git")
    if git is None:
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run([git, "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=False)
        diff = subprocess.run([git, "--no-optional-locks", "diff", "--quiet", "HEAD", "--"], cwd=ROOT,
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    commit = head.stdout.strip() if head.returncode == 0 else None
    return {"commit": commit, "dirty": diff.returncode == 1 if commit else None}

