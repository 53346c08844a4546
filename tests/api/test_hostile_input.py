"""Hostile and broken input against the real app (uvicorn, real Redis): every refusal is a 4xx
``application/problem+json`` with a stable code, never a 5xx, and the server keeps serving.

No worker runs here: what is accepted just waits in the queue, which is all these tests need.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from api.main import MAX_BODY_BYTES, create_app
from devtools.redis_server import RedisServer
from schemas.problems import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE
from services.api_keys import hash_key
from services.settings import Settings
from tests.api import serve

GOOD: dict[str, Any] = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def base_url(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        redis_url=redis_server.url,
        storage_url=f"file://{tmp_path_factory.mktemp('hostile-outputs')}",
        auth_disabled=True,
        rate_limit_per_minute=0,
        max_wait=1,
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A well-formed problem: the status, the media type, ``code`` also as the ``type``'s last segment."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["code"] == code, problem
    assert problem["type"] == PROBLEM_TYPE_BASE + code
    assert problem["title"]
    return problem


def post_raw(client: httpx.Client, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post("/v1/generations", content=content, headers={"Content-Type": content_type})


def field_errors(problem: dict[str, Any]) -> set[str]:
    return {error["field"] for error in problem.get("errors") or []}


# --- malformed JSON ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"prompt": "a fox", "width": 5', id="truncated"),
        pytest.param(b'{"prompt": "a fox",}', id="trailing-comma"),
        pytest.param(b"{'prompt': 'a fox'}", id="single-quotes"),
        pytest.param(b'{"prompt": "a fox"} {"prompt": "again"}', id="two-documents"),
        pytest.param(b'{"prompt": "\xff\xfe a fox"}', id="invalid-utf8"),
        pytest.param(b'{"prompt": "a \x00 fox"}', id="raw-control-char"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100k-deep"),
        pytest.param(b'{"prompt": "a fox", "seed": ' + b"9" * 5000 + b"}", id="5000-digit-int"),
        pytest.param(b"\x00\x01\x02\x03", id="binary"),
    ],
)
def test_malformed_json_is_422_malformed_json(client: httpx.Client, body: bytes) -> None:
    assert_problem(post_raw(client, body), 422, "malformed_json")


@pytest.mark.parametrize(
    "body", [b"[]", b'"a fox"', b"42", b"null", b"true", b'[{"prompt": "a fox"}]', b"{}", b""]
)
def test_a_body_that_is_not_a_request_object_is_a_validation_error(client: httpx.Client, body: bytes) -> None:
    problem = assert_problem(post_raw(client, body), 422, "validation_error")
    assert problem["errors"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
@pytest.mark.parametrize("path", ["/v1/generations", "/v1/batches", "/v1/images/generations"])
def test_a_body_that_is_not_declared_json_is_415(client: httpx.Client, path: str, content_type: str) -> None:
    body = json.dumps(GOOD if path != "/v1/batches" else {"requests": [GOOD]}).encode()
    response = client.post(path, content=body, headers={"Content-Type": content_type})
    problem = assert_problem(response, 415, "unsupported_media_type")
    assert repr(content_type.split(";")[0]) in problem["detail"] and "application/json" in problem["detail"]
    if path.startswith("/v1/images/"):  # the OpenAI-compatible route keeps its error member
        assert problem["error"]["code"] == "unsupported_media_type"
        assert problem["error"]["message"] == problem["detail"]


def test_duplicate_keys_the_last_one_wins_as_in_every_json_parser_we_use(client: httpx.Client) -> None:
    body = b'{"prompt": "a fox", "width": 512, "height": 512, "num_images": 1, "num_images": 99}'
    assert field_errors(assert_problem(post_raw(client, body), 422, "validation_error")) == {"num_images"}


# --- numbers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309"])
@pytest.mark.parametrize("field", ["guidance_scale", "seed", "width", "num_images", "strength"])
def test_non_finite_numbers_are_422_naming_the_field(client: httpx.Client, field: str, literal: str) -> None:
    body = json.dumps({**GOOD, field: "@"}).replace('"@"', literal).encode()
    problem = assert_problem(post_raw(client, body), 422, "validation_error")
    assert field in field_errors(problem)
    assert literal not in json.dumps(problem)  # the input is never echoed back


def test_non_finite_numbers_inside_nested_objects_are_422(client: httpx.Client) -> None:
    body = (
        b'{"prompt": "a fox", "guidance_scale": 5, "skip_layer_guidance": {"scale": NaN, "start": -Infinity}}'
    )
    problem = assert_problem(post_raw(client, body), 422, "validation_error")
    assert field_errors(problem) == {"skip_layer_guidance.scale", "skip_layer_guidance.start"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 1.5),
        ("seed", 10**400),
        ("width", 2**64),
        ("width", -512),
        ("num_inference_steps", 0),
        ("num_inference_steps", 10**30),
        ("num_images", 1e100),
        ("guidance_scale", 1e308),
        ("max_sequence_length", -(2**63)),
        ("output_quality", 100),  # png has no quality
    ],
)
def test_absurd_numbers_are_422_naming_the_field(client: httpx.Client, field: str, value: Any) -> None:
    problem = assert_problem(
        client.post("/v1/generations", json={**GOOD, field: value}), 422, "validation_error"
    )
    assert field_errors(problem) == {field}


def test_negative_zero_is_zero(client: httpx.Client) -> None:
    response = post_raw(client, json.dumps(GOOD).encode()[:-1] + b', "seed": -0, "guidance_scale": -0.0}')
    assert response.status_code == 202, response.text
    assert response.json()["request"]["seed"] == 0 and response.json()["request"]["guidance_scale"] == 0


# --- wrong types and extra fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", 123),
        ("prompt", ["a fox"]),
        ("prompt", {"text": "a fox"}),
        ("prompt", None),
        ("width", "512"),
        ("width", True),
        ("num_images", True),
        ("num_inference_steps", "4"),
        ("guidance_scale", "4.5"),
        ("seed", "42"),
        ("seed", False),
        ("skip_layer_guidance", "yes"),
        ("skip_layer_guidance", [7, 8, 9]),
        ("webhook_events", "completed"),
        ("webhook_events", []),
        ("webhook_events", ["completed", "exploded"]),
        ("webhook_url", {"url": "https://example.com"}),
        ("webhook_url", "javascript:alert(1)"),
        ("output_format", "gif"),
        ("aspect_ratio", [16, 9]),
        ("init_image", 12345),
    ],
)
def test_wrong_types_are_422_naming_the_field(client: httpx.Client, field: str, value: Any) -> None:
    problem = assert_problem(
        client.post("/v1/generations", json={**GOOD, field: value}), 422, "validation_error"
    )
    assert field in {name.split(".")[0] for name in field_errors(problem)}


def test_extra_fields_are_refused_by_name_also_nested(client: httpx.Client) -> None:
    body = {**GOOD, "guidance_scale": 5, "steps": 30, "skip_layer_guidance": {"layers": [7], "bogus": 1}}
    problem = assert_problem(client.post("/v1/generations", json=body), 422, "validation_error")
    assert field_errors(problem) == {"steps", "skip_layer_guidance.bogus"}


# --- unicode -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "a fox 🦊 in the snow ❄️ 👨‍👩‍👧‍👦",
        "ثعلب أحمر في الثلج",  # RTL
        "a fox \u202eswon eht ni",  # RTL override
        "Z̷̢̛a̵̡͠l̶̨̛g̸̨͝o̷̢̕ fox",  # stacked combining marks
        "a\u200bfox\ufeff",  # zero-width space and BOM inside
        "𝔞 𝔣𝔬𝔵 \U0010fffd",  # astral plane, private use
    ],
)
def test_unicode_prompts_are_accepted_and_stored_exactly(client: httpx.Client, prompt: str) -> None:
    response = client.post("/v1/generations", json={**GOOD, "prompt": prompt})
    assert response.status_code == 202, response.text
    job = client.get(f"/v1/generations/{response.json()['id']}").json()
    assert job["request"]["prompt"] == prompt


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "a \\ud800 fox"}', "prompt"),
        (b'{"prompt": "\xed\xa0\x80"}', "prompt"),  # a UTF-8-encoded surrogate: Python decodes it as one
        (b'{"prompt": "\\udfff"}', "prompt"),
        (b'{"prompt": "a fox", "negative_prompt": "\\udbff", "guidance_scale": 5}', "negative_prompt"),
        (b'{"prompt": "a \\u0000 fox"}', "prompt"),
        (b'{"prompt": "\\u3000\\u2003\\n\\t "}', "prompt"),  # only (unicode) whitespace
        (b'{"prompt": "a fox", "aspect_ratio": "1:1\\ud800"}', "aspect_ratio"),
        (b'{"prompt": "a fox", "webhook_url": "https://ex\\ud800ample.com/"}', "webhook_url"),
        (b'{"prompt": "a fox", "init_image": "\\ud800"}', "init_image"),
        (b'{"prompt": "a fox", "output_format": "p\\u0000ng"}', "output_format"),
    ],
)
def test_lone_surrogates_nul_and_blank_text_are_422(client: httpx.Client, body: bytes, field: str) -> None:
    assert field_errors(assert_problem(post_raw(client, body), 422, "validation_error")) == {field}


def test_unknown_fields_with_odd_names_are_422(client: httpx.Client) -> None:
    """Field names go into the problem body: they must not make rendering the error fail."""
    odd = b'{"prompt": "a fox", "\\ud83e\\udd8a": 2, "a\\u0000b": 3, "": 4}'
    problem = assert_problem(post_raw(client, odd), 422, "validation_error")
    assert field_errors(problem) == {"\U0001f98a", "a\x00b", ""}
    surrogate = b'{"prompt": "a fox", "\\ud800": 1}'  # pydantic refuses the whole object: not a str key
    assert field_errors(assert_problem(post_raw(client, surrogate), 422, "validation_error")) == {"body"}


# --- images ------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels: its IDAT inflates to side² bytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()  # only 64 rows
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


PHOTO = Image.radial_gradient("L").convert("RGB").resize((320, 240))
PNG = encode(PHOTO, "PNG")
JPEG = encode(PHOTO, "JPEG", quality=90)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "init_image",
    [
        pytest.param("", id="empty"),
        pytest.param("not base64 at all!", id="not-base64"),
        pytest.param(b64(PNG)[:-3], id="bad-padding"),
        pytest.param(b64(PNG).replace("A", "-"), id="urlsafe-alphabet"),
        pytest.param("data:image/png;base64,", id="empty-data-url"),
        pytest.param("data:text/html;base64," + b64(b"<script>"), id="html-data-url"),
        pytest.param(b64(b"just some bytes, not an image"), id="not-an-image"),
        pytest.param(b64(PNG[: len(PNG) // 2]), id="truncated-png"),
        pytest.param(b64(JPEG[: len(JPEG) // 2]), id="truncated-jpeg"),
        pytest.param(b64(PNG[:8]), id="png-signature-only"),
        pytest.param(b64(bomb_png(20_000)), id="decompression-bomb-png"),
        pytest.param(b64(bomb_png(4097)), id="just-over-the-pixel-limit"),
        pytest.param(b64(encode(PHOTO, "GIF")), id="gif"),
        pytest.param(b64(encode(PHOTO, "BMP")), id="bmp"),
        pytest.param(b64(encode(PHOTO, "TIFF")), id="tiff"),
    ],
)
def test_bad_init_images_are_422_naming_init_image(client: httpx.Client, init_image: str) -> None:
    response = client.post("/v1/generations", json={"prompt": "a fox", "init_image": init_image})
    assert field_errors(assert_problem(response, 422, "validation_error")) == {"init_image"}
    assert " object at 0x" not in response.text  # no Python repr of PIL's buffer


@pytest.mark.parametrize("field", ["init_image", "mask_image"])
def test_bytes_that_are_no_image_say_so_for_either_image_field(client: httpx.Client, field: str) -> None:
    body = {"prompt": "a fox", "init_image": b64(PNG), field: b64(b"just some text, not an image")}
    response = client.post("/v1/generations", json=body)
    [error] = assert_problem(response, 422, "validation_error")["errors"]
    assert error == {
        "field": field,
        "message": "not an image: the base64 decodes to bytes that are no PNG, JPEG or WebP file",
        "type": "value_error",
    }


def test_an_init_image_over_10_mb_is_422_even_under_the_body_limit(client: httpx.Client) -> None:
    oversized = "A" * (14 * 1024 * 1024)  # decodes to 10.5 MB of zeros: refused before decoding
    response = client.post("/v1/generations", json={"prompt": "a fox", "init_image": oversized})
    assert field_errors(assert_problem(response, 422, "validation_error")) == {"init_image"}


@pytest.mark.parametrize("data", [PNG, JPEG], ids=["png", "jpeg"])
def test_good_init_images_are_accepted_with_line_wrapped_or_data_url_base64(
    client: httpx.Client, data: bytes
) -> None:
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    for init_image in (wrapped, "data:image/whatever;base64," + b64(data)):
        response = client.post("/v1/generations", json={"prompt": "a fox", "init_image": init_image})
        assert response.status_code == 202, response.text
        request = response.json()["request"]
        assert abs(request["width"] / request["height"] - 320 / 240) < 0.05  # sized after the image


# --- huge bodies -------------------------------------------------------------------------------------------


def test_a_body_over_15_mb_is_413_with_content_length(client: httpx.Client) -> None:
    body = json.dumps({"prompt": "a fox", "init_image": "A" * (MAX_BODY_BYTES + 1)}).encode()
    assert_problem(post_raw(client, body), 413, "payload_too_large")


def test_a_chunked_body_over_15_mb_is_413(client: httpx.Client) -> None:
    chunk = b"A" * (1024 * 1024)

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "a fox", "init_image": "'
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk
        yield b'"}'

    response = client.post("/v1/generations", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload_too_large")


def test_a_lying_content_length_is_refused_before_reading(base_url: str) -> None:
    """Declared 1 GB, nothing sent: the 413 comes back at once, without waiting for the body."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413 ")
    assert f"content-type: {PROBLEM_CONTENT_TYPE}" in head.lower()


def test_a_prompt_of_10_000_characters_is_fine_and_10_001_is_not(client: httpx.Client) -> None:
    assert client.post("/v1/generations", json={**GOOD, "prompt": "ü" * 10_000}).status_code == 202
    response = client.post("/v1/generations", json={**GOOD, "prompt": "ü" * 10_001})
    assert field_errors(assert_problem(response, 422, "validation_error")) == {"prompt"}


def test_a_huge_unknown_field_is_named_in_short_and_its_value_never_echoed(client: httpx.Client) -> None:
    response = client.post("/v1/generations", json={**GOOD, "x" * 100_000: "y" * 1_000_000})
    [field] = field_errors(assert_problem(response, 422, "validation_error"))
    assert field.startswith("xxx") and len(field) <= 200
    assert len(response.content) < 2_000


def test_a_flood_of_unknown_fields_gets_a_bounded_answer(client: httpx.Client) -> None:
    """200,000 unknown keys (3 MB): the problem lists the first 100, the detail says how many there were."""
    body = {**GOOD, **{f"k{i}": 0 for i in range(200_000)}}
    problem = assert_problem(client.post("/v1/generations", json=body), 422, "validation_error")
    assert len(problem["errors"]) == 100
    assert "200000 invalid fields (the first 100 are listed)" in problem["detail"]
    assert len(json.dumps(problem)) < 20_000


# --- headers -----------------------------------------------------------------------------------------------


def test_idempotency_key_up_to_255_characters(client: httpx.Client) -> None:
    ok = client.post("/v1/generations", json=GOOD, headers={"Idempotency-Key": "k" * 255})
    assert ok.status_code == 202
    for key in ("k" * 256, "k" * 8000):
        response = client.post("/v1/generations", json=GOOD, headers={"Idempotency-Key": key})
        assert field_errors(assert_problem(response, 422, "validation_error")) == {"header.idempotency-key"}


def test_idempotency_keys_with_odd_bytes_work_like_any_other(client: httpx.Client) -> None:
    for key in (b"\xff\xfe caf\xe9", b"", b'"quoted"; x=1, y', "🦊".encode()):
        first = client.post("/v1/generations", json=GOOD, headers=[(b"Idempotency-Key", key)])
        again = client.post("/v1/generations", json=GOOD, headers=[(b"Idempotency-Key", key)])
        assert first.status_code == again.status_code == 202, first.text
        assert first.json()["id"] == again.json()["id"]


@pytest.mark.parametrize(
    "prefer",
    [
        "wait=99999999999999999999",
        ", ".join(["respond-async", "wait=1"] * 200),
        'wait="1", wait=abc',  # only the first wait counts (RFC 7240)
        "return=minimal; x=y, handling=lenient",
        'foo="a, wait=abc", wait=0',  # a quoted comma does not start a preference
        "wait=0",
    ],
)
def test_odd_prefer_headers_are_ignored_or_capped(client: httpx.Client, prefer: str) -> None:
    response = client.post("/v1/generations", json=GOOD, headers=[(b"Prefer", prefer.encode("latin-1"))])
    assert response.status_code == 202, response.text
    assert response.headers.get("preference-applied") in (None, "wait=1")


@pytest.mark.parametrize(
    "prefer", ["wait=abc", "wait=-1", "wait=1.5", "wait", "wait=", "wait=²", "x, WAIT=soon"]
)
def test_a_malformed_wait_is_422_and_queues_nothing(client: httpx.Client, prefer: str) -> None:
    """A client that typed wait=abc has a bug: answering 202 at once would hide it."""
    body = {**GOOD, "prompt": f"prefer {prefer}"}
    headers = [(b"Prefer", prefer.encode()), (b"Idempotency-Key", f"prefer {prefer}".encode())]
    response = client.post("/v1/generations", json=body, headers=headers)
    problem = assert_problem(response, 422, "invalid_prefer_header")
    assert "Prefer: wait=" in problem["detail"] and "preference-applied" not in response.headers
    assert field_errors(problem) == {"header.prefer"}
    retried = client.post("/v1/generations", json=body, headers=headers[1:])
    assert retried.status_code == 202  # the key was not claimed by the refused request: nothing was queued


def test_a_large_header_block_is_never_a_server_error(base_url: str) -> None:
    """uvicorn (httptools) sets no limit of its own on the request head: a proxy in front should."""
    try:
        response = httpx.post(
            base_url + "/v1/generations", json=GOOD, headers={"X-Junk": "j" * 200_000}, timeout=10
        )
    except httpx.TransportError:
        return
    assert response.status_code < 500


def raw_exchange(base_url: str, request: bytes) -> str:
    """Send bytes no well-behaved client would; return the status line of the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536).decode("latin-1").split("\r\n", 1)[0]


@pytest.mark.parametrize(
    "header",
    [
        b"Prefer: wait=\x7f",
        b"Idempotency-Key: a\x00b",
        b"Idempotency-Key: a\x0bb",
        b"Content-Length: -5",
        b"Content-Length: 12abc",
        b"Transfer-Encoding: chunked",
        b"X-Request-ID: \x01",
        b"Authorization: Bearer \x00",
    ],
)
def test_header_values_the_http_parser_refuses_are_400(base_url: str, header: bytes) -> None:
    """Refused by uvicorn before the app sees them (so as its plain-text 400, not problem+json)."""
    body = json.dumps(GOOD).encode()
    request = (
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + header
        + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    assert raw_exchange(base_url, request).startswith("HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "last_event_id",
    [b"99999999999999999999-0", b"0-18446744073709551616", b"-1", b"1-2-3", b"\xb2", b"1-", b"0" * 100],
)
def test_a_bogus_last_event_id_replays_from_the_start(client: httpx.Client, last_event_id: bytes) -> None:
    job_id = client.post("/v1/generations", json=GOOD).json()["id"]
    headers = [(b"Last-Event-ID", last_event_id)]
    with client.stream("GET", f"/v1/generations/{job_id}/events", headers=headers, timeout=10) as stream:
        assert stream.status_code == 200
        lines = []
        for line in stream.iter_lines():
            lines.append(line)
            if line.startswith("data:"):
                break
    assert "event: status" in lines and json.loads(lines[-1][5:])["status"] == "queued"


# --- paths and methods -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/generations/%00",
        "/v1/generations/..%2F..%2Fetc%2Fpasswd",
        "/v1/generations/%ED%A0%80",  # an encoded lone surrogate
        "/v1/generations/%F0%9F%A6%8A",
        "/v1/generations/" + "x" * 4000,
        "/v1/generations/gen_%FF%FE/events",
        "/v1/files/..%2F..%2Fetc%2Fpasswd",
        "/v1/files/a%00b?expires=99999999999999999999&signature=x",
        "/v1/files/%ED%A0%80?expires=1&signature=%ED%A0%80",
        "/v1/nothing-here",
    ],
)
def test_odd_paths_are_404_problems(client: httpx.Client, path: str) -> None:
    assert_problem(client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    "template",
    [
        "/v1/generations/{job}:events",  # a stream: WRONGTYPE on HGETALL before ids were validated
        "/v1/generations/{job}:events/events",
        "/v1/batches/{batch}:items",  # a list
        "/v1/generations/{batch}",  # another kind's id
        "/v1/batches/{job}",
        "/v1/generations/gen_{made_up}",  # the control: a made-up id of the right form
        "/v1/batches/batch_{made_up}",
    ],
)
def test_ids_naming_other_keys_are_404_like_made_up_ids(client: httpx.Client, template: str) -> None:
    """Issue #16 case 10: a path id is checked against its own format before a Redis key is built from
    it, so another key's name (``<id>:events``, ``<id>:items``) is the same 404 as a made-up id: no 500,
    no existence oracle."""
    job = client.post("/v1/generations", json=GOOD).json()["id"]
    batch = client.post("/v1/batches", json={"template": GOOD, "count": 1}).json()["id"]
    path = template.format(job=job, batch=batch, made_up="0" * 32)
    for method in ("GET", "POST") if not path.endswith("/events") else ("GET",):
        target = path if method == "GET" else path + "/cancel"
        response = client.request(method, target)
        print(f"{method} {target.replace(job, '<job>').replace(batch, '<batch>')} -> {response.status_code}")
        assert_problem(response, 404, "not_found")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_wrong_methods_are_405_problems(client: httpx.Client, method: str) -> None:
    assert_problem(client.request(method, "/v1/generations", json=GOOD), 405, "method_not_allowed")


def test_the_server_still_serves_after_all_that(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/generations", json=GOOD).status_code == 202


# --- authentication headers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authed_url(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        redis_url=redis_server.url,
        storage_url=f"file://{tmp_path_factory.mktemp('hostile-auth-outputs')}",
        api_keys=f"tests:sha256:{hash_key('dk_test_key')}",
        rate_limit_per_minute=0,
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield url


@pytest.mark.parametrize(
    "authorization",
    [
        b"",
        b"Bearer",
        b"Basic dXNlcjpwYXNz",
        b"Bearer dk_test_key extra",
        b"Bearer \xff\xfe\xfd",
        b"bearer " + b"k" * 8000,
        b"Bearer dk_test_ke",
    ],
)
def test_malformed_authorization_is_401_problem(authed_url: str, authorization: bytes) -> None:
    response = httpx.post(
        authed_url + "/v1/generations", json=GOOD, headers=[(b"Authorization", authorization)], timeout=10
    )
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_right_key_still_works(authed_url: str) -> None:
    response = httpx.post(
        authed_url + "/v1/generations", json=GOOD, headers={"Authorization": "Bearer dk_test_key"}, timeout=10
    )
    assert response.status_code == 202, response.text
