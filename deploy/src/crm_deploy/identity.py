"""The development identity of the local stack: signing keys, the key set the
services trust, and a bearer token per role.

    <data_dir>/identity/
      jwks.json            public keys the services verify with (CRM_AUTH_JWKS)
      users.key.pem        the development identity provider's key (users' tokens)
      platform.key.pem     the platform services' own key (CRM_SERVICE_KEY_FILE)
      tokens/<role>.jwt    a token per role, e.g. tokens/sales.jwt
      master-keys          the master keys wrapping every person's data key
                           (CRM_MASTER_KEYS_FILE), current first

`crm-stack identity` (`deploy/crm identity`) creates what is missing and mints
fresh tokens; `--rotate` replaces the users' key while the old one stays in
the key set until the next rotation, so tokens already handed out keep working.
The master keys file is written once and never replaced: it is the only way to
read the personal data the stack stored (losing it erases everyone).
`--rotate-master-key` puts a new key first and keeps the earlier ones after it,
so that the data keys they wrapped still open (docs/security.md, "Rotating the
master key", says how to move them to the new one).
In production none of this exists: users' tokens come from the enterprise's
identity provider and each service's key from a Secret (see docs/security.md).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crm_common.auth.issuer import TokenIssuer, jwks_document, new_private_key_pem, public_jwk
from crm_common.auth.principal import ROLES
from crm_common.privacy import new_master_key
from crm_common.privacy.masterkeys import MASTER_KEYS_FILE_VAR, parse_master_keys

ISSUER = "crm-local"
AUDIENCE = "crm-platform"
PLATFORM_KID = "platform-1"
#: Lifetime of the development tokens written to tokens/ (re-minted by every `up`).
TOKEN_LIFETIME = 12 * 3600


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


@dataclass(frozen=True)
class Identity:
    """The files of one development identity and the issuers behind them."""

    root: Path

    @property
    def jwks(self) -> Path:
        return self.root / "jwks.json"

    @property
    def users_key(self) -> Path:
        return self.root / "users.key.pem"

    @property
    def platform_key(self) -> Path:
        return self.root / "platform.key.pem"

    @property
    def pseudonym_key(self) -> Path:
        return self.root / "pseudonym.key"

    @property
    def master_keys(self) -> Path:
        return self.root / "master-keys"

    def master_key_ids(self) -> list[str]:
        """The ids of the master keys in the file, the current one first."""
        text = self.master_keys.read_text()
        return [key.id for key in parse_master_keys(text, source=str(self.master_keys))]

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    def token_path(self, role: str) -> Path:
        return self.tokens / f"{role}.jwt"

    def _keyset(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.jwks.read_text())
        return document

    def users_kid(self) -> str:
        return str(json.loads((self.root / "users.kid").read_text()))

    def users_issuer(self) -> TokenIssuer:
        return TokenIssuer(self.users_key.read_bytes(), self.users_kid(), ISSUER, AUDIENCE)

    def platform_issuer(self) -> TokenIssuer:
        return TokenIssuer(self.platform_key.read_bytes(), PLATFORM_KID, ISSUER, AUDIENCE)

    def mint(self, role: str, *, subject: str | None = None, lifetime: float = 3600.0,
             client: str = "dev-console", extra: dict[str, Any] | None = None) -> str:  # fmt: skip
        """A user token with one role (tests mint as many as they like)."""
        return self.users_issuer().mint(
            subject or f"dev-{role}", [role], client=client, lifetime=lifetime, extra=extra
        )

    def env(self) -> dict[str, str]:
        """What the services need to verify tokens, sign their own and seal personal
        data (the master keys file, once `ensure_identity` has written it)."""
        env = {
            "CRM_AUTH_JWKS": str(self.jwks),
            "CRM_AUTH_ISSUER": ISSUER,
            "CRM_AUTH_AUDIENCE": AUDIENCE,
            "CRM_SERVICE_KEY_FILE": str(self.platform_key),
            "CRM_SERVICE_KEY_ID": PLATFORM_KID,
            "CRM_PSEUDONYM_KEY_FILE": str(self.pseudonym_key),
        }
        if self.master_keys.exists():
            env[MASTER_KEYS_FILE_VAR] = str(self.master_keys)
        return env


def _master_key_id() -> str:
    return f"dev-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S-%f')}"


def ensure_master_keys(identity: Identity, *, rotate: bool = False) -> Path:
    """The development master keys file: created once (mode 0600, one entry) and
    never overwritten; `rotate` puts a new entry first and keeps every earlier
    one after it. Returns its path."""
    path = identity.master_keys
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if rotate:
            earlier = path.read_text().strip()
            parse_master_keys(earlier, source=str(path))  # refuse to rotate a broken file
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.unlink(missing_ok=True)
            _write_private(tmp, f"{new_master_key(_master_key_id())}\n{earlier}\n".encode())
            tmp.replace(path)
        return path
    with os.fdopen(fd, "w") as out:
        out.write(new_master_key(_master_key_id()) + "\n")
    return path


def ensure_identity(
    root: Path, *, rotate: bool = False, rotate_master_key: bool = False
) -> Identity:
    """Creates the keys that are missing (or rotates the users' key, or the master
    key) and mints fresh tokens for every role that users hold."""
    identity = Identity(root)
    root.mkdir(parents=True, exist_ok=True)
    ensure_master_keys(identity, rotate=rotate_master_key)
    fresh = not identity.jwks.exists()
    keys: list[dict[str, Any]] = [] if fresh else identity._keyset()["keys"]
    if fresh or not identity.platform_key.exists():
        _write_private(identity.platform_key, new_private_key_pem())
        keys = [k for k in keys if k.get("kid") != PLATFORM_KID]
        keys.append(public_jwk(identity.platform_key.read_bytes(), PLATFORM_KID))
    if fresh or rotate or not identity.users_key.exists():
        previous = None if fresh else identity.users_kid()
        kid = f"dev-users-{int(time.time() * 1000)}"
        _write_private(identity.users_key, new_private_key_pem())
        (root / "users.kid").write_text(json.dumps(kid))
        # Keep the previous users' key (tokens already handed out stay valid), drop older ones.
        keys = [k for k in keys if k.get("kid") in (PLATFORM_KID, previous)]
        keys.append(public_jwk(identity.users_key.read_bytes(), kid))
    if keys != ([] if fresh else identity._keyset()["keys"]):
        tmp = identity.jwks.with_suffix(".tmp")
        tmp.write_text(json.dumps(jwks_document(keys), indent=2) + "\n")
        tmp.replace(identity.jwks)
    if not identity.pseudonym_key.exists():
        _write_private(identity.pseudonym_key, secrets.token_hex(32).encode())
    identity.tokens.mkdir(exist_ok=True)
    for role in ROLES:
        if role == "platform":
            continue  # the services mint their own
        _write_private(
            identity.token_path(role),
            (identity.mint(role, lifetime=TOKEN_LIFETIME) + "\n").encode(),
        )
    return identity


# -- certificates (gRPC TLS and partner mTLS) --------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CRM platform (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_pair(root: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
                ) -> CertificateFiles:  # fmt: skip
    files = CertificateFiles(root / f"{stem}.pem", root / f"{stem}.key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


class DevelopmentCA:
    """A certificate authority for the local stack: server and partner certificates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.files = CertificateFiles(root / "ca.pem", root / "ca.key.pem")
        if not self.files.cert.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.now(UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(_name("CRM development CA"))
                .issuer_name(_name("CRM development CA"))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                    critical=True,
                )
                .sign(key, hashes.SHA256())
            )
            _write_pair(root, "ca", cert, key)
        self._cert = x509.load_pem_x509_certificate(self.files.cert.read_bytes())
        loaded = serialization.load_pem_private_key(self.files.key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        self._key = loaded

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        server: bool,
        days: int = 90,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> CertificateFiles:
        """A certificate signed by this CA: for a server (names and addresses) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write_pair(self.root, stem, builder.sign(self._key, hashes.SHA256()), key)


def ensure_certificates(root: Path, partners: tuple[str, ...] = ("acme",)) -> DevelopmentCA:
    """The development CA, a server certificate for 127.0.0.1/localhost, a client
    certificate for the platform's own services and one per partner."""
    ca = DevelopmentCA(root)
    if not (root / "server.pem").exists():
        ca.issue("server", "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    if not (root / "platform.pem").exists():
        ca.issue("platform", "platform", server=False)
    for partner in partners:
        if not (root / f"partner-{partner}.pem").exists():
            ca.issue(f"partner-{partner}", partner, server=False)
    return ca
