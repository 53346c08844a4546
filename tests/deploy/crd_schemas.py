"""JSON schemas for the custom resources deploy/k8s uses, which kubernetes-validate does not ship.

They cover the fields we rely on, written from the CRDs of KEDA 2.x (``keda.sh/v1alpha1`` ScaledObject)
and prometheus-operator (``monitoring.coreos.com/v1`` ServiceMonitor), and are closed
(``additionalProperties: false``) so a misspelt or misplaced field fails instead of being ignored by the
cluster. Where a field is a Kubernetes type (label selectors, HPA behaviour), the schema points at the
Kubernetes definition shipped with kubernetes-validate (``K8S_DEFS``), so that part is checked exactly.
"""

from __future__ import annotations

from typing import Any

K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"

_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


# KEDA's prometheus scaler: every metadata value is a string (KEDA's trigger metadata is map[string]string).
_PROMETHEUS_METADATA = {
    "type": "object",
    "required": ["serverAddress", "query", "threshold"],
    "properties": {
        key: {"type": "string", "minLength": 1}
        for key in (
            "serverAddress",
            "query",
            "threshold",
            "activationThreshold",
            "namespace",
            "ignoreNullValues",
            "unsafeSsl",
            "customHeaders",
            "queryParameters",
            "authModes",
            "timeout",
        )
    },
    "additionalProperties": False,
}

_REDIS_CONNECTION = (
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
)

# KEDA's redis-streams scaler (2.10+ for lagCount), from its documented parameter list.
_REDIS_STREAMS_METADATA = {
    "type": "object",
    "required": ["stream"],
    "properties": {
        key: {"type": "string", "minLength": 1}
        for key in (
            *_REDIS_CONNECTION,
            "stream",
            "consumerGroup",
            "pendingEntriesCount",
            "streamLength",
            "lagCount",
            "activationLagCount",
        )
    },
    "additionalProperties": False,
    "anyOf": [{"required": ["address"]}, {"required": ["addressFromEnv"]}, {"required": ["host"]}],
    # lagCount is the lag of a consumer group: without the group KEDA falls back to the stream's length.
    "dependentRequired": {"lagCount": ["consumerGroup"], "activationLagCount": ["lagCount"]},
}

# KEDA's redis (list) scaler.
_REDIS_LIST_METADATA = {
    "type": "object",
    "required": ["listName"],
    "properties": {
        key: {"type": "string", "minLength": 1}
        for key in (*_REDIS_CONNECTION, "listName", "listLength", "activationListLength")
    },
    "additionalProperties": False,
    "anyOf": [{"required": ["address"]}, {"required": ["addressFromEnv"]}, {"required": ["host"]}],
}


# KEDA's Sentinel variants of both: the same fields, the Redis found through Sentinels instead of an address.
_SENTINEL_CONNECTION = ("addresses", "addressesFromEnv", "sentinelMaster", "sentinelMasterFromEnv")


def _through_sentinels(schema: dict[str, Any]) -> dict[str, Any]:
    names = [key for key in schema["properties"] if key not in ("address", "addressFromEnv", "host")]
    return {
        **{key: value for key, value in schema.items() if key != "anyOf"},
        "properties": {key: {"type": "string", "minLength": 1} for key in (*names, *_SENTINEL_CONNECTION)},
        "allOf": [
            {"anyOf": [{"required": ["addresses"]}, {"required": ["addressesFromEnv"]}]},
            {"anyOf": [{"required": ["sentinelMaster"]}, {"required": ["sentinelMasterFromEnv"]}]},
        ],
    }


def _metadata_for(trigger_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "if": {"properties": {"type": {"const": trigger_type}}},
        "then": {"properties": {"metadata": schema}},
    }


SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                    "envSourceContainerName": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": {
                "type": "object",
                "required": ["failureThreshold", "replicas"],
                "properties": {
                    "failureThreshold": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "behavior": {
                        "enum": [
                            "static",
                            "currentReplicas",
                            "currentReplicasIfHigher",
                            "currentReplicasIfLower",
                        ]
                    },
                },
                "additionalProperties": False,
            },
            "advanced": {
                "type": "object",
                "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "behavior": {
                                "$ref": K8S_DEFS + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"
                            },
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string"},
                        "name": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            "additionalProperties": False,
                        },
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                    "additionalProperties": False,
                    "allOf": [
                        _metadata_for("prometheus", _PROMETHEUS_METADATA),
                        _metadata_for("redis-streams", _REDIS_STREAMS_METADATA),
                        _metadata_for("redis", _REDIS_LIST_METADATA),
                        _metadata_for("redis-sentinel-streams", _through_sentinels(_REDIS_STREAMS_METADATA)),
                        _metadata_for("redis-sentinel", _through_sentinels(_REDIS_LIST_METADATA)),
                    ],
                },
            },
        },
        "additionalProperties": False,
    },
)

# prometheus-operator's Duration: 30s, 1m30s, 0, ...
_PROMETHEUS_DURATION = (
    "^(0|" + "".join(f"(([0-9]+){unit})?" for unit in ("y", "w", "d", "h", "m", "s", "ms")) + ")$"
)

_ENDPOINT = {
    "type": "object",
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"type": ["string", "integer"]},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {
            "type": "string",
            "pattern": _PROMETHEUS_DURATION,
        },
        "scrapeTimeout": {"type": "string"},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}

SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": {"$ref": K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
            "namespaceSelector": {
                "type": "object",
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
                "additionalProperties": False,
            },
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": False,
    },
)

#: (apiVersion, kind) -> schema
CUSTOM_RESOURCE_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
