"""Certificates and kubeconfigs for the local e2e control plane, made with the openssl CLI.

One CA signs everything: the API server's serving certificate, the client certificates of
the admin, the controller manager, the scheduler, each kubelet (``system:node:<name>``, so
the Node authorizer and NodeRestriction admission apply), kube-proxy and the API server
towards the kubelets. The service-account signing key is a separate RSA key pair.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
from pathlib import Path

import yaml

# The first address of the service CIDR the API server is started with: in-cluster clients
# reach "kubernetes.default" there, so the serving certificate names it.
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
CERT_DAYS = "30"


class PkiError(RuntimeError):
    pass


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    if shutil.which("openssl") is None:
        raise PkiError("the openssl command is needed for the e2e cluster: apt-get install openssl")
    proc = subprocess.run(
        ["openssl", *args], input=stdin, capture_output=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _ec_key(path: Path) -> None:
    # EC keys: instant to generate, and every Kubernetes component accepts them for TLS.
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


class Pki:
    """A directory holding a CA and the certificates issued from it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_cert = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.sa_key = directory / "service-account.key"
        self.sa_pub = directory / "service-account.pub"
        self.front_proxy_ca_cert = directory / "front-proxy-ca.crt"
        self.front_proxy_ca_key = directory / "front-proxy-ca.key"

    @staticmethod
    def _make_ca(key: Path, cert: Path, name: str) -> None:
        _ec_key(key)
        _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert),
                 "-days", CERT_DAYS, "-subj", f"/CN={name}")  # fmt: skip

    def create_authorities(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._make_ca(self.ca_key, self.ca_cert, "cache-appliance-e2e-ca")
        # A separate CA for the aggregation layer's front proxy (request-header auth), so a
        # client certificate can never pass for a proxy that asserts user names.
        self._make_ca(self.front_proxy_ca_key, self.front_proxy_ca_cert, "front-proxy-ca")
        # Service-account tokens are signed with RS256, the algorithm every client expects.
        _openssl(
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            str(self.sa_key),
        )
        self.sa_key.chmod(0o600)
        _openssl("pkey", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub))

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: tuple[str, ...] = (),
        server_names: tuple[str, ...] = (),
        ca: tuple[Path, Path] | None = None,
    ) -> tuple[Path, Path]:
        """Issue a certificate signed by the CA (or ``ca``: (cert, key)); returns (cert, key).

        ``server_names`` makes it a serving certificate for those IPs/DNS names; otherwise it
        is a client certificate whose CN is the user and whose O entries are its groups.
        """
        key = self.dir / f"{name}.key"
        cert = self.dir / f"{name}.crt"
        csr = self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        _ec_key(key)
        subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
        _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names:
            alt = ",".join(
                f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in server_names
            )
            lines += ["extendedKeyUsage=serverAuth", f"subjectAltName={alt}"]
        else:
            lines.append("extendedKeyUsage=clientAuth")
        ext.write_text("\n".join(lines) + "\n")
        ca_cert, ca_key = ca or (self.ca_cert, self.ca_key)
        signing = ["-CA", str(ca_cert), "-CAkey", str(ca_key), "-days", CERT_DAYS]
        serial = ["-set_serial", f"0x{secrets.token_hex(16)}"]
        _openssl("x509", "-req", "-in", str(csr), *signing, *serial, "-extfile", str(ext),
                 "-out", str(cert))  # fmt: skip
        csr.unlink()
        ext.unlink()
        return cert, key

    def kubeconfig(
        self, path: Path, server: str, user: str, cert: Path, key: Path, cluster_name: str
    ) -> Path:
        """Write a self-contained kubeconfig (certificates embedded) for one client identity."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cluster_name,
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": _b64(self.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": _b64(cert),
                        "client-key-data": _b64(key),
                    },
                }
            ],
            "contexts": [
                {"name": cluster_name, "context": {"cluster": cluster_name, "user": user}}
            ],
            "current-context": cluster_name,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
