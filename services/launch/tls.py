"""Throwaway mTLS credentials for one ``megascale up`` launch: a CA and one certificate per
role, written into the launch's directory (keys mode 0600), never reused.

Each certificate's common name is its role (how services/common/auth.py knows the caller)
and its DNS name is :data:`services.common.auth.TLS_SERVER_NAME` (what every client checks
the server against). Needs the ``cryptography`` package.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from services.common import auth
from services.errors import UserError

VALID_DAYS = 30


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def make_role_certificates(directory: Path, roles: list[str]) -> dict[str, dict[str, str]]:
    """A fresh CA and a certificate per role under ``directory``; returns, per role, the
    ``MEGASCALE_TLS_*_FILE`` environment that points the role at its files."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise UserError("--tls needs the 'cryptography' package (pip install cryptography)"
                        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    begin, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "megascale up CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(begin).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_file = _write(directory / "ca.crt", ca.public_bytes(pem), 0o644)
    out: dict[str, dict[str, str]] = {}
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(begin).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(auth.TLS_SERVER_NAME)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file = _write(directory / f"{role}.crt", cert.public_bytes(pem), 0o644)
        key_file = _write(directory / f"{role}.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
        out[role] = {"MEGASCALE_TLS_CERT_FILE": str(cert_file),
                     "MEGASCALE_TLS_KEY_FILE": str(key_file),
                     "MEGASCALE_TLS_CA_FILE": str(ca_file)}
    return out
