"""All configuration, read once from ``DARKROOM_*`` environment variables.

One typed class for both processes, so a typo'd or out-of-range value fails at start-up with the variable's
name rather than deep inside a job. Read it through :func:`get_settings` (cached); tests build their own
``Settings(...)`` or clear the cache.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.models import MODEL_NAME_PATTERN
from services.redis_connect import is_sentinel_url, parse_sentinel_url

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
TINY_MODEL = "tiny"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
#: A LoRA name in DARKROOM_LORAS (and in requests: schemas.generation.LORA_NAME_PATTERN).
_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Settings(BaseSettings):
    # env_ignore_empty: `DARKROOM_URL_SIGNING_KEY=` must mean "unset", never an empty (forgeable) key.
    model_config = SettingsConfigDict(
        env_prefix="DARKROOM_",
        extra="ignore",
        protected_namespaces=(),
        env_ignore_empty=True,
        populate_by_name=True,  # fields with an old env name as alias are still set by name in code
    )

    environment: Literal["development", "production"] = Field(
        "production", description="'development' switches logs to readable text."
    )

    # --- the model and how it sits on the device ---------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="Hub id, a local folder in diffusers layout, or 'tiny' (offline random test model).",
    )
    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="The name the model is served under: requests' `model`, its queues, GET /v1/models. "
        "Default: DARKROOM_MODEL (for a local folder, the folder's name). On the API: the default model.",
    )
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="API only: further models the fleet serves (comma-separated names), accepted in "
        "requests' `model` beside the default; each is served by workers whose DARKROOM_MODEL_NAME (or "
        "DARKROOM_MODEL) is that name.",
    )
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), or a torch device string.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto': bfloat16 on CUDA, float32 on CPU."
    )
    cpu_offload: bool = Field(False, description="Model CPU offload: smaller GPUs, slower steps.")
    drop_t5: bool = Field(False, description="Load without the T5 encoder (~9 GB less); CLIP-only prompts.")
    warmup: bool = Field(True, description="Run one small generation at load so the first job is not slow.")

    # --- speed (worker/optimizations.py; 'auto' = on for CUDA, off on CPU) ----------------------------------
    tf32: bool = Field(True, description="TF32 matmuls/convolutions for what runs in fp32 (CUDA only).")
    sdpa_backends: str = Field(
        "auto",
        pattern=r"^(auto|(flash|efficient|cudnn|math)(,(flash|efficient|cudnn|math))*)$",
        description="SDPA kernels allowed on CUDA: 'auto' or some of flash,efficient,cudnn,math.",
    )
    fuse_qkv: bool | Literal["auto"] = Field(
        "auto", description="Fuse the q/k/v projections of the transformer and VAE into one matmul each."
    )
    channels_last_vae: bool | Literal["auto"] = Field(
        "auto", description="Channels-last memory format for the VAE's convolutions."
    )
    compile: bool | Literal["auto"] = Field(
        False,
        description=(
            "torch.compile the transformer (dynamic shapes: one graph for every size and batch). Opt-in "
            "until measured on a GPU; 'auto' = on for CUDA."
        ),
    )
    compile_vae: bool = Field(True, description="With compile on, compile the VAE decoder too.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode."
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Where compiled kernels are kept across restarts (default ~/.cache/darkroom/compile).",
    )
    compile_warmup: bool = Field(
        True, description="With compile on, run every aspect-ratio preset once at start (2 steps)."
    )
    loras: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="LoRA adapters requests may name: a JSON object or 'name=source,...', each source a "
        "local file/folder or a hub id ('owner/repo' or 'owner/repo/file.safetensors'). Transformer only.",
    )
    prompt_cache_size: int = Field(
        32, ge=0, description="Prompt embeddings kept for repeated (negative) prompts; 0 disables."
    )
    fp8: bool = Field(False, description="Opt-in FP8 transformer Linear layers (torchao, CUDA, sm_89+).")
    fp8_recipe: Literal["dynamic", "weight_only"] = Field(
        "dynamic", description="FP8 recipe: 'dynamic' (fp8 activations and weights) or 'weight_only'."
    )
    # --- small GPUs (worker/quantization.py; docs/operate/small-gpus.md) ------------------------------------
    quantize: Literal["none", "nf4"] = Field(
        "none",
        description="Weight quantisation for small GPUs: 'nf4' loads the SD3 transformer in 4-bit "
        "NormalFloat through diffusers' bitsandbytes config (pip install -e '.[worker,nf4]'; CUDA only: the "
        "worker refuses to start without a CUDA GPU or without bitsandbytes). Combines with "
        "DARKROOM_CPU_OFFLOAD and DARKROOM_DROP_T5; not with DARKROOM_FP8 or DARKROOM_FUSE_QKV=true. "
        "'none': the weights as stored.",
    )
    quantize_t5: bool = Field(
        False,
        description="With DARKROOM_QUANTIZE=nf4, load the T5 text encoder (text_encoder_3) in 4-bit NF4 "
        "too (transformers' bitsandbytes config); refused without DARKROOM_QUANTIZE=nf4 or with "
        "DARKROOM_DROP_T5.",
    )

    # --- who may call the API ------------------------------------------------------------------------------
    api_keys: str | None = Field(
        None, description="Comma-separated 'NAME:sha256:HEX' entries (python -m services.api_keys NAME)."
    )
    api_keys_file: Path | None = Field(None, description="File of 'NAME:sha256:HEX' lines.")
    auth_disabled: bool = Field(False, description="No API keys at all: local development only.")
    rate_limit_per_minute: int = Field(600, ge=0, description="Submissions per minute per key; 0 disables.")
    rate_limit_burst: int = Field(60, ge=1, description="Submissions a key may make at once.")
    read_rate_limit_per_minute: int = Field(
        6000,
        ge=0,
        description="Reads (GET of jobs, batches and their event streams) per minute per key, a bucket of "
        "their own; 0 disables.",
    )
    read_rate_limit_burst: int = Field(300, ge=1, description="Reads a key may make at once.")
    batch_items_per_minute: int = Field(
        2000,
        ge=0,
        description="Batch tokens per minute per key: a batch spends one per item plus one per "
        "DARKROOM_BATCH_TOKEN_BYTES of request it stores; 0 disables.",
    )
    batch_items_burst: int = Field(
        4000,
        ge=1,
        description="Batch tokens a key may spend at once (a batch costing more is refused with 413).",
    )
    image_decode_threads: int = Field(
        2, ge=1, le=64, description="API threads that may decode submitted init/mask images at once."
    )
    batch_token_bytes: int = Field(
        8192, ge=256, description="Stored request bytes that cost a batch one more token."
    )
    max_batch_stored_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Most bytes of item requests one batch may store (413 batch_too_large above it).",
    )

    # --- queue and job records ---------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="The one Redis of the service (queues, job records, events); run it with AOF on. "
        "'redis://', 'rediss://' or 'unix://' for one Redis; 'redis+sentinel://[user:pass@]host1:26379,"
        "host2:26379/service_name[/db][?sentinel_password=...]' (or 'rediss+sentinel://') for a primary that "
        "Redis Sentinel names and fails over (docs/operate/reliability.md).",
    )
    redis_min_replica_acks: int = Field(
        0,
        ge=0,
        le=16,
        description="Replicas that must acknowledge (Redis WAIT) an admission before its 202, and a job's "
        "end before its worker moves on. 0: no wait (one Redis). 1 with a primary and a replica: what was "
        "acknowledged survives the primary's loss.",
    )
    redis_replica_ack_timeout: timedelta = Field(
        timedelta(seconds=1),
        gt=timedelta(0),
        le=timedelta(seconds=4),  # WAIT must end before the clients' 5 s socket timeout
        description="How long an admission or a job's end waits for DARKROOM_REDIS_MIN_REPLICA_ACKS. A "
        "submission not acknowledged in time answers 503 redis_unavailable (its Idempotency-Key replay "
        "returns the same job); a job's end is logged and the worker goes on.",
    )
    queue_name: str = Field(
        "darkroom",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of each model's queue ('<prefix>:<model>').",
    )
    webhook_queue_name: str = Field(
        "darkroom-webhooks", description="RQ queue of webhook delivery attempts (the webhook worker's)."
    )
    batch_queue_name: str = Field(
        "darkroom-batch",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of each model's batch-item queue; its workers serve it when the main is empty.",
    )
    job_timeout: timedelta = Field(timedelta(minutes=10), description="Longest a generation job may run.")
    result_ttl: timedelta = Field(
        timedelta(0),
        description="How long RQ keeps a finished job and its result (0: dropped at once; nothing reads "
        "them, the outcome is on our job record).",
    )
    failure_ttl: timedelta = Field(timedelta(days=7), description="How long RQ keeps a failed job.")
    job_retention: timedelta = Field(timedelta(days=7), description="How long job records stay readable.")
    finished_ttl: timedelta = Field(
        timedelta(minutes=5),
        gt=timedelta(0),
        description="How long a finished job's (or batch's) Redis keys stay once its record is archived to "
        "storage (reads then fall through to the archive, within DARKROOM_JOB_RETENTION). Redis holds "
        "about finished jobs/s x this x ~7 KB (BENCHMARKS.md).",
    )
    archiver_in_webhook_process: bool = Field(
        True,
        description="Whether the webhook process also archives finished jobs (a thread; one process at a "
        "time holds the archive lease). Set false where archivers run as their own processes "
        "(`python -m services.archiver`, as the Kubernetes manifests do): archiving writes one storage "
        "object per finished job, CPU that webhook delivery at fleet rate needs.",
    )
    idempotency_ttl: timedelta = Field(
        timedelta(hours=24), description="How long an Idempotency-Key is kept."
    )
    max_queue_depth: int = Field(
        10_000,
        ge=1,
        description="Queued jobs above which submissions get 503 + Retry-After (no unbounded backlog).",
    )
    max_batch_queue_depth: int = Field(
        50_000,
        ge=1,
        description="Queued batch items above which a batch (all of its items) gets 503 + Retry-After.",
    )
    queue_full_retry_after: timedelta = Field(timedelta(seconds=10), description="Retry-After when full.")
    queue_share_per_key: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of each queue ceiling (DARKROOM_MAX_QUEUE_DEPTH, "
        "DARKROOM_MAX_BATCH_QUEUE_DEPTH, per model) one API key may fill; past it that key gets 429 "
        "queue_share_exceeded while others "
        "still get in. 1: no per-key share.",
    )
    http_max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest request head (request line and headers) the API reads before authentication; a "
        "larger one is answered 431 and the connection closed. Applies under --http api.http_protocol:"
        "LimitedHttpProtocol, as the shipped images run uvicorn.",
    )
    http_header_timeout: timedelta = Field(
        timedelta(seconds=10),
        gt=timedelta(0),
        description="How long a connection may take to send a request's head (from connecting, or from its "
        "first byte on a kept-alive connection); then it is closed (408 if part of a head came).",
    )
    http_max_pending_connections: int = Field(
        256,
        ge=1,
        description="Connections per API process still sending their first request head (or silent); past "
        "this the oldest of them is closed, so idle sockets cannot crowd out real requests.",
    )
    max_wait: timedelta = Field(timedelta(seconds=60), description="Largest accepted 'Prefer: wait=N'.")
    openai_images_wait: timedelta = Field(
        timedelta(seconds=120),
        gt=timedelta(0),
        description="How long POST /v1/images/generations waits for its job before answering 504 with it.",
    )
    max_waits_per_key: int = Field(
        8,
        ge=0,
        description="API: waits one key may hold at once across the fleet (SSE streams, 'Prefer: wait' "
        "submissions and OpenAI image calls, together); one more gets 429 'too_many_waits' with "
        "Retry-After. 0: no per-key limit.",
    )
    max_waits: int = Field(
        256,
        ge=1,
        description="API: waits one API process holds at once, all keys together, each on a Redis "
        "connection of a pool of this size kept apart from the one serving other requests; one more gets "
        "503 'server_busy' with Retry-After.",
    )
    progress_interval: timedelta = Field(
        timedelta(seconds=1),
        description="Least time between two progress writes of one job (the first and the last step are "
        "always written). Each write is a Redis script and an SSE event: a second keeps a 1,000-GPU fleet's "
        "progress traffic near one write per running job per second.",
    )
    heartbeat_interval: timedelta = Field(timedelta(seconds=5), description="Worker heartbeat while busy.")
    lost_after: timedelta = Field(
        timedelta(seconds=20), description="A running job with no heartbeat for this long is requeued."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Runs a job may lose to dead workers before failing."
    )
    unserved_after: timedelta = Field(
        timedelta(minutes=10),
        ge=timedelta(0),
        description="API: a queued job fails 'model_unavailable' once no worker of its model has been "
        "ready (nor loading it) for this long, counted from its submission at the earliest; 0 turns this "
        "off (a fleet scaled from zero whose nodes take longer to come up). Jobs for a model no API "
        "accepts any more fail as soon as no worker of it is ready or loading, whatever this says.",
    )
    redis_retry_deadline: timedelta = Field(
        timedelta(seconds=60),
        description="How long a worker retries recording a job's start or end while Redis is unreachable.",
    )
    # Coalescing: a GPU worker may run several compatible waiting jobs in one pipeline call. Off by default:
    # a coalesced job's pixels can differ by a level or two from the same request run alone (batched
    # kernels round differently), and published figures for this model family show ~no throughput gain
    # at 1024². docs/architecture.md says where it pays and what it trades. The old DARKROOM_MAX_BATCH_SIZE
    # / _BATCH_LINGER / _BATCH_LOOKAHEAD names are still read (deprecated).
    coalesce_max: int = Field(
        1,
        ge=1,
        le=64,
        validation_alias=AliasChoices("DARKROOM_COALESCE_MAX", "DARKROOM_MAX_BATCH_SIZE"),
        description="Compatible queued jobs (and images) a GPU worker runs in one pipeline call; 1 (the "
        "default) runs every job alone.",
    )
    coalesce_linger: timedelta = Field(
        timedelta(0),
        ge=timedelta(0),
        le=timedelta(seconds=5),
        validation_alias=AliasChoices("DARKROOM_COALESCE_LINGER", "DARKROOM_BATCH_LINGER"),
        description="How long a worker waits for partners not queued yet (0: only what is waiting).",
    )
    coalesce_lookahead: int = Field(
        16,
        ge=1,
        le=1000,
        validation_alias=AliasChoices("DARKROOM_COALESCE_LOOKAHEAD", "DARKROOM_BATCH_LOOKAHEAD"),
        description="Waiting jobs, from the front of the queue, looked at for partners.",
    )

    # --- storage -----------------------------------------------------------------------------------------
    storage_url: str = Field(
        "file:///var/lib/darkroom/outputs", description="'s3://bucket/prefix' or 'file:///absolute/path'."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, moto); None for AWS.")
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint to sign URLs for, when clients reach S3 by another address."
    )
    s3_region: str | None = Field(None, description="S3 region; unset: the AWS_* defaults' (or none).")
    storage_retry_deadline: timedelta = Field(
        timedelta(seconds=60), description="How long a worker retries an upload through an S3 outage."
    )
    url_expiry: timedelta = Field(timedelta(hours=1), description="Lifetime of signed image URLs.")
    url_signing_key: SecretStr | None = Field(
        None, description="Key for file:// download URLs; if unset, one is generated and shared via Redis."
    )
    public_url: str | None = Field(
        None,
        description="Base URL clients reach the API at, for file:// download URLs. Unset: the API's answers "
        "use the URL each request reached it at, and webhook payloads (sent without a request) use "
        "http://127.0.0.1:8000 — set it whenever webhook receivers fetch file:// images.",
    )

    # --- webhooks ----------------------------------------------------------------------------------------
    webhook_secret: SecretStr | None = Field(
        None,
        description="'whsec_<base64 key>' used to sign webhooks (Standard Webhooks); webhooks are refused "
        "without it. Mint one with services.webhooks.signing.generate_secret().",
    )
    webhook_allow_private: bool = Field(False, description="Allow loopback/private webhook targets (tests).")
    webhook_allow_http: bool = Field(False, description="Allow plain-http webhook targets (tests, dev).")
    webhook_timeout: timedelta = Field(
        timedelta(seconds=10),
        description="Timeout of each phase of a webhook attempt: connecting, sending, and each wait for "
        "the receiver's next bytes.",
    )
    webhook_attempt_deadline: timedelta = Field(
        timedelta(seconds=15),
        gt=timedelta(0),
        description="Total time one webhook attempt may take — connect, TLS, request body and the "
        "receiver's response headers together — however slowly the receiver trickles bytes; past it the "
        "attempt is recorded as a timeout and retried.",
    )
    webhook_concurrency: int = Field(
        32,
        ge=1,
        le=1024,
        description="Webhook retries (and attempts that waited for a busy host's or key's share) one "
        "webhook process sends at once (RQ threads); a slow receiver holds only its own.",
    )
    webhook_dispatch_concurrency: int = Field(
        256,
        ge=1,
        le=4096,
        description="First attempts of new webhook events one webhook process has in flight at once, "
        "straight from the outbox (one event loop: an attempt waiting on its receiver holds a socket, not a "
        "thread; those waiting for a busy host's or key's share count too); at 150 ms per receiver answer, "
        "256 allow ~1,700 deliveries/s. Retries run on the DARKROOM_WEBHOOK_CONCURRENCY threads.",
    )
    webhook_per_host: int = Field(
        4,
        ge=1,
        le=1024,
        description="Webhook attempts one webhook process sends at once to one receiver (host and port); "
        "more wait their turn parked in Redis, without holding a slot, until one comes free.",
    )
    webhook_per_key: int = Field(
        8,
        ge=1,
        le=1024,
        description="Webhook attempts one webhook process sends at once for one API key (the job's or "
        "batch's owner), whatever their receivers; more wait their turn like a busy host's. The default, a "
        "quarter of the default concurrency, leaves 3/4 of the slots to others however many bad receivers "
        "one key has.",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts per webhook event before its delivery is marked failed."
    )
    webhook_backoff_base: timedelta = Field(
        timedelta(seconds=2),
        description="Webhook retry n waits a random delay up to base x 2^(n-1) (full jitter).",
    )
    webhook_backoff_max: timedelta = Field(
        timedelta(minutes=10), description="Cap on that delay (a receiver's Retry-After is honoured)."
    )
    outbox_claim_idle: timedelta = Field(
        timedelta(seconds=30),
        gt=timedelta(0),
        description="A webhook event a webhook process read but did not finish (it died mid-attempt) is "
        "taken over by another after this long, its first attempt made again. Keep it above "
        "DARKROOM_WEBHOOK_ATTEMPT_DEADLINE, or a slow first attempt may be sent twice at once.",
    )

    # --- content safety (services/content_safety.py) -----------------------------------------------------
    prompt_blocklist: str | None = Field(
        None,
        description="Terms refused in prompts (whole words, any case/width), comma- or newline-separated; "
        "'re:' starts a regex.",
    )
    prompt_blocklist_file: Path | None = Field(
        None, description="File of blocklist entries, one a line ('#' comments), added to the above."
    )
    prompt_filter_negative: bool = Field(
        False, description="Check negative_prompt against the blocklist too (off: it steers away)."
    )
    image_classifier: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="'package.module:callable' the worker calls on every image; filtered images are "
        "reported as finish_reason content_filtered, never stored.",
    )

    # --- observability -----------------------------------------------------------------------------------
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Worker /metrics port; 0 disables.")
    ready_file: str | None = Field(
        None, description="File the worker creates once its model is loaded and warm (readiness probes)."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _seconds_as_numbers(cls, value: object, info: ValidationInfo) -> object:
        """Durations may be given as plain seconds (``DARKROOM_JOB_TIMEOUT=900``) as well as ISO 8601."""
        field = cls.model_fields[str(info.field_name)]
        if field.annotation is timedelta and isinstance(value, str):
            try:
                return timedelta(seconds=float(value))
            except ValueError:
                return value
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """A malformed Sentinel URL stops start-up with what is wrong, not the first command."""
        if is_sentinel_url(url):
            parse_sentinel_url(url)
        return url

    @model_validator(mode="after")
    def _heartbeats_fit(self) -> Settings:
        if self.lost_after < 3 * self.heartbeat_interval:
            raise ValueError("DARKROOM_LOST_AFTER must be at least 3x DARKROOM_HEARTBEAT_INTERVAL")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _model_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(name.strip() for name in re.split(r"[,\n]", value) if name.strip())
        if isinstance(value, list | tuple):
            for name in value:
                if not isinstance(name, str) or not _MODEL_NAME.match(name):
                    raise ValueError(
                        f"model name {name!r}: letters, digits, '.', '_', '-', '/' (at most 128)"
                    )
        return value

    @model_validator(mode="after")
    def _served_model_has_a_name(self) -> Settings:
        if not _MODEL_NAME.match(self.served_model):
            raise ValueError(
                f"DARKROOM_MODEL={self.model!r} gives no usable model name ({self.served_model!r}): "
                "set DARKROOM_MODEL_NAME (letters, digits, '.', '_', '-', '/')"
            )
        return self

    @property
    def served_model(self) -> str:
        """The name of the model this process serves (worker) or defaults to (API)."""
        if self.model_name:
            return self.model_name
        if self.model.startswith(("/", ".", "~")):  # a local folder: its own name, not its path
            return Path(self.model).expanduser().resolve().name
        return self.model

    @property
    def accepted_models(self) -> tuple[str, ...]:
        """Every model requests may name, the default first."""
        return tuple(dict.fromkeys((self.served_model, *self.models)))

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_allow_list(cls, value: object) -> object:
        """``{"name": "source"}`` as JSON, or ``name=source`` pairs separated by commas or newlines."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = json.loads(text)
            else:
                pairs = [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]
                if any("=" not in pair for pair in pairs):
                    raise ValueError("DARKROOM_LORAS entries must look like 'name=path-or-hub-id'")
                value = {name.strip(): source.strip() for name, source in (p.split("=", 1) for p in pairs)}
        if isinstance(value, dict):
            for name, source in value.items():
                if not isinstance(name, str) or not _LORA_NAME.match(name):
                    raise ValueError(f"LoRA name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
                if not isinstance(source, str) or not source.strip():
                    raise ValueError(f"LoRA {name!r} needs a source (a local path or a hub id)")
        return value

    @model_validator(mode="after")
    def _loras_fit_the_optimizations(self) -> Settings:
        """Adapters wrap the transformer's q/k/v/out Linears: a fused, FP8 or compiled transformer would
        bypass them (or recompile on every switch), so those switches cannot be forced on alongside."""
        if self.loras:
            forced = [
                name
                for name, on in (("FUSE_QKV", self.fuse_qkv), ("FP8", self.fp8), ("COMPILE", self.compile))
                if on is True
            ]
            if forced:
                raise ValueError(
                    "DARKROOM_LORAS cannot be combined with "
                    + ", ".join(f"DARKROOM_{name}=true" for name in forced)
                    + " (LoRA layers apply to the unfused, uncompiled transformer)"
                )
        return self

    @model_validator(mode="after")
    def _quantization_fits(self) -> Settings:
        """NF4 replaces the transformer's Linear weights with packed 4-bit ones: FP8 would quantise them a
        second time and fused q/k/v would concatenate packed blocks, so neither can be forced on alongside
        ('auto' fusing leaves the transformer unfused). DARKROOM_QUANTIZE_T5 needs NF4 and a T5 encoder."""
        if self.quantize == "nf4":
            if self.fp8:
                raise ValueError(
                    "DARKROOM_QUANTIZE=nf4 cannot be combined with DARKROOM_FP8=true (both quantise the "
                    "transformer's weights): choose one"
                )
            if self.fuse_qkv is True:
                raise ValueError(
                    "DARKROOM_QUANTIZE=nf4 cannot be combined with DARKROOM_FUSE_QKV=true (4-bit weights "
                    "cannot be concatenated); leave it 'auto' (the VAE is still fused) or false"
                )
            if self.quantize_t5 and self.drop_t5:
                raise ValueError(
                    "DARKROOM_QUANTIZE_T5=true and DARKROOM_DROP_T5=true contradict each other: there is no "
                    "T5 encoder to quantise"
                )
        elif self.quantize_t5:
            raise ValueError("DARKROOM_QUANTIZE_T5=true needs DARKROOM_QUANTIZE=nf4")
        return self

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and not secret.get_secret_value().startswith("whsec_"):
            raise ValueError("DARKROOM_WEBHOOK_SECRET must look like 'whsec_<base64 key>'")
        return secret


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
