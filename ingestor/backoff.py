"""Reconnect delays for the venue session: :class:`consumer_sdk.backoff.Backoff` (shared by every package)."""

from consumer_sdk.backoff import Backoff

__all__ = ["Backoff"]
