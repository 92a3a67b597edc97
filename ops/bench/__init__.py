"""ops.bench: the load tests behind ``market bench``, one module per concern.

Imports flow one way, from the bottom up (a test walks them):

- :mod:`~ops.bench.profiles`: the load offered and the targets (constants only);
- :mod:`~ops.bench.scrape`, :mod:`~ops.bench.analysis`, :mod:`~ops.bench.render`, :mod:`~ops.bench.plots`:
  pure: ``/metrics`` text -> histograms, two edges -> a step's figures and verdicts, a report -> Markdown
  and PNGs;
- :mod:`~ops.bench.processes`: child processes, ``/proc``, ports, the machine;
- :mod:`~ops.bench.harness` and :mod:`~ops.bench.stages`: one whole-path run (simulator -> ingestor ->
  Redis -> consumer) and its phases;
- the stand-alone stage benches: :mod:`~ops.bench.hotpath` (on :mod:`~ops.bench.hotpath_load`),
  :mod:`~ops.bench.writer` (writer, reader, flush), :mod:`~ops.bench.ingest` (instrumentation cost), and
  :mod:`~ops.bench.probe` (the co-located no-op subscriber);
- :mod:`~ops.bench.scale` (on the pure :mod:`~ops.bench.scale_report`): ``market bench scale``, throughput by
  Redis masters x ingestors, each cell on a Redis of its own;
- :mod:`~ops.bench.report`: ``market bench`` itself, all of the above into ``report.json`` and ``report.md``.

The package exports nothing and imports none of them: import the module you need.
"""

from __future__ import annotations

__all__: list[str] = []
