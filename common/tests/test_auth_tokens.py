"""Bearer tokens and the key set: what is accepted and everything that is refused."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import jwt
import pytest

from crm_common.auth.issuer import TokenIssuer, jwks_document, new_private_key_pem, public_jwk
from crm_common.auth.keys import KeySet, KeySetError
from crm_common.auth.tokens import TokenPolicy, TokenVerifier
from crm_common.errors import Unauthenticated

ISSUER, AUDIENCE = "https://id.example.com", "crm-platform"


def write_jwks(path: Path, *pems_and_kids: tuple[bytes, str]) -> None:
    path.write_text(json.dumps(jwks_document(public_jwk(p, k) for p, k in pems_and_kids)))


@pytest.fixture
def key() -> bytes:
    return new_private_key_pem()


@pytest.fixture
def jwks(tmp_path: Path, key: bytes) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, (key, "k1"))
    return path


@pytest.fixture
def verifier(jwks: Path) -> TokenVerifier:
    return TokenVerifier(KeySet(str(jwks), check_every=0), TokenPolicy(ISSUER, AUDIENCE))


def issuer(key: bytes, kid: str = "k1", iss: str = ISSUER, aud: str = AUDIENCE) -> TokenIssuer:
    return TokenIssuer(key, kid, iss, aud)


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(token)
    return error.value.message


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_valid_token_names_the_caller_its_roles_and_client(verifier, key):
    token = issuer(key).mint("ada", ["sales"], client="sales-console")
    principal = verifier.verify(token)
    assert (principal.subject, principal.roles, principal.client) == (
        "ada",
        frozenset({"sales"}),
        "sales-console",
    )
    assert principal.actor == "ada"


def test_expired_and_not_yet_valid_tokens_are_refused(verifier, key):
    past = TokenIssuer(key, "k1", ISSUER, AUDIENCE, clock=lambda: time.time() - 7200)
    assert "expired" in refused(verifier, past.mint("ada", ["sales"], client="c"))
    later = time.time() + 3600
    assert "not valid yet" in refused(
        verifier, issuer(key).mint("ada", ["sales"], client="c", not_before=later)
    )
    future = TokenIssuer(key, "k1", ISSUER, AUDIENCE, clock=lambda: time.time() + 3600)
    assert "not valid yet" in refused(verifier, future.mint("ada", ["sales"], client="c"))


def test_a_little_clock_skew_is_tolerated(verifier, key):
    skewed = TokenIssuer(key, "k1", ISSUER, AUDIENCE, clock=lambda: time.time() + 10)
    assert verifier.verify(skewed.mint("ada", ["sales"], client="c")).subject == "ada"


def test_a_token_signed_by_another_key_under_a_trusted_kid_is_refused(verifier):
    forged = issuer(new_private_key_pem()).mint("mallory", ["admin"], client="c")
    assert "signature" in refused(verifier, forged)


def test_a_tampered_payload_is_refused(verifier, key):
    header, _, signature = issuer(key).mint("ada", ["sales"], client="c").split(".")
    claims = {"sub": "ada", "roles": ["admin"], "iss": ISSUER, "aud": AUDIENCE,
              "iat": int(time.time()), "exp": int(time.time()) + 60}  # fmt: skip
    assert "signature" in refused(verifier, f"{header}.{b64(claims)}.{signature}")


def test_alg_none_and_hmac_with_the_public_key_are_refused(verifier, key):
    claims = {"sub": "mallory", "roles": ["admin"], "iss": ISSUER, "aud": AUDIENCE,
              "iat": int(time.time()), "exp": int(time.time()) + 60}  # fmt: skip
    unsigned = f"{b64({'alg': 'none', 'kid': 'k1', 'typ': 'JWT'})}.{b64(claims)}."
    assert "ES256 only" in refused(verifier, unsigned)
    public = json.dumps(public_jwk(key, "k1")).encode()
    hmac_header = b64({"alg": "HS256", "kid": "k1", "typ": "JWT"})
    signing_input = f"{hmac_header}.{b64(claims)}"
    import hashlib
    import hmac

    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert "ES256 only" in refused(verifier, token)


def test_wrong_issuer_wrong_audience_unknown_key_and_garbage_are_refused(verifier, key):
    assert "issuer" in refused(
        verifier, issuer(key, iss="https://evil.example").mint("a", ["sales"], client="c")
    )
    assert "audience" in refused(
        verifier, issuer(key, aud="other-app").mint("a", ["sales"], client="c")
    )
    assert "unknown key" in refused(
        verifier, issuer(new_private_key_pem(), kid="k9").mint("a", ["sales"], client="c")
    )
    assert "not a JWT" in refused(verifier, "not-a-token")
    assert "missing" in refused(verifier, "")
    assert "too long" in refused(verifier, "x" * 10_000)


def test_unknown_roles_and_overlong_lifetimes_are_refused(verifier, key):
    assert "unknown roles" in refused(verifier, issuer(key).mint("a", ["root"], client="c"))
    long = issuer(key).mint("a", ["sales"], client="c", lifetime=30 * 86400)
    assert "lifetime" in refused(verifier, long)


def test_a_rotated_key_set_is_picked_up_without_a_restart(tmp_path, verifier, jwks, key):
    new_key = new_private_key_pem()
    token = issuer(new_key, kid="k2").mint("ada", ["sales"], client="c")
    assert "unknown key" in refused(verifier, token)
    write_jwks(jwks, (key, "k1"), (new_key, "k2"))
    os.utime(jwks, (time.time() + 5, time.time() + 5))
    assert verifier.verify(token).subject == "ada"
    write_jwks(jwks, (new_key, "k2"))
    os.utime(jwks, (time.time() + 10, time.time() + 10))
    assert "unknown key" in refused(verifier, issuer(key).mint("ada", ["sales"], client="c"))


def test_a_key_set_with_symmetric_unpinned_or_private_keys_is_refused(tmp_path, key):
    path = tmp_path / "bad.json"
    good = public_jwk(key, "k1")
    for bad in (
        {"kty": "oct", "k": "c2VjcmV0", "kid": "h", "alg": "HS256"},
        {**good, "alg": None},
        {**good, "alg": "none"},
        {k: v for k, v in good.items() if k != "kid"},
        {**good, "d": "private"},
    ):
        path.write_text(json.dumps({"keys": [bad]}))
        with pytest.raises(KeySetError):
            KeySet(str(path))


def test_a_broken_key_set_publication_keeps_the_last_good_keys(verifier, jwks, key):
    jwks.write_text("{not json")
    os.utime(jwks, (time.time() + 5, time.time() + 5))
    assert verifier.verify(issuer(key).mint("ada", ["sales"], client="c")).subject == "ada"


def test_pyjwt_itself_would_refuse_none_when_not_allowed(key):
    # The pinning above does not depend on this, but it documents the library's stance.
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode("e30.e30.", options={"verify_signature": True}, algorithms=["ES256"], key=key)


def test_a_token_verified_before_a_key_is_withdrawn_is_refused_after(verifier, jwks, key):
    token = issuer(key).mint("ada", ["sales"], client="c")
    assert verifier.verify(token).subject == "ada"
    assert verifier.verify(token).subject == "ada"  # answered from the verified tokens
    write_jwks(jwks, (new_private_key_pem(), "k2"))
    os.utime(jwks, (time.time() + 5, time.time() + 5))
    assert "unknown key" in refused(verifier, token)


def test_a_key_set_from_a_url_is_fetched_again_when_a_token_names_a_new_key(tmp_path, key):
    import http.server
    import threading

    published = {"body": json.dumps(jwks_document([public_jwk(key, "k1")])).encode()}

    class Keys(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(published["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
        verifier = TokenVerifier(KeySet(url, check_every=0), TokenPolicy(ISSUER, AUDIENCE))
        assert verifier.verify(issuer(key).mint("ada", ["sales"], client="c")).subject == "ada"
        new_key = new_private_key_pem()
        published["body"] = json.dumps(
            jwks_document([public_jwk(key, "k1"), public_jwk(new_key, "k2")])
        ).encode()
        token = issuer(new_key, kid="k2").mint("grace", ["sales"], client="c")
        assert verifier.verify(token).subject == "grace"
    finally:
        server.shutdown()
