"""Certificates and keys for the dev cluster: one CA, the API server's serving cert, an admin client cert,
and the ServiceAccount token signing key pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=3650)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _sign(
    subject: x509.Name,
    pub: rsa.RSAPublicKey,
    ca_key: rsa.RSAPrivateKey,
    ca_name: x509.Name,
    *,
    is_ca: bool = False,
    server_sans: tuple[list[str], list[str]] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        usages = []
        if server_sans is not None:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            dns, ips = server_sans
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def ensure_pki(pki: Path, service_ip: str) -> None:
    """Create every key/cert under `pki` that does not exist yet (so restarts keep the same identity)."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "admin.crt").exists():
        return
    ca_key = _key()
    ca_name = _name("kubeforge-devcluster-ca")
    ca = _sign(ca_name, ca_key.public_key(), ca_key, ca_name, is_ca=True)
    _write_key(pki / "ca.key", ca_key)
    _write_cert(pki / "ca.crt", ca)

    dns = [
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    srv_key = _key()
    srv = _sign(_name("kube-apiserver"), srv_key.public_key(), ca_key, ca_name,
                server_sans=(dns, ["127.0.0.1", service_ip]))
    _write_key(pki / "apiserver.key", srv_key)
    _write_cert(pki / "apiserver.crt", srv)

    # system:masters: the admin, the controller-manager, the scheduler and the node agent all use it.
    # A dev cluster does not need per-component identities; RBAC still applies to ServiceAccounts.
    adm_key = _key()
    adm = _sign(_name("kubeforge-admin", "system:masters"), adm_key.public_key(), ca_key, ca_name, client=True)
    _write_key(pki / "admin.key", adm_key)

    sa_key = _key()
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # Written last: its presence marks the PKI as complete.
    _write_cert(pki / "admin.crt", adm)


def sign_serving_cert(pki: Path, out_dir: Path, dns_names: list[str], ips: list[str]) -> tuple[Path, Path]:
    """Issue a serving cert from the cluster CA (e.g. for an admission webhook in a test)."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = _key()
    cert = _sign(_name(dns_names[0] if dns_names else ips[0]), key.public_key(), ca_key, ca.subject,
                 server_sans=(dns_names, ips))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_key(out_dir / "tls.key", key)
    _write_cert(out_dir / "tls.crt", cert)
    return out_dir / "tls.crt", out_dir / "tls.key"
