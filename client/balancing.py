"""Client-side balancing: one channel over several servers, each stream placed on the next
healthy one.

A stream is one long HTTP/2 stream, so a balancer of connections (L4) pins every stream of a
client to one server. Here the channel itself balances, per call, through gRPC's service
config: `round_robin` over every address, and `healthCheckConfig`, which makes the channel
watch each server's grpc.health.v1 (asr-server serves it) and send no new call to one that is
not SERVING, a draining server among them. Open streams stay where they are.

Targets:
  - a list of servers ("10.0.0.5:50051,10.0.0.6:50051", or a Python list): each is resolved
    once to its addresses (a fixed set);
  - one name with balancing on ("asr-headless.asr.svc:50051", e.g. a Kubernetes headless
    Service): gRPC's DNS resolver, which resolves it again whenever a connection ends, so
    servers added under the name get streams once old connections reach the servers'
    maximum age (asr-server --max-connection-age-s) or end;
  - anything with a scheme ("dns:///...", "ipv4:...") is passed on as it is.
With TLS and a list of addresses, the certificate is checked against the first address; give
tls_server_name for the name the certificates carry.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence

from proto import asr_stream_pb2 as pb

HEALTH_SERVICE = pb.DESCRIPTOR.services_by_name["SpeechRecognition"].full_name
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
})


def add_target_args(parser) -> None:
    """--server and --balance, as asr-client and asr-loadgen both take them."""
    parser.add_argument("--server", default="localhost:50051",
                        help="HOST:PORT of the server, or several (comma-separated): client-side balancing, "
                             "each stream on the next healthy server")
    parser.add_argument("--balance", action="store_true",
                        help="balance streams over every address of --server's name (e.g. a headless Service), "
                             "re-resolved as connections end; round_robin with gRPC health checks")


def server_list(servers: str | Sequence[str]) -> list[str]:
    """"a:1,b:2" or ["a:1", "b:2"] as a list of HOST:PORT (blanks dropped)."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    return [s.strip() for s in items if s.strip()]


def _split(server: str) -> tuple[str, str]:
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"a server is HOST:PORT, not {server!r}")
    return host.strip("[]"), port


def _addresses(servers: list[str]) -> str:
    """An ipv4: or ipv6: target naming every address of every server."""
    v4, v6 = [], []
    for server in servers:
        host, port = _split(server)
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve {host}: {exc}") from None
        for family, _, _, _, address in infos:
            entry = f"{address[0]}:{port}" if family == socket.AF_INET else f"[{address[0]}]:{port}"
            bucket = v4 if family == socket.AF_INET else v6
            if entry not in bucket:
                bucket.append(entry)
    if v4 and v6:  # gRPC's address-list schemes take one family
        return "ipv4:" + ",".join(v4)
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def channel_target(servers: str | Sequence[str], balance: bool = False) -> tuple[str, list[tuple[str, object]]]:
    """(gRPC target, channel options) for `servers`. More than one server turns balancing on."""
    items = server_list(servers)
    if not items:
        raise ValueError("no server given")
    if len(items) == 1 and not balance:
        return items[0], []
    options: list[tuple[str, object]] = [("grpc.service_config", SERVICE_CONFIG)]
    if len(items) == 1:
        target = items[0]
        return (target if "://" in target or target.startswith(("ipv4:", "ipv6:", "unix:")) else f"dns:///{target}"), options
    return _addresses(items), options
