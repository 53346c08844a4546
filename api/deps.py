"""Typed dependencies: routes ask for ``StateDep`` / ``SettingsDep`` instead of reaching into globals.

Coroutines on purpose: FastAPI runs a plain ``def`` dependency in the threadpool, a thread hop (and GIL
hand-off) per dependency per request for what is an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.state import AppState
from services.settings import Settings


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.darkroom
    return state


async def get_state(request: Request) -> AppState:
    return app_state(request)


async def get_app_settings(request: Request) -> Settings:
    return app_state(request).settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
