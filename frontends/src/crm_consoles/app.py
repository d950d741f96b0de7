"""The console's web application: pages, sign-in and the backend-for-frontend.

    GET  /                       the console (signed-in users; otherwise to /signin)
    GET  /signin                 sign-in: the identity provider, or the development form
    GET  /auth/login             OIDC: off to the identity provider (state, nonce, PKCE)
    GET  /auth/callback          OIDC: back from it; the session cookie is set
    POST /auth/dev               development sign-in (only with CRM_CONSOLE_DEV_IDENTITY_DIR)
    POST /auth/signout           ends the session
    ANY  /api/<service>/<path>   forwarded to the service's public REST API with the user's token
    GET  /live/<view>/<key>      server-sent events: the page's data changed (crm_consoles.live)
    GET  /healthz, /readyz       liveness and readiness

Nothing here reads a database: every datum comes from a public API, called
as the signed-in user, and the API's answer (refusals included) goes back
to the page unchanged.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.background import BackgroundTask

from crm_common.auth.access import DEFAULT_POLICY, AccessPolicy
from crm_common.auth.issuer import TokenIssuer
from crm_common.auth.principal import ROLES
from crm_consoles.config import API_SERVICES, ConsoleSettings
from crm_consoles.consoles import CONSOLES, Console
from crm_consoles.live import VIEWS, StreamLimits, follow
from crm_consoles.oidc import SIGNIN_TTL, OidcClient, SignInError, SignInState
from crm_consoles.sessions import Session, SessionCodec, same_secret

HERE = Path(__file__).parent
#: Request headers the BFF passes on to an API (besides the user's token).
FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "if-match", "idempotency-key")
#: Reply headers passed back to the page.
FORWARDED_REPLY_HEADERS = ("content-type", "etag", "retry-after", "location")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_BODY = 1 << 20
#: Lifetime of a development sign-in's token.
DEV_TOKEN_LIFETIME = 8 * 3600
USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def refusal(status: int, error: str, message: str) -> JSONResponse:
    """The platform's error shape."""
    return JSONResponse({"error": error, "message": message}, status_code=status)


def create_app(
    settings: ConsoleSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    policy: AccessPolicy | None = None,
) -> FastAPI:
    console: Console = CONSOLES[settings.console]
    policy = policy or AccessPolicy.load(os.environ.get("CRM_ACCESS_POLICY") or _default_policy())
    sessions = SessionCodec(settings.session_key, f"session:{console.name}")
    signins = SessionCodec(settings.session_key, f"signin:{console.name}")
    cookie = f"crm_{console.name}_session"
    signin_cookie = f"crm_{console.name}_signin"
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )
    http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30.0, connect=5.0))
    oidc = OidcClient(settings.oidc, http) if settings.oidc else None
    redirect_uri = f"{settings.public_url}/auth/callback"
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(settings.public_url))
    streams = StreamLimits()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await http.aclose()

    app = FastAPI(
        title=f"CRM {console.title} console",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            if name == "cache-control" and request.url.path.startswith("/static/"):
                response.headers[name] = "no-cache"
                continue
            response.headers.setdefault(name, value)
        return response

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(console=console, **context)
        return HTMLResponse(html, status_code=status)

    def current(request: Request) -> Session | None:
        return sessions.open_session(request.cookies.get(cookie))

    def set_session(response: Response, session: Session) -> None:
        max_age = max(0, session.expires_at - int(time.time()))
        response.set_cookie(
            cookie,
            sessions.seal_session(session),
            max_age=max_age,
            httponly=True,
            secure=settings.secure_cookies,
            samesite="strict",
            path="/",
        )

    def same_origin(request: Request) -> bool:
        """A browser's form post or fetch from this console's own pages."""
        sent = request.headers.get("origin")
        if sent is None:
            referer = request.headers.get("referer")
            if referer is None:
                return False
            sent = "{0.scheme}://{0.netloc}".format(urlsplit(referer))
        own = {origin, f"{request.url.scheme}://{request.url.netloc}"}
        return sent in own

    def safe_next(value: str | None) -> str:
        if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
            return value
        return "/"

    def allowed_pages(session: Session) -> list[dict[str, Any]]:
        roles = set(session.roles)
        return [
            {
                "route": p.route,
                "label": p.label,
                "allowed": bool(roles & policy.roles_for(p.service, p.operation)),
            }
            for p in console.pages
        ]

    # -- pages ---------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    @app.get("/readyz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Alive and ready: the console keeps no state of its own to wait for."""
        return {"status": "ok", "console": console.name}

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request) -> Response:
        session = current(request)
        if session is None:
            return RedirectResponse("/signin", status_code=303)
        pages = allowed_pages(session)
        boot = {
            "console": console.name,
            "title": console.title,
            "home": console.home,
            "user": {"subject": session.subject, "name": session.name, "roles": session.roles},
            "expires_at": session.expires_at,
            "csrf": session.csrf,
            "pages": pages,
            "operations": {
                f"{service}.{op}": sorted(roles)
                for service, ops in policy.operations.items()
                for op, roles in ops.items()
            },
        }
        return page(
            "shell.html", session=session, pages=pages, boot=json.dumps(boot).replace("</", "<\\/")
        )

    @app.get("/signin", response_class=HTMLResponse)
    async def signin(request: Request, error: str = "", next: str = "/") -> Response:
        return page(
            "signin.html",
            status=400 if error else 200,
            error=error,
            next=safe_next(next),
            oidc=settings.oidc,
            development=settings.dev_identity_dir is not None,
            roles=[r for r in ROLES if r != "platform"],
            default_role=console.name if console.name in ROLES else "analyst",
        )

    # -- development sign-in ------------------------------------------------------------

    @app.post("/auth/dev", response_class=HTMLResponse)
    async def dev_signin(request: Request) -> Response:
        if settings.dev_identity_dir is None:
            return page(
                "signin.html",
                status=404,
                error="Development sign-in is not enabled on this console.",
                next="/",
                oidc=settings.oidc,
                development=False,
                roles=[],
                default_role="",
            )
        if not same_origin(request):
            return refusal(403, "CsrfRejected", "Sign-in must come from this console's page.")
        body = await request.body()
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        role, user = form.get("role", ""), form.get("user", "").strip()
        problems = []
        if role not in ROLES or role == "platform":
            problems.append("Choose one of the roles offered.")
        if not USER_NAME.match(user):
            problems.append("A user name is 1 to 64 letters, digits or . _ @ -.")
        if problems:
            return page(
                "signin.html",
                status=422,
                error=" ".join(problems),
                next=safe_next(form.get("next")),
                oidc=settings.oidc,
                development=True,
                roles=[r for r in ROLES if r != "platform"],
                default_role=role,
                user=user,
            )
        root = settings.dev_identity_dir
        kid = json.loads((root / "users.kid").read_text())
        issuer = TokenIssuer.from_file(
            root / "users.key.pem", str(kid), settings.dev_issuer, settings.dev_audience
        )
        token = issuer.mint(
            user, [role], client=f"console-{console.name}", lifetime=DEV_TOKEN_LIFETIME
        )
        response = RedirectResponse(safe_next(form.get("next")), status_code=303)
        set_session(response, Session.for_token(token, via="development"))
        return response

    # -- OpenID Connect ---------------------------------------------------------------

    @app.get("/auth/login")
    async def oidc_login(next: str = "/") -> Response:
        if oidc is None:
            return RedirectResponse("/signin?error=No+identity+provider+is+configured.", 303)
        state = SignInState.fresh(safe_next(next))
        try:
            url = await oidc.authorization_url(state, redirect_uri)
        except SignInError as error:
            return RedirectResponse(f"/signin?{urlencode({'error': str(error)})}", 303)
        response = RedirectResponse(url, status_code=303)
        # Lax: the provider sends the browser back with a cross-site top-level GET.
        response.set_cookie(
            signin_cookie,
            signins.seal(state.__dict__),
            max_age=SIGNIN_TTL,
            httponly=True,
            secure=settings.secure_cookies,
            samesite="lax",
            path="/auth/callback",
        )
        return response

    @app.get("/auth/callback", response_class=HTMLResponse)
    async def oidc_callback(
        request: Request,
        code: str = "",
        state: str = "",
        error: str = "",
        error_description: str = "",
    ) -> Response:
        def failed(message: str) -> Response:
            response = page(
                "signin.html",
                status=400,
                error=message,
                next="/",
                oidc=settings.oidc,
                development=settings.dev_identity_dir is not None,
                roles=[r for r in ROLES if r != "platform"],
                default_role="",
            )
            response.delete_cookie(signin_cookie, path="/auth/callback")
            return response

        if oidc is None:
            return failed("No identity provider is configured.")
        saved = signins.open(request.cookies.get(signin_cookie), max_age=SIGNIN_TTL)
        if saved is None:
            return failed("This sign-in has expired or was started elsewhere; sign in again.")
        pending = SignInState(**saved)
        if not state or not secrets.compare_digest(state, pending.state):
            return failed("The sign-in answer does not belong to this sign-in (state).")
        if error:
            return failed(
                f"The identity provider refused the sign-in: {error_description or error}."
            )
        if not code:
            return failed("The identity provider sent no authorization code.")
        try:
            tokens = await oidc.redeem(code, pending, redirect_uri)
        except SignInError as problem:
            return failed(str(problem))
        session = Session.for_token(tokens.api_token, via="oidc")
        name = tokens.id_claims.get("name") or tokens.id_claims.get("preferred_username") or ""
        session = Session(**{**session.__dict__, "name": str(name)})
        # A page, not a redirect: a SameSite=Strict cookie set in answer to the
        # provider's cross-site redirect is only sent from the next same-site step.
        response = page("signed-in.html", next=pending.next)
        set_session(response, session)
        response.delete_cookie(signin_cookie, path="/auth/callback")
        return response

    @app.post("/auth/signout")
    async def signout(request: Request) -> Response:
        session = current(request)
        body = await request.body()
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if session is not None and not same_secret(form.get("csrf", ""), session.csrf):
            return refusal(403, "CsrfRejected", "Sign-out must come from this console's page.")
        target = "/signin"
        if session is not None and session.via == "oidc" and oidc is not None:
            target = await oidc.end_session_url(f"{settings.public_url}/signin") or target
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(cookie, path="/")
        return response

    # -- the backend-for-frontend --------------------------------------------------------

    @app.get("/api/session")
    async def who(request: Request) -> Response:
        session = current(request)
        if session is None:
            return refusal(401, "SignedOut", "You are not signed in (or your session ended).")
        return JSONResponse(
            {
                "subject": session.subject,
                "roles": list(session.roles),
                "expires_at": session.expires_at,
                "via": session.via,
            }
        )

    @app.api_route("/api/{service}/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(service: str, path: str, request: Request) -> Response:
        session = current(request)
        if session is None:
            return refusal(401, "SignedOut", "Your session has ended; sign in again.")
        if request.method in UNSAFE_METHODS and not same_secret(
            request.headers.get("x-csrf-token", ""), session.csrf
        ):
            return refusal(403, "CsrfRejected", "The request did not come from this console.")
        if service not in API_SERVICES or service not in settings.api_urls:
            return refusal(404, "NotFound", f"There is no service {service!r}.")
        body = await request.body()
        if len(body) > MAX_BODY:
            return refusal(413, "TooLarge", "The request is too large.")
        headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
        headers["authorization"] = f"Bearer {session.token}"
        url = f"{settings.api_urls[service]}/{path}"
        try:
            reply = await http.request(
                request.method,
                url,
                params=tuple(request.query_params.multi_items()),
                content=body or None,
                headers=headers,
            )
        except httpx.TimeoutException:
            return refusal(504, "ServiceTimeout", f"The {service} service did not answer in time.")
        except httpx.HTTPError:
            return refusal(502, "ServiceUnavailable", f"The {service} service cannot be reached.")
        out = {h: reply.headers[h] for h in FORWARDED_REPLY_HEADERS if h in reply.headers}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    # -- live updates ----------------------------------------------------------------

    @app.get("/live/{view}/{key:path}")
    async def live(view: str, key: str, request: Request) -> Response:
        session = current(request)
        if session is None:
            return refusal(401, "SignedOut", "Your session has ended; sign in again.")
        if view not in VIEWS or not key or len(key) > 200:
            return refusal(404, "NotFound", f"There are no live updates for {view!r}.")
        watch = VIEWS[view](key)
        if watch.service not in settings.api_urls:
            return refusal(404, "NotFound", f"There is no service {watch.service!r}.")
        slot = session.csrf
        if not streams.acquire(slot):
            return refusal(
                429,
                "TooManyStreams",
                "Too many pages with live updates are open; close some and reload this one.",
            )
        released = False

        def release() -> None:
            # Once, whether the stream ended itself or the browser left before it began.
            nonlocal released
            if not released:
                released = True
                streams.release(slot)

        stream = follow(
            http,
            f"{settings.api_urls[watch.service]}/{watch.path}",
            watch,
            session.token,
            interval=settings.live_interval,
            expires_at=session.expires_at,
            gone=request.is_disconnected,
            release=release,
        )
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no", "cache-control": "no-store"},
            background=BackgroundTask(release),
        )

    return app


def _default_policy() -> Path:
    return DEFAULT_POLICY
