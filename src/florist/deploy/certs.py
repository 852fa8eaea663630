"""A private CA, the SuperLink's TLS certificate and SuperNode authentication keys.

    certs = make_tls(Path("work/certs"), hosts=["127.0.0.1", "localhost", "link.example.org"])
    node = make_node_key(Path("work/keys"), "node-000")   # node.private, node.public (OpenSSH)

The SuperLink serves its Fleet, Control and Runtime APIs with ``certs.server_cert`` /
``certs.server_key``; every SuperNode and ``flwr`` verify it against ``certs.ca_cert``. The server
certificate must name every address it is dialled by: the SuperLink's own SuperExec dials it on
127.0.0.1, so that IP is always included. Node keys are ECDSA P-384 keys in OpenSSH format, the
same as ``ssh-keygen -t ecdsa -b 384 -N ""`` writes, which ``flwr supernode register`` and
``flower-supernode --auth-supernode-private-key`` read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from florist.errors import ConfigError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a deployment's CA and SuperLink certificate.

    Parameters
    ----------
    ca_cert : Path
        The CA certificate: ``--ssl-ca-certfile`` of the SuperLink, ``--root-certificates`` of
        every SuperNode, ``root-certificates`` of the ``flwr`` connection.
    ca_key : Path
        The CA's private key (keep it off the servers; it signs new certificates).
    server_cert : Path
        The SuperLink's certificate (``--ssl-certfile``), signed by the CA.
    server_key : Path
        The SuperLink's private key (``--ssl-keyfile``).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair in OpenSSH format.

    Parameters
    ----------
    private : Path
        ``--auth-supernode-private-key`` of the SuperNode (mode 0600).
    public : Path
        What ``flwr supernode register`` sends to the SuperLink.
    """

    private: Path
    public: Path


def make_tls(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> TlsFiles:
    """Write a new CA and a SuperLink certificate valid for ``hosts`` (and 127.0.0.1) into ``directory``.

    Parameters
    ----------
    directory : Path
        Created if missing; ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` are written there.
    hosts : Sequence[str]
        IP addresses and DNS names the SuperLink is reached by; each becomes a subjectAltName.

    Returns
    -------
    TlsFiles
        The four PEM files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, _with_loopback(hosts))
    files = TlsFiles(
        directory / "ca.crt", directory / "ca.key", directory / "server.crt", directory / "server.key"
    )
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.ca_key, _pem_private(ca_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_key, _pem_private(server_key), private=True)
    return files


def make_node_key(directory: Path, name: str) -> NodeKey:
    """Write an ECDSA P-384 key pair ``directory/name`` (private) and ``directory/name.pub`` (OpenSSH)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pair = NodeKey(directory / name, directory / f"{name}.pub")
    _write(pair.private, private, private=True)
    _write(pair.public, public + f" {name}\n".encode())
    return pair


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """An ``IPAddress`` entry for each IP literal in ``hosts`` and a ``DNSName`` for every other name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip().strip("[]")
        if not host:
            raise ConfigError(f"empty host name in the certificate's host list {list(hosts)!r}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _with_loopback(hosts: Sequence[str]) -> list[str]:
    """``hosts`` with 127.0.0.1 added: the SuperLink's SuperExec dials the Runtime API there."""
    return list(dict.fromkeys([*hosts, "127.0.0.1"]))


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "florist deployment CA")])
    return (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    return (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between sites
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data``; a private key is created with mode 0600 so it is never readable by others."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
