"""A Binance-compatible spot market-data venue for tests, demos and load runs, with profiles of other venues.

Venues (``SimulatorConfig(venue=...)``, ``market simulate --venue``; :mod:`.profiles`): ``binance`` (spot, all
that follows), ``binance_usdm`` and ``binance_coinm`` (futures: the same server with Binance futures' streams,
routes and REST paths, :mod:`.profiles`), ``okx`` (OKX v5 public, its own server: :mod:`.okx`).

Real Binance clients work against it unchanged: point them at ``Simulator.ws_url`` (the WebSocket
base, like ``wss://stream.binance.com:9443``) and ``Simulator.rest_url`` (like
``https://api.binance.com``). One port serves everything::

    async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=5000)) as sim:
        ...  # connect to f"{sim.ws_url}/stream?streams=btcusdt@trade/btcusdt@bookTicker"

WebSocket
    ``/ws/<stream>[/<stream>...]`` and ``/ws`` send raw payloads; ``/stream?streams=a/b/c`` sends
    combined frames ``{"stream": ..., "data": ...}``. Streams: ``<symbol>@trade``, ``@aggTrade``,
    ``@bookTicker``, ``@kline_<interval>``, ``@depth@100ms`` and ``@depth`` (1000 ms) (symbols in
    lower case). Live requests ``SUBSCRIBE``,
    ``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``, ``SET_PROPERTY``/``GET_PROPERTY`` (``combined``) get
    ``{"result": ..., "id": ...}`` or Binance's ``{"error": {"code", "msg"}, "id": ...}``. An invalid
    stream in the URL is refused with HTTP 400.

Binance's rules, each configurable in :class:`SimulatorConfig`
    a ping every 20 s and close 1011 when no pong comes within 60 s; close at 24 h, preceded by
    ``{"e":"serverShutdown","E":<ms>}``; more than 5 incoming messages in a second closes the
    connection (1008); at most 1024 streams a connection (an error reply to the ``SUBSCRIBE`` that
    would exceed it); a client too slow to take what it subscribed to is closed (1008) once its
    unsent bytes pass ``max_send_buffer``. ``serverShutdown`` is a connection event, not a stream
    event: it is sent unwrapped on raw and combined connections alike, before the 24 h close and
    before the simulator itself shuts down.

REST (same port, GET)
    ``/api/v3/ping``, ``/api/v3/time``, ``/api/v3/exchangeInfo``, ``/api/v3/trades``,
    ``/api/v3/historicalTrades``, ``/api/v3/aggTrades``, ``/api/v3/klines``: see :mod:`.rest`;
    ``/api/v3/depth``: see :mod:`.book`. Each request costs Binance's weight against a budget of
    ``rest_weight_limit`` (``market simulate``: 6000; in code 0, no limit) a clock minute and client
    address: over it HTTP 429 with
    ``Retry-After`` until the minute ends, and a client that asks twice more before then is banned
    (418 with ``Retry-After``); answers carry ``X-MBX-USED-WEIGHT-1M`` (:mod:`.weights`).

Order books
    With ``depth`` (on in ``market simulate``, off in :class:`SimulatorConfig` unless asked for) each
    symbol of the synthetic market has a seeded L2 book
    (:class:`~ops.simulator.book.DepthBooks`, :attr:`Simulator.depth`) whose touch follows the market's
    ``bookTicker``: its changes go out batched every 100 ms on ``<symbol>@depth@100ms`` and aggregated
    every 1000 ms on ``<symbol>@depth`` (``depthUpdate`` with ``E``, ``s``, ``U``, ``u``, ``b``, ``a``),
    and ``/api/v3/depth`` answers its snapshot, so a client following Binance's procedure holds the
    same book.

Control endpoint (same port, GET; answers the state as JSON)
    ``/control/state``; ``/control/close_all[?abort=true]``; ``/control/stall?seconds=S``;
    ``/control/refuse?seconds=S``; ``/control/faults?malformed=F&duplicate=F&out_of_order=F``;
    ``/control/rest_faults?path=P&schedule=ITEMS``; ``/control/depth_faults?schedule=ITEMS``;
    ``/control/hostile?kind=K&count=N`` (frames a venue
    should never send, put into every connection's live stream: :mod:`.hostile`); ``/control/clear``. The
    same faults are methods of :class:`Simulator` and settings of :class:`SimulatorConfig` applied from the
    start:

    - close_all: every connection gets a close frame (1001), or with ``abort`` the TCP connection
      is dropped without one;
    - stall: for S seconds every connection (and any new one) gets nothing, not even pings, and
      nothing it sends is read, so its pings go unanswered; sockets stay open; ticks generated
      meanwhile are not sent but are in the REST history;
    - refuse: for S seconds new WebSocket handshakes get HTTP 503; REST keeps answering;
    - malformed / duplicate / out_of_order: that fraction of stream frames is cut short (invalid
      JSON), sent twice, or swapped with the next frame of the same stream;
    - rest_faults: the next requests to a REST path (or to any) get, one each and in order, an
      HTTP error with Binance's error body (``400``, ``418``, ``429:30`` with ``Retry-After: 30``,
      ``503``, ...) or ``close`` (the connection dropped, no answer); then normal answers again.
      :attr:`Simulator.rest_faults` counts the requests and the faults given per path;
    - depth_faults: ``drop`` (a book's next diff is not sent: a ``U != previous u + 1`` jump on both
      depth streams) and ``stale:N`` (its next snapshot is N batches old), for one ``@SYMBOL`` or
      every book (:mod:`.depth_faults`); ``/control/clear`` disarms them and forgets every client's
      weight and ban.

Synthetic market or replay
    By default a seeded :class:`SyntheticMarket` generates ``rate`` ticks a second in total (trade,
    aggTrade, bookTicker and kline updates together), spread over the symbols by weight, with
    optional bursts. With ``replay=FILE`` the simulator instead plays a capture (one
    ``{"recv_ts": s, "frame": "<combined frame>"}`` per line) at its recorded pace times
    ``replay_speed``, starting when the first connection subscribes to anything; its symbols are
    the ones the venue lists, and their REST history is empty. Depth frames in the capture are played
    like any other; with ``replay_rest=FILE`` (recorded REST snapshots, ``*.depth.jsonl``)
    ``/api/v3/depth`` answers the symbol's snapshot recorded last at or before the capture time being
    played (the capture's first ``recv_ts`` plus the seconds played times ``replay_speed``), else its
    first (:mod:`.book_replay`); without it there are no books and ``/api/v3/depth`` is 404.
"""

from __future__ import annotations

from .config import SimulatorConfig
from .errors import CaptureError, SimulatorConfigError, SimulatorError
from .market import SymbolSpec, SyntheticMarket
from .protocol import FaultRates
from .rest import RestFault, RestFaults
from .server import Simulator, SimulatorStats, run_simulator

__all__ = [
    "CaptureError",
    "FaultRates",
    "RestFault",
    "RestFaults",
    "Simulator",
    "SimulatorConfig",
    "SimulatorConfigError",
    "SimulatorError",
    "SimulatorStats",
    "SymbolSpec",
    "SyntheticMarket",
    "run_simulator",
]
