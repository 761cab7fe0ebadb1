"""Cluster key files: the shared secret every agent and the coordinator sign with.

A key is 32 random bytes, stored as 64 hex characters (and a newline) in a file that only
its owner may read (mode 0600). Whoever holds it can command every device of the cluster:
copy it to devices over a secure channel (scp, provisioning), never through the broker.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from edgeswarm.placement.errors import InvalidInput

log = logging.getLogger("edgeswarm.agent.keys")

KEY_BYTES = 32


def generate() -> bytes:
    """A new cluster key: 32 bytes from the operating system's secure random source."""
    return secrets.token_bytes(KEY_BYTES)


def write(path: str | Path, key: bytes, force: bool = False) -> Path:
    """Write ``key`` as hex to ``path`` with mode 0600.

    Refuses to replace an existing file unless ``force``; with ``force`` the new file
    replaces the old one atomically, so a crash never leaves a half-written key.
    """
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"a cluster key is {KEY_BYTES} bytes, got {len(key)}")
    p = Path(path)
    text = (key.hex() + "\n").encode("ascii")
    if not force:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise InvalidInput(f"key file {p} already exists; keep it, or pass force=True "
                               "(--force) to replace it (every device then needs the new key)"
                               ) from None
        except OSError as e:
            raise InvalidInput(f"cannot create key file {p}: {e.strerror or e}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        return p
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")  # mode 0600
    except OSError as e:
        raise InvalidInput(f"cannot write key file {p}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read(path: str | Path) -> bytes:
    """Read a key file written by ``write`` (or ``edgeswarm keygen``).

    Raises InvalidInput naming the problem for a missing, unreadable, non-hex or
    wrong-length file; logs a warning when the group or others may read it.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        if not stat.S_ISREG(mode):   # checked before opening: a FIFO would block
            raise InvalidInput(f"key file {p} is not a regular file")
        with p.open("rb") as f:
            raw = f.read(4 * KEY_BYTES + 1)   # more than any valid file holds
    except FileNotFoundError:
        raise InvalidInput(f"key file {p} does not exist; create one with "
                           f"`edgeswarm keygen {p}` and copy it to every device") from None
    except OSError as e:
        raise InvalidInput(f"cannot read key file {p}: {e.strerror or e}") from None
    if mode & 0o077:
        log.warning("key file %s can be read by other users (mode %o); run `chmod 600 %s`",
                    p, stat.S_IMODE(mode), p)
    try:
        text = raw.decode("ascii").strip()
        key = bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"key file {p} is not hex text; a key file holds "
                           f"{2 * KEY_BYTES} hex characters (make one with `edgeswarm keygen`)"
                           ) from None
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"key file {p} holds {len(key)} bytes; a cluster key is "
                           f"{KEY_BYTES} bytes ({2 * KEY_BYTES} hex characters)")
    return key
