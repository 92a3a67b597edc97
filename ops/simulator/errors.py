"""The simulator's exceptions.

::

    MarketError (consumer_sdk.core.errors)
    └── SimulatorError
        └── SimulatorConfigError   a setting that cannot work (also a ConfigError, a ValueError)
            └── CaptureError       a replay file that cannot be read or parsed
"""

from __future__ import annotations

from consumer_sdk.core.errors import ConfigError, MarketError

__all__ = ["CaptureError", "SimulatorConfigError", "SimulatorError"]


class SimulatorError(MarketError):
    """Root of every error the simulator raises on purpose."""


class SimulatorConfigError(SimulatorError, ConfigError):
    """A simulator setting that cannot work; retrying will not help."""


class CaptureError(SimulatorConfigError):
    """A replay capture that cannot be read, or a line in it that is not a capture record."""
