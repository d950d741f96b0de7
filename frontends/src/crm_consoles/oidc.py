"""OpenID Connect sign-in: the authorization-code flow with PKCE (S256).

The console is a confidential client of the company's identity provider. It
reads the provider's discovery document, sends the browser to its
authorization endpoint with a fresh `state`, `nonce` and PKCE challenge (kept
in a short-lived encrypted cookie), and on the way back checks the state,
redeems the code with the PKCE verifier, verifies the ID token (signature by
the provider's key set, issuer, audience, nonce) and keeps the token the APIs
verify in the session.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from crm_consoles.config import OidcSettings

#: Seconds a sign-in may take between leaving for the provider and coming back.
SIGNIN_TTL = 600
#: Seconds the discovery document and key set are reused.
METADATA_TTL = 300


class SignInError(Exception):
    """The sign-in cannot complete; the message is shown to the user."""


def pkce_pair() -> tuple[str, str]:
    """A PKCE verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


@dataclass(frozen=True)
class SignInState:
    state: str
    nonce: str
    verifier: str
    next: str

    @classmethod
    def fresh(cls, next_path: str) -> SignInState:
        return cls(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            verifier=pkce_pair()[0],
            next=next_path,
        )

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Tokens:
    api_token: str
    id_claims: dict[str, Any]


class OidcClient:
    def __init__(self, settings: OidcSettings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: jwt.PyJWKSet | None = None
        self._keys_at = 0.0

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None or time.monotonic() - self._metadata_at > METADATA_TTL:
            url = f"{self.settings.issuer}/.well-known/openid-configuration"
            try:
                reply = await self.http.get(url, timeout=10)
                reply.raise_for_status()
                document = reply.json()
            except (httpx.HTTPError, ValueError) as error:
                raise SignInError("The identity provider cannot be reached.") from error
            if document.get("issuer", "").rstrip("/") != self.settings.issuer:
                raise SignInError("The identity provider names another issuer.")
            self._metadata, self._metadata_at = document, time.monotonic()
        return self._metadata

    async def authorization_url(self, state: SignInState, redirect_uri: str) -> str:
        metadata = await self.metadata()
        query = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": self.settings.scopes,
            "state": state.state,
            "nonce": state.nonce,
            "code_challenge": state.challenge,
            "code_challenge_method": "S256",
        }
        return f"{metadata['authorization_endpoint']}?{urlencode(query)}"

    async def _key_set(self, refresh: bool = False) -> jwt.PyJWKSet:
        stale = time.monotonic() - self._keys_at > METADATA_TTL
        if self._keys is None or stale or refresh:
            metadata = await self.metadata()
            try:
                reply = await self.http.get(metadata["jwks_uri"], timeout=10)
                reply.raise_for_status()
                self._keys = jwt.PyJWKSet.from_dict(reply.json())
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as error:
                raise SignInError("The identity provider's keys cannot be read.") from error
            self._keys_at = time.monotonic()
        return self._keys

    async def _verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError as error:
            raise SignInError("The identity provider returned a malformed ID token.") from error
        kid = header.get("kid")
        keys = await self._key_set()
        if kid not in {k.key_id for k in keys.keys}:
            keys = await self._key_set(refresh=True)
        matching = [k for k in keys.keys if k.key_id == kid]
        if not matching:
            raise SignInError("The ID token is signed with a key the provider does not publish.")
        key = matching[0]
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self.settings.client_id,
                issuer=(await self.metadata())["issuer"],
                leeway=30,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.PyJWTError as error:
            raise SignInError(f"The ID token was refused: {error}.") from error
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise SignInError("The ID token does not answer this sign-in (nonce).")
        return claims

    async def redeem(self, code: str, state: SignInState, redirect_uri: str) -> Tokens:
        """Exchanges the code (with the PKCE verifier) for tokens and verifies them."""
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": state.verifier,
            "client_id": self.settings.client_id,
        }
        auth: httpx.Auth | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        if self.settings.client_secret:
            # A confidential client authenticates with its secret (client_secret_basic).
            auth = httpx.BasicAuth(self.settings.client_id, self.settings.client_secret)
        try:
            reply = await self.http.post(
                metadata["token_endpoint"], data=form, auth=auth, timeout=10
            )
        except httpx.HTTPError as error:
            raise SignInError("The identity provider cannot be reached.") from error
        try:
            body = reply.json()
        except ValueError:
            body = {}
        if reply.status_code != 200:
            detail = body.get("error_description") or body.get("error") or reply.status_code
            raise SignInError(f"The identity provider refused the sign-in ({detail}).")
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise SignInError("The identity provider returned no ID token.")
        claims = await self._verify_id_token(id_token, state.nonce)
        api_token = body.get(self.settings.api_token)
        if not isinstance(api_token, str) or not api_token:
            raise SignInError(f"The identity provider returned no {self.settings.api_token}.")
        return Tokens(api_token=api_token, id_claims=claims)

    async def end_session_url(self, post_logout: str) -> str | None:
        try:
            metadata = await self.metadata()
        except SignInError:
            return None
        endpoint = metadata.get("end_session_endpoint")
        if not endpoint:
            return None
        query = {"client_id": self.settings.client_id, "post_logout_redirect_uri": post_logout}
        return f"{endpoint}?{urlencode(query)}"
