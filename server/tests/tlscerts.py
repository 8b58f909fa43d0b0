"""Certificates for the TLS tests, made with the openssl command line (scripts/bootstrap.sh
installs it): a CA, server and client certificates it signs, and TLS client contexts."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

# P-256 keys: a handshake costs a fraction of an RSA one, and every TLS test makes many.
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run scripts/bootstrap.sh")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_KEY, "-keyout", str(pair.key), "-out", str(pair.cert),
        "-days", "2", "-subj", f"/CN={name}",
    )  # fmt: skip
    return pair


def make_cert(
    ca: Pair,
    directory: Path,
    name: str,
    *,
    client: bool = False,
    addresses: Sequence[str] = ("127.0.0.1",),
) -> Pair:
    """A certificate signed by ``ca``: a server's for ``addresses`` and localhost, or a
    client's."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    names = ",".join([*(f"IP:{a}" for a in addresses), "DNS:localhost"])
    ext.write_text(
        "extendedKeyUsage=clientAuth\n"
        if client
        else f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("req", *_KEY, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return pair


def client_context(ca: Pair | None, cert: Pair | None = None) -> ssl.SSLContext:
    """A client that trusts ``ca`` (checking the server's name) and presents ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


@dataclass(frozen=True)
class Certificates:
    ca: Pair
    server: Pair
    client: Pair
    other_ca: Pair  # a CA the server does not trust
    stranger: Pair  # a client certificate that CA signed


def make_certificates(directory: Path, addresses: Sequence[str] = ("127.0.0.1",)) -> Certificates:
    ca = make_ca(directory, "ca")
    other = make_ca(directory, "other-ca")
    return Certificates(
        ca=ca,
        server=make_cert(ca, directory, "server", addresses=addresses),
        client=make_cert(ca, directory, "client", client=True),
        other_ca=other,
        stranger=make_cert(other, directory, "stranger", client=True),
    )


def tls_args(certs: Certificates, verify_mode: int = 0, ca: bool = False) -> list[str]:
    """memcached's (and cacheserver's) flags for TLS with these certificates."""
    options = f"ssl_chain_cert={certs.server.cert},ssl_key={certs.server.key}"
    if verify_mode:
        options += f",ssl_verify_mode={verify_mode}"
    if ca or verify_mode:
        options += f",ssl_ca_cert={certs.ca.cert}"
    return ["-Z", "-o", options]
