"""A small authoritative DNS server on loopback (UDP), for the fleet tests: it answers A
queries for the names it holds with their current addresses, and every other query with an
empty answer. Both resolvers under test ask it: gRPC's (a `dns://127.0.0.1:PORT/NAME:PORT`
target) and HAProxy's (`nameserver` in a `resolvers` section). Changing a name's addresses
while they run is how a server joins the fleet, as a pod joins a headless Service."""

from __future__ import annotations

import socket
import struct
import threading


class DnsStub:
    def __init__(self, host: str = "127.0.0.1"):
        self.records: dict[str, list[str]] = {}
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self.address = self._sock.getsockname()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self.records[name.lower().rstrip(".")] = list(addresses)

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            try:
                answer = self._answer(query)
            except (IndexError, struct.error, UnicodeDecodeError):
                continue  # not a query we understand: no answer, as a server would drop it
            try:
                self._sock.sendto(answer, peer)
            except OSError:
                return

    def _answer(self, query: bytes) -> bytes:
        ident, flags = struct.unpack("!HH", query[:4])
        labels, pos = [], 12
        while query[pos]:
            n = query[pos]
            labels.append(query[pos + 1:pos + 1 + n].decode("ascii"))
            pos += 1 + n
        qtype, _ = struct.unpack("!HH", query[pos + 1:pos + 5])
        question = query[12:pos + 5]
        name = ".".join(labels).lower()
        self.queries += 1
        with self._lock:
            known = name in self.records
            addresses = list(self.records.get(name, [])) if qtype == 1 else []
        rcode = 0 if known else 3  # NXDOMAIN for a name we do not hold
        answers = b"".join(struct.pack("!HHHIH4s", 0xC00C, 1, 1, 0, 4, socket.inet_aton(a)) for a in addresses)
        header = struct.pack("!HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1, len(addresses), 0, 0)
        return header + question + answers
