"""The playground in a real headless Chromium, driven by Playwright, against the real running stack.

Redis, the API under uvicorn, a tiny-model worker and the webhook worker run as processes (``file_stack``);
the browser talks to them exactly as a person would: it fills the form, clicks, and watches the page. A
screenshot of the finished page is saved under ``test-output/playground/`` (ignored by git).

Chromium is a system package (Debian's ``chromium``, installed by ``make browser``), not a Playwright
download: this suite fails, rather than skips, when it is missing, so a green run always means the page
really worked in a browser.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Request, expect, sync_playwright

from api.playground import CONTENT_SECURITY_POLICY
from schemas.sizes import ASPECT_RATIO_SIZES
from tests.fixtures.stack import ROOT, Stack

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
START_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def playground_url(file_stack: Stack) -> str:
    """The stack's own API serves the page."""
    return file_stack.api_url


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
    """A fresh tab that records script errors and any request leaving the server (there must be none)."""
    tab = browser.new_page()
    problems: list[str] = []
    origin = httpx.URL(playground_url)
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


def save_screenshot(page: Page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUTPUT_DIR / name
    page.screenshot(path=path, full_page=True)
    with capsys.disabled():
        print(f"\nplayground screenshot: {path}")
    return path


def record_status_texts(page: Page) -> None:
    """Keep every text the status line shows in ``window.statusLog``: steps pass faster than polling."""
    page.evaluate(
        """() => {
            const status = document.getElementById("status");
            window.statusLog = [];
            new MutationObserver(() => window.statusLog.push(status.textContent))
                .observe(status, {childList: true, characterData: true, subtree: true});
        }"""
    )


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 90, 40)).save(buffer, format="PNG")
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


def test_server_validation_errors_are_shown_next_to_their_fields(
    page: Page, playground_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    problem = httpx.post(
        f"{playground_url}/v1/generations",
        json={"prompt": "", "aspect_ratio": "1:1", "num_inference_steps": 0, "guidance_scale": 4.5},
    ).json()
    messages = {error["field"]: error["message"] for error in problem["errors"]}
    assert set(messages) == {"prompt", "num_inference_steps"}

    page.goto(playground_url)  # the bare server redirects to the page
    expect(page).to_have_url(f"{playground_url}/playground")
    expect(page).to_have_title("darkroom playground")
    prompt = page.get_by_label("Prompt", exact=True)
    steps = page.get_by_label("Steps")
    steps.fill("0")
    page.get_by_role("button", name="Generate").click()

    expect(page.locator("#prompt-error")).to_have_text(messages["prompt"])
    expect(page.locator("#num_inference_steps-error")).to_have_text(messages["num_inference_steps"])
    expect(prompt).to_have_attribute("aria-invalid", "true")
    expect(prompt).to_have_accessible_description(messages["prompt"])
    expect(prompt).to_be_focused()
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("alert")).to_contain_text(problem["detail"])
    expect(page.locator("#status")).to_have_text("Not submitted: fix the marked fields.")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    save_screenshot(page, "playground-validation.png", capsys)


def test_generate_with_queue_position_live_progress_and_reuse_seed(
    page: Page, playground_url: str, file_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Keep the worker busy first, so the page's job has to wait its turn and shows its queue position.
    with file_stack.client() as client:
        blocker = client.post(
            "/v1/generations",
            json={"prompt": "busy", "aspect_ratio": "1:1", "num_inference_steps": 100},
        ).json()
    file_stack.wait_for(blocker["id"], {"running"})

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
    with file_stack.client() as client:
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
    expect(page.get_by_label("Aspect ratio")).to_have_value("1:1")
