"""Fixtures for the security tests: credentials made in the test (a cluster token, a
throwaway CA and role certificates)."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import auth


@pytest.fixture
def token() -> bytes:
    return secrets.token_hex(32).encode()


@pytest.fixture
def restore_auth() -> Iterator[None]:
    """Tests configure this process's credentials; put back "nothing checked" after."""
    yield
    auth.configure(None)


class CA:
    """A throwaway certificate authority: :meth:`issue` writes a key and certificate for a
    common name (with the DNS name every internal server certificate carries)."""

    def __init__(self, workdir: Path, name: str = "megascale test CA") -> None:
        x509 = pytest.importorskip("cryptography.x509")
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = (
            x509, hashes, serialization, ec, NameOID)
        self.workdir = workdir
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = workdir / f"{name.replace(' ', '_')}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str) -> tuple[str, str, str]:
        """(cert file, key file, CA file) for ``common_name``."""
        x509, ser, oid = self._x509, self._ser, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME, common_name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(auth.TLS_SERVER_NAME)]), False)
                .sign(self.key, self._hashes.SHA256()))
        stem = self.workdir / common_name.replace("/", "_")
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(ser.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                               ser.NoEncryption()))
        return str(cert_file), str(key_file), str(self.ca_file)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path)


@pytest.fixture
def make_ca():  # noqa: ANN201 - the CA class (test modules cannot import a conftest reliably)
    return CA
