"""Typed dependencies: routes ask for ``StateDep`` instead of reaching into globals.

Coroutines on purpose: FastAPI runs a plain ``def`` dependency in the threadpool, a thread hop (and GIL
hand-off) per dependency per request for what is an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.state import AppState
from services.storage import Storage


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.darkroom
    return state


async def get_state(request: Request) -> AppState:
    return app_state(request)


StateDep = Annotated[AppState, Depends(get_state)]


async def get_links(request: Request) -> Storage:
    """The storage that signs this answer's download URLs: ``file://`` URLs are rooted at the URL this
    request reached the API at, unless ``DARKROOM_PUBLIC_URL`` says otherwise."""
    return app_state(request).clients.storage_for(str(request.base_url))


LinksDep = Annotated[Storage, Depends(get_links)]
