"""The shared kernel of every package: what the ingestor, the distributor, the consumer and ``market`` share.

Depends on redis, hiredis and orjson only, never on the ingestor, the distributor or the consumer, and
importing it loads none of them.  One module per concern:

=================  ==========================================================================================
module             what it holds
=================  ==========================================================================================
``tick``           the tick model (schema version 1), its JSON form, gap markers
``keys``           stream keys, entry IDs, patterns, the prefix rule, the ``_hb``/``_ctl`` key names
``errors``         the exception tree: :class:`~consumer_sdk.core.errors.Retryable` versus
                   :class:`~consumer_sdk.core.errors.Fatal`
``redis``          connecting, the one Redis error classifier, stream reply helpers, ``XACK`` packing
``urls``           the Redis URL check and the one redactor of secrets in URLs
``sequencing``     per-stream seq tracking (gaps, duplicates, late ticks)
``latency``        the latency histogram and its sampling
``backoff``        the one reconnect delay schedule
``log``            structured logging and its throttle
``aio``            asyncio helpers
``handler``        what a tick is handed to
``server``         the supported Redis and Valkey versions
``health``         the heartbeat document: its one typed definition, written and read back
``untrusted``      reading untrusted JSON field by field, naming each field missing or wrong
=================  ==========================================================================================
"""

__all__: list[str] = []
