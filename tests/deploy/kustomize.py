"""A small, offline kustomize: just the features deploy/k8s uses, and a refusal for anything else.

CI has no kustomize binary, so the manifests are rendered here to be validated. Supported:

- ``resources``: files (multi-document YAML) and directories holding a kustomization.yaml (recursively);
- ``patches``: from ``path`` or inline ``patch``, optionally with a ``target`` (kind, name, group, version,
  namespace, labelSelector of ``k=v`` pairs). A patch that is a YAML list of operations is JSON 6902
  (add/remove/replace/test); otherwise it is a strategic-merge patch: maps merge, ``null`` deletes a key,
  ``$patch: delete`` on the document deletes the resource, lists of built-in kinds merge by their merge key
  (containers by name, ports by containerPort, ...) with kustomize's ordering (the patch's items first,
  then the untouched originals), and every other list, and every list of a custom resource, is replaced;
- ``namespace`` (set on every namespaced object), ``images`` (newName/newTag/digest), ``replicas``.

Transformers run in kustomize's order: patches, namespace, images, replicas. tests/deploy compares this
output with ``kubectl kustomize`` wherever kubectl is installed, so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "images", "replicas"}

# Kinds whose lists merge by key in a strategic-merge patch (everything else is a custom resource here).
BUILTIN_GROUPS = {
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
}
# Cluster-scoped kinds keep no namespace.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
}
# Merge keys of the lists deploy/k8s patches, by field name. A list field not named here is replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "volumeClaimTemplates": None,  # replaced, like other lists without a key
}
PORT_MERGE_KEYS = {"Service": "port"}  # ports of containers merge by containerPort


class UnsupportedKustomization(Exception):
    """The kustomization uses something this resolver does not implement: extend it, or simplify."""


def build(directory: Path) -> list[Obj]:
    """Render the kustomization in ``directory``, like ``kustomize build directory``."""
    kustomization = _load_kustomization(directory)
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise UnsupportedKustomization(f"{directory}: unsupported fields {sorted(unsupported)}")

    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(build(path))
        elif path.is_file():
            objects.extend(_documents(path.read_text()))
        else:
            raise UnsupportedKustomization(
                f"{directory}: resource {entry!r} is neither a file nor a directory"
            )
    _check_unique(objects, directory)

    for patch_entry in kustomization.get("patches", []):
        objects = _apply_patch_entry(objects, patch_entry, directory)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    for replica in kustomization.get("replicas", []):
        _set_replicas(objects, replica)
    return objects


def key_of(obj: Obj) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): identifies an object in a rendered kustomization."""
    metadata = obj.get("metadata", {})
    return (obj["apiVersion"], obj["kind"], metadata.get("namespace", ""), metadata["name"])


# --- loading -------------------------------------------------------------------------------------------


def _load_kustomization(directory: Path) -> Obj:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            if not isinstance(loaded, dict):
                raise UnsupportedKustomization(f"{path}: not a mapping")
            return loaded
    raise UnsupportedKustomization(f"{directory}: no kustomization.yaml")


def _documents(text: str) -> Iterator[Obj]:
    for document in yaml.safe_load_all(text):
        if document is None:
            continue
        if not isinstance(document, dict) or "kind" not in document:
            raise UnsupportedKustomization(f"not a Kubernetes object: {str(document)[:80]}")
        yield document


def _check_unique(objects: list[Obj], directory: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        key = key_of(obj)
        if key in seen:
            raise UnsupportedKustomization(f"{directory}: {key} defined twice")
        seen.add(key)


# --- patches -------------------------------------------------------------------------------------------


def _apply_patch_entry(objects: list[Obj], entry: Obj, directory: Path) -> list[Obj]:
    extra = set(entry) - {"path", "patch", "target", "options"}
    if extra or entry.get("options"):
        raise UnsupportedKustomization(
            f"{directory}: unsupported patch fields {sorted(extra) or ['options']}"
        )
    if "path" in entry:
        text = (directory / entry["path"]).read_text()
    elif "patch" in entry:
        text = entry["patch"]
    else:
        raise UnsupportedKustomization(f"{directory}: a patch needs `path` or `patch`")

    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(documents) == 1 and isinstance(documents[0], list):
        if "target" not in entry:
            raise UnsupportedKustomization(f"{directory}: a JSON 6902 patch needs a `target`")
        targets = [o for o in objects if _matches(o, entry["target"])]
        if not targets:
            raise UnsupportedKustomization(f"{directory}: patch target {entry['target']} matches nothing")
        for obj in targets:
            for operation in documents[0]:
                _json6902(obj, operation)
        return objects

    for document in documents:
        if not isinstance(document, dict):
            raise UnsupportedKustomization(f"{directory}: a patch document must be a mapping")
        if "target" in entry:
            targets = [o for o in objects if _matches(o, entry["target"])]
        else:
            targets = [o for o in objects if _same_resource(o, document)]
        if not targets:
            raise UnsupportedKustomization(f"{directory}: patch {_describe(document)} matches no resource")
        if document.get("$patch") == "delete":
            objects = [o for o in objects if not any(o is t for t in targets)]
            continue
        for obj in targets:
            patch = {k: v for k, v in document.items() if k not in ("apiVersion", "kind")}
            patch["metadata"] = {k: v for k, v in patch.get("metadata", {}).items() if k != "name"}
            if not patch["metadata"]:
                del patch["metadata"]
            merged = _merge(obj, patch, builtin=_is_builtin(obj), path=())
            obj.clear()
            obj.update(merged)
    return objects


def _describe(document: Obj) -> str:
    return f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"


def _group_version(obj: Obj) -> tuple[str, str]:
    api_version = obj.get("apiVersion", "")
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def _is_builtin(obj: Obj) -> bool:
    return _group_version(obj)[0] in BUILTIN_GROUPS


def _same_resource(obj: Obj, patch: Obj) -> bool:
    metadata = patch.get("metadata", {})
    return (
        obj["kind"] == patch.get("kind")
        and _group_version(obj)[0] == _group_version(patch)[0]
        and obj["metadata"]["name"] == metadata.get("name")
        and ("namespace" not in metadata or obj["metadata"].get("namespace") == metadata["namespace"])
    )


def _matches(obj: Obj, target: Obj) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace", "labelSelector"}
    if unsupported:
        raise UnsupportedKustomization(f"unsupported target fields {sorted(unsupported)}")
    group, version = _group_version(obj)
    metadata = obj.get("metadata", {})
    checks = [
        ("group", group),
        ("version", version),
        ("kind", obj["kind"]),
        ("name", metadata.get("name", "")),
        ("namespace", metadata.get("namespace", "")),
    ]
    for field, actual in checks:
        if field in target and not re.fullmatch(target[field], actual):
            return False
    if "labelSelector" in target:
        labels = metadata.get("labels", {})
        for requirement in target["labelSelector"].split(","):
            if "=" not in requirement or "!=" in requirement:
                raise UnsupportedKustomization(f"only k=v label selectors: {target['labelSelector']!r}")
            key, value = (part.strip() for part in requirement.split("=", 1))
            if labels.get(key) != value:
                return False
    return True


def _merge(original: Any, patch: Any, *, builtin: bool, path: tuple[str, ...]) -> Any:
    """Strategic merge of ``patch`` into ``original`` (a copy is returned)."""
    if not isinstance(patch, dict) or not isinstance(original, dict):
        return copy.deepcopy(patch)
    if "$patch" in patch:
        if patch["$patch"] == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        raise UnsupportedKustomization(f"unsupported directive $patch: {patch['$patch']} at {path}")
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedKustomization(f"unsupported directive {key} at {path}")
        if value is None:
            result.pop(key, None)
        elif key not in result:
            result[key] = _strip_nulls(value)
        elif isinstance(value, list) and isinstance(result[key], list):
            merge_key = _merge_key(path, key) if builtin else None
            result[key] = _merge_list(result[key], value, merge_key, builtin, path + (key,))
        else:
            result[key] = _merge(result[key], value, builtin=builtin, path=path + (key,))
    return result


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _merge_key(path: tuple[str, ...], field: str) -> str | None:
    if field == "ports":
        # Service.spec.ports merge by port; container ports by containerPort.
        return "port" if path == ("spec",) else "containerPort"
    return MERGE_KEYS.get(field)


def _merge_list(
    original: list[Any], patch: list[Any], merge_key: str | None, builtin: bool, path: tuple
) -> list:
    if merge_key is None:
        return _strip_nulls(copy.deepcopy(patch))
    by_key = {item.get(merge_key): item for item in original if isinstance(item, dict)}
    merged: list[Any] = []
    patched_keys = set()
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise UnsupportedKustomization(f"list item without merge key {merge_key!r} at {path}")
        key = item[merge_key]
        patched_keys.add(key)
        if item.get("$patch") == "delete":
            continue
        if key in by_key:
            merged.append(_merge(by_key[key], item, builtin=builtin, path=path))
        else:
            merged.append(_strip_nulls(copy.deepcopy(item)))
    merged.extend(
        copy.deepcopy(item)
        for item in original
        if not (isinstance(item, dict) and item.get(merge_key) in patched_keys)
    )
    return merged


def _json6902(obj: Obj, operation: Obj) -> None:
    op, pointer = operation.get("op"), operation.get("path", "")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        raise UnsupportedKustomization(f"JSON 6902 operation on the whole document: {operation}")
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op == "test":
        actual = parent[int(last)] if isinstance(parent, list) else parent[last]
        if actual != operation["value"]:
            raise AssertionError(f"JSON 6902 test failed at {pointer}: {actual!r} != {operation['value']!r}")
    elif op == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    elif op == "replace":
        index = int(last) if isinstance(parent, list) else last
        if isinstance(parent, dict) and index not in parent:
            raise AssertionError(f"JSON 6902 replace of a missing path {pointer}")
        parent[index] = copy.deepcopy(operation["value"])
    elif op == "add":
        value = copy.deepcopy(operation["value"])
        if isinstance(parent, list) and last == "-":
            parent.append(value)
        elif isinstance(parent, list):
            parent.insert(int(last), value)
        else:
            parent[last] = value
    else:
        raise UnsupportedKustomization(f"unsupported JSON 6902 op {op!r}")


# --- images, replicas ----------------------------------------------------------------------------------


def _pod_specs(obj: Obj) -> Iterator[Obj]:
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        yield spec
    elif isinstance(spec.get("template"), dict):
        yield spec["template"].get("spec", {})
    elif obj["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


def _split_image(image: str) -> tuple[str, str]:
    """'repo/name:tag' -> ('repo/name', ':tag'); digests ('@sha256:...') stay in the suffix."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_image(objects: list[Obj], rule: Obj) -> None:
    unsupported = set(rule) - {"name", "newName", "newTag", "digest"}
    if unsupported:
        raise UnsupportedKustomization(f"unsupported image fields {sorted(unsupported)}")
    for obj in objects:
        for pod_spec in _pod_specs(obj):
            for field in ("initContainers", "containers"):
                for container in pod_spec.get(field, []):
                    name, suffix = _split_image(container["image"])
                    if name != rule["name"]:
                        continue
                    if "digest" in rule:
                        suffix = "@" + rule["digest"]
                    elif "newTag" in rule:
                        suffix = ":" + str(rule["newTag"])
                    container["image"] = rule.get("newName", name) + suffix


def _set_replicas(objects: list[Obj], rule: Obj) -> None:
    matched = False
    for obj in objects:
        if (
            obj["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")
            and obj["metadata"]["name"] == rule["name"]
        ):
            obj["spec"]["replicas"] = int(rule["count"])
            matched = True
    if not matched:
        raise UnsupportedKustomization(f"replicas: nothing named {rule['name']!r}")
