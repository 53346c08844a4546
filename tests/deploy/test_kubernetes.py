"""deploy/k8s: every kustomization renders, every object passes the Kubernetes (or CRD) schema, and the
pieces fit together: selectors, GPU scheduling, shutdown timing, autoscaling signal, secrets."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from services.jobs.keys import OUTBOX, OUTBOX_GROUP
from services.redis_connect import parse_sentinel_url
from services.settings import Settings
from tests.deploy import ROOT
from tests.deploy import kustomize as kz
from tests.deploy.crd_schemas import CUSTOM_RESOURCE_SCHEMAS, K8S_DEFS
from tests.deploy.promql import problems, selectors

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/production", "overlays/sentinel")
#: The oldest Kubernetes the manifests claim (docs/operate/deploy.md), and the newest schemas the package
#: ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SECRET_TEMPLATE = K8S / "secret-template.yaml"
Obj = dict[str, Any]


@dataclass
class Rendered:
    name: str
    objects: list[Obj]

    def of(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        matches = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def find(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of(kind) if o["metadata"]["name"] == name), None)


@functools.cache
def _render(name: str) -> Rendered:
    return Rendered(name, kz.build(K8S / name))


@pytest.fixture(params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return _render(request.param)


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]


def container(obj: Obj, name: str) -> Obj:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def container_env(rendered: Rendered, workload: Obj, container_name: str) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps (envFrom) and plain `env` values."""
    values: dict[str, str] = {}
    spec = container(workload, container_name)
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            values.update(rendered.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in spec.get("env", []):
        if "value" in item:
            values[item["name"]] = item["value"]
    return values


def settings_for(env: dict[str, str]) -> Settings:
    return Settings(
        **{k.removeprefix("DARKROOM_").lower(): v for k, v in env.items() if k.startswith("DARKROOM_")}
    )


# --- rendering and schemas -----------------------------------------------------------------------------


def test_renders_the_expected_objects(rendered: Rendered) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
    for expected in [
        ("ConfigMap", "darkroom-config"),
        ("Deployment", "darkroom-api"),
        ("Service", "darkroom-api"),
        ("HorizontalPodAutoscaler", "darkroom-api"),
        ("PodDisruptionBudget", "darkroom-api"),
        ("Deployment", "darkroom-worker"),
        ("ScaledObject", "darkroom-worker"),
        ("ScaledObject", "darkroom-webhooks"),
        ("Deployment", "darkroom-webhooks"),
        ("ServiceMonitor", "darkroom-api"),
        ("ServiceMonitor", "darkroom-worker"),
        ("ServiceMonitor", "darkroom-webhooks"),
    ]:
        assert expected in kinds, f"{rendered.name}: {expected} missing"
    assert not rendered.of("Secret"), "secrets are created out of band (secret-template.yaml), never applied"


def test_overlays_put_everything_in_their_namespace() -> None:
    for name, namespace in (("overlays/dev", "darkroom-dev"), ("overlays/production", "darkroom")):
        for obj in _render(name).objects:
            assert obj["metadata"].get("namespace") == namespace, (name, obj["kind"], obj["metadata"]["name"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_match_the_kubernetes_schemas(rendered: Rendered, version: str) -> None:
    failures = []
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCE_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(p) for p in error.absolute_path)
            detail = error.message if len(error.message) < 400 else error.message[:400] + "..."
            failures.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {detail}")
    assert not failures, f"{rendered.name} against Kubernetes {version}:\n" + "\n".join(failures)


@functools.cache
def _crd_registry() -> referencing.Registry:
    definitions = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{kubernetes_validate.latest_version()}-local-strict/_definitions.json"
    )
    resource = referencing.Resource.from_contents(json.loads(definitions.read_text()))
    return referencing.Registry().with_resource(K8S_DEFS.split("#")[0], resource)


def test_custom_resources_match_their_schemas(rendered: Rendered) -> None:
    custom = [o for o in rendered.objects if (o["apiVersion"], o["kind"]) in CUSTOM_RESOURCE_SCHEMAS]
    assert custom
    for obj in custom:
        schema = CUSTOM_RESOURCE_SCHEMAS[(obj["apiVersion"], obj["kind"])]
        validator = jsonschema.Draft202012Validator(schema, registry=_crd_registry())
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{obj['kind']}: {list(e.absolute_path)}: {e.message}" for e in errors)


def test_only_known_kinds(rendered: Rendered) -> None:
    for obj in rendered.objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        known = group in kz.BUILTIN_GROUPS or (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCE_SCHEMAS
        assert known, f"{obj['apiVersion']} {obj['kind']}: add a schema to crd_schemas.py"


def test_secret_template_is_valid_and_outside_every_kustomization() -> None:
    secrets = [d for d in yaml.safe_load_all(SECRET_TEMPLATE.read_text()) if d]
    assert {s["metadata"]["name"] for s in secrets} == {"darkroom-secrets", "darkroom-hf-token"}
    for secret in secrets:
        kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
        for key, value in secret["stringData"].items():
            assert value.startswith("<") and value.endswith(">"), f"{key}: a placeholder, never a real value"
    for name in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        assert not any("secret" in str(r) for r in kustomization.get("resources", [])), name


# --- the pieces fit together ---------------------------------------------------------------------------


def _selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdbs_and_monitors_select_something(rendered: Rendered) -> None:
    workloads = rendered.of("Deployment") + rendered.of("StatefulSet")
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    for workload in workloads:
        assert _selector_matches(
            workload["spec"]["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"]
        )
    for service in rendered.of("Service"):
        selected = [
            w
            for w in workloads
            if _selector_matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in selected:
                names = {p.get("name") for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
                numbers = {
                    p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])
                }
                assert target in names | numbers, (
                    f"Service {service['metadata']['name']}: no container port {target}"
                )
    for pdb in rendered.of("PodDisruptionBudget"):
        assert any(_selector_matches(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels)
    for monitor in rendered.of("ServiceMonitor"):
        services = [
            s
            for s in rendered.of("Service")
            if _selector_matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert len(services) == 1, (
            f"ServiceMonitor {monitor['metadata']['name']} selects {len(services)} Services"
        )
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names


def test_autoscalers_target_existing_deployments(rendered: Rendered) -> None:
    for hpa in rendered.of("HorizontalPodAutoscaler"):
        target = rendered.get("Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # A PDB must not demand every pod the HPA may scale down to: node drains would block forever.
        for pdb in rendered.of("PodDisruptionBudget"):
            if _selector_matches(
                pdb["spec"]["selector"]["matchLabels"], target["spec"]["template"]["metadata"]["labels"]
            ):
                if "minAvailable" in pdb["spec"]:
                    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], rendered.name
    for scaled in rendered.of("ScaledObject"):
        target = rendered.get("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "KEDA owns the worker replica count"


def test_every_referenced_configmap_and_secret_is_known(rendered: Rendered) -> None:
    template_secrets = {
        s["metadata"]["name"]: set(s["stringData"])
        for s in yaml.safe_load_all(SECRET_TEMPLATE.read_text())
        if s
    }
    for workload in rendered.of("Deployment") + rendered.of("StatefulSet"):
        for c in pod_spec(workload)["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert rendered.find("ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in template_secrets
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in template_secrets[ref["name"]], ref


def test_images_are_pinned(rendered: Rendered) -> None:
    for workload in rendered.of("Deployment") + rendered.of("StatefulSet"):
        for c in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", []):
            image = c["image"]
            name, suffix = kz._split_image(image)
            assert suffix and suffix not in (":latest",), (
                f"{workload['metadata']['name']}: {image} has no pinned tag"
            )


def test_pods_meet_the_restricted_pod_security_standard(rendered: Rendered) -> None:
    for workload in rendered.of("Deployment") + rendered.of("StatefulSet"):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for c in spec["containers"]:
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context.get("readOnlyRootFilesystem") is True
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if workload["metadata"]["name"] != "darkroom-redis":
                assert "/tmp" in mounts, "read-only root: /tmp needs a volume"
            limits = c["resources"]["limits"]
            assert "memory" in limits and "memory" in c["resources"]["requests"]


# --- GPU worker ----------------------------------------------------------------------------------------


def test_gpu_worker_is_scheduled_on_gpu_nodes(rendered: Rendered) -> None:
    worker = rendered.get("Deployment", "darkroom-worker")
    spec = pod_spec(worker)
    assert container(worker, "worker")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"], "GPU node selector"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    for other in ("darkroom-api", "darkroom-webhooks"):
        for c in pod_spec(rendered.get("Deployment", other))["containers"]:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), other


def test_gpu_worker_readiness_follows_the_ready_file(rendered: Rendered) -> None:
    worker = rendered.get("Deployment", "darkroom-worker")
    env = container_env(rendered, worker, "worker")
    ready_file = env["DARKROOM_READY_FILE"]
    probe = container(worker, "worker")["readinessProbe"]
    assert probe["exec"]["command"] == ["test", "-f", ready_file]
    assert "livenessProbe" not in container(worker, "worker"), "a liveness restart would kill the running job"
    mounts = {m["mountPath"]: m["name"] for m in container(worker, "worker")["volumeMounts"]}
    assert ready_file.startswith("/tmp/") and "/tmp" in mounts


def test_gpu_worker_shutdown_lets_the_running_job_finish(rendered: Rendered) -> None:
    worker = rendered.get("Deployment", "darkroom-worker")
    env = container_env(rendered, worker, "worker")
    job_timeout = settings_for(env).job_timeout
    grace = timedelta(seconds=pod_spec(worker)["terminationGracePeriodSeconds"])
    pre_stop = container(worker, "worker")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_time = timedelta(seconds=int(pre_stop[1]))
    # The grace period counts from the start of preStop; a job taken just before SIGTERM may run the
    # full job timeout after it.
    assert grace >= pre_stop_time + job_timeout + timedelta(seconds=30), (grace, pre_stop_time, job_timeout)
    assert env["DARKROOM_WORKER_METRICS_PORT"] == "9100"


def test_gpu_worker_keeps_the_model_cache_on_a_volume(rendered: Rendered) -> None:
    worker = rendered.get("Deployment", "darkroom-worker")
    env = container_env(rendered, worker, "worker")
    mounts = {m["mountPath"]: m["name"] for m in container(worker, "worker")["volumeMounts"]}
    volume_name = mounts[env["HF_HOME"]]
    volume = next(v for v in pod_spec(worker)["volumes"] if v["name"] == volume_name)
    sources = set(volume) - {"name"}
    assert len(sources) == 1, f"{rendered.name}: volume {volume_name} has sources {sources}"
    if "persistentVolumeClaim" in volume:
        claim = rendered.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "shared by every worker pod"
    token = next(e for e in container(worker, "worker")["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "darkroom-hf-token"


def test_scaled_object_counts_queued_and_running_jobs(rendered: Rendered) -> None:
    scaled = rendered.get("ScaledObject", "darkroom-worker")
    spec = scaled["spec"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 300
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert float(metadata["threshold"]) == 1.0, "one job per worker: wanted replicas = queued + running"
    query = metadata["query"]
    assert problems(query) == [], problems(query)
    names = {s.name for s in selectors(query)}
    assert names == {"darkroom_queue_depth", "darkroom_generation_jobs_running"}
    # Both sides count only the workers' own model (the configmap's DARKROOM_MODEL): with a deployment
    # per model, each scales on its own backlog.
    for selector in selectors(query):
        assert ("model", "=", Settings().served_model) in selector.matchers, selector
    # Empty results read as 0 in KEDA: with no worker (scaled to zero) the running-jobs sum would be empty
    # and so would the whole sum, unless each side falls back to 0.
    assert query.count("or vector(0)") == 2, query
    # All API replicas report the same queue lengths: one per queue (interactive and batch), never their
    # sum over replicas.
    assert "sum(maxby(queue)(darkroom_queue_depth" in query.replace(" ", "")
    namespace = scaled["metadata"].get("namespace")
    if namespace:
        for selector in selectors(query):
            assert ("namespace", "=", namespace) in selector.matchers, f"{rendered.name}: {selector}"
    # KEDA's activation step (0 <-> 1 replica) wakes the fleet on one queued or running job.
    assert metadata["activationThreshold"] == "0"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    # Up at least by doubling every 15 s: a backlog waits for one pod start, not for the autoscaler.
    assert up["stabilizationWindowSeconds"] == 0
    assert up["selectPolicy"] == "Max"
    assert {"type": "Percent", "value": 100, "periodSeconds": 15} in up["policies"]
    # Down only after 10 minutes of lower demand, and never more than 10 % of the pods a minute.
    assert down["stabilizationWindowSeconds"] >= 600
    for policy in down["policies"]:
        assert policy["periodSeconds"] >= 60
        assert (policy["type"], policy["value"]) in {("Pods", 1), ("Percent", 10)}, policy
    # The fallback (Prometheus unreachable) holds at least the warm floor.
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


def test_base_worker_scaling_suits_a_few_gpus() -> None:
    """The base is for a handful of GPUs: one warm, a few at most, one pod removed per 5 minutes."""
    spec = _render("base").get("ScaledObject", "darkroom-worker")["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]


def test_production_worker_scaling_is_the_simulated_fleet_policy() -> None:
    """The production overlay ships what bench/fleet_sim.py's `keda-remedy` simulates, field for field."""
    from bench.fleet_sim import autoscalers

    spec = _render("overlays/production").get("ScaledObject", "darkroom-worker")["spec"]
    remedy = autoscalers(spec["maxReplicaCount"])["keda-remedy"]
    assert spec["minReplicaCount"] == remedy.min_replicas
    assert spec["maxReplicaCount"] == remedy.max_replicas
    assert spec["pollingInterval"] == remedy.polling_s
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert sorted(up["policies"], key=lambda p: p["type"]) == [
        {"type": "Percent", "value": round(remedy.up_percent * 100), "periodSeconds": remedy.up_period_s},
        {"type": "Pods", "value": remedy.up_pods, "periodSeconds": remedy.up_period_s},
    ]
    assert down["stabilizationWindowSeconds"] == remedy.down_window_s
    assert down["policies"] == [
        {"type": "Percent", "value": round(remedy.down_percent * 100), "periodSeconds": remedy.down_period_s}
    ]
    assert remedy.down_pods == 0


def test_worker_rollout_fits_the_gpu_budget() -> None:
    """Dev has one GPU and no spare: its rollout must free the GPU first."""
    strategy = _render("overlays/dev").get("Deployment", "darkroom-worker")["spec"]["strategy"][
        "rollingUpdate"
    ]
    assert strategy == {"maxSurge": 0, "maxUnavailable": 1}


# --- API and webhooks ----------------------------------------------------------------------------------


def test_api_probes_and_graceful_shutdown(rendered: Rendered) -> None:
    api = rendered.get("Deployment", "darkroom-api")
    c = container(api, "api")
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    graceful = int(env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert graceful >= Settings().max_wait.total_seconds(), "a `Prefer: wait` request must be able to finish"
    assert pod_spec(api)["terminationGracePeriodSeconds"] > pre_stop + graceful
    assert "HF_TOKEN" not in json.dumps(c)
    # Limits before authentication, set explicitly (docs/operate/deploy.md), each a valid setting.
    limits = {name: value for name, value in env.items() if name.startswith("DARKROOM_HTTP_")}
    assert len(limits) == 3
    Settings(**{name.removeprefix("DARKROOM_").lower(): value for name, value in limits.items()})


def test_webhook_worker_runs_the_webhook_process(rendered: Rendered) -> None:
    webhooks = rendered.get("Deployment", "darkroom-webhooks")
    c = container(webhooks, "webhooks")
    assert c["command"] == ["python", "-m", "services.webhooks"]
    assert c["image"].split(":")[0].endswith("darkroom-api")
    assert (
        pod_spec(webhooks)["terminationGracePeriodSeconds"]
        > Settings().webhook_attempt_deadline.total_seconds()
    )


def test_webhook_scaled_object_follows_the_outbox_lag_and_the_retry_queue(rendered: Rendered) -> None:
    """KEDA reads the very stream, group and list the webhook process uses, on the Redis it uses."""
    scaled = rendered.get("ScaledObject", "darkroom-webhooks")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "darkroom-webhooks"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "RQ's scheduler fires the retries"
    webhooks = rendered.get("Deployment", "darkroom-webhooks")
    settings = settings_for(container_env(rendered, webhooks, "webhooks"))
    through_sentinels = settings.redis_url.startswith(("redis+sentinel:", "rediss+sentinel:"))
    stream_type, list_type = (
        ("redis-sentinel-streams", "redis-sentinel") if through_sentinels else ("redis-streams", "redis")
    )
    triggers = {t["type"]: t["metadata"] for t in spec["triggers"]}
    assert set(triggers) == {stream_type, list_type}, rendered.name
    lag = triggers[stream_type]
    assert (lag["stream"], lag["consumerGroup"]) == (OUTBOX, OUTBOX_GROUP)
    assert int(lag["lagCount"]) >= 1
    assert "pendingEntriesCount" not in lag and "streamLength" not in lag, "lag, not pending or length"
    assert triggers[list_type]["listName"] == f"rq:queue:{settings.webhook_queue_name}"
    if through_sentinels:
        target = parse_sentinel_url(settings.redis_url)
        for metadata in triggers.values():
            addresses = ",".join(f"{host}:{port}" for host, port in target.sentinels)
            assert metadata["addresses"] == addresses, rendered.name
            assert metadata["sentinelMaster"] == target.service_name
            assert metadata.get("databaseIndex", "0") == str(target.db)
        return
    url = urlsplit(settings.redis_url)
    for metadata in triggers.values():
        assert metadata["address"] == f"{url.hostname}:{url.port or 6379}", rendered.name
        assert metadata.get("databaseIndex", "0") == (url.path.strip("/") or "0")
        assert (metadata.get("enableTLS") == "true") == (url.scheme == "rediss"), rendered.name


# --- Redis ---------------------------------------------------------------------------------------------


def test_in_cluster_redis_is_durable_and_never_evicts() -> None:
    base = _render("base")
    redis = base.get("StatefulSet", "darkroom-redis")
    args = [str(a) for a in container(redis, "redis")["args"]]
    options = dict(zip(args[1::2], args[2::2], strict=False))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert redis["spec"]["volumeClaimTemplates"], "the AOF needs a persistent volume"
    config = base.get("ConfigMap", "darkroom-config")["data"]
    service = base.get("Service", "darkroom-redis")
    assert config["DARKROOM_REDIS_URL"].startswith(f"redis://{service['metadata']['name']}:6379/")


def test_production_uses_an_external_redis() -> None:
    production = _render("overlays/production")
    assert not production.of("StatefulSet")
    assert production.find("Service", "darkroom-redis") is None
    url = production.get("ConfigMap", "darkroom-config")["data"]["DARKROOM_REDIS_URL"]
    assert "darkroom-redis" not in url


def test_the_sentinel_overlay_finds_the_primary_through_sentinel_and_waits_for_a_replica() -> None:
    sentinel = _render("overlays/sentinel")
    assert not sentinel.of("StatefulSet"), "Redis is the operator's (a chart), not ours"
    settings = settings_for(sentinel.get("ConfigMap", "darkroom-config")["data"])
    target = parse_sentinel_url(settings.redis_url)
    assert target.service_name == "mymaster" and all(port == 26379 for _, port in target.sentinels)
    assert settings.redis_min_replica_acks == 1
    assert {o["metadata"]["namespace"] for o in sentinel.objects} == {"darkroom"}


# --- the resolver against the real kustomize -----------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_resolver_agrees_with_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the offline resolver's output is not cross-checked")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {kz.key_of(o): o for o in yaml.safe_load_all(result.stdout) if o}
    ours = {kz.key_of(o): o for o in _render(name).objects}
    assert set(ours) == set(theirs)
    for key, obj in ours.items():
        assert obj == theirs[key], f"{name}: {key} differs from kubectl kustomize"
