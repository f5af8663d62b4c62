"""A process's identity: one Ed25519 key for libp2p (its peer id) and for signing DHT records.

The key file uses libp2p's protobuf encoding, so the same file is handed to p2pd. An Ed25519 peer id
is the *identity* multihash of the public key: anyone can recover the public key from the peer id
alone, so a record stored under a peer-id subkey can be verified with no key exchange, and nobody
can sign a record for a peer id that is not theirs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError
from hivemind.proto import crypto_pb2

from swarmnet.errors import ConfigError

_IDENTITY_MULTIHASH = 0x00
MAX_PEER_ID_CHARS = 128
"""An Ed25519 peer id has 52 characters; a longer string is refused before base58 decoding, whose
cost grows with the square of the length (a 60 KB "peer id" in a record took 1.6 s to refuse)."""
_RAW = serialization.Encoding.Raw


@dataclass(frozen=True)
class Identity:
    """An Ed25519 private key and the libp2p peer id derived from it."""

    private_key: ed25519.Ed25519PrivateKey
    path: Path

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        """The base58 libp2p peer id, as p2pd reports it."""
        return peer_id_from_public_key(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def load_or_create(cls, path: str | Path) -> "Identity":
        """Loads the key file, generating it (mode 0400) on first use."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_key(path, ed25519.Ed25519PrivateKey.generate())
        return cls(private_key=_read_key(path), path=path)

    @classmethod
    def ephemeral(cls, directory: str | Path | None = None) -> "Identity":
        """A fresh identity in a private temp file (the caller removes it when done)."""
        fd, name = tempfile.mkstemp(prefix="swarmnet-id-", suffix=".key", dir=directory)
        os.close(fd)
        os.unlink(name)
        return cls.load_or_create(name)


def peer_id_from_public_key(public_key: bytes) -> str:
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public_key).SerializeToString()
    return base58.b58encode(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded).decode()


def public_key_from_peer_id(peer_id: str) -> ed25519.Ed25519PublicKey:
    """Recovers the Ed25519 public key embedded in a peer id; ValueError if there is none."""
    if len(peer_id) > MAX_PEER_ID_CHARS:
        raise ValueError(f"peer id of {len(peer_id)} characters (at most {MAX_PEER_ID_CHARS})")
    try:
        raw = base58.b58decode(peer_id)
    except Exception as e:  # base58 raises bare ValueError/TypeError variants
        raise ValueError(f"not a base58 peer id: {peer_id!r}") from e
    if len(raw) < 2 or raw[0] != _IDENTITY_MULTIHASH or raw[1] != len(raw) - 2:
        raise ValueError("peer id does not embed its public key (not an Ed25519 identity)")
    key = crypto_pb2.PublicKey()
    try:
        key.ParseFromString(raw[2:])
    except DecodeError as e:
        raise ValueError("peer id does not embed a valid public key") from e
    if key.key_type != crypto_pb2.KeyType.Ed25519 or len(key.data) != 32:
        raise ValueError("peer id does not embed an Ed25519 public key")
    return ed25519.Ed25519PublicKey.from_public_bytes(key.data)


def verify_signature(peer_id: str, data: bytes, signature: bytes) -> bool:
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
        return True
    except (ValueError, InvalidSignature):
        return False


def _write_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    private = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=private + public)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(blob.SerializeToString())


def _read_key(path: Path) -> ed25519.Ed25519PrivateKey:
    blob = crypto_pb2.PrivateKey()
    try:
        blob.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ConfigError(f"{path}: not a libp2p private key file") from e
    if blob.key_type != crypto_pb2.KeyType.Ed25519 or len(blob.data) != 64:
        raise ConfigError(f"{path}: expected an Ed25519 libp2p key")
    return ed25519.Ed25519PrivateKey.from_private_bytes(blob.data[:32])
