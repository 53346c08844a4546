"""Shared fixtures: each starts a real component (Redis, S3 API, HTTP receiver) on a free loopback port."""

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.s3",
    "tests.fixtures.http_receiver",
    "tests.fixtures.tiny_model",
    "tests.fixtures.stack",
]

from services import metrics  # noqa: E402

# In-process tests read the default registry (``REGISTRY.get_sample_value``), and this one process plays
# every role; the service's own processes each export only theirs (tests/services/test_metrics_roles.py).
metrics.export("api", "worker", "webhooks")
