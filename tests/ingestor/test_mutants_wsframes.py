"""Frame parser edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

The size limits at exactly ``max_size`` (a frame, and a message in fragments), control frames at
exactly 125 bytes, the shortest frames (two bytes), a header that is complete with nothing after it,
and the close reasons sent to the venue.
"""

from __future__ import annotations

import pytest
from websockets.frames import CloseCode, Frame, Opcode

from ingestor.wsframes import FrameError, read_frames


def wire(*frames: Frame) -> bytes:
    return b"".join(f.serialize(mask=False, extensions=[]) for f in frames)


def read(buf: bytes, max_size: int) -> tuple[list[bytes], list[tuple[int, bytes]], int, list[bytes] | None, bool]:
    data: list[bytes] = []
    control: list[tuple[int, bytes]] = []
    pos, partial, closed = read_frames(buf, 0, max_size, data, control, None)
    return data, control, pos, partial, closed


# one limit per length encoding: 7-bit, 16-bit and 64-bit lengths
LIMITS = [100, 125, 126, 1000, 65535, 65536, 70_000]


@pytest.mark.parametrize("max_size", LIMITS)
def test_a_frame_of_exactly_max_size_is_accepted(max_size: int) -> None:
    payload = b"x" * max_size
    data, _, pos, partial, _ = read(wire(Frame(Opcode.BINARY, payload)), max_size)
    assert data == [payload] and partial is None and pos == len(wire(Frame(Opcode.BINARY, payload)))


@pytest.mark.parametrize("max_size", LIMITS)
def test_a_frame_one_byte_over_max_size_is_refused_with_1009(max_size: int) -> None:
    with pytest.raises(FrameError) as info:
        read(wire(Frame(Opcode.TEXT, b"x" * (max_size + 1))), max_size)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert str(info.value) == f"frame of {max_size + 1} bytes exceeds limit of {max_size} bytes"


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    """The length is checked before the payload arrives: nothing is buffered for a frame that cannot fit."""
    head = wire(Frame(Opcode.TEXT, b"x" * 70_001))[:10]
    with pytest.raises(FrameError) as info:
        read(head, 70_000)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("max_size", LIMITS)
def test_a_fragmented_message_of_exactly_max_size_is_accepted(max_size: int) -> None:
    first = max_size // 3
    parts = [b"a" * first, b"b" * (max_size - 2 * first), b"c" * first]
    stream = wire(
        Frame(Opcode.TEXT, parts[0], fin=False), Frame(Opcode.CONT, parts[1], fin=False), Frame(Opcode.CONT, parts[2])
    )
    data, _, pos, partial, _ = read(stream, max_size)
    assert data == [b"".join(parts)] and len(data[0]) == max_size and partial is None and pos == len(stream)


@pytest.mark.parametrize("max_size", LIMITS)
def test_a_fragmented_message_one_byte_over_max_size_is_refused_with_1009(max_size: int) -> None:
    first = max_size // 3
    stream = wire(
        Frame(Opcode.TEXT, b"a" * first, fin=False),
        Frame(Opcode.CONT, b"b" * (max_size - 2 * first), fin=False),
        Frame(Opcode.CONT, b"c" * (first + 1)),
    )
    with pytest.raises(FrameError) as info:
        read(stream, max_size)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert str(info.value) == f"message of {max_size + 1} bytes exceeds limit of {max_size}"


def test_a_fragmented_message_is_refused_as_soon_as_its_fragments_exceed_the_limit() -> None:
    """The refusal comes with the fragment that crosses the limit, before the final one arrives."""
    stream = wire(Frame(Opcode.TEXT, b"a" * 60, fin=False), Frame(Opcode.CONT, b"b" * 41, fin=False))
    with pytest.raises(FrameError, match="message of 101 bytes"):
        read(stream, 100)


def test_a_control_frame_of_exactly_125_bytes_is_accepted_and_126_refused() -> None:
    data, control, _, _, _ = read(wire(Frame(Opcode.PING, b"p" * 125)), 1 << 20)
    assert control == [(Opcode.PING, b"p" * 125)] and data == []
    with pytest.raises(FrameError) as info:
        read(bytes([0x89, 126, 0, 126]) + b"p" * 126, 1 << 20)
    assert info.value.code == CloseCode.PROTOCOL_ERROR and str(info.value) == "control frame too long"


def test_an_empty_frame_of_two_bytes_is_read() -> None:
    stream = wire(Frame(Opcode.TEXT, b"a"), Frame(Opcode.TEXT, b""))
    data, _, pos, _, _ = read(stream, 100)
    assert data == [b"a", b""] and pos == len(stream) == 5


def test_an_empty_frame_with_a_16_bit_length_is_read_once_its_header_is_complete() -> None:
    """The length's encoding is not required to be the shortest: four bytes are a whole empty frame."""
    data, _, pos, _, _ = read(bytes([0x81, 126, 0, 0]), 100)
    assert data == [b""] and pos == 4
    data, _, pos, _, _ = read(bytes([0x81, 126, 0]), 100)
    assert data == [] and pos == 0


def test_an_empty_frame_with_a_64_bit_length_is_read_once_its_header_is_complete() -> None:
    data, _, pos, _, _ = read(bytes([0x82, 127]) + bytes(8), 100)
    assert data == [b""] and pos == 10
    data, _, pos, _, _ = read(bytes([0x82, 127]) + bytes(7), 100)
    assert data == [] and pos == 0


@pytest.mark.parametrize(("raw", "reason"), [
    (bytes([0x81 | 0x40, 1]) + b"x", "reserved bits must be 0"),
    (bytes([0x81 | 0x10, 1]) + b"x", "reserved bits must be 0"),
    (Frame(Opcode.TEXT, b"x").serialize(mask=True, extensions=[]), "incorrect masking"),
    (bytes([0x83, 1]) + b"x", "invalid opcode: 3"),
    (bytes([0x09, 1]) + b"x", "fragmented control frame"),
    (wire(Frame(Opcode.CONT, b"x")), "unexpected continuation frame"),
    (wire(Frame(Opcode.TEXT, b"a", fin=False), Frame(Opcode.TEXT, b"b")), "expected a continuation frame"),
])
def test_the_close_reason_sent_to_the_venue(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        read(raw, 100)
    assert str(info.value) == reason and info.value.code == CloseCode.PROTOCOL_ERROR


def test_reading_starts_at_pos_and_a_close_frame_ends_it() -> None:
    lead = b"\x00" * 7  # bytes already consumed by the caller
    stream = lead + wire(Frame(Opcode.TEXT, b"a"), Frame(Opcode.CLOSE, b"\x03\xe8"), Frame(Opcode.TEXT, b"b"))
    data: list[bytes] = []
    control: list[tuple[int, bytes]] = []
    pos, partial, closed = read_frames(stream, len(lead), 100, data, control, None)
    assert data == [b"a"] and control == [(Opcode.CLOSE, b"\x03\xe8")] and closed and partial is None
    assert pos == len(lead) + 3 + 4


def test_a_close_frame_over_125_bytes_is_refused() -> None:
    """Close is a control frame too (opcode 8, the lowest): the 125-byte limit applies to it."""
    raw = bytes([0x88, 126, 0, 126]) + b"\x03\xe8" + b"r" * 124
    with pytest.raises(FrameError) as info:
        read(raw, 1 << 20)
    assert info.value.code == CloseCode.PROTOCOL_ERROR and str(info.value) == "control frame too long"


def test_an_incomplete_64_bit_length_after_pos_waits_for_the_rest() -> None:
    """Eight length bytes are needed before the length means anything: five of them are not read as a length."""
    lead = b"\x00" * 7
    partial = bytes([0x82, 127, 0, 0, 0, 1, 0])  # the length 0x0000000100...: only five of its eight bytes
    data: list[bytes] = []
    pos, partial_out, closed = read_frames(lead + partial, len(lead), 100, data, [], None)
    assert (pos, data, partial_out, closed) == (len(lead), [], None, False)


def test_binary_messages_go_to_their_own_list_when_one_is_given() -> None:
    buf = wire(Frame(Opcode.BINARY, b"\x00\x01"), Frame(Opcode.TEXT, b"{}"), Frame(Opcode.BINARY, b"zz"))
    data: list[bytes] = []
    control: list[tuple[int, bytes]] = []
    binary: list[bytes] = []
    pos, partial, closed = read_frames(buf, 0, 1000, data, control, None, binary)
    assert (data, binary, control, pos, partial, closed) == ([b"{}"], [b"\x00\x01", b"zz"], [], len(buf), None, False)
    # without a list for them, a binary message is a message like any other (fragments included)
    assert read(buf, 1000)[0] == [b"\x00\x01", b"{}", b"zz"]


def test_a_fragmented_binary_message_is_refused_with_1003_when_binary_is_kept_apart() -> None:
    buf = wire(Frame(Opcode.BINARY, b"ab", fin=False), Frame(Opcode.CONT, b"cd"))
    with pytest.raises(FrameError) as info:
        read_frames(buf, 0, 1000, [], [], None, [])
    assert (info.value.code, str(info.value), info.value.kind) == (
        CloseCode.UNSUPPORTED_DATA, "fragmented binary message", "binary")
    assert read(buf, 1000)[0] == [b"abcd"]  # not kept apart: reassembled as usual
