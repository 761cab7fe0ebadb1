"""The one exception tree of edgeswarm.

It lives in ``placement`` because that is the lowest layer: every other folder may
import it. ``edgeswarm`` re-exports the public names. Every message says what was
wrong and what to do about it.
"""

from __future__ import annotations


class Error(Exception):
    """Base of every error edgeswarm raises on purpose."""


class InvalidInput(Error, ValueError):
    """Input data (a tensor, a JSON document, a CLI argument) is malformed."""


class UnknownModel(Error, KeyError):
    """A model name is not in the zoo."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ModelFileError(Error):
    """A model file (ONNX, TFLite, GGUF, safetensors) is missing, corrupt or of the wrong kind."""


class RuntimeNotAvailable(Error):
    """A runtime (or the package it needs) is not installed on this device."""


class PlacementInfeasible(Error):
    """No plan satisfies the constraints (memory, allowed devices)."""


class ProtocolError(Error):
    """A message from a peer is malformed, unsigned, stale or replayed."""


class DeviceLost(Error):
    """A device stopped answering while it held part of a deployment."""
