"""The payload framing: varints and the strict reader."""

from __future__ import annotations

import pytest

from edgeswarm.models.codecs import wire
from edgeswarm.placement.errors import InvalidInput


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**24])
def test_varints_round_trip_and_are_short(n):
    data = wire.header("none") + wire.varint(n)
    r = wire.Reader("none", data)
    assert r.varint("n", limit=2**25) == n
    r.done()
    assert len(wire.varint(n)) == max(1, -(-n.bit_length() // 7))


def test_reader_rejects_bad_headers_and_lengths():
    with pytest.raises(InvalidInput, match=r"codec 'fp16'.*not start with an edgeswarm"):
        wire.Reader("fp16", b"\x00\x02")
    with pytest.raises(InvalidInput, match="unknown codec \\(tag 99\\)"):
        wire.Reader("fp16", bytes((wire.MAGIC, 99)))
    r = wire.Reader("none", wire.header("none") + wire.varint(5))
    with pytest.raises(InvalidInput, match="exceeds 4"):
        r.varint("rank", limit=4)
    r = wire.Reader("none", wire.header("none") + b"\x80\x80")
    with pytest.raises(InvalidInput, match="ends inside a number"):
        r.varint("n")
    r = wire.Reader("none", wire.header("none") + b"ab")
    with pytest.raises(InvalidInput, match="needs 3 bytes, 2 left"):
        r.take(3, "body")
    with pytest.raises(InvalidInput, match="varint of negative"):
        wire.varint(-1)


def test_labels_name_the_codec_setting():
    with pytest.raises(InvalidInput, match="codec 'learned:1e-05'"):
        wire.Reader("learned", b"", label="learned:1e-05")
