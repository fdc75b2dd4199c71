"""What one call and one client may cost the server, for both APIs (native and Riva): how
much of a client's text goes back into a status message, the unary Recognize bytes in flight
(per call, per client, per server process), the size of one response, and the Riva RequestId.

Pure Python (no gRPC): the servicers call these and turn a StreamError into the status.
"""

from __future__ import annotations

import collections
import contextvars
from dataclasses import dataclass

from server.scheduling.stream_events import ErrorKind, StreamError

# A client's own strings (a model name, a language code, a RequestId) are echoed into status
# messages only this far: gRPC sends the message as trailing metadata, and a message over its
# metadata limit turns the intended status into a transport-level RESOURCE_EXHAUSTED.
MAX_SHOWN_CHARS = 64
MAX_STATUS_CHARS = 1024   # a whole status message (4 KiB at most in UTF-8)
MAX_REQUEST_ID_CHARS = 256  # Riva's RequestId is echoed into every response of its stream

# The client identity the security interceptor decided (token name, certificate name, peer),
# set for the handler it runs; None when no interceptor counts clients.
CLIENT_IDENTITY: contextvars.ContextVar[str | None] = contextvars.ContextVar("asr_client_identity", default=None)


def shown(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """A client's string for a status message: its repr, cut to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def status_message(message: str) -> str:
    """Any status message, cut to MAX_STATUS_CHARS characters (the last safety net)."""
    if len(message) <= MAX_STATUS_CHARS:
        return message
    return message[:MAX_STATUS_CHARS - 40] + f"... ({len(message)} characters in all)"


def check_request_id(request_id: str, limit: int = MAX_REQUEST_ID_CHARS) -> None:
    if len(request_id) > limit:
        raise StreamError(ErrorKind.INVALID_ARGUMENT,
                          f"id (RequestId) of {len(request_id)} characters exceeds the limit of {limit} "
                          "characters; it is echoed into every response, so send a short id")


def check_response_size(size: int, limit: int, what: str = "response") -> None:
    """A response over the send limit would be lost in the transport (the client would get a
    RESOURCE_EXHAUSTED of gRPC's own after the whole stream ran): say so instead."""
    if size > limit:
        raise StreamError(ErrorKind.RESOURCE_EXHAUSTED,
                          f"the {what} is {size} bytes, over the send limit of {limit} bytes "
                          "(asr-server --max-message-mb); send shorter audio per stream")


def client_of(context) -> str:
    """The caller's identity: the security interceptor's, else the peer address."""
    identity = CLIENT_IDENTITY.get()
    if identity:
        return identity
    from server.transport.security import peer_identity  # transport-level helper; no cycle at import time

    return peer_identity(context)


@dataclass(frozen=True)
class RecognizeLimits:
    """Bytes of unary Recognize requests being recognized at once. A request is held whole
    (gRPC delivered it so), and its audio is decoded piece by piece, so these bytes are what
    the calls cost. 0: no limit of that kind."""

    per_call_bytes: int = 32 << 20
    per_client_bytes: int = 64 << 20
    per_server_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        if min(self.per_call_bytes, self.per_client_bytes, self.per_server_bytes) < 0:
            raise ValueError("Recognize byte limits must be >= 0")


class RecognizeBudget:
    """Bytes in flight of unary Recognize calls, per client and in all (event loop only)."""

    def __init__(self, limits: RecognizeLimits):
        self.limits = limits
        self.total = 0
        self.by_client: collections.Counter[str] = collections.Counter()

    def acquire(self, client: str, size: int) -> None:
        """Take `size` bytes for `client`, or raise StreamError(RESOURCE_EXHAUSTED) naming the limit."""
        lim = self.limits
        if lim.per_call_bytes and size > lim.per_call_bytes:
            raise StreamError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"Recognize request of {size} bytes exceeds the limit of {lim.per_call_bytes} bytes "
                              "per call (--recognize-max-call-mb); stream long audio with StreamingRecognize")
        if lim.per_client_bytes and self.by_client[client] + size > lim.per_client_bytes:
            raise StreamError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"client {shown(client)} already has {self.by_client[client]} bytes of Recognize "
                              f"requests in flight; with this one ({size} bytes) it would exceed the limit of "
                              f"{lim.per_client_bytes} bytes per client (--recognize-max-client-mb); retry when "
                              "one has finished")
        if lim.per_server_bytes and self.total + size > lim.per_server_bytes:
            raise StreamError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"the server has {self.total} bytes of Recognize requests in flight; with this one "
                              f"({size} bytes) it would exceed the limit of {lim.per_server_bytes} bytes per "
                              "server process (--recognize-max-server-mb); retry later")
        self.by_client[client] += size
        self.total += size

    def release(self, client: str, size: int) -> None:
        self.total -= size
        self.by_client[client] -= size
        if self.by_client[client] <= 0:
            del self.by_client[client]


# Unary Recognize audio is decoded and handed to the scheduler in pieces of this many bytes:
# decoding (and resampling) a whole 32 MiB body at once cost about 12 bytes per byte sent.
RECOGNIZE_PIECE_BYTES = 256 << 10
