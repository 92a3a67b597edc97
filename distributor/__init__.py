"""distributor: the ingress queue, the in-process fan-out and the Redis Streams writer."""

from distributor.ingress import IngressQueue, IngressStats, Policy
from distributor.service import BatchHandler, Distributor
from distributor.writer import Retention, StreamWriter, WriterStats

__all__ = [
    "BatchHandler",
    "Distributor",
    "IngressQueue",
    "IngressStats",
    "Policy",
    "Retention",
    "StreamWriter",
    "WriterStats",
]
