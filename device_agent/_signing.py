"""What the protocol and the manifest share: the strict model base, the rejection error,
canonical JSON and its HMAC-SHA256.

Private: ``protocol`` and ``manifest`` re-export the public names. It exists only so that
``protocol`` (whose ``Deploy`` command carries a ``Manifest``) and ``manifest`` (whose
models and signature need the same base) do not import each other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from edgeswarm.placement.errors import ProtocolError

# The protocol's own reasons, in the order unseal checks them. Higher layers add
# "unknown_deployment" and "bad_artifact"; Rejected accepts those too.
REASONS = ("oversized", "malformed", "schema", "unsigned", "bad_signature", "wrong_topic",
           "stale", "replayed")


class Model(BaseModel):
    """The one base of every message and manifest: frozen, strict, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Rejected(ProtocolError):
    """A message (or manifest, or artifact) was refused; ``reason`` is a short label.

    ``reason`` is one of ``REASONS`` (or a higher layer's, such as "unknown_deployment"):
    it is what metrics count by. ``str()`` says what was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII, no NaN or infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def digest(key: bytes, obj: Any) -> str:
    """HMAC-SHA256 of ``canonical(obj)`` under ``key``, as 64 lowercase hex characters."""
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


def signature_matches(key: bytes, obj: Any, sig: str) -> bool:
    """Constant-time comparison of ``sig`` with the HMAC of ``obj``."""
    return hmac.compare_digest(digest(key, obj).encode("ascii"), sig.encode("utf-8"))


def describe(error: ValidationError, limit: int = 3) -> str:
    """A validation error as one line that names each wrong field: ``a.b[2].c: message``."""
    parts = []
    for item in error.errors()[:limit]:
        where = ""
        for loc in item["loc"]:
            where += f"[{loc}]" if isinstance(loc, int) else (f".{loc}" if where else str(loc))
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    more = len(error.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
