"""
Throwaway TLS material for tests: a CA, a server certificate for
C{localhost} / C{127.0.0.1} signed by it, and a certificate for another host
name signed by the same CA (to prove that host names are verified).

    pki = make_test_pki()
    fake.listen(reactor, context_factory=pki.server_options())        # https://localhost:PORT
    fake.listen(reactor, context_factory=pki.wrong_host_options())    # must fail verification
    BrowserLikePolicyForHTTPS(trustRoot=pki.trust_root())              # client side
    pki.write_ca(path)                                                 # a PEM file
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer


@implementer(IOpenSSLContextFactory)
class ServerContextFactory:
    """
    A TLS server context built from cryptography objects.

    (L{twisted.internet.ssl.CertificateOptions} hands pyOpenSSL C{X509}/C{PKey}
    objects to OpenSSL, which pyOpenSSL 24+ deprecates: a warning, so an error
    under C{-W error}.)
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        self._key = serialization.load_pem_private_key(key_pem, None)
        self._context: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        if self._context is None:
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
            ctx.use_certificate(self._cert)
            ctx.use_privatekey(self._key)  # type: ignore[arg-type]
            ctx.check_privatekey()
            self._context = ctx
        return self._context


@attrs.frozen
class TestPKI:
    """PEM bytes of a test CA and two server certificates it signed."""

    ca_cert_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    wrong_host_cert_pem: bytes
    wrong_host_key_pem: bytes

    def server_options(self) -> ServerContextFactory:
        """Server context for C{localhost} and C{127.0.0.1} (for C{listenSSL})."""
        return ServerContextFactory(self.server_cert_pem, self.server_key_pem)

    def wrong_host_options(self) -> ServerContextFactory:
        """Server context whose certificate names C{wrong.example} only."""
        return ServerContextFactory(self.wrong_host_cert_pem, self.wrong_host_key_pem)

    def trust_root(self) -> ssl.Certificate:
        """The CA, for C{optionsForClientTLS(trustRoot=...)} / C{BrowserLikePolicyForHTTPS}."""
        return ssl.Certificate.loadPEM(self.ca_cert_pem)

    def write_ca(self, path: str) -> str:
        with open(path, "wb") as f:
            f.write(self.ca_cert_pem)
        return path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    names: Sequence[str],
    now: datetime.datetime,
) -> tuple[bytes, bytes]:
    key = _key()
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_test_pki(
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    wrong_hostnames: Sequence[str] = ("wrong.example",),
) -> TestPKI:
    """Generate a fresh CA and certificates (EC P-256, valid from yesterday for 30 days)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmproxy test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = _leaf(ca_key, ca_name, hostnames, now)
    wrong_cert, wrong_key = _leaf(ca_key, ca_name, wrong_hostnames, now)
    return TestPKI(
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert_pem=server_cert,
        server_key_pem=server_key,
        wrong_host_cert_pem=wrong_cert,
        wrong_host_key_pem=wrong_key,
    )
