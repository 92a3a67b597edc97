"""ingestor: venue WebSocket sessions, normalization and sequencing."""

from ingestor.binance import MalformedFrame, Reply, ServerShutdown, parse_frame
from ingestor.config import IngestSettings, SubscriberSpec, load_settings
from ingestor.sequencer import GapReport, Sequencer
from ingestor.service import Ingestor

__all__ = [
    "GapReport",
    "IngestSettings",
    "Ingestor",
    "MalformedFrame",
    "Reply",
    "Sequencer",
    "ServerShutdown",
    "SubscriberSpec",
    "load_settings",
    "parse_frame",
]
