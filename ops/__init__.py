"""ops: what runs the feed and what exercises it, one module per tool.

The ``market`` command (:mod:`ops.cli`), the venue simulator (:mod:`ops.simulator`), the demo, the
load tests (:mod:`ops.bench`), ``market status`` and ``market ctl``, the fault proxy and the Redis
bootstrap.  The package itself exports nothing: import the module you need; importing ``ops`` costs
nothing and starts nothing.
"""

from __future__ import annotations

__all__: list[str] = []
