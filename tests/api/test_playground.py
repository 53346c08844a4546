"""The playground in a real headless Chromium, driven by Playwright, against the real running stack.

Redis, the API under uvicorn, a tiny-model worker and the webhook worker run as processes
(``playground_stack``); the browser talks to them exactly as a person would: it fills the form, clicks, and
watches the page. A screenshot of the finished page is saved under ``test-output/playground/`` (ignored by
git). The stack's API runs with auth off, accepts a second model no worker serves (so the page's model menu
has two entries, one with no worker ready) and offers the two tiny LoRAs; a second API process with API
keys on (``keyed_url``) shares its Redis, storage and worker, for the page's API key field and its
fetch-based event stream reader.

Chromium is a system package (Debian's ``chromium``, installed by ``make browser``), not a Playwright
download: this suite fails, rather than skips, when it is missing, so a green run always means the page
really worked in a browser.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)

from api.playground import CONTENT_SECURITY_POLICY, CUSTOM_SIZE, TINY_MODEL_SIZE, TINY_MODEL_STEPS
from schemas.sizes import ASPECT_RATIO_SIZES, MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, side_problem
from services.api_keys import hash_key, new_key
from tests.fixtures.stack import ROOT, Stack, api_stack

CHROMIUM = Path(os.environ.get("DARKROOM_CHROMIUM", "/usr/bin/chromium"))
# No GPU, no network beyond loopback: without these Chromium floods the log with refused connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT_DIR = ROOT / "test-output" / "playground"
JOB_TIMEOUT_MS = 120_000
_HTTP_ERROR_LOGGED = "Failed to load resource: the server responded with a status of"
API_KEY = new_key()
KEY_STORAGE = "darkroom.apiKey"  # the page's sessionStorage entry
EVENTS_URL = re.compile(r"/v1/generations/[^/]+/events$")
OTHER_MODEL = "tiny-b"  # accepted by the API, held by no worker: listed with none ready


@pytest.fixture(scope="module")
def playground_env(tiny_loras: dict[str, str]) -> dict[str, str]:
    """The tiny model by default, a second model nobody serves, and the tiny LoRAs (ink, rust) on offer."""
    return {"DARKROOM_MODELS": OTHER_MODEL, "DARKROOM_LORAS": json.dumps(tiny_loras)}


@pytest.fixture(scope="module")
def playground_stack(
    tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack, playground_env: dict[str, str]
) -> Iterator[Stack]:
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-playground"), playground_env)


@pytest.fixture(scope="module")
def playground_url(playground_stack: Stack) -> str:
    """The stack's own API serves the page."""
    return playground_stack.api_url


@pytest.fixture(scope="module")
def keyed_url(
    tmp_path_factory: pytest.TempPathFactory,
    shared_backend: Stack,
    playground_env: dict[str, str],
) -> Iterator[str]:
    """A second API process, with API keys on, beside the stack's: same Redis, storage and worker."""
    env = {**playground_env, "DARKROOM_AUTH_DISABLED": "false"}
    env["DARKROOM_API_KEYS"] = f"playground:sha256:{hash_key(API_KEY)}"
    with Stack(tmp_path_factory.mktemp("stack-playground-keyed"), env=env, backend=shared_backend) as keyed:
        yield keyed.api_url  # its image URLs point at itself, not at the stack's API


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Headless Chromium with a fresh profile; a missing browser is a failure that says how to fix it."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}. Install it with `make browser` "
            "(Debian: apt-get install -y chromium), or point DARKROOM_CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext, playground_url: str) -> Iterator[Page]:
    with checked_tab(browser, playground_url) as tab:
        yield tab


@pytest.fixture
def keyed_page(browser: BrowserContext, keyed_url: str) -> Iterator[Page]:
    with checked_tab(browser, keyed_url) as tab:
        yield tab


@contextmanager
def checked_tab(browser: BrowserContext, server_url: str) -> Iterator[Page]:
    """A fresh tab that records script errors and any request leaving the server (there must be none)."""
    tab = browser.new_page()
    problems: list[str] = []
    origin = httpx.URL(server_url)
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def check_failure(request: Request) -> None:
        # Aborted is how the page closing an event stream (or leaving) looks; anything else is a fault.
        if request.failure != "net::ERR_ABORTED":
            problems.append(f"request failed ({request.failure}): {request.url}")

    tab.on("requestfailed", check_failure)

    def check_console(message: ConsoleMessage) -> None:
        # An HTTP error answer is logged by Chromium too; those the page shows are the tests' business.
        if message.type == "error" and not message.text.startswith(_HTTP_ERROR_LOGGED):
            problems.append(f"console: {message.text}")

    tab.on("console", check_console)

    def check_request(request: Request) -> None:
        url = httpx.URL(request.url)
        if url.scheme in ("http", "https") and (url.host, url.port) != (origin.host, origin.port):
            problems.append(f"request outside the server: {request.url}")

    tab.on("request", check_request)
    try:
        yield tab
        assert problems == []
    finally:
        tab.close()


def save_screenshot(
    page: Page, name: str, capsys: pytest.CaptureFixture[str], *, full_page: bool = True
) -> Path:
    """The whole page, or (``full_page=False``) just what the viewport shows."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUTPUT_DIR / name
    page.screenshot(path=path, full_page=full_page)
    with capsys.disabled():
        print(f"\nplayground screenshot: {path}")
    return path


def record_status_texts(page: Page) -> None:
    """Keep every text the status line shows in ``window.statusLog``: steps pass faster than polling.

    Each text is read from its own mutation record (the text node it added), not from the line when the
    observer runs: several updates in one task (a replayed stream's last events) reach it together.
    """
    page.evaluate(
        """() => {
            const status = document.getElementById("status");
            window.statusLog = [];
            new MutationObserver((records) => {
                for (const record of records) {
                    for (const node of record.addedNodes) window.statusLog.push(node.textContent);
                }
            }).observe(status, {childList: true});
        }"""
    )


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 90, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_bytes(width: int, height: int) -> bytes:
    """An inpainting mask that repaints the right half (white) and keeps the left (black)."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the page and its assets ---------------------------------------------------------------------------


def test_served_from_the_root_without_openapi_entries_or_stray_files(playground_url: str) -> None:
    with httpx.Client(base_url=playground_url, timeout=10) as client:
        root = client.get("/")
        assert (root.status_code, root.headers["location"]) == (307, "/playground")
        page = client.get("/playground")
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "$" not in page.text  # every template value was filled in
        for ratio, (width, height) in ASPECT_RATIO_SIZES.items():
            assert f'<option value="{ratio.value}"' in page.text and f"{width}×{height}" in page.text
        assert f'<option value="{CUSTOM_SIZE}" selected>' in page.text  # the tiny model: a small size
        for side in ("width", "height"):
            assert f'id="{side}" name="{side}" type="number"' in page.text
        assert f'min="{MIN_SIDE}" max="{MAX_SIDE}"' in page.text and f'step="{SIZE_MULTIPLE}"' in page.text
        for name, media_type in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
            asset = client.get(f"/playground/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        for stray in ["__init__.py", "index.html", "..%2F__init__.py"]:
            missing = client.get(f"/playground/static/{stray}")
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/problem+json"
        paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/playground")]


# --- in the browser -------------------------------------------------------------------------------------


def test_the_page_says_when_the_server_runs_the_tiny_model(
    page: Page, playground_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: the stack serves the offline tiny model (DARKROOM_MODEL=tiny), so the page warns that its
    images are noise before anyone waits for one."""
    page.goto(f"{playground_url}/playground")
    warning = page.locator("#tiny-model-warning")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("tiny test model")
    expect(warning).to_contain_text("images are noise")
    # ...and starts the form at a size and step count a CPU answers in seconds.
    expect(page.get_by_label("Aspect ratio")).to_have_value(CUSTOM_SIZE)
    expect(page.get_by_label("Width")).to_have_value(str(TINY_MODEL_SIZE[0]))
    expect(page.get_by_label("Height")).to_have_value(str(TINY_MODEL_SIZE[1]))
    expect(page.get_by_label("Steps")).to_have_value(str(TINY_MODEL_STEPS))
    save_screenshot(page, "tiny-model-warning.png", capsys)


def test_validation_errors_are_shown_next_to_their_fields_in_plain_words(
    page: Page, playground_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: the library's words ("String should have at least 1 character") become plain ones next to
    the field; the API's own size messages are plain already and pass through unchanged."""
    problem = httpx.post(
        f"{playground_url}/v1/generations",
        json={"prompt": "", "width": 500, "height": 512, "num_inference_steps": 0, "guidance_scale": 4.5},
    ).json()
    errors = {error["field"]: error for error in problem["errors"]}
    assert set(errors) == {"prompt", "width", "num_inference_steps"}
    assert errors["prompt"]["type"] == "string_too_short"
    assert errors["num_inference_steps"]["type"] == "greater_than_equal"
    assert errors["width"]["message"] == side_problem("width", 500)

    page.goto(playground_url)  # the bare server redirects to the page
    expect(page).to_have_url(f"{playground_url}/playground")
    expect(page).to_have_title("darkroom playground")
    expect(page.get_by_label("API key")).to_be_hidden()  # auth is off: there is no key to enter
    prompt = page.get_by_label("Prompt", exact=True)
    expect(prompt).to_have_value("")  # left empty; the form has no `required` (novalidate): the server judges
    size = page.get_by_label("Aspect ratio")
    size.select_option("16:9")  # a preset fills in its size...
    width = page.get_by_label("Width")
    expect(width).to_have_value("1344")
    expect(page.get_by_label("Height")).to_have_value("768")
    width.fill("500")  # ...and typing one picks "custom"
    expect(size).to_have_value(CUSTOM_SIZE)
    page.get_by_label("Height").fill("512")
    steps = page.get_by_label("Steps")
    steps.fill("0")
    with page.expect_request(f"{playground_url}/v1/generations") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert isinstance(body, dict)
    assert (body["width"], body["height"]) == (500, 512) and "aspect_ratio" not in body

    readable = {
        "prompt": "Write a prompt.",
        "width": errors["width"]["message"],  # the API's own words: plain already
        "num_inference_steps": "Must be at least 1.",
    }
    for field, message in readable.items():
        expect(page.locator(f"#{field}-error")).to_have_text(message)
        control = page.locator(f"#{field}")
        expect(control).to_have_attribute("aria-invalid", "true")
        expect(control).to_have_accessible_description(re.compile(re.escape(message)))
    expect(page.locator("#form-heading ~ * .error:not([hidden])")).to_have_count(3)
    expect(prompt).to_be_focused()
    expect(page.get_by_role("alert")).to_contain_text(problem["detail"])
    expect(page.get_by_role("alert")).not_to_contain_text("String should")
    expect(page.locator("#status")).to_have_text("Not submitted: fix the marked fields.")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    save_screenshot(page, "playground-readable-errors.png", capsys)


def test_unknown_validation_errors_keep_the_servers_message_and_others_go_to_the_alert(
    page: Page, playground_url: str
) -> None:
    """The plain-words tables fall back to the server's message; a field the page has no control for, and
    a whole-request error, are listed in the alert under the problem's detail."""
    problem = {
        "type": "urn:darkroom:problem:validation_error",
        "title": "Unprocessable Content",
        "status": 422,
        "detail": "2 fields are invalid.",
        "code": "validation_error",
        "errors": [
            {"field": field, "message": message, "type": kind}
            for field, message, kind in [
                ("guidance_scale", "a message the page has no words for", "made_up"),
                ("num_images", "Input should be less than or equal to 8", "less_than_equal"),
                ("output_quality", "needs a lossy output_format", "value_error"),
                ("body", "negative_prompt has no effect without guidance", "value_error"),
            ]
        ],
    }
    page.route(
        f"{playground_url}/v1/generations",
        lambda route: route.fulfill(
            status=422, headers={"Content-Type": "application/problem+json"}, body=json.dumps(problem)
        ),
    )
    page.goto(f"{playground_url}/playground")
    page.get_by_label("Prompt", exact=True).fill("a fox")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#guidance_scale-error")).to_have_text("a message the page has no words for")
    expect(page.locator("#num_images-error")).to_have_text("Must be at most 8.")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("2 fields are invalid.")
    expect(alert.locator("li")).to_have_text(
        ["output_quality: needs a lossy output_format", "negative_prompt has no effect without guidance"]
    )


def test_generate_with_queue_position_live_progress_and_reuse_seed(
    page: Page, playground_url: str, playground_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Keep the worker busy first, so the page's job has to wait its turn and shows its queue position.
    with playground_stack.client() as client:
        blocker = client.post(
            "/v1/generations",
            json={"prompt": "busy", "aspect_ratio": "1:1", "num_inference_steps": 100},
        ).json()
    playground_stack.wait_for(blocker["id"], {"running"})

    page.goto(f"{playground_url}/playground")
    record_status_texts(page)
    page.get_by_label("Prompt", exact=True).fill("a red fox in the snow")
    page.get_by_label("Aspect ratio").select_option("1:1")
    page.get_by_label("Steps").fill("2")
    expect(page.get_by_label("Seed", exact=True)).to_be_disabled()  # unlocked: the server draws one
    with page.expect_response(f"{playground_url}/v1/generations") as submitted:
        page.get_by_role("button", name="Generate").click()
    job = submitted.value.json()
    assert submitted.value.status == 202 and job["request"]["seed"] is not None

    status = page.locator("#status")
    expect(status).to_have_text("Queued — position 1")
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    with playground_stack.client() as client:
        assert client.post(f"/v1/generations/{blocker['id']}/cancel").status_code in (200, 202)

    expect(status).to_have_text(re.compile(r"^Done: 1 image in \d+\.\d s\.$"), timeout=JOB_TIMEOUT_MS)
    log: list[str] = page.evaluate("window.statusLog")
    assert "Running — step 1/2" in log and "Running — step 2/2" in log, log
    assert log.index("Queued — position 1") < log.index("Running — step 1/2")
    progress = page.get_by_role("progressbar", name="Generation progress")
    expect(progress).to_have_js_property("value", 2)
    expect(progress).to_have_js_property("max", 2)

    image = page.get_by_role("img", name=re.compile(r"^Image 1 of 1"))
    expect(image).to_have_js_property("complete", True)
    expect(image).to_have_js_property("naturalWidth", 1024)
    seed = job["request"]["seed"]
    expect(page.locator("#gallery figcaption .seed")).to_have_text(f"Seed {seed}")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == f"darkroom-{seed}.png"

    page.get_by_role("button", name=f"Reuse seed {seed}").click()
    seed_input = page.get_by_label("Seed", exact=True)
    expect(seed_input).to_have_value(str(seed))
    expect(seed_input).to_be_enabled()
    expect(seed_input).to_be_focused()
    expect(page.get_by_label("Lock")).to_be_checked()
    save_screenshot(page, "playground.png", capsys)


def test_with_the_tiny_model_a_default_request_is_small_and_its_result_is_scrolled_into_view(
    page: Page, playground_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: in a laptop-sized window the Generate button sits below the fold, far under the result
    panel; when the image is done the page brings it whole into view and hands focus to the result."""
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(f"{playground_url}/playground")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse on a cliff")
    generate = page.get_by_role("button", name="Generate")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # where the button is
    expect(generate).to_be_in_viewport()
    heading = page.get_by_role("heading", name="Result")
    expect(heading).not_to_be_in_viewport()  # the panel the image will appear in is out of sight
    with page.expect_request(f"{playground_url}/v1/generations") as sent:
        generate.click()
    body = sent.value.post_data_json
    assert isinstance(body, dict)
    assert (body["width"], body["height"]) == TINY_MODEL_SIZE and "aspect_ratio" not in body
    assert body["num_inference_steps"] == TINY_MODEL_STEPS

    expect(page.locator("#status")).to_have_text(re.compile(r"^Done: 1 image"), timeout=JOB_TIMEOUT_MS)
    image = page.get_by_role("img", name=re.compile(r"^Image 1 of 1"))
    expect(image).to_have_js_property("complete", True)
    expect(image).to_have_js_property("naturalWidth", TINY_MODEL_SIZE[0])
    expect(image).to_be_in_viewport(ratio=1)  # whole, not half out of view
    expect(heading).to_be_in_viewport()
    expect(page.locator("#status")).to_be_in_viewport()
    expect(heading).to_be_focused()  # the Generate button was disabled while it ran: focus goes to the result
    box = image.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 720, box
    save_screenshot(page, "playground-result-in-view.png", capsys, full_page=False)


def test_image_to_image_upload_sends_a_data_url_and_follows_the_image_size(
    page: Page, playground_url: str
) -> None:
    page.goto(f"{playground_url}/playground")
    strength = page.get_by_label("Strength")
    expect(strength).to_be_disabled()
    page.get_by_label("Prompt", exact=True).fill("the same, in watercolour")
    page.get_by_label("Steps").fill("2")
    page.get_by_label(re.compile("^Start from an image")).set_input_files(
        {"name": "start.png", "mimeType": "image/png", "buffer": png_bytes(640, 512)}
    )
    expect(page.get_by_role("img", name="The chosen input image")).to_be_visible()
    expect(strength).to_be_enabled()
    expect(page.get_by_label("Aspect ratio")).to_have_value("")  # size follows the input image

    with page.expect_request(f"{playground_url}/v1/generations") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert isinstance(body, dict)
    assert body["init_image"].startswith("data:image/png;base64,") and body["strength"] == 0.6
    assert "aspect_ratio" not in body

    expect(page.locator("#status")).to_have_text(re.compile(r"^Done: 1 image"), timeout=JOB_TIMEOUT_MS)
    image = page.get_by_role("img", name=re.compile(r"^Image 1 of 1"))
    expect(image).to_have_js_property("naturalWidth", 640)
    expect(image).to_have_js_property("naturalHeight", 512)

    page.get_by_role("button", name="Remove image").click()
    expect(strength).to_be_disabled()
    # Back to the size chosen before the image: the tiny model's small custom one.
    expect(page.get_by_label("Aspect ratio")).to_have_value(CUSTOM_SIZE)
    expect(page.get_by_label("Width")).to_have_value(str(TINY_MODEL_SIZE[0]))
    expect(page.get_by_label("Height")).to_have_value(str(TINY_MODEL_SIZE[1]))


# --- with API keys on -----------------------------------------------------------------------------------


def fill_small_request(page: Page, prompt: str, steps: int) -> None:
    """A 512x512 job (a quarter of a preset's pixels, so a quicker one): image-to-image at strength 1,
    which ignores the input image but keeps its size and runs every step."""
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label(re.compile("^Start from an image")).set_input_files(
        {"name": "start.png", "mimeType": "image/png", "buffer": png_bytes(512, 512)}
    )
    page.get_by_label("Strength").press("End")
    expect(page.get_by_label("Strength")).to_have_value("1")


def test_with_a_key_every_call_carries_it_and_a_dropped_event_stream_resumes(
    keyed_page: Page, keyed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    page = keyed_page
    page.goto(f"{keyed_url}/playground")
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_visible()
    expect(key_field).to_have_attribute("type", "password")
    expect(key_field).to_have_attribute("autocomplete", "off")
    key_field.fill(API_KEY)
    requested: list[Request] = []
    page.on("request", lambda request: requested.append(request))
    page.reload()
    expect(key_field).to_have_value(API_KEY)  # remembered for this tab, in sessionStorage only
    # The model menu's list is read with the key too (without it, the menu stays hidden).
    expect(page.get_by_label("Model", exact=True)).to_be_visible()
    record_status_texts(page)
    connections: list[dict[str, Any]] = []

    def drop_the_first_stream(route: Route) -> None:
        """The first connection ends after its first progress event, as a dropped one would (and asks
        for a 50 ms reconnection delay); the next goes to the server, which must resume after it."""
        connections.append({"headers": route.request.all_headers(), "at": time.monotonic()})
        if len(connections) > 1:
            route.fallback()
            return
        blocks = route.fetch().text().split("\n\n")  # the whole stream: the job runs to its end
        kept = blocks[: next(i for i, block in enumerate(blocks) if "event: progress" in block) + 1]
        connections[0]["last_id"] = re.findall(r"^id: (.+)$", kept[-1], re.MULTILINE)[-1]
        events = [block for block in kept if not block.startswith("retry:")]
        body = "retry: 50\n\n" + "\n\n".join(events) + "\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
        connections[0]["dropped_at"] = time.monotonic()

    page.route(EVENTS_URL, drop_the_first_stream)
    fill_small_request(page, "a lighthouse at dusk", steps=2)
    page.get_by_role("button", name="Generate").click()

    expect(page.locator("#status")).to_have_text(re.compile(r"^Done: 1 image"), timeout=JOB_TIMEOUT_MS)
    log: list[str] = page.evaluate("window.statusLog")
    assert "Running — step 1/2" in log and "Running — step 2/2" in log, log  # from the stream: no polling
    assert log.index("Running — step 1/2") < log.index("Running — step 2/2")
    image = page.get_by_role("img", name=re.compile(r"^Image 1 of 1"))
    expect(image).to_have_js_property("complete", True)
    expect(image).to_have_js_property("naturalWidth", 512)

    first, second = connections  # one drop, one resumption, and the job event closed the second
    assert "last-event-id" not in first["headers"]
    assert second["headers"]["last-event-id"] == first["last_id"]
    assert second["at"] - first["dropped_at"] < 1.5  # the stream's retry: 50, not the default 2 s
    api_calls = [request for request in requested if re.search(r"/v1/(generations|models)", request.url)]
    assert {request.method for request in api_calls} >= {"GET", "POST"}
    assert [request for request in api_calls if request.url.endswith("/v1/models")]
    for request in api_calls:
        assert request.all_headers().get("authorization") == f"Bearer {API_KEY}", request.url
    assert not [url for url in [page.url, *(request.url for request in requested)] if API_KEY in url]
    assert page.evaluate("() => JSON.stringify({...localStorage})") == "{}"
    assert page.evaluate(f"() => sessionStorage.getItem({KEY_STORAGE!r})") == API_KEY
    save_screenshot(page, "playground-api-key.png", capsys)


def test_a_wrong_key_is_shown_at_the_key_field_and_polling_and_cancel_send_the_key(
    keyed_page: Page, keyed_url: str
) -> None:
    page = keyed_page
    page.goto(f"{keyed_url}/playground")
    key_field = page.get_by_label("API key")
    status = page.locator("#status")
    key_field.fill("drk_not-the-key")
    fill_small_request(page, "a harbour in fog", steps=100)
    with page.expect_response(f"{keyed_url}/v1/generations") as refused:
        page.get_by_role("button", name="Generate").click()
    assert refused.value.status == 401
    problem = refused.value.json()

    alert = page.get_by_role("alert")
    expect(alert).to_contain_text(problem["detail"])
    expect(alert).to_contain_text("check the API key field")
    expect(page.locator("#api_key-error")).to_have_text("The server did not accept this API key.")
    expect(key_field).to_have_attribute("aria-invalid", "true")
    expect(key_field).to_be_focused()
    expect(status).to_have_text("Not submitted: check the API key.")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    # The right key: the same form goes through. Its event stream is refused here, so the page follows the
    # job by reading it (with the key), and Cancel carries the key too.
    page.route(EVENTS_URL, lambda route: route.fulfill(status=503, body="busy"))
    key_field.fill(API_KEY)
    with page.expect_request(re.compile(r"/v1/generations/[^/]+$")) as read:
        page.get_by_role("button", name="Generate").click()
    assert read.value.all_headers()["authorization"] == f"Bearer {API_KEY}"
    expect(status).to_have_text(re.compile(r"^Running — step"), timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#api_key-error")).to_be_hidden()
    with page.expect_request(re.compile(r"/v1/generations/[^/]+/cancel$")) as cancel:
        page.get_by_role("button", name="Cancel").click()
    assert cancel.value.all_headers()["authorization"] == f"Bearer {API_KEY}"
    expect(status).to_have_text("Canceled.", timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("() => JSON.stringify({...localStorage})") == "{}"


# --- models, LoRA adapters, inpainting ------------------------------------------------------------------


def test_the_model_menu_lists_served_models_and_an_unknown_lora_is_shown_at_the_adapters(
    page: Page, playground_url: str
) -> None:
    page.goto(f"{playground_url}/playground")
    model = page.get_by_label("Model", exact=True)
    expect(model.locator("option")).to_have_text(
        ["tiny (default) — 1 worker ready", f"{OTHER_MODEL} — 0 workers ready"]
    )
    expect(model).to_have_value("tiny")
    hint = page.locator("#model-hint")
    expect(hint).to_be_hidden()
    model.select_option(OTHER_MODEL)
    expect(hint).to_have_text("No worker holds this model right now: its jobs wait until one starts.")

    add = page.get_by_role("button", name="Add LoRA")
    for _ in range(4):
        add.click()
    expect(add).to_be_disabled()  # as many rows as a request may name adapters, no more
    page.get_by_role("button", name="Remove LoRA 2").click()
    expect(add).to_be_enabled()
    expect(page.get_by_label("LoRA 4 name", exact=True)).to_have_count(0)  # the rest renumbered
    page.get_by_label("LoRA 1 name", exact=True).fill("ink")
    page.get_by_label("LoRA 2 name", exact=True).fill("sepia")
    page.get_by_label("LoRA 2 scale", exact=True).fill("0.5")
    # LoRA 3 stays blank: a row without a name is not sent.
    page.get_by_label("Prompt", exact=True).fill("a fox in ink")
    page.get_by_label("Steps").fill("2")
    with page.expect_response(f"{playground_url}/v1/generations") as answered:
        page.get_by_role("button", name="Generate").click()
    body = answered.value.request.post_data_json
    assert isinstance(body, dict)
    assert body["model"] == OTHER_MODEL
    assert body["loras"] == [{"name": "ink", "scale": 1}, {"name": "sepia", "scale": 0.5}]
    assert answered.value.status == 422
    problem = answered.value.json()
    assert problem["code"] == "lora_not_found"
    assert [error["field"] for error in problem["errors"]] == ["loras.1.name"]
    message = problem["errors"][0]["message"]
    assert "offers: ink, rust" in message  # the names there are: no endpoint lists them

    expect(page.locator("#loras-error")).to_have_text(message)
    wrong = page.get_by_label("LoRA 2 name", exact=True)
    expect(wrong).to_have_attribute("aria-invalid", "true")
    expect(wrong).to_have_accessible_description(message)
    expect(wrong).to_be_focused()
    expect(page.get_by_label("LoRA 1 name", exact=True)).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#status")).to_have_text("Not submitted: fix the marked fields.")
    # Refused at submission: nothing waits for the model no worker holds.
    listed = httpx.get(f"{playground_url}/v1/models", timeout=10).json()["data"]
    assert [(entry["id"], entry["queued"]) for entry in listed] == [("tiny", 0), (OTHER_MODEL, 0)]


def test_inpainting_with_a_mask_and_an_offered_lora_reaches_succeeded(
    page: Page, playground_url: str, playground_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    page.goto(f"{playground_url}/playground")
    mask_field = page.get_by_label(re.compile("^Inpainting mask"))
    expect(mask_field).to_be_disabled()  # a mask belongs to a start image
    expect(mask_field).to_have_accessible_description(re.compile("^White repaints, black keeps"))
    fill_small_request(page, "a red boat in the harbour", steps=2)
    expect(mask_field).to_be_enabled()
    mask = mask_bytes(512, 512)
    mask_field.set_input_files({"name": "mask.png", "mimeType": "image/png", "buffer": mask})
    expect(page.get_by_role("img", name="The chosen mask")).to_be_visible()
    expect(page.locator("#strength-hint")).to_have_text(
        "How far to repaint the masked area (1 = from noise)."
    )
    page.get_by_role("button", name="Add LoRA").click()
    page.get_by_label("LoRA 1 name", exact=True).fill("ink")
    page.get_by_label("LoRA 1 scale", exact=True).fill("0.8")

    with page.expect_response(f"{playground_url}/v1/generations") as submitted:
        page.get_by_role("button", name="Generate").click()
    body = submitted.value.request.post_data_json
    assert isinstance(body, dict)
    assert body["mask_image"] == "data:image/png;base64," + base64.b64encode(mask).decode()
    assert body["init_image"].startswith("data:image/png;base64,") and body["strength"] == 1
    assert body["loras"] == [{"name": "ink", "scale": 0.8}] and body["model"] == "tiny"
    assert submitted.value.status == 202, submitted.value.text()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Done: 1 image"), timeout=JOB_TIMEOUT_MS)
    expect(page.get_by_role("img", name=re.compile(r"^Image 1 of 1"))).to_have_js_property(
        "naturalWidth", 512
    )
    save_screenshot(page, "playground-inpainting.png", capsys)

    job = playground_stack.wait_for(submitted.value.json()["id"], {"succeeded", "failed", "canceled"})
    assert job["status"] == "succeeded", job
    assert job["request"]["loras"] == [{"name": "ink", "scale": 0.8}]
    assert httpx.get(job["mask_image_url"], timeout=10).content == mask  # stored as uploaded
    with Image.open(io.BytesIO(httpx.get(job["images"][0]["url"], timeout=10).content)) as png:
        recorded = json.loads(png.text["darkroom"])["request"]
    # The hash of the mask file itself, whatever data: URL or base64 wrapping carried it.
    assert recorded["mask_image_sha256"] == hashlib.sha256(mask).hexdigest()

    page.get_by_role("button", name="Remove image").click()  # the mask goes with its image
    expect(mask_field).to_be_disabled()
    expect(page.get_by_role("img", name="The chosen mask")).to_be_hidden()
    expect(page.locator("#strength-hint")).to_have_text(re.compile("^How far to move away"))
