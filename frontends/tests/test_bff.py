"""The consoles' backend-for-frontend without a browser: sign-in (development
and OpenID Connect with PKCE), the session cookie, CSRF, and the forwarding of
the signed-in user's own token to a real contacts REST API (in process, on
SQLite)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from crm_common.auth.issuer import TokenIssuer, jwks_document, new_private_key_pem, public_jwk
from crm_common.settings import Settings
from crm_consoles.app import create_app
from crm_consoles.config import ConfigError, ConsoleSettings, OidcSettings
from crm_consoles.sessions import SessionCodec
from crm_contacts.application import ContactsService, create_application
from crm_contacts.rest_api import create_app as contacts_app
from crm_deploy.identity import Identity
from crm_deploy.testing import gate_for

CONSOLE = "http://127.0.0.1:8091"
ISSUER = "https://idp.example"


class Routes(httpx.AsyncBaseTransport):
    """Sends each request to the in-process application serving its host."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = {host: httpx.ASGITransport(app=app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.apps[request.url.host].handle_async_request(request)


class OpenIdProvider:
    """An OpenID provider with the parts the console uses: discovery, keys, the
    authorization endpoint (the user is already signed in there) and the token
    endpoint, which checks the client's secret and the PKCE verifier (S256)."""

    def __init__(self, identity: Identity, user: str, role: str) -> None:
        self.identity, self.user, self.role = identity, user, role
        self.key = new_private_key_pem()
        self.codes: dict[str, dict[str, str]] = {}
        self.token_requests: list[dict[str, str]] = []
        self.app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )

    async def discovery(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/authorize",
                "token_endpoint": f"{ISSUER}/token",
                "jwks_uri": f"{ISSUER}/jwks",
                "end_session_endpoint": f"{ISSUER}/logout",
            }
        )

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse(jwks_document([public_jwk(self.key, "idp-1")]))

    async def authorize(self, request: Request) -> RedirectResponse:
        q = request.query_params
        assert q["response_type"] == "code" and q["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self.codes[code] = dict(q)
        return RedirectResponse(f"{q['redirect_uri']}?code={code}&state={q['state']}", 302)

    async def token(self, request: Request) -> JSONResponse:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        self.token_requests.append(form)
        basic = base64.b64encode(b"sales-console:s3cret").decode()
        if request.headers.get("authorization") != f"Basic {basic}":
            return JSONResponse({"error": "invalid_client"}, 401)
        asked = self.codes.pop(form.get("code", ""), None)
        if asked is None:
            return JSONResponse({"error": "invalid_grant"}, 400)
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != asked["code_challenge"]:
            return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, 400)
        id_token = TokenIssuer(self.key, "idp-1", ISSUER, "sales-console").mint(
            self.user, [], client="sales-console", extra={"nonce": asked["nonce"], "name": "Ada L."}
        )
        access = self.identity.mint(self.role, subject=self.user, client="sales-console")
        return JSONResponse({"id_token": id_token, "access_token": access, "token_type": "Bearer"})


def settings_for(identity: Identity | None, **changes: Any) -> ConsoleSettings:
    base = ConsoleSettings(
        console="sales",
        bind_host="127.0.0.1",
        port=8091,
        public_url=CONSOLE,
        session_key=b"k" * 40,
        api_urls={s: "http://contacts.test" for s in ("contacts", "pipeline", "analytics")},
        dev_identity_dir=identity.root if identity else None,
    )
    return replace(base, **changes)


@pytest.fixture
def contacts(tmp_path: Path, identity: Identity) -> Any:
    service = ContactsService(
        create_application(
            Settings(
                service="contacts",
                data_dir=tmp_path,
                bind_host="127.0.0.1",
                grpc_port=0,
                http_port=0,
                event_store="sqlite",
            )
        )
    )
    yield contacts_app(
        service, gate_for("contacts", identity), pseudonym_key=identity.pseudonym_key.read_bytes()
    )
    service.close()


async def console(settings: ConsoleSettings, apps: dict[str, Any]) -> httpx.AsyncClient:
    app = create_app(settings, transport=Routes(apps))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=CONSOLE)


async def dev_signin(client: httpx.AsyncClient, role: str, user: str) -> httpx.Response:
    return await client.post(
        "/auth/dev",
        content=f"role={role}&user={user}&next=/",
        headers={"content-type": "application/x-www-form-urlencoded", "origin": CONSOLE},
    )


def csrf_of(page: str) -> str:
    boot = page.split('<script type="application/json" id="boot">')[1].split("</script>")[0]
    return str(json.loads(boot)["csrf"])


@pytest.fixture
async def signed_in(
    identity: Identity, contacts: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    async with await console(settings_for(identity), {"contacts.test": contacts}) as client:
        assert (await dev_signin(client, "sales", "ada")).status_code == 303
        yield client, csrf_of((await client.get("/")).text)


async def test_the_development_sign_in_sets_a_strict_http_only_cookie_that_hides_the_token(
    identity: Identity, contacts: Any
) -> None:
    async with await console(settings_for(identity), {"contacts.test": contacts}) as client:
        assert (await client.get("/")).headers["location"] == "/signin"
        page = await client.get("/signin")
        assert 'action="/auth/dev"' in page.text and "Sign in with your company" not in page.text
        reply = await dev_signin(client, "sales", "ada")
        assert reply.status_code == 303
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith("crm_sales_session=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # served over plain http locally
        value = cookie.split(";")[0].split("=", 1)[1]
        assert "eyJ" not in value  # the token is sealed, not readable
        home = await client.get("/")
        assert home.status_code == 200 and "ada" in home.text and "Pipeline board" in home.text
        assert "content-security-policy" in home.headers


async def test_cookies_are_secure_behind_https(identity: Identity, contacts: Any) -> None:
    settings = settings_for(identity, public_url="https://sales.crm.example")
    async with await console(settings, {"contacts.test": contacts}) as client:
        reply = await client.post(
            "/auth/dev",
            content="role=sales&user=ada",
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "origin": "https://sales.crm.example",
            },
        )
        assert reply.status_code == 303 and "Secure" in reply.headers["set-cookie"]


async def test_development_sign_in_is_refused_when_not_enabled(contacts: Any) -> None:
    settings = settings_for(None, oidc=OidcSettings(ISSUER, "sales-console", "s3cret"))
    async with await console(settings, {"contacts.test": contacts}) as client:
        page = await client.get("/signin")
        assert 'action="/auth/dev"' not in page.text and "company account" in page.text
        reply = await dev_signin(client, "admin", "mallory")
        assert reply.status_code == 404 and "not enabled" in reply.text
        assert "set-cookie" not in reply.headers
        assert (await client.get("/api/contacts/contacts")).status_code == 401


def test_production_settings_never_enable_development_sign_in() -> None:
    env = {"CRM_OIDC_ISSUER": ISSUER, "CRM_OIDC_CLIENT_ID": "c", "CRM_CONSOLE_SESSION_KEY_FILE": ""}
    with pytest.raises(ConfigError, match="SESSION_KEY_FILE"):
        ConsoleSettings.from_env("sales", env)
    with pytest.raises(ConfigError, match="no sign-in configured"):
        ConsoleSettings.from_env("sales", {})


async def test_a_sign_in_posted_from_another_site_is_refused(
    identity: Identity, contacts: Any
) -> None:
    async with await console(settings_for(identity), {"contacts.test": contacts}) as client:
        reply = await client.post(
            "/auth/dev",
            content="role=admin&user=x",
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "origin": "https://evil.example",
            },
        )
        assert reply.status_code == 403 and "set-cookie" not in reply.headers


async def test_the_api_gets_the_signed_in_users_own_token(
    signed_in: tuple[httpx.AsyncClient, str], identity: Identity, contacts: Any
) -> None:
    client, csrf = signed_in
    created = await client.post(
        "/api/contacts/persons",
        json={"given_name": "Grace", "family_name": "Hopper"},
        headers={"x-csrf-token": csrf},
    )
    assert created.status_code == 201, created.text
    person = created.json()["id"]
    seen = await client.get(f"/api/contacts/contacts/{person}")
    assert seen.json()["name"] == "Grace Hopper"
    # The same request as an analyst: the API answers as it answers analysts (pseudonyms).
    async with await console(settings_for(identity), {"contacts.test": contacts}) as other:
        await dev_signin(other, "analyst", "bob")
        as_analyst = (await other.get(f"/api/contacts/contacts/{person}")).json()
        assert as_analyst["name"].startswith("pseudonym:")
        # A refusal of the API comes back as it is, with its message.
        refused = await other.post(
            "/api/contacts/persons",
            json={"family_name": "X"},
            headers={"x-csrf-token": csrf_of((await other.get("/")).text)},
        )
        assert refused.status_code == 403 and refused.json()["message"]


async def test_writes_without_the_csrf_secret_are_refused_and_change_nothing(
    signed_in: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = signed_in
    for headers in ({}, {"x-csrf-token": "guess"}):
        reply = await client.post(
            "/api/contacts/persons", json={"family_name": "Forged"}, headers=headers
        )
        assert reply.status_code == 403 and reply.json()["error"] == "CsrfRejected"
    listed = await client.get("/api/contacts/contacts", params={"query": "Forged"})
    assert listed.json()["contacts"] == []
    assert (await client.post("/auth/signout", content="csrf=guess")).status_code == 403


async def test_no_or_a_tampered_session_is_signed_out(
    signed_in: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = signed_in
    value = client.cookies["crm_sales_session"]
    client.cookies.set("crm_sales_session", value[:-4] + "AAAA")
    reply = await client.get("/api/contacts/contacts")
    assert reply.status_code == 401 and reply.json()["error"] == "SignedOut"
    assert (await client.get("/api/nosuch/x")).status_code == 401


async def test_sign_out_ends_the_session(signed_in: tuple[httpx.AsyncClient, str]) -> None:
    client, csrf = signed_in
    reply = await client.post(
        "/auth/signout",
        content=f"csrf={csrf}",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 303 and 'crm_sales_session=""' in reply.headers["set-cookie"]
    assert (await client.get("/api/contacts/contacts")).status_code == 401


async def test_an_unknown_service_is_not_forwarded(
    signed_in: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = signed_in
    reply = await client.get("/api/secrets/anything")
    assert reply.status_code == 404 and reply.json()["error"] == "NotFound"


# -- OpenID Connect -----------------------------------------------------------------------


def oidc_settings() -> ConsoleSettings:
    return settings_for(None, oidc=OidcSettings(ISSUER, "sales-console", "s3cret"))


async def start_signin(client: httpx.AsyncClient) -> tuple[dict[str, list[str]], str]:
    reply = await client.get("/auth/login", params={"next": "/#/board"})
    assert reply.status_code == 303
    location = reply.headers["location"]
    assert location.startswith(f"{ISSUER}/authorize?")
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/auth/callback" in cookie
    return parse_qs(urlsplit(location).query), location


async def test_oidc_sign_in_with_pkce_reaches_the_api_as_the_user(
    identity: Identity, contacts: Any
) -> None:
    idp = OpenIdProvider(identity, "ada", "sales")
    apps = {"contacts.test": contacts, "idp.example": idp.app}
    async with await console(oidc_settings(), apps) as client:
        query, location = await start_signin(client)
        assert query["code_challenge_method"] == ["S256"] and query["client_id"] == [
            "sales-console"
        ]
        assert query["redirect_uri"] == [f"{CONSOLE}/auth/callback"]
        # The verifier stays in the sealed sign-in cookie; only its S256 hash travels.
        sealed = client.cookies["crm_sales_signin"]
        state = SessionCodec(b"k" * 40, "signin:sales").open(sealed)
        assert state is not None and state["verifier"] not in location
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as browser:
            back = await browser.get(location)
        callback = urlsplit(back.headers["location"])
        done = await client.get(f"/auth/callback?{callback.query}")
        assert done.status_code == 200, done.text
        assert 'content="0;url=/#/board"' in done.text
        assert "SameSite=strict" in done.headers["set-cookie"]
        assert idp.token_requests[0]["code_verifier"] == state["verifier"]
        home = await client.get("/")
        assert "Ada L." in home.text
        assert (await client.get("/api/contacts/contacts")).status_code == 200
        # A code is redeemed once.
        again = await client.get(f"/auth/callback?{callback.query}")
        assert again.status_code == 400


async def test_oidc_callback_with_another_state_is_refused(
    identity: Identity, contacts: Any
) -> None:
    idp = OpenIdProvider(identity, "ada", "sales")
    async with await console(
        oidc_settings(), {"contacts.test": contacts, "idp.example": idp.app}
    ) as client:
        _, location = await start_signin(client)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as browser:
            back = urlsplit((await browser.get(location)).headers["location"])
        code = parse_qs(back.query)["code"][0]
        reply = await client.get("/auth/callback", params={"code": code, "state": "forged"})
        assert reply.status_code == 400 and "state" in reply.text
        assert "crm_sales_session=" not in reply.headers.get("set-cookie", "")
        assert idp.token_requests == []  # the code was never redeemed
        # Without the sign-in cookie (another browser): refused as well.
        client.cookies.clear()
        reply = await client.get(f"/auth/callback?{back.query}")
        assert reply.status_code == 400 and "expired or was started elsewhere" in reply.text


async def test_oidc_with_a_wrong_pkce_verifier_gets_no_session(
    identity: Identity, contacts: Any
) -> None:
    idp = OpenIdProvider(identity, "ada", "sales")
    async with await console(
        oidc_settings(), {"contacts.test": contacts, "idp.example": idp.app}
    ) as client:
        _, location = await start_signin(client)
        # Another sign-in started in the same browser replaces the verifier.
        await start_signin(client)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as browser:
            back = urlsplit((await browser.get(location)).headers["location"])
        reply = await client.get(f"/auth/callback?{back.query}")
        assert reply.status_code == 400
        assert "crm_sales_session=" not in reply.headers.get("set-cookie", "")


async def test_oidc_id_token_with_another_nonce_is_refused(
    identity: Identity, contacts: Any
) -> None:
    idp = OpenIdProvider(identity, "ada", "sales")
    original = idp.authorize

    async def replaying(request: Request) -> RedirectResponse:
        reply = await original(request)
        code = parse_qs(urlsplit(reply.headers["location"]).query)["code"][0]
        idp.codes[code]["nonce"] = "another"
        return reply

    idp.app.router.routes[2] = Route("/authorize", replaying)
    async with await console(
        oidc_settings(), {"contacts.test": contacts, "idp.example": idp.app}
    ) as client:
        _, location = await start_signin(client)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as browser:
            back = urlsplit((await browser.get(location)).headers["location"])
        reply = await client.get(f"/auth/callback?{back.query}")
        assert reply.status_code == 400 and "nonce" in reply.text


def test_the_sealed_session_expires_with_its_token() -> None:
    codec = SessionCodec(b"k" * 40, "session:sales")
    from crm_consoles.sessions import Session

    token = jwt.encode({"sub": "ada", "roles": ["sales"], "exp": int(time.time()) - 1}, "x" * 32)
    assert codec.open_session(codec.seal_session(Session.for_token(token, "development"))) is None


def test_every_page_is_offered_to_the_roles_its_api_operation_allows() -> None:
    """A page needs an operation the access policy lists: a misspelt one would hide the
    page from everyone. The lead inbox follows `ListLeads`, the service levels page (SLA
    compliance and the satisfaction trend) the tickets reports' roles."""
    from crm_common.auth.access import AccessPolicy
    from crm_consoles.consoles import CONSOLES

    policy = AccessPolicy.load()
    for console in CONSOLES.values():
        for page in console.pages:
            assert policy.roles_for(page.service, page.operation), (console.name, page.route)
    sales = {p.route: p for p in CONSOLES["sales"].pages}
    assert sales["leads"].operation == "ListLeads"
    levels = {p.route: p for p in CONSOLES["management"].pages}["service-levels"]
    assert policy.roles_for("tickets", levels.operation) == policy.roles_for(
        "tickets", "GetSatisfactionTrend"
    )
    assert "marketing" not in policy.roles_for("tickets", "GetSatisfactionTrend")
