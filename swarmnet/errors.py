"""Exception taxonomy: every error says whose fault it is and whether a retry can help.

- `ConfigError`: the local user's configuration is wrong. Not retryable.
- `RemoteError` and subclasses: a remote peer answered with a typed error.
  - `BadRequestError`: *our* request was invalid (wrong shape, dtype, NaN, unknown run...).
    Retrying the same request elsewhere will not help.
  - `PeerBusyError`, `PeerUnavailableError`: the peer could not serve now; another peer of the
    same stage may. Retryable.
  - `UnknownMicrobatchError`: the peer no longer holds that microbatch's input (expired, evicted,
    restarted). Retryable after replaying the forward.
- `ProtocolError`: a peer spoke the wire protocol wrongly (malformed frame, oversized message).
  The peer is at fault; avoid it. Retryable on another peer.
- `ManifestError`: no verified manifest for this run. Not retryable without user action.
- `AccessDeniedError`: the run is private and the caller is not admitted (not on its allowlist,
  no valid join credential). The caller's fault; no retry on any peer can help.
- `SwarmError`: the swarm cannot serve (no peers for a stage after all retries).
"""

from __future__ import annotations


class SwarmnetError(Exception):
    """Base of every swarmnet error."""

    retryable: bool = False
    code: str = "internal"


class ConfigError(SwarmnetError, ValueError):
    """The local configuration is invalid (user's fault)."""

    code = "config"


class ManifestError(SwarmnetError):
    """No run manifest could be found or verified."""

    code = "manifest"


class ProtocolError(SwarmnetError):
    """A message broke the wire protocol (malformed, oversized, truncated)."""

    code = "protocol"
    retryable = True


class RemoteError(SwarmnetError):
    """A typed error reply from a remote peer."""

    code = "remote"

    def __init__(self, message: str, *, peer: str | None = None):
        super().__init__(message)
        self.peer = peer


class BadRequestError(RemoteError):
    """The request itself was invalid: the caller's fault; retrying it unchanged cannot help."""

    code = "bad_request"


class UnknownRunError(BadRequestError):
    """The request names a run the peer does not serve."""

    code = "unknown_run"


class UnknownMicrobatchError(RemoteError):
    """The peer has no cached input for this microbatch: replay the forward, then retry."""

    code = "unknown_microbatch"
    retryable = True


class PeerBusyError(RemoteError):
    """The peer's compute queue is full; try another peer."""

    code = "busy"
    retryable = True


class PeerUnavailableError(RemoteError):
    """The peer could not be reached, timed out or is shutting down."""

    code = "unavailable"
    retryable = True


class StateSyncError(SwarmnetError):
    """A stage's state could not be downloaded or verified; retry, possibly from other peers."""

    code = "state_sync"
    retryable = True


class UnknownStateError(RemoteError):
    """The peer no longer holds the state snapshot asked for (it has stepped since)."""

    code = "unknown_state"
    retryable = True


class AccessDeniedError(RemoteError):
    """A private run refused us: our peer id is not on its allowlist and we presented no valid
    join credential (or we hold no valid token ourselves). Not retryable: every member refuses
    the same way, so the process must stop with this message, not try other peers."""

    code = "access_denied"


class SwarmError(SwarmnetError):
    """The swarm could not serve a request after every permitted retry."""

    code = "swarm"


_BY_CODE = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnknownRunError,
        UnknownMicrobatchError,
        PeerBusyError,
        PeerUnavailableError,
        ProtocolError,
        UnknownStateError,
        StateSyncError,
        AccessDeniedError,
    )
}


def error_from_code(code: str, message: str, peer: str | None = None) -> SwarmnetError:
    """Rebuilds a typed exception from an error reply; unknown codes become `RemoteError`."""
    cls = _BY_CODE.get(code, RemoteError)
    if issubclass(cls, RemoteError):
        return cls(message, peer=peer)
    return cls(f"{message} (from {peer})")
