"""The playground: a browser page for trying the service, served by the API itself at ``/playground``.

What a Gradio demo gives people — model, prompt, size, seed, steps, LoRA adapters, image-to-image and
inpainting, live progress, the images — without a second process, a build step or a CDN: one HTML page, one
vanilla JS module and one stylesheet that ship inside the package and talk to the public ``/v1/models`` and
``/v1/generations`` API like any other client. It adds no API endpoint of its own, so it cannot drift from
the contract, and it is left out of the OpenAPI schema.

The page's size presets, size limits and numeric limits (LoRA count and scales included) are filled in
from ``schemas/`` when the page is first served, so they follow the request model rather than repeating
it. The models come from ``GET /v1/models`` when the page loads (with their ready workers); the LoRA names
have no listing, so the page takes whatever is typed and shows the server's ``lora_not_found`` answer,
which names the ones on offer. Whether the server wants an API key is filled in too (a yes or no, nothing
about the keys): the page shows its "API key" field only then. The key a person types stays in the tab's
``sessionStorage`` and travels only as an ``Authorization`` header, which is also why the page follows
jobs with a fetch-based SSE reader rather than ``EventSource`` (it cannot send one).
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from api.errors import NotFound
from schemas.generation import MAX_LORA_SCALE, MAX_LORAS, MAX_SEED, GenerationRequest, LoraRequest
from schemas.sizes import (
    ASPECT_RATIO_SIZES,
    DEFAULT_ASPECT_RATIO,
    MAX_MEGAPIXELS,
    MAX_SIDE,
    MIN_MEGAPIXELS,
    MIN_SIDE,
    SIZE_MULTIPLE,
)
from services.settings import TINY_MODEL

PAGE_PATH = "/playground"
STATIC_DIR = Path(__file__).resolve().parent
# Only these files are served: the package folder also holds Python sources, which are not for browsers.
STATIC_FILES: dict[str, str] = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# Everything comes from this origin; images may come from S3 (another origin) or be data:/blob: previews.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# The size menu's entry for the width and height fields (the request then sends those instead of a preset).
CUSTOM_SIZE = "custom"
# Where the form starts with the offline tiny model: a CPU answers in seconds (1 MP at 40 steps: a minute).
TINY_MODEL_SIZE = (512, 512)
TINY_MODEL_STEPS = 4
# Revalidate every time (ETag / Last-Modified make that cheap), so an upgraded server is seen at once.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root(request: Request) -> RedirectResponse:
    """A browser pointed at the bare server lands on something useful instead of a 404 problem."""
    return RedirectResponse(request.scope.get("root_path", "") + PAGE_PATH, status_code=307)


@router.get(PAGE_PATH)
async def playground_page(request: Request) -> HTMLResponse:
    """The page itself; its asset and API URLs are relative, so it also works behind a path prefix."""
    return HTMLResponse(
        render_page(auth_required=auth_required(request), tiny_model=serves_tiny_model(request)),
        headers={**_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


def auth_required(request: Request) -> bool:
    """Whether API calls need a key: the same test ``ApiKeyMiddleware`` makes (no key ring, no check)."""
    state = getattr(request.app.state, "darkroom", None)
    return state is not None and state.keys is not None


def serves_tiny_model(request: Request) -> bool:
    """Whether this API's default model is the offline tiny one (``DARKROOM_MODEL=tiny``, or ``make run``'s
    fallback when the real weights cannot be loaded): its images are noise, and the page says so."""
    state = getattr(request.app.state, "darkroom", None)
    return state is not None and state.settings.model == TINY_MODEL


@router.get(PAGE_PATH + "/static/{name}")
async def playground_static(name: str) -> Response:
    """One of the page's own assets (a fixed list: nothing else in the package folder is reachable)."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound(detail=f"no playground asset named {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)


@cache
def render_page(*, auth_required: bool, tiny_model: bool = False) -> str:
    """``index.html`` with the request model's presets, defaults and limits filled in (once per process
    for each answer to "does this server want an API key")."""
    template = Template((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    return template.substitute(page_values(auth_required=auth_required, tiny_model=tiny_model))


def page_values(*, auth_required: bool, tiny_model: bool = False) -> dict[str, str]:
    """The values ``index.html`` refers to as ``$name``: derived from ``schemas/``, plus whether the API
    key field is shown (with auth off there is nothing to enter). With the tiny model the form starts at a
    small custom size and few steps, so a first try on a CPU takes seconds; else at the API's defaults."""
    fields = GenerationRequest.model_fields
    chosen = CUSTOM_SIZE if tiny_model else DEFAULT_ASPECT_RATIO.value
    width, height = TINY_MODEL_SIZE if tiny_model else ASPECT_RATIO_SIZES[DEFAULT_ASPECT_RATIO]
    steps = TINY_MODEL_STEPS if tiny_model else fields["num_inference_steps"].default
    options = [
        _option(ratio.value, f"{ratio.value} · {w}×{h}", chosen, f' data-width="{w}" data-height="{h}"')
        for ratio, (w, h) in ASPECT_RATIO_SIZES.items()
    ]
    options.append(_option(CUSTOM_SIZE, "custom size", chosen))
    return {
        "api_key_hidden": "" if auth_required else " hidden",
        "tiny_model_hidden": "" if tiny_model else " hidden",
        "aspect_ratio_options": "\n            ".join(options),
        "width_default": str(width),
        "height_default": str(height),
        "side_min": str(MIN_SIDE),
        "side_max": str(MAX_SIDE),
        "side_step": str(SIZE_MULTIPLE),
        "megapixels_min": f"{MIN_MEGAPIXELS:g}",
        "megapixels_max": f"{MAX_MEGAPIXELS:g}",
        "max_seed": str(MAX_SEED),
        "steps_default": str(steps),
        "steps_min": str(_bound("num_inference_steps", "ge")),
        "steps_max": str(_bound("num_inference_steps", "le")),
        "guidance_default": str(fields["guidance_scale"].default),
        "guidance_min": str(_bound("guidance_scale", "ge")),
        "guidance_max": str(_bound("guidance_scale", "le")),
        "images_default": str(fields["num_images"].default),
        "images_min": str(_bound("num_images", "ge")),
        "images_max": str(_bound("num_images", "le")),
        "loras_max": str(MAX_LORAS),
        "lora_scale_min": f"{-MAX_LORA_SCALE:g}",
        "lora_scale_max": f"{MAX_LORA_SCALE:g}",
        "lora_scale_default": f"{LoraRequest.model_fields['scale'].default:g}",
    }


def _option(value: str, label: str, chosen: str, attributes: str = "") -> str:
    selected = " selected" if value == chosen else ""
    return f'<option value="{html.escape(value)}"{attributes}{selected}>{html.escape(label)}</option>'


def _bound(field: str, constraint: str) -> Any:
    """One constraint (``ge``, ``le``) of a request field, as pydantic recorded it."""
    for item in GenerationRequest.model_fields[field].metadata:
        if hasattr(item, constraint):
            return getattr(item, constraint)
    raise LookupError(f"GenerationRequest.{field} has no {constraint} bound; the playground relies on it")
