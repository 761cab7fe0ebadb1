"""The data-plane wire format: round trips of every dtype, and every kind of bad message."""

import struct

import numpy as np
import pytest

from edgeswarm.device_agent import wire
from edgeswarm.placement.errors import InvalidInput, ProtocolError

_HEADER = struct.Struct("<4sHqI")


def _message(*tensors: bytes, count: int | None = None, magic: bytes = b"ESW1",
             version: int = 1, request_id: int = 7) -> bytes:
    """A hand-built message: header, then the given already-packed tensors."""
    n = len(tensors) if count is None else count
    return _HEADER.pack(magic, version, request_id, n) + b"".join(tensors)


def _tensor(code: int, shape: tuple[int, ...], length: int, data: bytes,
            offset: int = _HEADER.size) -> bytes:
    head = struct.pack(f"<BB{len(shape)}qQ", code, len(shape), *shape, length)
    pad = -(offset + len(head)) % 8
    return head + bytes(pad) + data


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8", "int32", "int64",
                                   "bool"])
def test_round_trip_keeps_dtype_shape_and_values(dtype: str) -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((2, 3, 4)) * 50).astype(dtype)
    b = np.asarray(5, dtype=dtype)  # a 0-d scalar
    c = np.zeros((0, 3), dtype=dtype)  # an empty tensor
    rid, out = wire.decode(wire.encode([a, b, c], request_id=123456789012))
    assert rid == 123456789012
    for want, got in zip([a, b, c], out, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_round_trip_of_bfloat16_keeps_the_bits() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.array([[1.5, -2.25], [3e38, 0.0]], dtype=ml_dtypes.bfloat16)
    _, (got,) = wire.decode(wire.encode([a], 0))
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got.view(np.uint16), a.view(np.uint16))


def test_big_endian_and_strided_inputs_arrive_as_little_endian_values() -> None:
    a = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]  # non-contiguous, big-endian
    _, (got,) = wire.decode(wire.encode([a], 1))
    np.testing.assert_array_equal(got, a)
    assert got.dtype == np.dtype("<i4")


def test_shutdown_is_a_message_without_tensors() -> None:
    assert wire.decode(wire.encode([], wire.SHUTDOWN)) == (wire.SHUTDOWN, [])


def test_data_is_aligned_and_decoding_a_bytearray_gives_writable_views() -> None:
    raw = bytearray(wire.encode([np.ones(3, np.int8), np.ones((2, 2), np.float32)], 3))
    _, (a, b) = wire.decode(raw)
    base = np.frombuffer(raw, np.uint8).ctypes.data
    assert (a.ctypes.data - base) % 8 == 0 and (b.ctypes.data - base) % 8 == 0
    b[0, 0] = 42.0  # shares memory with the message: no copy was made
    assert wire.decode(raw)[1][1][0, 0] == 42.0
    assert not wire.decode(bytes(raw))[1][0].flags.writeable


def test_encode_refuses_dtypes_off_the_allow_list() -> None:
    for bad in (np.zeros(2, np.float64), np.zeros(2, np.uint16), np.array(["x"]),
                np.array([object()])):
        with pytest.raises(InvalidInput, match="the wire carries only"):
            wire.encode([bad], 0)


def test_encode_refuses_a_tensor_over_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_TENSOR_BYTES", 64)
    wire.encode([np.zeros(16, np.float32)], 0)
    with pytest.raises(InvalidInput, match="MAX_TENSOR_BYTES"):
        wire.encode([np.zeros(17, np.float32)], 0)


@pytest.mark.parametrize("cut", [0, 3, _HEADER.size - 1, _HEADER.size + 1, _HEADER.size + 9,
                                 -1])
def test_truncated_messages_are_rejected(cut: int) -> None:
    raw = wire.encode([np.arange(6, dtype=np.float32).reshape(2, 3)], 5)
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(raw[:cut])


def test_bad_magic_and_unknown_version_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="bad magic"):
        wire.decode(_message(magic=b"HTTP"))
    with pytest.raises(ProtocolError, match="version 9"):
        wire.decode(_message(version=9))


def test_a_message_claiming_more_tensors_than_it_holds_is_truncated() -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(_message(count=3))
    with pytest.raises(ProtocolError, match="at most"):
        wire.decode(_message(count=wire.MAX_TENSORS + 1))


def test_lying_byte_lengths_are_rejected() -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    with pytest.raises(ProtocolError, match="claims 20 bytes but shape"):
        wire.decode(_message(_tensor(1, (2, 3), 20, data[:20])))
    with pytest.raises(ProtocolError, match="claims 28 bytes but shape"):
        wire.decode(_message(_tensor(1, (2, 3), 28, data + bytes(4))))
    # the length agrees with the shape, but the bytes are not there
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(_message(_tensor(1, (2, 3), 24, data[:10])))
    # a correct tensor followed by junk
    with pytest.raises(ProtocolError, match="3 trailing bytes"):
        wire.decode(_message(_tensor(1, (2, 3), 24, data)) + b"abc")


def test_unknown_dtype_codes_are_rejected() -> None:
    for code in (0, len(wire.DTYPES) + 1, 255):
        with pytest.raises(ProtocolError, match=f"unknown dtype code {code}"):
            wire.decode(_message(_tensor(code, (1,), 4, bytes(4))))


def test_negative_and_too_many_dimensions_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="negative dimension"):
        wire.decode(_message(_tensor(1, (-1, 4), 16, bytes(16))))
    with pytest.raises(ProtocolError, match="at most 16"):
        wire.decode(_message(_tensor(1, (1,) * 17, 4, bytes(4))))


def test_sizes_over_the_cap_are_rejected_before_anything_is_allocated() -> None:
    huge = (1 << 20, 1 << 20)  # 4 TiB of float32: must fail on the header alone
    with pytest.raises(ProtocolError, match="cap"):
        wire.decode(_message(_tensor(1, huge, 4 << 40, b"")))
    # a length within the cap that disagrees with an overflowing shape
    with pytest.raises(ProtocolError, match="needs"):
        wire.decode(_message(_tensor(1, (1 << 62, 1 << 62), 16, bytes(16))))


def test_bool_tensors_hold_only_zero_and_one() -> None:
    with pytest.raises(ProtocolError, match="bool"):
        wire.decode(_message(_tensor(8, (3,), 3, b"\x00\x01\x02")))


def test_the_decoder_never_unpickles() -> None:
    import pickle

    payload = pickle.dumps(np.zeros(3))
    with pytest.raises(ProtocolError):
        wire.decode(payload)
