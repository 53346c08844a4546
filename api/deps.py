"""Typed dependencies: routes ask for ``StateDep`` / ``SettingsDep`` instead of reaching into globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.state import AppState
from services.settings import Settings


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.darkroom
    return state


def get_app_settings(request: Request) -> Settings:
    return get_state(request).settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
