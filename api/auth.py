"""API-key authentication as raw ASGI middleware: ``Authorization: Bearer <key>`` on every API route.

The key's *name* becomes the request's principal (``scope["state"]["principal"]``), which owns the jobs it
creates. Probes, metrics, the playground shell and signed file downloads stay open: they carry no job data
(downloads are capabilities — the signature in the URL is the credential, as with S3 presigned URLs).
With auth explicitly disabled (local development only) every request is the principal ``anonymous``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import Unauthorized, problem_response
from services.api_keys import KeyRing

ANONYMOUS = "anonymous"
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc")
OPEN_PREFIXES = ("/v1/files/", "/playground", "/docs/")


def is_open_path(path: str) -> bool:
    return path == "/" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    """Refuses API requests without a valid key (401 problem+json).

    The key ring is read from the app's state, which the lifespan fills from settings — so building the
    app (e.g. to export its OpenAPI spec) needs no configuration, and starting it without keys fails.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        app_state = getattr(scope["app"].state, "darkroom", None) if "app" in scope else None
        keys: KeyRing | None = app_state.keys if app_state is not None else None
        if app_state is None or keys is None:
            state["principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        principal = keys.verify(token) if token else None
        if principal is None and not is_open_path(scope["path"]):
            error = Unauthorized(
                "missing or invalid API key: send 'Authorization: Bearer <key>'"
                if token is None
                else "invalid API key"
            )
            await problem_response(error.to_problem(scope["path"]), error.headers)(scope, receive, send)
            return
        state["principal"] = principal
        await self.app(scope, receive, send)


# Declared so the OpenAPI spec documents the bearer scheme; the middleware has already done the checking.
BEARER_SCHEME = "HTTPBearer"
_BEARER = HTTPBearer(
    auto_error=False, scheme_name=BEARER_SCHEME, description="An API key: `Authorization: Bearer <key>`."
)


async def get_principal(  # a coroutine: a plain def would cost a threadpool hop per request
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
) -> str:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, str):  # the middleware guarantees this on API routes
        raise Unauthorized("missing or invalid API key")
    return principal


PrincipalDep = Annotated[str, Depends(get_principal)]
