"""The lattice over TLS: a real nats-server with a certificate from a CA made for the test,
and the operator verbs passing `--lattice-tls-ca` (and a client certificate) through. A
missing, unreadable or untrusted certificate is a clear one-line error, never a traceback."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.latticehosts import apply, orch, write_capsule, write_config
from tests.natsserver import free_port, server_binary


@dataclass
class TlsServer:
    url: str
    ca: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it
    (PEM files: ca.pem, server.pem, server-key.pem, client.pem, client-key.pem)."""
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(name: str, private: ec.EllipticCurvePrivateKey) -> None:
        pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        (folder / f"{name}-key.pem").write_bytes(pem)

    def certificate(name: str, public: ec.EllipticCurvePublicKey, issuer: x509.Name) -> x509.CertificateBuilder:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = (
        certificate("test-ca", ca_key.public_key(), ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(Encoding.PEM))
    both = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for name in ("server", "client"):
        private = key()
        issued = (
            certificate(name, private.public_key(), ca_name)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(both, False)
            .sign(ca_key, hashes.SHA256())
        )
        (folder / f"{name}.pem").write_bytes(issued.public_bytes(Encoding.PEM))
        write_key(name, private)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    folder = tmp_path_factory.mktemp("nats-tls")
    make_pki(folder)
    port = free_port()
    (folder / "server.conf").write_text(
        f"listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{ store_dir: {str(folder / 'js')!r} }}\n"
        f"tls {{ cert_file: {str(folder / 'server.pem')!r}, key_file: {str(folder / 'server-key.pem')!r},\n"
        f"      ca_file: {str(folder / 'ca.pem')!r}, verify: true }}\n"
    )
    with open(folder / "log", "wb") as log:
        process = subprocess.Popen([server_binary(), "-c", str(folder / "server.conf")], stdout=log, stderr=log)
    server = TlsServer(f"tls://127.0.0.1:{port}", folder / "ca.pem", folder / "client.pem", folder / "client-key.pem")
    try:
        end = time.monotonic() + 30
        while "Server is ready" not in (folder / "log").read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < end, (folder / "log").read_text()
            time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        process.wait(10)


def tls_args(server: TlsServer) -> list[str]:
    return ["--lattice-tls-ca", str(server.ca), "--lattice-tls-cert", str(server.client_cert),
            "--lattice-tls-key", str(server.client_key)]  # fmt: skip


def test_apply_and_status_over_mutual_tls(tmp_path: Path, tls_server: TlsServer) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    applied = apply(config, tls_server.url, *tls_args(tls_server))
    assert applied.returncode == 0, applied.stderr
    status = orch("status", "--lattice", tls_server.url, *tls_args(tls_server))
    assert status.returncode == 0 and "revision 1" in status.stdout, status.stderr


def test_tls_problems_are_one_clear_line(tmp_path: Path, tls_server: TlsServer) -> None:
    untrusted = orch("status", "--lattice", tls_server.url)  # the system's CAs do not know the test CA
    assert untrusted.returncode == 1 and "cannot reach the lattice" in untrusted.stderr
    assert len(untrusted.stderr.strip().splitlines()) == 1 and "Traceback" not in untrusted.stderr
    no_client_cert = orch("status", "--lattice", tls_server.url, "--lattice-tls-ca", str(tls_server.ca))
    assert no_client_cert.returncode == 1 and "cannot reach the lattice" in no_client_cert.stderr
    missing = orch("status", "--lattice", tls_server.url, "--lattice-tls-ca", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "--lattice-tls-ca" in missing.stderr and "no such file" in missing.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    unusable = orch("status", "--lattice", tls_server.url, "--lattice-tls-ca", str(garbage))
    assert unusable.returncode == 1 and "cannot use the TLS files" in unusable.stderr, unusable.stderr
    key_alone = orch("call", "ver", "version", "--lattice", tls_server.url, "--lattice-tls-key", str(garbage))
    assert key_alone.returncode == 2 and "--lattice-tls-key needs --lattice-tls-cert" in key_alone.stderr
