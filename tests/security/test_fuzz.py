"""Fuzzing (hypothesis) of every DHT record decoder, every wire message decoder and every RPC
handler, in process (issue 10).

Every target gets at least `EXAMPLES` generated malformed inputs and must answer each with a typed
error: a decoder raises only its documented `SwarmnetError` subclass; a handler answers with a typed
error frame (never `internal`) or closes the connection, lets nothing escape and logs no internal
error. Memory stays bounded (RSS, and the bounded caches stay within their bounds), and every
handler still serves a valid request after the run.

Inputs are mostly mutations of valid inputs (a `plan`): values replaced by odd ones, fields dropped,
added, swapped and retyped, tensor bytes poisoned, then bytes flipped, cut and spliced, frame types
and lengths rewritten. Signed records are re-signed after the mutation, so that the body checks are
reached. Random bytes go to every decoder as well. No p2pd and no other process: stream handlers
read in-memory streams (`swarmnet.testing.memstream`); the all-reduce port, which reads raw sockets,
reads one end of a `socket.socketpair()`.

Two fuzzing tests share the time (hypothesis costs about half a millisecond per example, so each
example feeds every target of its test once): one for the decoders, one for the handlers. The tests
after them pin what the fuzzing found: an oversized peer id (fixed) and a stage poisoned by finite
but huge activations (fixed: magnitudes beyond 1e6 are refused, non-finite steps skipped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import os
import random
import socket
import time
from pathlib import Path

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmnet.averaging import allreduce, rounds, wire
from swarmnet.averaging.state import StateSnapshot, TensorEntry, compute_digest, decode_header, encode_header
from swarmnet.config import AccessConfig, ModelConfig, MoEConfig, PeerConfig, RunManifest, TrainingConfig
from swarmnet.dht import keys, records
from swarmnet.dht.identity import Identity, verify_signature
from swarmnet.dht.validator import SwarmnetRecordValidator
from swarmnet.errors import AccessDeniedError, ConfigError, ProtocolError, SwarmnetError
from swarmnet.models.partition import build_stage
from swarmnet.peer.compute import StageComputer
from swarmnet.peer.serving import StageServing
from swarmnet.peer.throughput import ThroughputMeter
from swarmnet.protocols import access, direct, stage, state
from swarmnet.protocols.codec import from_body, to_body
from swarmnet.protocols.framing import CHUNK, ERROR, MESSAGE, FramedStream, SocketIO, TensorHeader
from swarmnet.testing.memstream import MemoryWriter, PeerInfo, feed, frame, frames

EXAMPLES = 10_000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RSS_GROWTH_MB = 64
"""Bound on a fuzzing test's RSS growth: hypothesis alone keeps about 28 MB of records of 10,000
examples; the rest is ours (measured: decoders +37 MB, handlers +35 MB in all)."""

# --- the swarm under test -----------------------------------------------------------------------

B, T, D, V = 2, 4, 16, 256
MODEL = ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=1, d_ff=16, max_seq_len=T)
MANIFEST = RunManifest(
    name="fuzz",
    model=MODEL,
    training=TrainingConfig(num_stages=2, microbatch_size=B, seq_len=T, target_batch_size=4),
)
RUN = MANIFEST.run_id


def identity(seed: int) -> Identity:
    """A fixed Ed25519 identity (no key file)."""
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return Identity(private_key=key, path=Path("/nonexistent"))


SERVER, CLIENT = identity(1), identity(2)
TOKENS = torch.arange(B * T, dtype=torch.int64).reshape(B, T)
HIDDEN = torch.linspace(-1, 1, B * T * D).reshape(B, T, D)
TOKEN_BYTES, HIDDEN_BYTES = TOKENS.numpy().tobytes(), HIDDEN.numpy().tobytes()


def header(tensor: torch.Tensor) -> TensorHeader:
    """The header a client announces for `tensor`."""
    dtype = {torch.int64: "int64", torch.float32: "float32"}[tensor.dtype]
    return TensorHeader(dtype=dtype, shape=list(tensor.shape))


# --- inputs: odd values and mutation plans ------------------------------------------------------

# fmt: off
ODD = [
    None, True, False, 0, 1, -1, 2, 7, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 0.5, 1e308,
    math.nan, math.inf, -math.inf, "", "x", "none", "fp16", "int8", "float32", "float16", "int64",
    "bfloat16", "float64", "stage", "\x00é", "x" * 300, "y" * 70_000, "2" * 60_000, b"", b"\x00",
    b"\xff" * 32, b"z" * 64, [], [0], [1], [-1], [B, T], [B, T, D], [2**40] * 8, [1] * 9, ["a"], [[[]]],
    {}, {"dtype": "float32", "shape": [1], "compression": "none"}, {"a": 1}, {b"k": 1},
]
# fmt: on
TREE_OPS = ("set", "drop", "add", "swap", "retype", "poison", "tweak", "tweak", "tweak")
"""`tweak` (a value of the same type, so that the input still decodes and reaches the checks
behind the decoder) is drawn three times as often as the others."""
# fmt: off
TWEAKS = {
    int: [0, -1, 1, B, B + 1, T, D, V, 2**31, 2**63 - 1, -(2**63)],
    float: [0.0, -1.0, 1e-30, 1e308, math.nan, math.inf],
    str: ["", "x" * 129, "none", "fp16", "int8", "float16", "int64", "mb", "0" * 16, "ef" * 32,
          "/swarmnet/x/1"],
    bytes: [b"", bytes(31), bytes(33), bytes(64)],
    list: [[], [1], [B + 1, T], [0, T], [B, T, D], [B, T + 1], [B, T, 1], [-1, T], [2**31, 2**31], [B]],
    type(None): [{"dtype": "int64", "shape": [B, T]},
                 {"dtype": "float32", "shape": [B, T, D], "compression": "int8"}],
}
# fmt: on
BYTE_OPS = ("flip", "truncate", "splice", "frame_kind", "frame_length")
SEEDS = st.integers(0, 2**64 - 1)
POISONS = (b"\x00\x00\xc0\x7f" * 2, b"\x00\x00\x80\x7f" * 2, b"\xff" * 8, (V).to_bytes(8, "little"))
"""8 bytes written into tensor data: NaN, +inf (float32 pairs); -1 and `V` (int64 token ids)."""


def odd_value(rng: random.Random):
    """A value for a field: one of `ODD`, or a random integer, float (specials included), short
    text or short bytes."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(ODD)
    if kind == 1:
        return rng.choice([rng.randint(-(2**63), 2**64 - 1), rng.randint(-300, 300), 2**32, -(2**31) - 1])
    if kind == 2:
        return rng.choice(
            [rng.uniform(-1e6, 1e6), math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308]
        )
    if kind == 3:
        return "".join(
            chr(rng.choice((rng.randrange(32, 127), rng.randrange(0xA0, 0xD800))))
            for _ in range(rng.randrange(7))
        )
    return rng.randbytes(rng.randrange(9))


def make_plan(seed: int) -> tuple[list[tuple[str, int, object]], int, bytes]:
    """A mutation plan of 1 to 4 operations `(op, where, value)`, an index (which base input to
    mutate, which kind of input to send) and up to 96 random bytes, all chosen by the hypothesis
    drawn `seed`. (Drawing each of them from hypothesis costs two to three times as much per
    example, and the examples are what the time goes to.)"""
    rng = random.Random(seed)
    mode = rng.randrange(4)  # half the plans change values only, a quarter bytes only, a quarter both
    ops = TREE_OPS if mode < 2 else BYTE_OPS if mode == 2 else TREE_OPS + BYTE_OPS
    plan = [(rng.choice(ops), rng.getrandbits(32), odd_value(rng)) for _ in range(rng.randint(1, 4))]
    return plan, rng.getrandbits(16), rng.randbytes(rng.randint(0, 96))


def _copy(tree):
    """A deep copy of a msgpack tree (lists and maps)."""
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _slots(tree) -> list[tuple[list | dict, object]]:
    """Every (container, key) of a msgpack tree, depth first."""
    out: list[tuple[list | dict, object]] = []

    def walk(node):
        for key in range(len(node)) if isinstance(node, list) else list(node):
            out.append((node, key))
            if isinstance(node[key], (list, dict)):
                walk(node[key])

    if isinstance(tree, (list, dict)):
        walk(tree)
    return out


def _retyped(value):
    """A value of a neighbouring type: int ↔ float, str ↔ bytes, list ↔ map, None → 0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value) if abs(value) < 2**53 else str(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and abs(value) < 2**63 else str(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return 0


def mutate_tree(tree, plan):
    """A copy of a msgpack tree after the plan's structural operations (the tree itself when the
    plan has none)."""
    if not any(op in TREE_OPS for op, _, _ in plan):
        return tree
    tree = _copy(tree)
    for op, where, value in plan:
        if op not in TREE_OPS or op == "poison":
            continue
        value = _copy(value)  # the odd values are shared: never mutate them in place
        slots = _slots(tree)
        if op == "add":
            containers = [tree] + [n[k] for n, k in slots if isinstance(n[k], (list, dict))]
            node = containers[where % len(containers)]
            if isinstance(node, list):
                node.insert(where % (len(node) + 1), value)
            elif isinstance(node, dict):
                node[value if isinstance(value, (str, bytes)) else f"extra{where % 5}"] = value
        elif op in ("set", "drop", "swap", "retype", "tweak") and slots:
            node, key = slots[where % len(slots)]
            if op == "tweak":
                if isinstance(node[key], bool):
                    node[key] = not node[key]
                elif type(node[key]) in TWEAKS:
                    choices = TWEAKS[type(node[key])]
                    node[key] = _copy(choices[(where >> 8) % len(choices)])
            elif op == "set":
                node[key] = value
            elif op == "drop":
                del node[key]
            elif op == "retype":
                node[key] = _retyped(node[key])
            else:
                other, other_key = slots[(where >> 8) % len(slots)]
                mine, theirs = _copy(node[key]), _copy(other[other_key])
                node[key] = theirs
                other[other_key] = mine
    return tree


def mutate_tensor(data: bytes, plan) -> bytes:
    """Tensor bytes with the plan's poison values written in (NaN, inf, out-of-range token ids)."""
    out = bytearray(data)
    for op, where, _ in plan:
        if op == "poison" and len(out) >= 8:
            at = (where % (len(out) // 8)) * 8
            out[at : at + 8] = POISONS[(where >> 16) % len(POISONS)]
    return bytes(out)


def mutate_bytes(data: bytes, plan, starts: list[int], head: int | None = None) -> bytes:
    """Bytes after the plan's byte operations; `starts` are the offsets of the frames in them.
    Flips and splices stay within the first `head` bytes (the message frames: tensor values are
    changed by `poison` only, see `test_huge_finite_activations_do_not_poison_the_stage`); cuts and
    frame header rewrites go anywhere."""
    out, starts = bytearray(data), list(starts)
    head = len(out) if head is None else head
    for op, where, value in plan:
        if op == "flip" and head:
            out[where % head] ^= (where >> 24) % 255 + 1
        elif op == "truncate":
            del out[where % (len(out) + 1) :]
            head = min(head, len(out))
        elif op == "splice":
            at = where % (head + 1)
            spliced = value if isinstance(value, bytes) else msgpack.packb(value, use_bin_type=True)
            out[at:at] = spliced
            head += len(spliced)
            starts = [s + len(spliced) if s >= at else s for s in starts]
        elif op in ("frame_kind", "frame_length"):
            at = starts[(where >> 8) % len(starts)]
            if op == "frame_kind" and at < len(out):
                out[at] = (where >> 4) % 5  # 1..3 are real frame types
            elif op == "frame_length" and at + 5 <= len(out):
                length = int.from_bytes(out[at + 1 : at + 5], "big")
                length = where if where & 1 else max(0, length + (where >> 1) % 9 - 4)
                out[at + 1 : at + 5] = (length % 2**32).to_bytes(4, "big")
    return bytes(out)


_TREES: dict[int, tuple[object, list]] = {}


def message_tree(message) -> list:
    """`[name, body]` of a message, as `FramedStream.send_message` packs it (computed once)."""
    known = _TREES.get(id(message))
    if known is None or known[0] is not message:
        known = _TREES[id(message)] = (message, [type(message).__name__, to_body(message)])
    return known[1]


def framed(messages: list, plan, tensors: tuple[bytes, ...] = (), raw: bytes = b"") -> bytes:
    """Message frames, then chunk frames of `tensors`, then `raw` unframed bytes, mutated by `plan`."""
    trees = mutate_tree([message_tree(m) for m in messages], plan)
    parts = [frame(MESSAGE, msgpack.packb(tree, use_bin_type=True)) for tree in trees]
    head = sum(map(len, parts))
    parts += [frame(CHUNK, mutate_tensor(t, plan)) for t in tensors]
    starts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))] or [0]
    return mutate_bytes(b"".join(parts) + mutate_tensor(raw, plan), plan, starts, head)


# --- checks ---------------------------------------------------------------------------------------


def _typed_codes() -> set[str]:
    """The code of every `SwarmnetError` subclass, all but the base's `internal`."""
    codes, todo = set(), list(SwarmnetError.__subclasses__())
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo += cls.__subclasses__()
    return codes - {"internal"}


CODES = _typed_codes()
"""Error codes of typed replies (computed after every module defining an error was imported)."""


def expect(error: type[Exception], fn, *args):
    """`fn(*args)`, which may return or raise `error`; any other exception fails the example."""
    try:
        return fn(*args)
    except error:
        return None


def check_answer(data: bytes, replies: tuple[type, ...]) -> tuple[list, list[str]]:
    """What a handler wrote must be whole frames: typed error frames, reply messages of the protocol
    (and their chunks), or nothing (it closed the connection). Returns the messages and the codes."""
    messages, codes = [], []
    for kind, payload in frames(data):
        if kind == ERROR:
            code, message = msgpack.unpackb(payload, raw=False)
            assert code in CODES, f"untyped error reply {code!r}: {message}"
            codes.append(code)
        elif kind == MESSAGE:
            name, body = msgpack.unpackb(payload, raw=False)
            matching = [c for c in replies if c.__name__ == name]
            assert matching, f"unexpected reply message {name!r}"
            messages.append(from_body(matching[0], body, AssertionError))
    return messages, codes


def rss_mb() -> float:
    """Resident memory of this process, after a garbage collection (Linux)."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class ErrorLog(logging.Handler):
    """Collects ERROR records of swarmnet loggers: the handlers log every internal error so."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        records, self.records = self.records, []
        assert not records, [f"{r.getMessage()} {r.exc_info!r}" for r in records]


@pytest.fixture
def error_log():
    log = ErrorLog()
    logging.getLogger("swarmnet").addHandler(log)
    yield log
    logging.getLogger("swarmnet").removeHandler(log)


# --- record decoders ------------------------------------------------------------------------------

EXPIRATION = 4.0e9
"""In 2096: the validator's freshness check passes, and the fuzzing reaches beyond it."""
VALIDATOR = SwarmnetRecordValidator()
MOE_MANIFEST = dataclasses.replace(
    MANIFEST, model=dataclasses.replace(MODEL, n_layers=2, moe=MoEConfig(layers=(1,), num_experts=2, top_k=1))
)
MAXDDR = "/ip4/127.0.0.1/tcp/1"
RECORDS = [
    (
        keys.stage_key(RUN, 0),
        records.StageServerRecord(
            stage=0,
            throughput=1.5,
            queue_depth=0,
            device="cpu",
            memory_bytes=10,
            step=3,
            metrics_addr=None,
            maddrs=[MAXDDR],
            averaging_addr="127.0.0.1:2",
        ),
    ),
    (
        keys.progress_key(RUN, 0),
        records.ProgressRecord(epoch=1, samples=4, joining=False, left=False, digest="ab" * 32),
    ),
    (keys.trainer_key(RUN), records.TrainerRecord(step=1, loss=2.5, samples_per_s=3.0)),
    (
        keys.archive_key(RUN),
        records.ArchiveRecord(
            stages=[records.ArchivedStage(stage=0, step=1, digest="cd" * 32)], maddrs=[MAXDDR]
        ),
    ),
    (keys.MANIFESTS, records.ManifestRecord(run_id=MOE_MANIFEST.run_id, manifest=MOE_MANIFEST.to_dict())),
]
RECORD_TREES = [
    (
        DHTID.generate(source=key).to_bytes(),
        msgpack.unpackb(records.encode_record(SERVER, key, record, EXPIRATION)),
    )
    for key, record in RECORDS
]
SUBKEY = msgpack.packb(SERVER.peer_id)
STATE_ENTRIES = [
    TensorEntry(name="w", dtype="float32", shape=[4, 4]),
    TensorEntry(name="b", dtype="int64", shape=[2]),
]
HEADER_TREE = msgpack.unpackb(encode_header(7, STATE_ENTRIES))


def signed(tree) -> bytes:
    """A record tree, re-signed by `SERVER` over its first six fields when it has them."""
    if isinstance(tree, list) and len(tree) >= 6:
        tree = tree[:6] + [SERVER.sign(msgpack.packb(tree[:6], use_bin_type=True))] + tree[7:]
    return msgpack.packb(tree, use_bin_type=True)


def parse_manifest(manifest: dict) -> None:
    """`ManifestRecord.verified_manifest`, which parses with `RunManifest.from_dict`: a refusal is
    a `RecordError`, caused by the `ConfigError` of `from_dict` or by a run id mismatch."""
    try:
        records.ManifestRecord(run_id=RUN, manifest=manifest).verified_manifest()
    except records.RecordError as e:
        assert e.__cause__ is None or type(e.__cause__) is ConfigError, repr(e.__cause__)


MANIFEST_DICT = MOE_MANIFEST.to_dict()


def decode_records(plan, index: int, noise: bytes) -> None:
    """One input through each record decoder: random bytes, a near-valid unsigned record or a
    re-signed record with a mutated body (by `index`) to `decode_record` and to the validator
    hivemind calls (which runs `check_dht_record`); a mutated manifest to
    `ManifestRecord.verified_manifest`; a mutated state header or random bytes to `decode_header`."""
    dht_key, tree = RECORD_TREES[index // 3 % len(RECORD_TREES)]
    mutated = mutate_tree(tree, plan)
    if index % 3 == 0:
        blob, place = noise, DHTRecord(key=noise, subkey=noise, value=noise, expiration_time=EXPIRATION)
    else:
        blob = mutate_bytes(msgpack.packb(mutated), plan, [0]) if index % 3 == 1 else signed(mutated)
        place = DHTRecord(key=dht_key, subkey=SUBKEY, value=msgpack.packb(blob), expiration_time=EXPIRATION)
    record = expect(records.RecordError, records.decode_record, blob)
    if record is not None and isinstance(record.record, records.ManifestRecord):
        expect(records.RecordError, record.record.verified_manifest)
    # what hivemind calls: `check_dht_record`, whose `RecordError` (only) becomes False
    assert VALIDATOR.validate(place) in (True, False)
    parse_manifest(mutate_tree(MANIFEST_DICT, plan))
    header = noise if index % 3 == 0 else msgpack.packb(mutate_tree(HEADER_TREE, plan), use_bin_type=True)
    expect(ProtocolError, decode_header, mutate_bytes(header, plan, [0]), ProtocolError)


# --- wire message decoders ------------------------------------------------------------------------

TOKEN_HEADER, HIDDEN_HEADER = header(TOKENS), header(HIDDEN)
FORWARD_FIRST = stage.ForwardRequest(run_id=RUN, microbatch_id="mb", stage=0, input=TOKEN_HEADER)
FORWARD_LAST = stage.ForwardRequest(
    run_id=RUN, microbatch_id="mb", stage=1, input=HIDDEN_HEADER, targets=TOKEN_HEADER
)
BACKWARD_FIRST = stage.BackwardRequest(run_id=RUN, microbatch_id="mb", stage=0, grad_output=HIDDEN_HEADER)
STAGE_MESSAGES = (stage.ForwardRequest, stage.ForwardReply, stage.BackwardRequest, stage.BackwardReply)
STATE_MESSAGES = (
    state.StateInfoRequest,
    state.StateInfoReply,
    state.StateRangeRequest,
    state.StateRangeReply,
)
DIRECT_MESSAGES = (direct.DirectOpen, direct.DirectChallenge, direct.DirectProof)
AVERAGING_MESSAGES = (
    wire.Hello,
    wire.Ping,
    wire.Pong,
    wire.Handoff,
    wire.HandoffAck,
    wire.Welcome,
    wire.Done,
    direct.DirectOpen,
)
DIGEST = "ef" * 32
HELLO = direct.DirectOpen(
    protocol=stage.PROTOCOL, client=CLIENT.peer_id, server=SERVER.peer_id, nonce=bytes(32)
)
HANDOFF = wire.Handoff(run_id=RUN, stage=0, epoch=0, numel=4, weight=2.0, sender=CLIENT.peer_id)
HANDOFF = dataclasses.replace(HANDOFF, signature=CLIENT.sign(wire.handoff_transcript(HANDOFF)))
DECODED = [
    (
        FramedStream,
        STAGE_MESSAGES,
        [
            FORWARD_FIRST,
            FORWARD_LAST,
            BACKWARD_FIRST,
            stage.ForwardReply(output=HIDDEN_HEADER, grad_input=None, loss=None, step=1),
            stage.ForwardReply(output=None, grad_input=HIDDEN_HEADER, loss=2.5, step=1),
            stage.BackwardReply(grad_input=HIDDEN_HEADER, step=2),
        ],
    ),
    (
        state.StateStream,
        STATE_MESSAGES,
        [
            state.StateInfoRequest(run_id=RUN, stage=0),
            state.StateInfoReply(step=3, digest=DIGEST, total_bytes=80, header_bytes=40),
            state.StateRangeRequest(run_id=RUN, stage=0, digest=DIGEST, offset=0, length=80),
            state.StateRangeReply(digest=DIGEST, offset=0, length=80),
        ],
    ),
    (
        FramedStream,
        DIRECT_MESSAGES,
        [
            HELLO,
            direct.DirectChallenge(nonce=bytes(32), signature=bytes(64)),
            direct.DirectProof(signature=bytes(64)),
        ],
    ),
]
AVERAGING_BASES = [
    wire.Hello(round_id="r", group=DIGEST, sender=1, numel=8, weight=1.0, signature=bytes(64)),
    wire.Ping(),
    wire.Pong(),
    HANDOFF,
    wire.HandoffAck(accepted=False, reason="no"),
    wire.Welcome(round_id="r"),
    wire.Done(round_id="r", checksum=DIGEST),
    HELLO,
]


def socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


async def send_and_close(sock: socket.socket, data: bytes) -> None:
    """Sends `data` and half-closes, unless the other end closes first."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def received(sock: socket.socket) -> bytes:
    """Everything already received on a non-blocking socket (a reset, from a peer that closed with
    our bytes unread, comes after the bytes it had sent)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except (BlockingIOError, ConnectionResetError):
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


async def decoded_from_socket(data: bytes):
    """`wire.recv_message` over one end of a socket pair while the other end sends `data`."""
    ours, theirs = socket_pair()
    sender = asyncio.ensure_future(send_and_close(theirs, data))
    try:
        return await wire.recv_message(ours, AVERAGING_MESSAGES)
    finally:
        ours.close()  # ends the sender if it is still blocked
        await sender
        theirs.close()


async def decode_messages(plan, index: int, noise: bytes) -> None:
    """One input per protocol through its decoder: a mutated message of the protocol (two thirds of
    the examples), or the noise as a message payload or as raw bytes."""
    choice = index % 3

    def data_for(bases: list) -> bytes:
        if choice == 0:
            return frame(MESSAGE, noise) if index & 8 else noise
        return framed([bases[index // 3 % len(bases)]], plan)

    for stream_cls, expected, bases in DECODED:
        try:
            message = await stream_cls(feed(data_for(bases)), MemoryWriter(), peer="fuzzer").receive_message(
                *expected
            )
        except SwarmnetError:
            continue
        assert isinstance(message, expected)
        for value in vars(message).values():
            if isinstance(value, TensorHeader):
                expect(ProtocolError, value.check)
    try:
        assert isinstance(await decoded_from_socket(data_for(AVERAGING_BASES)), AVERAGING_MESSAGES)
    except (SwarmnetError, ConnectionError):  # ConnectionError: the bytes ended inside a frame
        pass


@pytest.mark.timeout(150)
def test_decoders_raise_only_typed_errors(error_log):
    """Each record decoder and each protocol's message decoder gets one input per example (see
    `decode_records`, `decode_messages`): `decode_record` and `check_dht_record` raise only
    `RecordError`, `RunManifest.from_dict` only `ConfigError` (as the cause of the manifest record's
    `RecordError`), `decode_header` only the error it is given, the message decoders only
    `SwarmnetError`s. The verified-record cache stays within its bound and memory stays bounded."""
    loop = asyncio.new_event_loop()
    calls = 0
    before = rss_mb()

    @FUZZ
    @given(seed=SEEDS)
    def fuzz(seed):
        nonlocal calls
        calls += 1
        plan, index, noise = make_plan(seed)
        decode_records(plan, index, noise)
        loop.run_until_complete(decode_messages(plan, index, noise))
        error_log.check()

    try:
        fuzz()
    finally:
        loop.close()
    assert calls >= EXAMPLES
    assert len(records._verified) <= records.VERIFIED_CACHE_SIZE
    assert rss_mb() - before < RSS_GROWTH_MB


# --- RPC handlers ---------------------------------------------------------------------------------

STATE_DATA = bytes(range(80))
SNAPSHOT = StateSnapshot(
    step=7, entries=STATE_ENTRIES, data=STATE_DATA, digest=compute_digest(7, STATE_ENTRIES, STATE_DATA)
)
STAGE_BASES = [
    (FORWARD_FIRST, (TOKEN_BYTES,)),
    (FORWARD_LAST, (HIDDEN_BYTES, TOKEN_BYTES)),
    (BACKWARD_FIRST, (HIDDEN_BYTES,)),
]
STAGE_REPLIES = (stage.ForwardReply, stage.BackwardReply)
STATE_BASES = [
    state.StateInfoRequest(run_id=RUN, stage=0),
    state.StateRangeRequest(run_id=RUN, stage=0, digest=SNAPSHOT.digest, offset=8, length=64),
]
STATE_REPLIES = (state.StateInfoReply, state.StateRangeReply)
ROUND = "fuzz-round"
THIRD = identity(3)
MEMBERS = tuple(
    wire.Member(peer_id=who.peer_id, host="127.0.0.1", port=i + 1)
    for i, who in enumerate((SERVER, CLIENT, THIRD))
)


def signed_hello(sender: Identity, index: int, weight: float) -> wire.Hello:
    """A hello into the open round, signed by the member it claims to be."""
    hello = wire.Hello(round_id=ROUND, group=wire.group_digest(MEMBERS), sender=index, numel=8, weight=weight)
    return dataclasses.replace(hello, signature=sender.sign(wire.hello_transcript(hello)))


HANDOFF_BYTES = torch.ones(4).numpy().tobytes()
PORT_BASES = [
    ([signed_hello(CLIENT, 1, 1.0)], b""),
    ([signed_hello(THIRD, 2, 3.0)], b""),
    ([wire.Ping()], b""),
    ([HANDOFF], HANDOFF_BYTES),
]
PORT_REPLIES = (wire.Pong, wire.HandoffAck, direct.DirectChallenge)
DIRECT_CALLS = [
    (stage.PROTOCOL, FORWARD_FIRST, (TOKEN_BYTES,)),
    (stage.PROTOCOL, BACKWARD_FIRST, (HIDDEN_BYTES,)),
    (state.PROTOCOL, STATE_BASES[0], ()),
]
CALL_REPLIES = STAGE_REPLIES + STATE_REPLIES
TOKEN = "fuzz-join-token-0123456789"
POLICY = access.AccessPolicy(
    AccessConfig(allowlist=(SERVER.peer_id,), token_sha256=access.token_sha256(TOKEN)),
    TOKEN,
    SERVER.peer_id,
    run_name=MANIFEST.name,
    run_id=RUN,
)
"""A private run: only this peer is on the allowlist, everyone else needs a join credential."""
CREDENTIAL = access.make_credential(TOKEN, MANIFEST.name, CLIENT.peer_id)
PRIVATE_HELLO = access.AccessHello(
    run_id=RUN, credential=access.make_credential(TOKEN, MANIFEST.name, "fuzz-client")
)


class PrivateHost:
    """Stands for the libp2p host a private run's access policy is attached to."""


class HandoffSink:
    """What the all-reduce server asks of the stage it hands gradients to (`StageAverager` in a
    peer): takes up to 64 finite values for stage 0 of the run, signed by the one known stage-mate."""

    def __init__(self) -> None:
        self.taken = 0

    def check_handoff(self, handoff: wire.Handoff) -> str | None:
        if handoff.run_id != RUN or handoff.stage != 0 or not 0 < handoff.numel <= 64:
            return "not a handoff this stage takes"
        if handoff.sender != CLIENT.peer_id or not verify_signature(
            handoff.sender, wire.handoff_transcript(handoff), handoff.signature
        ):
            return "handoffs are taken only from known stage-mates, signed by their key"
        return None

    async def accept_handoff(self, handoff: wire.Handoff, tensor: torch.Tensor) -> str | None:
        if not bool(torch.isfinite(tensor).all()):
            return "not finite"
        self.taken += 1
        return None


class Peer:
    """One peer's servers, in process: the stage servicers of both stages (real `StageServing`s of
    a tiny model), a state servicer and a state router, the all-reduce port with an open round and
    a handoff target, the direct endpoint behind that port serving stage 0 and the state (of a
    private run: clients need a join credential), and stage 0's servicer behind the access check of
    a private run's libp2p streams."""

    def __init__(self) -> None:
        config = PeerConfig(input_cache_size=8)
        self.servings = []
        for unit in (0, 1):
            computer = StageComputer(build_stage(MANIFEST, unit), MANIFEST.optimizer, target_batch_size=4)
            serving = StageServing(MANIFEST, unit, computer, ThroughputMeter(), config)
            serving.order.wait = 0.001  # a call naming a predecessor that never comes waits (5 s in a peer)
            self.servings.append(serving)
        self.stage = [stage.StageServicer(serving) for serving in self.servings]
        self.state = state.StateServicer(RUN, 0, self._snapshot)
        self.router = state.StateRouter()
        self.router.add(self.state)
        self.port = allreduce.AllReduceServer(socket.socket(), pending_timeout=0.0)
        self.port.handoff_target = self.sink = HandoffSink()
        self.port.direct = self.endpoint = direct.DirectEndpoint(SERVER, access=POLICY)
        self.host = PrivateHost()
        access.attach(self.host, POLICY)
        self.private_stage = access.guarded(self.host, self.stage[0]._handle, what="stage")
        self.stage[0].register_direct(self.endpoint)
        self.state.register_direct(self.endpoint)
        self.port.identity = SERVER  # rounds admit only hellos signed by the member they claim
        self.round = rounds.Round(ROUND, MEMBERS, 0, torch.zeros(8), 1.0, torch.empty(8), identity=SERVER)
        self.port._open(self.round)

    async def _snapshot(self) -> StateSnapshot:
        return SNAPSHOT

    async def close(self) -> None:
        await self.port.close()
        self.round.close()
        for serving in self.servings:
            serving.shutdown()

    # --- one request per handler ----------------------------------------------------------------

    async def stage_call(self, data: bytes, unit: int, client: str = "fuzz-client") -> tuple[list, list[str]]:
        writer = MemoryWriter()
        await self.stage[unit]._handle(PeerInfo(client), feed(data), writer)
        assert writer.closed
        return check_answer(writer.data, STAGE_REPLIES)

    async def state_call(self, data: bytes, router: bool = False) -> tuple[list, list[str]]:
        writer = MemoryWriter()
        await (self.router if router else self.state)._handle(PeerInfo("fuzz-client"), feed(data), writer)
        assert writer.closed
        return check_answer(writer.data, STATE_REPLIES)

    async def port_call(self, data: bytes) -> tuple[list, list[str]]:
        """`data` sent to the all-reduce port, which reads it with `AllReduceServer._admit`."""
        ours, theirs = socket_pair()
        sender = asyncio.ensure_future(send_and_close(theirs, data))
        try:
            await self.port._admit(ours)  # closes `ours`, unless the open round took the connection
            if not sender.done():
                sender.cancel()  # the connection was handed over and is not read further
            await asyncio.wait([sender])
            return check_answer(received(theirs), PORT_REPLIES)
        finally:
            theirs.close()

    async def direct_call(self, protocol: str, data: bytes, plan=()) -> tuple[list, list[str]]:
        """A direct connection whose `DirectOpen` (as the port decoded it) is valid or mutated by
        `plan` (its join credential included), the client's proof of identity, then `data` as the
        calls on the connection."""
        valid = direct.DirectOpen(
            protocol=protocol,
            client=CLIENT.peer_id,
            server=SERVER.peer_id,
            nonce=os.urandom(32),
            credential=CREDENTIAL,
        )
        try:
            hello = from_body(direct.DirectOpen, mutate_tree(to_body(valid), plan), ProtocolError)
        except ProtocolError:
            hello = valid  # the port refuses what does not decode (`port_call` fuzzes that)
        ours, theirs = socket_pair()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.endpoint.accept(ours, hello))  # closes `ours`
                client = FramedStream.over(SocketIO(theirs))
                try:
                    challenge = await client.receive_message(direct.DirectChallenge)
                except SwarmnetError:
                    return [], []  # refused before the proof of identity
                proof = CLIENT.sign(direct._transcript("client", challenge.nonce, hello))
                await client.send_message(direct.DirectProof(signature=proof))
                await send_and_close(theirs, data)
            return check_answer(received(theirs), CALL_REPLIES)
        finally:
            theirs.close()

    async def private_stage_call(self, data: bytes) -> tuple[list, list[str]]:
        """`data` to the stage servicer of a private run: behind `access.guarded`, which reads the
        stream's `AccessHello` first."""
        writer = MemoryWriter()
        await self.private_stage(PeerInfo("fuzz-client"), feed(data), writer)
        assert writer.closed
        return check_answer(writer.data, STAGE_REPLIES)

    # --- the fuzzing and the checks -------------------------------------------------------------

    async def fuzz(self, plan, index: int) -> None:
        """One mutated request to each handler; every eighth example also a mutated call (and, every
        other time, a mutated `DirectOpen`) on a direct connection, whose handshake makes it the
        costliest input (the handshake itself gets a mutated input in every example)."""
        message, tensors = STAGE_BASES[index % len(STAGE_BASES)]
        await self.stage_call(framed([message], plan, tensors), message.stage)
        await self.state_call(framed([STATE_BASES[index % 2]], plan), router=bool(index & 2))
        messages, raw = PORT_BASES[index % len(PORT_BASES)]
        await self.port_call(framed(messages, plan, raw=raw))
        await self.port_call(framed([HELLO, direct.DirectProof(signature=bytes(64))], plan))
        await self.private_stage_call(framed([PRIVATE_HELLO, FORWARD_FIRST], plan, (TOKEN_BYTES,)))
        if index % 8 == 0:
            protocol, message, tensors = DIRECT_CALLS[index // 8 % len(DIRECT_CALLS)]
            await self.direct_call(protocol, framed([message], plan, tensors), plan if index & 1024 else ())

    async def serves_valid_requests(self) -> None:
        """A valid request to every handler gets its reply."""
        for message, tensors in STAGE_BASES:
            (reply,), errors = await self.stage_call(
                framed([message], [], tensors), message.stage, "valid-client"
            )
            assert not errors and reply.step >= 0
        for request in STATE_BASES:
            (reply,), errors = await self.state_call(framed([request], []))
            assert not errors and reply.digest == SNAPSHOT.digest
        (pong,), errors = await self.port_call(framed([wire.Ping()], []))
        assert not errors and isinstance(pong, wire.Pong)
        (ack,), errors = await self.port_call(framed([HANDOFF], [], raw=HANDOFF_BYTES))
        assert not errors and ack.accepted
        (reply,), errors = await self.private_stage_call(
            framed([PRIVATE_HELLO, FORWARD_FIRST], [], (TOKEN_BYTES,))
        )
        assert not errors and isinstance(reply, stage.ForwardReply) and reply.output is not None
        (reply,), errors = await self.direct_call(stage.PROTOCOL, framed([FORWARD_FIRST], [], (TOKEN_BYTES,)))
        assert not errors and isinstance(reply, stage.ForwardReply) and reply.output is not None

    def check_bounded(self) -> None:
        """The caches and the connection counts are within their bounds."""
        for serving in self.servings:
            assert len(serving.cache) <= serving.cache.max_size
            assert serving.in_flight == 0 and serving.queue_depth == 0
        assert len(self.state.held_digests) <= self.state.keep
        assert self.port._pending == 0 and self.endpoint._connections == 0
        assert len(self.round.sockets) <= len(MEMBERS) - 1
        assert POLICY.cached <= access.CACHE_SIZE


@pytest.mark.timeout(240)
def test_rpc_handlers_answer_typed_errors_and_keep_serving(error_log):
    """Mutated requests to the stage servicer (libp2p path) of both stages, to the state servicer
    and the state router, to the all-reduce port (hello, ping, handoff), to the direct endpoint's
    handshake, to stage 0 behind a private run's access check (`AccessHello` first), and as calls
    on an authenticated direct connection: every handler answers with typed error frames or
    replies, or closes, lets nothing escape and logs no internal error; the caches and memory stay
    bounded, and every handler then serves a valid request."""
    loop = asyncio.new_event_loop()
    peer = loop.run_until_complete(_create(Peer))
    calls = 0
    try:
        loop.run_until_complete(peer.serves_valid_requests())
        before = rss_mb()

        @FUZZ
        @given(seed=SEEDS)
        def fuzz(seed):
            nonlocal calls
            calls += 1
            plan, index, _ = make_plan(seed)
            loop.run_until_complete(peer.fuzz(plan, index))
            error_log.check()

        fuzz()
        loop.run_until_complete(peer.serves_valid_requests())
        peer.check_bounded()
        assert rss_mb() - before < RSS_GROWTH_MB
    finally:
        loop.run_until_complete(peer.close())
        loop.close()
    assert calls >= EXAMPLES


async def _create(cls):
    """Builds `cls()` on the running loop (an all-reduce round binds futures to it)."""
    return cls()


@pytest.mark.timeout(30)
def test_an_oversized_peer_id_is_refused_at_once():
    """A record, or a direct handshake, that names a 60,000-character "peer id" is refused in
    milliseconds: base58 decoding costs the square of the length, and refusing one such record
    took 1.6 s before `identity.MAX_PEER_ID_CHARS` (found by the fuzzing above)."""
    tree = _copy(RECORD_TREES[2][1])
    tree[3] = "2" * 60_000
    started = time.perf_counter()
    with pytest.raises(records.RecordError):
        records.decode_record(signed(tree))
    assert not direct._verify("2" * 60_000, bytes(64), b"transcript")
    assert time.perf_counter() - started < 0.5


@pytest.mark.timeout(60)
def test_huge_finite_activations_do_not_poison_the_stage():
    """Activations that pass the finiteness check but overflow the stage (1e20) get a typed error
    reply, and the stage's parameters stay finite: the next batch still has a finite loss."""
    loop = asyncio.new_event_loop()
    peer = loop.run_until_complete(_create(Peer))
    try:
        huge = torch.full((B, T, D), 1e20).numpy().tobytes()
        _, errors = loop.run_until_complete(
            peer.stage_call(framed([FORWARD_LAST], [], (huge, TOKEN_BYTES)), 1)
        )
        assert errors == ["bad_request"]
        for _ in range(3):  # two microbatches make a batch: the stage steps
            valid = framed([FORWARD_LAST], [], (HIDDEN_BYTES, TOKEN_BYTES))
            (reply,), errors = loop.run_until_complete(peer.stage_call(valid, 1))
            assert not errors and math.isfinite(reply.loss)
    finally:
        loop.run_until_complete(peer.close())
        loop.close()


@pytest.mark.timeout(30)
def test_a_non_ascii_join_credential_is_refused_as_access_denied():
    """A join credential with a non-ASCII character is an `AccessDeniedError` (and a refused DHT
    record), not a `TypeError` from `hmac.compare_digest` escaping the stream handler, the direct
    handshake (which took the all-reduce port down with it) or the DHT read (found by the fuzzing
    above)."""
    assert not POLICY.admits("some-peer", "é" * 64)
    with pytest.raises(AccessDeniedError):
        POLICY.check("some-peer", "\x00é", protocol="stage")
    assert not POLICY.admits_record(
        "some-peer", records.TrainerRecord(step=1, loss=1.0, samples_per_s=1.0, credential="é")
    )
