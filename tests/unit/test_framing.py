"""The framed stream: typed messages, chunked tensors and error replies over in-memory streams."""

from __future__ import annotations

import asyncio
import math

import msgpack
import pytest
import torch

from swarmnet.errors import (
    BadRequestError,
    PeerBusyError,
    PeerUnavailableError,
    ProtocolError,
    RemoteError,
    UnknownMicrobatchError,
    UnknownRunError,
)
from swarmnet.protocols.framing import (
    CHUNK,
    CHUNK_BYTES,
    ERROR,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    MESSAGE,
    FramedStream,
    TensorHeader,
    header_for,
    serve_request,
)
from swarmnet.protocols.stage import BackwardReply, BackwardRequest, ForwardReply, ForwardRequest
from swarmnet.testing.memstream import frames

pytestmark = pytest.mark.timeout(30)


class MemoryWriter:
    """The part of `asyncio.StreamWriter` that `FramedStream` uses, collecting bytes in memory."""

    def __init__(self):
        self.data = bytearray()
        self.closed = False

    def write(self, data) -> None:
        assert not self.closed
        self.data += bytes(data)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def run(coro):
    return asyncio.run(coro)


def reader_of(data: bytes) -> FramedStream:
    """A stream that reads `data`, then end of stream. Call inside a running loop."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return FramedStream(reader, MemoryWriter(), peer="remote-peer")  # type: ignore[arg-type]


async def written(*sends) -> bytes:
    """Bytes produced by `FramedStream` for a sequence of `(method name, *args)` calls."""
    writer = MemoryWriter()
    stream = FramedStream(asyncio.StreamReader(), writer)  # type: ignore[arg-type]
    for name, *args in sends:
        await getattr(stream, name)(*args)
    return bytes(writer.data)


def frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + len(payload).to_bytes(4, "big") + payload


def message_frame(name: str, body) -> bytes:
    return frame(MESSAGE, msgpack.packb([name, body], use_bin_type=True))


def frames_of(data: bytes) -> list[tuple[int, int]]:
    """(type, length) of each frame in `data`."""
    frames, offset = [], 0
    while offset < len(data):
        kind, length = data[offset], int.from_bytes(data[offset + 1 : offset + 5], "big")
        frames.append((kind, length))
        offset += 5 + length
    assert offset == len(data)
    return frames


def round_trip_message(message, *expected: type):
    async def go():
        stream = reader_of(await written(("send_message", message)))
        return await stream.receive_message(*(expected or (type(message),)))

    return run(go())


def round_trip_tensor(tensor: torch.Tensor, compression: str = "none") -> tuple[torch.Tensor, bytes]:
    header = header_for(tensor, compression)

    async def go():
        data = await written(("send_tensor", tensor, header))
        return await reader_of(data).receive_tensor(header), data

    return run(go())


def receive_message(data: bytes, *expected: type):
    async def go():
        return await reader_of(data).receive_message(*(expected or (ForwardRequest,)))

    return run(go())


def receive_tensor(data: bytes, header: TensorHeader):
    async def go():
        return await reader_of(data).receive_tensor(header)

    return run(go())


HEADER = TensorHeader(dtype="float32", shape=[2, 8, 32])
TOKENS = TensorHeader(dtype="int64", shape=[2, 8])


# --- messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        ForwardRequest(run_id="r" * 16, microbatch_id="mb-1", stage=0, input=TOKENS),
        ForwardRequest(
            run_id="r" * 16,
            microbatch_id="mb-2",
            stage=3,
            input=TensorHeader(dtype="float32", shape=[2, 8, 32], compression="fp16"),
            targets=TOKENS,
            reply_compression="fp16",
        ),
        ForwardReply(output=HEADER, grad_input=None, loss=None, step=0),
        ForwardReply(output=None, grad_input=HEADER, loss=2.75, step=12),
        BackwardRequest(run_id="r" * 16, microbatch_id="mb-3", stage=1, grad_output=HEADER),
        BackwardReply(grad_input=None, step=4),
        BackwardReply(grad_input=HEADER, step=5),
    ],
    ids=lambda m: type(m).__name__,
)
def test_message_round_trip(message):
    received = round_trip_message(message, ForwardRequest, ForwardReply, BackwardRequest, BackwardReply)
    assert received == message
    assert type(received) is type(message)


def test_nested_header_comes_back_typed():
    message = ForwardRequest(run_id="r", microbatch_id="m", stage=1, input=HEADER, targets=TOKENS)
    received = round_trip_message(message)
    assert isinstance(received.input, TensorHeader) and isinstance(received.targets, TensorHeader)
    assert received.input.shape == [2, 8, 32]


def test_integer_loss_comes_back_as_float():
    body = {"output": None, "grad_input": None, "loss": 3, "step": 1}
    reply = receive_message(message_frame("ForwardReply", body), ForwardReply)
    assert reply.loss == 3.0 and isinstance(reply.loss, float)


def test_a_message_then_its_tensors_in_order():
    x = torch.randn(2, 8, 32)
    targets = torch.randint(0, 256, (2, 8))
    request = ForwardRequest(
        run_id="r", microbatch_id="m", stage=1, input=header_for(x), targets=header_for(targets)
    )

    async def go():
        data = await written(
            ("send_message", request),
            ("send_tensor", x, request.input),
            ("send_tensor", targets, request.targets),
        )
        stream = reader_of(data)
        received = await stream.receive_message(ForwardRequest)
        got_x = await stream.receive_tensor(received.input)
        return received, got_x, await stream.receive_tensor(received.targets)

    received, got_x, got_targets = run(go())
    assert received == request
    assert torch.equal(got_x, x) and torch.equal(got_targets, targets)


def test_oversized_messages_are_not_sent():
    message = ForwardRequest(run_id="r", microbatch_id="m" * MAX_MESSAGE_BYTES, stage=0, input=TOKENS)
    with pytest.raises(ProtocolError):
        run(written(("send_message", message)))


# --- tensors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 8, 32),
        torch.randint(-(2**62), 2**62, (3, 5)),
        torch.randn(4, 16).to(torch.bfloat16),
        torch.randn(7).to(torch.float16),
        torch.tensor(1.5),
    ],
    ids=["float32", "int64", "bfloat16", "float16", "scalar"],
)
def test_tensor_round_trip_is_exact(tensor):
    received, _ = round_trip_tensor(tensor)
    assert received.dtype == tensor.dtype
    assert received.shape == tensor.shape
    assert torch.equal(received, tensor)


def test_non_contiguous_tensor_round_trip():
    tensor = torch.randn(8, 6).t()
    assert not tensor.is_contiguous()
    received, _ = round_trip_tensor(tensor)
    assert torch.equal(received, tensor)


def test_a_large_tensor_spans_several_chunks():
    tensor = torch.randn(5, 160_000)  # 3.2 MB of float32
    received, data = round_trip_tensor(tensor)
    assert torch.equal(received, tensor)
    frames = frames_of(data)
    assert len(frames) == math.ceil(tensor.numel() * 4 / CHUNK_BYTES) > 1
    assert all(kind == CHUNK and length <= CHUNK_BYTES for kind, length in frames)
    assert sum(length for _, length in frames) == tensor.numel() * 4


@pytest.mark.parametrize("shape", [(0,), (0, 4), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_empty_tensor_round_trip(shape, dtype):
    tensor = torch.empty(shape, dtype=dtype)
    received, data = round_trip_tensor(tensor)
    assert data == b""
    assert received.shape == tensor.shape and received.dtype == dtype


def test_fp16_compression_is_lossy_but_close():
    tensor = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(0))
    received, data = round_trip_tensor(tensor, "fp16")
    assert sum(length for _, length in frames_of(data)) == tensor.numel() * 2
    assert received.dtype == torch.float32 and received.shape == tensor.shape
    assert not torch.equal(received, tensor)
    assert torch.allclose(received, tensor, rtol=1e-3, atol=1e-4)


def test_fp16_compression_does_not_apply_to_integers():
    tensor = torch.randint(0, 70_000, (2, 8))
    header = header_for(tensor, "fp16")
    assert header.compression == "none"
    received, _ = round_trip_tensor(tensor, "fp16")
    assert torch.equal(received, tensor)


def test_unsendable_dtype_is_refused():
    with pytest.raises(ProtocolError):
        header_for(torch.zeros(2, dtype=torch.float64))


# --- error frames -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        BadRequestError("input contains NaN"),
        UnknownRunError("not this run"),
        UnknownMicrobatchError("no cached input"),
        PeerBusyError("queue full"),
        PeerUnavailableError("shutting down"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_frames_round_trip_to_their_class(error):
    async def go():
        return await reader_of(await written(("send_error", error))).receive_message(ForwardReply)

    with pytest.raises(type(error)) as caught:
        run(go())
    assert type(caught.value) is type(error)
    assert str(caught.value) == str(error)
    assert caught.value.peer == "remote-peer"
    assert caught.value.retryable == error.retryable


def test_protocol_error_frame_round_trips():
    async def go():
        data = await written(("send_error", ProtocolError("bad frame")))
        return await reader_of(data).receive_message(ForwardReply)

    with pytest.raises(ProtocolError, match="bad frame"):
        run(go())


def test_unknown_error_code_becomes_remote_error():
    data = frame(ERROR, msgpack.packb(["martian", "something odd"]))
    with pytest.raises(RemoteError) as caught:
        receive_message(data)
    assert type(caught.value) is RemoteError
    assert str(caught.value) == "something odd"


def test_internal_errors_do_not_leak_their_message():
    async def go():
        data = await written(("send_error", KeyError("secret path")))
        return await reader_of(data).receive_message(ForwardReply)

    with pytest.raises(RemoteError) as caught:
        run(go())
    assert type(caught.value) is RemoteError
    assert "secret" not in str(caught.value) and "KeyError" in str(caught.value)


def test_an_error_frame_instead_of_a_chunk_raises_it():
    with pytest.raises(PeerBusyError):
        receive_tensor(frame(ERROR, msgpack.packb(["busy", "later"])), HEADER)


def test_a_server_refuses_an_error_frame_instead_of_echoing_its_code():
    """A client that sends an error frame as its request gets `bad_request` (a protocol
    violation), not the error code it chose, and the refusal is counted as such."""

    async def go() -> tuple[str, list]:
        stream = reader_of(frame(ERROR, msgpack.packb(["busy", "echo me"])))
        outcome = await serve_request(stream, lambda: stream.receive_message(ForwardRequest), what="stage")
        return outcome, frames(stream.io.writer.data)

    outcome, answer = run(go())
    assert outcome == ProtocolError.code
    (kind, payload), = answer
    assert kind == ERROR and msgpack.unpackb(payload)[0] == ProtocolError.code


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb("just a string"), msgpack.packb([1, 2, 3])])
def test_malformed_error_frames_are_protocol_errors(payload):
    with pytest.raises(ProtocolError):
        receive_message(frame(ERROR, payload))


# --- malformed input --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 4, 255])
def test_unknown_frame_type(kind):
    with pytest.raises(ProtocolError, match="unknown frame type"):
        receive_message(frame(kind, b"x"))


@pytest.mark.parametrize(
    ("kind", "length"),
    [
        (CHUNK, MAX_FRAME_BYTES + 1),
        (MESSAGE, MAX_MESSAGE_BYTES + 1),
        (ERROR, MAX_MESSAGE_BYTES + 1),
        (MESSAGE, 2**32 - 1),
    ],
)
def test_frames_over_the_limit_are_refused_before_reading_them(kind, length):
    # Only the 5-byte header is sent: the limit must be enforced before waiting for the payload.
    data = bytes([kind]) + length.to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="limit"):
        if kind == CHUNK:
            receive_tensor(data, TensorHeader(dtype="float32", shape=[2**21]))
        else:
            receive_message(data)


def test_a_chunk_frame_at_the_limit_is_accepted():
    header = TensorHeader(dtype="float32", shape=[MAX_FRAME_BYTES // 4])
    tensor = receive_tensor(frame(CHUNK, bytes(MAX_FRAME_BYTES)), header)
    assert tensor.shape == (MAX_FRAME_BYTES // 4,) and not tensor.any()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty-stream"),
        pytest.param(b"\x01\x00\x00", id="partial-header"),
        pytest.param(b"\x01\x00\x00\x00\x10" + b"\x92" * 4, id="partial-payload"),
    ],
)
def test_truncated_frames(data):
    with pytest.raises(ProtocolError, match="closed"):
        receive_message(data)


def test_a_tensor_cut_short_between_chunks():
    tensor = torch.randn(3, 160_000)

    async def go():
        data = await written(("send_tensor", tensor, header_for(tensor)))
        first_chunk = data[: 5 + CHUNK_BYTES]
        return await reader_of(first_chunk).receive_tensor(header_for(tensor))

    with pytest.raises(ProtocolError, match="closed"):
        run(go())


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x92\xa1", id="truncated"),
        pytest.param(msgpack.packb(["ForwardRequest", {}]) + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb("ForwardRequest"), id="str"),
        pytest.param(msgpack.packb(["ForwardRequest"]), id="one-item"),
        pytest.param(msgpack.packb(["ForwardRequest", {}, 1]), id="three-items"),
        pytest.param(msgpack.packb({1: 2}), id="int-map-key"),
    ],
)
def test_garbage_msgpack(payload):
    with pytest.raises(ProtocolError):
        receive_message(frame(MESSAGE, payload))


def _forward_body(**changes):
    body = {
        "run_id": "r",
        "microbatch_id": "m",
        "stage": 0,
        "input": {"dtype": "int64", "shape": [2, 8], "compression": "none"},
    }
    body.update(changes)
    return body


def test_a_hand_built_valid_message_is_accepted():
    request = receive_message(message_frame("ForwardRequest", _forward_body()))
    assert request == ForwardRequest(run_id="r", microbatch_id="m", stage=0, input=TOKENS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BackwardRequest", (ForwardRequest,)),
        ("ForwardReply", (ForwardRequest, BackwardRequest)),
        ("forwardrequest", (ForwardRequest,)),
        ("TensorHeader", (ForwardRequest,)),
    ],
)
def test_unexpected_message_name(name, expected):
    with pytest.raises(ProtocolError, match="unexpected message"):
        receive_message(message_frame(name, _forward_body()), *expected)


def test_a_chunk_where_a_message_is_expected():
    with pytest.raises(ProtocolError, match="expected a message"):
        receive_message(frame(CHUNK, b"\x00" * 8))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_forward_body(stage="0"), id="str-for-int"),
        pytest.param(_forward_body(stage=True), id="bool-for-int"),
        pytest.param(_forward_body(stage=0.0), id="float-for-int"),
        pytest.param(_forward_body(run_id=b"r"), id="bytes-for-str"),
        pytest.param(_forward_body(microbatch_id=None), id="none-for-str"),
        pytest.param(_forward_body(input=[2, 8]), id="list-for-header"),
        pytest.param(_forward_body(input={"dtype": "int64", "shape": "2x8"}), id="str-for-shape"),
        pytest.param(_forward_body(input={"dtype": "int64", "shape": [2.0, 8]}), id="float-in-shape"),
        pytest.param(_forward_body(input={"dtype": 5, "shape": [2, 8]}), id="int-for-dtype"),
        pytest.param(_forward_body(targets="yes"), id="str-for-optional-header"),
        pytest.param([], id="list-body"),
        pytest.param(None, id="none-body"),
    ],
)
def test_wrong_field_types(body):
    with pytest.raises(ProtocolError):
        receive_message(message_frame("ForwardRequest", body))


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), "1.0", True])
def test_bad_loss_values(loss):
    body = {"output": None, "grad_input": None, "loss": loss, "step": 1}
    with pytest.raises(ProtocolError):
        receive_message(message_frame("ForwardReply", body), ForwardReply)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_forward_body(extra=1), id="extra-field"),
        pytest.param(
            _forward_body(input={"dtype": "int64", "shape": [2, 8], "device": "cuda"}), id="nested-extra"
        ),
        pytest.param({k: v for k, v in _forward_body().items() if k != "stage"}, id="missing-field"),
        pytest.param(_forward_body(input={"shape": [2, 8]}), id="nested-missing"),
        pytest.param({**_forward_body(), b"x": 1, "y": 2}, id="mixed-key-types"),
    ],
)
def test_extra_or_missing_fields(body):
    with pytest.raises(ProtocolError):
        receive_message(message_frame("ForwardRequest", body))


@pytest.mark.parametrize(
    "sizes", [[12], [4, 5], [7, 2]], ids=["one-big-chunk", "second-overflows", "by-one-byte"]
)
def test_chunks_exceeding_the_announced_size(sizes):
    header = TensorHeader(dtype="float32", shape=[2])  # 8 bytes
    data = b"".join(frame(CHUNK, bytes(n)) for n in sizes)
    with pytest.raises(ProtocolError, match="exceed"):
        receive_tensor(data, header)


def test_a_chunk_after_a_complete_tensor_is_not_taken_for_a_message():
    header = TensorHeader(dtype="float32", shape=[2])

    async def go():
        stream = reader_of(frame(CHUNK, bytes(8)) + frame(CHUNK, bytes(4)))
        assert torch.equal(await stream.receive_tensor(header), torch.zeros(2))
        return await stream.receive_message(ForwardReply)

    with pytest.raises(ProtocolError, match="expected a message"):
        run(go())


def test_a_message_where_a_chunk_is_expected():
    with pytest.raises(ProtocolError, match="chunk"):
        receive_tensor(message_frame("ForwardRequest", _forward_body()), HEADER)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(TensorHeader(dtype="float64", shape=[2]), id="float64"),
        pytest.param(TensorHeader(dtype="complex64", shape=[2]), id="complex64"),
        pytest.param(TensorHeader(dtype="torch.float32", shape=[2]), id="torch-name"),
        pytest.param(TensorHeader(dtype="float32", shape=[2, -1]), id="negative-dim"),
        pytest.param(TensorHeader(dtype="float32", shape=[-2, -4]), id="two-negative-dims"),
        pytest.param(TensorHeader(dtype="float32", shape=[1] * 9), id="nine-dims"),
        pytest.param(TensorHeader(dtype="float32", shape=[2], compression="zstd"), id="unknown-compression"),
        pytest.param(TensorHeader(dtype="int64", shape=[2], compression="fp16"), id="fp16-of-int64"),
        pytest.param(TensorHeader(dtype="float32", shape=[2**62]), id="absurd-size"),
    ],
)
def test_invalid_tensor_headers_are_refused_before_reading(header):
    # The stream holds a plausible chunk; the header must be refused without reading or allocating.
    with pytest.raises(ProtocolError):
        receive_tensor(frame(CHUNK, bytes(8)), header)


def test_tensor_header_from_the_wire_with_unsupported_dtype():
    body = _forward_body(input={"dtype": "float64", "shape": [2, 8]})
    request = receive_message(message_frame("ForwardRequest", body))  # typed, not yet checked
    with pytest.raises(ProtocolError, match="dtype"):
        request.input.check()
