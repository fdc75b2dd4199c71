"""Real X.509 certificates for the TLS tests, generated with the `cryptography` package (a dev
dependency; tests import this module only through a fixture that skips without it): a CA,
a server certificate for localhost/127.0.0.1 signed by it, and client certificates (for mutual
TLS) signed by a second CA. Written as PEM files into a directory."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key) -> Pem:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Pem(cert_path, key_path)


class Authority:
    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = _write(directory, name, self.cert, self.key)

    def issue(self, stem: str, common_name: str, server: bool) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _write(self.directory, stem, builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    server_ca: Pem       # verifies the server
    server: Pem          # the server's certificate, for localhost and 127.0.0.1
    client_ca: Pem       # signs the clients (mutual TLS)
    alice: Pem           # a client certificate, CN alice
    bob: Pem             # another, CN bob
    stranger: Pem        # a client certificate from a CA the server does not trust
    other_ca: Pem        # a CA that did not sign the server


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    server_ca = Authority(directory, "server-ca")
    client_ca = Authority(directory, "client-ca")
    other = Authority(directory, "other-ca")
    return Pki(server_ca=server_ca.pem, server=server_ca.issue("server", "localhost", server=True),
                   client_ca=client_ca.pem, alice=client_ca.issue("alice", "alice", server=False),
                   bob=client_ca.issue("bob", "bob", server=False),
                   stranger=other.issue("stranger", "stranger", server=False), other_ca=other.pem)
