"""Transport security and admission by client: TLS (optionally mutual), bearer tokens, and a
limit on concurrent streams per client identity.

Everything here happens in a grpc.aio server interceptor, before any handler runs, so a call
that is refused never reaches the scheduler and never takes a slot:
  - tokens: `authorization: Bearer <token>` in the request metadata, checked against the
    configured tokens (compared by SHA-256 digest); a missing or unknown token is
    UNAUTHENTICATED. Health and reflection may be exempted (probes carry no token).
  - streams per client: StreamingRecognize and Recognize calls (of every API served here) are
    counted per client identity while they run; past the limit, RESOURCE_EXHAUSTED. The
    identity is the token's name, else the mutual-TLS client certificate's common name, else
    the peer's address without its port.

Token files: one token per line, `NAME TOKEN` or just `TOKEN` (then named by a digest prefix);
blank lines and lines starting with `#` are skipped. An environment variable holds the same
entries separated by commas or newlines.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from server.transport.call_limits import CLIENT_IDENTITY, shown

log = logging.getLogger("nemostream.security")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
AUTH_HEADER = "authorization"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """{token digest: name} from token-file lines (or comma-separated entries)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) > 2:
            raise ValueError(f"{source}: entry {n} has {len(fields)} fields; expected 'NAME TOKEN' or 'TOKEN'")
        token = fields[-1]
        if len(token) < 16:
            raise ValueError(f"{source}: entry {n}: tokens must be at least 16 characters")
        name = fields[0] if len(fields) == 2 else f"token-{_digest(token)[:8]}"
        out[_digest(token)] = name
    return out


def load_tokens(file: str | None = None, env: str | None = None) -> dict[str, str]:
    """Tokens from a file and/or the environment variable named `env`; {digest: name}.
    Raises ValueError when a named source is missing or holds no token: a server asked to
    require tokens must not start open."""
    tokens: dict[str, str] = {}
    if file:
        tokens.update(parse_tokens(Path(file).read_text(), file))
        if not tokens:
            raise ValueError(f"token file {file} holds no token")
    if env:
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"environment variable {env} is unset or empty; it should hold the tokens")
        found = parse_tokens(value, f"${env}")
        if not found:
            raise ValueError(f"${env} holds no token")
        tokens.update(found)
    return tokens


@dataclass(frozen=True)
class SecuritySettings:
    tls_cert: str | None = None       # PEM certificate chain of the server
    tls_key: str | None = None        # PEM private key of the server
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed
    tokens: Mapping[str, str] = field(default_factory=dict)  # token digest -> client name; empty: no tokens
    exempt_health: bool = False       # health checks need no token
    exempt_reflection: bool = False   # reflection needs no token
    max_streams_per_client: int = 0   # 0: no per-client limit

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("mutual TLS (a client CA) needs the server's own certificate and key")
        if self.max_streams_per_client < 0:
            raise ValueError("max_streams_per_client must be >= 0")
        if (self.exempt_health or self.exempt_reflection) and not self.tokens:
            raise ValueError("auth exemptions only make sense with tokens configured")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for add_secure_port, or None for plaintext. Files are read now: a bad
        path fails start-up, not the first handshake."""
        if not self.tls:
            return None
        key, cert = Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()
        client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def interceptors(self, on_refused: Callable[[str], None] | None = None) -> list[grpc.aio.ServerInterceptor]:
        if not self.tokens and not self.max_streams_per_client:
            return []
        return [SecurityInterceptor(self, on_refused)]


def _exempt(method: str, settings: SecuritySettings) -> bool:
    if method.startswith(HEALTH_PREFIX):
        return settings.exempt_health
    if method.startswith(REFLECTION_PREFIXES):
        return settings.exempt_reflection
    return False


def _limited(method: str) -> bool:
    """Calls that hold a stream: StreamingRecognize and Recognize of every API."""
    return method.rsplit("/", 1)[-1] in ("StreamingRecognize", "Recognize")


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def peer_identity(context) -> str:
    """The mutual-TLS client certificate's common name, else the peer address without port."""
    try:
        names = context.auth_context().get("x509_common_name")
    except Exception:  # noqa: BLE001 - no auth context on plaintext connections
        names = None
    if names:
        return f"cert:{names[0].decode() if isinstance(names[0], bytes) else names[0]}"
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    return f"peer:{host.strip('[]')}"


class ClientLimiter:
    """Concurrent calls per identity (event-loop only: no lock needed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: collections.Counter[str] = collections.Counter()

    def acquire(self, identity: str) -> bool:
        if self.open[identity] >= self.limit:
            return False
        self.open[identity] += 1
        return True

    def release(self, identity: str) -> None:
        self.open[identity] -= 1
        if self.open[identity] <= 0:
            del self.open[identity]


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, settings: SecuritySettings, on_refused: Callable[[str], None] | None = None):
        self._settings = settings
        self._tokens = dict(settings.tokens)
        self._limiter = ClientLimiter(settings.max_streams_per_client) if settings.max_streams_per_client else None
        self._on_refused = on_refused or (lambda reason: None)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _exempt(method, self._settings):
            return handler
        identity = None
        if self._tokens:
            token = bearer_token(handler_call_details.invocation_metadata)
            identity = self._tokens.get(_digest(token)) if token else None
            if identity is None:
                self._on_refused("unauthenticated")
                log.warning("refused: missing or unknown token", extra={"method": method})
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or invalid token: send the metadata 'authorization: Bearer <token>'")
            identity = f"token:{identity}"
        if self._limiter is not None and _limited(method):
            return _counted(handler, self._limiter, identity, self._on_refused)
        return handler


# A refused client that is still sending when the call ends may see grpc.aio's INTERNAL "Internal
# error from Core" instead of the status (grpc/grpc#36066). So a refusal first reads (and drops)
# what the client sends, until it half-closes, within this budget; nothing read is used.
REFUSAL_DRAIN_BYTES = 4 << 20
REFUSAL_DRAIN_SECONDS = 2.0
REFUSAL_QUIET_SECONDS = 0.5  # the servicers' drains stop once the client has sent nothing this long


async def drain_requests(requests, max_bytes: int = REFUSAL_DRAIN_BYTES,
                         max_seconds: float = REFUSAL_DRAIN_SECONDS, quiet_s: float | None = None) -> None:
    """Read and drop requests until the client half-closes, within the bounds. `quiet_s`: stop
    as soon as the client sends nothing for this long (it is not writing, so the status cannot
    race a write), rather than hold the status of a quiet client for max_seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    seen = 0
    it = requests.__aiter__()
    while seen < max_bytes and (left := deadline - loop.time()) > 0:
        # asyncio.timeout, not wait_for: wait_for runs the read as a task, whose exception (the
        # StopAsyncIteration of a half-closed client) its frame then holds in a cycle, and, raised
        # while the handler handles its refusal, that exception's context is the refusal's error,
        # whose traceback holds the handler's frame and the call until a garbage collection.
        try:
            async with asyncio.timeout(left if quiet_s is None else min(left, quiet_s)):
                message = await it.__anext__()
        except (StopAsyncIteration, TimeoutError):
            return
        except Exception:  # noqa: BLE001 - undecodable bytes, a broken stream: stop reading
            return
        seen += message.ByteSize() if hasattr(message, "ByteSize") else 1


def end_with_status(context, code: grpc.StatusCode, details: str) -> None:
    """The call's status once its handler returns (which it does next). Not context.abort: its
    AbortError's traceback is held by grpc's handler frame, a cycle that keeps the handler's
    frame and what it read until a garbage collection, which a serving process runs rarely
    (server.runtime.gc_policy): a storm of refused calls would pile them up."""
    context.set_code(code)
    context.set_details(details)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends the call with `code`, having read (a bounded
    amount of) a streaming request only to let the client see the status."""
    async def refuse(request_or_iterator, context):
        if handler.request_streaming:
            await drain_requests(request_or_iterator)
        end_with_status(context, code, details)

    return _same_shape(handler, refuse)


def _counted(handler: grpc.RpcMethodHandler, limiter: ClientLimiter, identity: str | None,
             on_refused: Callable[[str], None]) -> grpc.RpcMethodHandler:
    """The handler, run only while its client has fewer than the limit of calls open."""
    inner = _behaviour(handler)

    async def admit(request_or_iterator, context) -> str | None:
        who = identity or peer_identity(context)
        if not limiter.acquire(who):
            on_refused("client_stream_limit")
            log.warning("refused: streams per client", extra={"client": who, "limit": limiter.limit})
            if handler.request_streaming:
                await drain_requests(request_or_iterator)
            end_with_status(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"client {shown(who)} already has {limiter.limit} streams open (the limit per client, "
                            "--max-streams-per-client); retry when one has finished")
            return None
        # For the handler: the Recognize byte budget and, behind frontends, the engine process's
        # count across every frontend (server.runtime.engine_host) go by the same identity.
        CLIENT_IDENTITY.set(who)
        return who

    if inspect.isasyncgenfunction(inner):
        async def run(request_or_iterator, context):
            who = await admit(request_or_iterator, context)
            if who is None:
                return
            try:
                async for response in inner(request_or_iterator, context):
                    yield response
            finally:
                limiter.release(who)
    elif inspect.iscoroutinefunction(inner):
        async def run(request_or_iterator, context):
            who = await admit(request_or_iterator, context)
            if who is None:
                return None
            try:
                return await inner(request_or_iterator, context)
            finally:
                limiter.release(who)
    else:  # a synchronous handler (none here): runs in gRPC's thread pool, not counted
        return handler
    return _same_shape(handler, run)


def _behaviour(handler: grpc.RpcMethodHandler):
    return (handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary)


def _same_shape(handler: grpc.RpcMethodHandler, behaviour) -> grpc.RpcMethodHandler:
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


def add_security_args(parser) -> None:
    """asr-server flags of this module."""
    g = parser.add_argument_group("security")
    g.add_argument("--tls-cert", default=None, help="PEM certificate (chain) of the server: serve TLS")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    g.add_argument("--auth-tokens-file", default=None,
                   help="require 'authorization: Bearer <token>' with a token from this file ('NAME TOKEN' per line)")
    g.add_argument("--auth-tokens-env", default=None, metavar="VAR",
                   help="require tokens, taken from this environment variable (comma-separated entries)")
    g.add_argument("--auth-exempt-health", action="store_true", help="health checks need no token")
    g.add_argument("--auth-exempt-reflection", action="store_true", help="reflection needs no token")
    g.add_argument("--max-streams-per-client", type=int, default=0,
                   help="concurrent StreamingRecognize/Recognize calls per client (token name, client "
                        "certificate, or peer address), counted across the whole server (with --frontends N, "
                        "in the engine process, over every frontend); 0: no limit")


def security_settings(args) -> SecuritySettings:
    """SecuritySettings from add_security_args' flags; ValueError on a bad combination."""
    try:
        tokens = load_tokens(args.auth_tokens_file, args.auth_tokens_env)
    except OSError as exc:
        raise ValueError(f"cannot read the token file: {exc}") from exc
    for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
        if path and not Path(path).is_file():
            raise ValueError(f"TLS file {path} does not exist")
    return SecuritySettings(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                            tokens=tokens, exempt_health=args.auth_exempt_health,
                            exempt_reflection=args.auth_exempt_reflection,
                            max_streams_per_client=args.max_streams_per_client)
