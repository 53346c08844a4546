"""The offline kustomize resolver (tests/deploy/kustomize.py) on small cases, against kubectl's built-in
kustomize where kubectl is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import kustomize as kz

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: main
          image: example/web:1.0
          env: [{name: A, value: "1"}, {name: B, value: "2"}, {name: C, value: "3"}]
          ports: [{containerPort: 80, name: http}, {containerPort: 90, name: metrics}]
        - name: sidecar
          image: example/sidecar:2.0
      volumes: [{name: v1, emptyDir: {}}, {name: v2, emptyDir: {}}]
      tolerations: [{key: a, operator: Exists}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 90, targetPort: metrics}]
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: web}
spec:
  items: [{name: a, size: 1}, {name: b, size: 2}]
  keep: true
"""

OVERLAY_PATCH = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: main
          env: [{name: B, value: "22"}, {name: D, value: "4"}]
          ports: [{containerPort: 90, name: prom}]
        - name: extra
          image: example/extra:3.0
      volumes: [{name: v2, emptyDir: null, hostPath: {path: /data}}]
      tolerations: [{key: b, operator: Exists}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: metrics-new, port: 90}]
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: web}
spec:
  items: [{name: b, size: 5}]
  keep: null
"""


def write_case(root: Path, overlay: dict[str, Any], files: dict[str, str]) -> Path:
    (root / "base").mkdir()
    (root / "base" / "all.yaml").write_text(DEPLOYMENT)
    (root / "base" / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["all.yaml"]}))
    (root / "overlay").mkdir()
    (root / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    for name, text in files.items():
        (root / "overlay" / name).write_text(text)
    return root / "overlay"


CASES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "strategic-merge": (
        {"resources": ["../base"], "patches": [{"path": "patch.yaml"}], "namespace": "ns"},
        {"patch.yaml": OVERLAY_PATCH},
    ),
    "delete-and-images": (
        {
            "resources": ["../base"],
            "patches": [{"patch": "$patch: delete\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n"}],
            "images": [
                {"name": "example/web", "newName": "registry.example.com/web", "newTag": "1.1"},
                {"name": "example/sidecar", "digest": "sha256:" + "a" * 64},
            ],
            "replicas": [{"name": "web", "count": 3}],
        },
        {},
    ),
    "json6902-with-target": (
        {
            "resources": ["../base"],
            "patches": [
                {
                    "target": {"kind": "Deployment", "name": "web"},
                    "patch": yaml.safe_dump(
                        [
                            {
                                "op": "replace",
                                "path": "/spec/template/spec/containers/0/image",
                                "value": "x/y:9",
                            },
                            {
                                "op": "add",
                                "path": "/spec/template/spec/volumes/-",
                                "value": {"name": "v3", "emptyDir": {}},
                            },
                            {"op": "remove", "path": "/spec/template/spec/tolerations"},
                        ]
                    ),
                },
                {
                    "target": {"kind": "Widget"},
                    # With a target, the patch's own name does not matter.
                    "patch": "{apiVersion: example.com/v1, kind: Widget, metadata: {name: x}, spec: {n: 1}}",
                },
            ],
        },
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_kubectl_kustomize(case: str, tmp_path: Path) -> None:
    overlay, files = CASES[case]
    directory = write_case(tmp_path, overlay, files)
    ours = kz.build(directory)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: nothing to compare with (the semantics tests below still run)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert {kz.key_of(o): o for o in ours} == {kz.key_of(o): o for o in theirs}


def test_strategic_merge_semantics(tmp_path: Path) -> None:
    overlay, files = CASES["strategic-merge"]
    objects = {o["kind"]: o for o in kz.build(write_case(tmp_path, overlay, files))}
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    main = spec["containers"][0]
    # The patch's items first (merged with the originals they name), then the untouched originals.
    assert [c["name"] for c in spec["containers"]] == ["main", "extra", "sidecar"]
    assert main["env"] == [
        {"name": "B", "value": "22"},
        {"name": "D", "value": "4"},
        {"name": "A", "value": "1"},
        {"name": "C", "value": "3"},
    ]
    assert main["ports"] == [{"containerPort": 90, "name": "prom"}, {"containerPort": 80, "name": "http"}]
    assert spec["volumes"][0] == {"name": "v2", "hostPath": {"path": "/data"}}  # null removed emptyDir
    assert spec["tolerations"] == [{"key": "b", "operator": "Exists"}]  # no merge key: replaced
    assert [p["port"] for p in objects["Service"]["spec"]["ports"]] == [90, 80]
    assert objects["Widget"]["spec"] == {"items": [{"name": "b", "size": 5}]}  # custom resource: replaced
    assert all(o["metadata"]["namespace"] == "ns" for o in objects.values())


def test_delete_images_replicas(tmp_path: Path) -> None:
    overlay, files = CASES["delete-and-images"]
    objects = {o["kind"]: o for o in kz.build(write_case(tmp_path, overlay, files))}
    assert "Service" not in objects
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert containers[0]["image"] == "registry.example.com/web:1.1"
    assert containers[1]["image"] == "example/sidecar@sha256:" + "a" * 64
    assert objects["Deployment"]["spec"]["replicas"] == 3


def test_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    directory = write_case(tmp_path, {"resources": ["../base"], "commonLabels": {"a": "b"}}, {})
    with pytest.raises(kz.UnsupportedKustomization, match="commonLabels"):
        kz.build(directory)


def test_refuses_a_patch_that_matches_nothing(tmp_path: Path) -> None:
    patch = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nope\nspec:\n  replicas: 2\n"
    directory = write_case(tmp_path, {"resources": ["../base"], "patches": [{"patch": patch}]}, {})
    with pytest.raises(kz.UnsupportedKustomization, match="matches no resource"):
        kz.build(directory)
