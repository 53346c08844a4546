"""Shared fixtures: each starts a real component (Redis, S3 API, HTTP receiver) on a free loopback port."""

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.s3",
    "tests.fixtures.http_receiver",
    "tests.fixtures.tiny_model",
    "tests.fixtures.stack",
]
