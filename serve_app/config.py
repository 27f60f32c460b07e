"""The one typed configuration, validated once at start and read by every layer.

A config file in ``configs/`` is a Ray Serve config (``serve deploy`` accepts it); the
application's ``args`` are an ``AppConfig`` (``cli/serve_file.py`` reads such a file).
Numbers that size deployments live in those YAML files, never in code.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

APP_NAME = "photoenhance"
"""The Serve application's default name; the job actor (``<name>-jobs``) finds the ingress
under it."""

MULTIPART_OVERHEAD = 256 * 1024
"""Bytes a multipart body may add around one file of ``limits.max_bytes``: boundary, part
headers and small form fields. A protocol allowance, not a deployment number."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_weights_dir() -> Path:
    return Path(os.environ.get("PHOTOENHANCE_WEIGHTS", "~/.cache/photoenhance/weights")).expanduser()


def _default_data_dir() -> Path:
    return Path(os.environ.get("PHOTOENHANCE_DATA", "~/.local/share/photoenhance")).expanduser()


class WeightsConfig(_Section):
    dir: Path = Field(default_factory=_default_weights_dir, description="Weights folder.")
    source: Literal["official", "synthetic", "auto"] = Field(
        "auto",
        description="official: refuse to start without the checked official files; "
        "synthetic: generate random weights of `profile` if absent; "
        "auto: official when present, else synthetic with a loud warning.",
    )
    profile: Literal["tiny", "full"] = Field("tiny", description="Synthetic weights profile.")
    added: str | None = Field(
        None,
        description="Folder or fsspec URL (s3://..., gs://...) of the models added with "
        "`photoenhance models add` (their models.json registry and files); default: `dir`.",
    )

    @property
    def added_location(self) -> str:
        return self.added or str(Path(self.dir).expanduser())


class EngineConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    half: bool = Field(True, description="fp16 on CUDA; the CPU always runs fp32.")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the networks (CUDA only).")
    tile: int = Field(512, ge=32, description="Default upsampler tile size (input pixels).")
    tile_pad: int = Field(10, ge=0)
    pre_pad: int = Field(0, ge=0)
    memory_budget_mb: int = Field(
        2048, ge=64, description="Activation memory one forward may use; sets chunk sizes."
    )
    cpu_memory_mb: int = Field(
        0, ge=0, description="On the CPU device: private memory (RLIMIT_DATA) the model "
        "replica may add after loading; an image that needs more fails alone with 413 "
        "too_large_for_device instead of the kernel's OOM killer ending the replica and its "
        "neighbours' requests. 0: no limit.",
    )
    overlap_paste: bool | None = Field(
        None, description="Paste a batch's faces (CPU work) outside the device lock, so the "
        "next batch's device stages overlap it. None: on for a GPU, off on the CPU (where "
        "the CPU is the device and overlapping only adds contention; off, a batch's device "
        "stages and paste run in one thread hop).",
    )
    paste_on_device: bool | None = Field(
        None, description="Warp and blend pasted faces with torch on the model's device "
        "(equal to the CPU blend within 1 grey level) instead of OpenCV on the replica's CPU. "
        "None: on for a GPU, off on the CPU.",
    )
    det_threshold: float = Field(0.97, gt=0, lt=1)
    use_parse: bool = Field(True, description="Blend pasted faces with parsing masks.")
    torch_threads: int = Field(0, ge=0, description="0: torch's default.")
    cpu_lanes: int | None = Field(
        None, ge=1, le=256, description="On the CPU, a batch's crops, tiles and images go "
        "through this many forwards side by side, each with one torch thread (on 2 cores "
        "1.1x to 1.9x the items per second of one at a time with torch's threads; "
        "docs/BENCHMARKS.md); one item alone still gets every torch thread. None: one lane "
        "per torch thread; 1: off.",
    )
    warmup: bool = True


class LimitsConfig(_Section):
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Largest accepted body.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest input (width*height).")
    max_side: int = Field(16384, ge=16, description="Largest input width or height.")
    max_output_pixels: int = Field(
        200_000_000, ge=1, description="Largest output (input pixels * upscale^2)."
    )
    # Structure, counted before any decoder runs (serve_app.codec.structure).
    max_jpeg_scans: int = Field(100, ge=1, description="Scans of a (progressive) JPEG.")
    max_jpeg_markers: int = Field(1000, ge=8, description="Markers (segments) of a JPEG.")
    max_chunks: int = Field(20_000, ge=8, description="PNG/WebP chunks or HEIF/AVIF boxes.")
    max_frames: int = Field(256, ge=1, description="Frames or pages (only the first is used).")
    max_tiff_strips: int = Field(32_768, ge=1, description="Strips or tiles of a TIFF page.")
    max_tiff_tags: int = Field(512, ge=16, description="Tags of a TIFF page.")
    max_heif_items: int = Field(1024, ge=1, description="Items (tiles, thumbnails) of HEIF/AVIF.")
    decode_cpu_s: float = Field(10.0, gt=0, description="CPU seconds one decode may use.")
    encode_cpu_s: float = Field(60.0, gt=0, description="CPU seconds one encode may use.")
    codec_memory_mb: int = Field(
        4096, ge=128, description="Memory (data segment) of one decode/encode worker process."
    )
    codec_inline_pixels: int = Field(
        0, ge=0, description="JPEG, PNG, WebP and BMP images up to this many pixels (in, or "
        "out for encoding; not AVIF) are decoded and encoded on the replica's threads instead "
        "of the stoppable workers: their cost is bounded by the structure limits (docs/"
        "SECURITY.md), and a worker round trip costs a few ms. 0: every image in a worker.",
    )


class BatchingConfig(_Section):
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_batch_pixels: int = Field(
        16_000_000, ge=1, description="Sum of input pixels in one batch; larger images run alone."
    )


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_queue_depth: float = Field(
        4.0, gt=0, description="Requests (running + queued + job backlog) per replica."
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Delay of the last step, 1 -> 0; None: downscale_delay_s."
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often replicas and handles push load figures (Serve 2.60)."
    )
    look_back_period_s: float = Field(30.0, gt=0)
    allow_scale_to_zero: bool = False
    hysteresis: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Scale down only to a count that would run at most (1 - hysteresis) * "
        "target_queue_depth per replica.",
    )
    backlog_weight: float = Field(
        1.0, ge=0, description="Replica load of one job item not yet dispatched."
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas exceeds max_replicas")
        if self.min_replicas == 0 and not self.allow_scale_to_zero:
            raise ValueError("min_replicas=0 needs allow_scale_to_zero: true")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class ModelDeploymentConfig(_Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="-1: unbounded; beyond it: 503.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    codec_threads: int = Field(
        0, ge=0, description="Threads per model replica that decode inputs and encode results "
        "beside the engine (docs/CAPACITY.md sizes them); 0: ceil(num_cpus), at least 1.",
    )

    def codec_pool_size(self) -> int:
        return self.codec_threads or max(1, math.ceil(self.num_cpus))


class EncodingConfig(_Section):
    """How results are written (chosen by measurement: docs/BENCHMARKS.md, "Encoders")."""

    png_compression: int = Field(1, ge=0, le=9, description="zlib level of PNG output.")
    png_strategy: Literal["default", "filtered", "huffman", "rle", "fixed"] = Field(
        "huffman", description="zlib strategy of PNG output."
    )
    png_filter: Literal["none", "sub", "up", "avg", "paeth", "all", "fast"] = Field(
        "paeth", description="PNG row filter ('all'/'fast': libpng picks per row)."
    )
    gpu_jpeg: bool = Field(
        True, description="On a CUDA replica, decode and encode plain JPEGs with nvJPEG."
    )
    metadata: Literal["keep", "strip", "keep-no-gps"] = Field(
        "keep", description="Default of the `metadata` option when a request does not set it."
    )


class IngressConfig(_Section):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(
        64, ge=1, description="Serve's limit per replica; raised to at least max_inflight + "
        "max_queued_requests + 16, so requests wait at the door, not unbounded in the proxy.",
    )
    request_timeout_s: float = Field(300.0, gt=0)
    max_inflight: int | None = Field(
        None, ge=1, description="Enhance requests past the door at once (decode, model, "
        "encode); None: model.max_ongoing_requests * max_replicas / num_replicas.",
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Enhance requests waiting at the door; more are shed (503)."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="A request that waited this long at the door is shed (503)."
    )
    max_replicas: int | None = Field(
        None, ge=1, description="Autoscale the ingress between num_replicas and this on the "
        "requests it holds (Serve's policy); None: a fixed num_replicas.",
    )
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="Requests per ingress replica the autoscaler aims at."
    )

    @model_validator(mode="after")
    def _check(self) -> IngressConfig:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError("ingress.max_replicas must be >= ingress.num_replicas")
        return self


class StorageConfig(_Section):
    """Where jobs submitted over HTTP may read inputs and write outputs, besides each job's
    own folder (docs/JOBS.md, "The storage gate"). Roots are absolute local folders; buckets
    are ``s3://bucket[/prefix]`` or ``gs://bucket[/prefix]``."""

    input_roots: tuple[Path, ...] = Field((), description="Local folders inputs may come from.")
    output_roots: tuple[Path, ...] = Field((), description="Local folders outputs may go to.")
    input_buckets: tuple[str, ...] = Field((), description="Bucket prefixes inputs may come from.")
    output_buckets: tuple[str, ...] = Field((), description="Bucket prefixes outputs may go to.")
    fsspec: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {s3: {endpoint_url: ...}}.",
    )

    @model_validator(mode="after")
    def _check(self) -> StorageConfig:
        for root in (*self.input_roots, *self.output_roots):
            if not root.expanduser().is_absolute():
                raise ValueError(f"storage roots must be absolute folders: {root}")
        for bucket in (*self.input_buckets, *self.output_buckets):
            if not re.fullmatch(r"(s3|gs)://[a-z0-9][a-z0-9._-]{1,62}(/[^\s?#]*)?", bucket):
                raise ValueError(f"a bucket is s3://NAME[/PREFIX] or gs://NAME[/PREFIX]: {bucket!r}")
        unknown = set(self.fsspec) - {"s3", "gs"}
        if unknown:
            raise ValueError(f"fsspec options only for s3 and gs, not {sorted(unknown)}")
        return self


class JobsConfig(_Section):
    data_dir: Path = Field(default_factory=_default_data_dir, description="Job state and outputs.")
    max_upload_files: int = Field(100, ge=1)
    max_inflight: int = Field(8, ge=1, description="Items in flight across all jobs.")
    max_inflight_per_job: int = Field(4, ge=1)
    max_attempts: int = Field(3, ge=1)
    retry_base_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(10.0, gt=0)
    min_free_bytes: int = Field(512 * 1024 * 1024, ge=0, description="Pause jobs below this.")
    allow_private_urls: bool = Field(False, description="Allow loopback/private URL fetches.")
    fetch_timeout_s: float = Field(30.0, gt=0)
    local_roots: tuple[Path, ...] = Field(
        (),
        description="Local folders HTTP jobs may read inputs from and write outputs to, "
        "besides <data_dir>/inputs and <data_dir>/outputs.",
    )
    max_json_bytes: int = Field(
        6 * 1024 * 1024, ge=1024, description="Largest JSON body of POST /v1/jobs (413): "
        "room for max_json_inputs URIs of ~80 bytes. A larger job names an input_prefix "
        "(listed lazily) or is split, so that parsing a body stays within ~64 MiB.",
    )
    max_json_inputs: int = Field(
        100_000, ge=1, description="Most `inputs` in one JSON job body (413 too_many_inputs, "
        "counted on the bytes before the body is parsed).",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    max_fetches_per_job: int = Field(4, ge=1, description="Input fetches in flight in one job.")
    retention_s: float | None = Field(
        7 * 86400.0, gt=0, description="Ended jobs' folders go this long after they end; "
        "None: kept until DELETE."
    )
    paused_ttl_s: float | None = Field(
        7 * 86400.0, gt=0, description="A job paused this long is cancelled (reason_code "
        "`paused_expired`), so a forgotten pause does not hold its output folder and its "
        "key's quota for ever; None: paused jobs wait until resumed or cancelled."
    )
    webhook_secret: str | None = Field(
        None, description="HMAC-SHA256 secret signing job callbacks when the job's API key "
        "has none of its own (config or PHOTOENHANCE_WEBHOOK_SECRET)."
    )
    webhook_attempts: int = Field(5, ge=1, le=20)
    webhook_timeout_s: float = Field(10.0, gt=0)


class AuthConfig(_Section):
    """API keys and per-key limits. Off by default (local use on 127.0.0.1); see
    docs/SECURITY.md for making keys and rotating them."""

    enabled: bool = Field(False, description="Require `Authorization: Bearer <key>` on /v1.")
    keys_file: Path | None = Field(
        None, description="File of `NAME ROLE sha256:HEX` lines (hashes only); re-read when "
        "it changes, so keys rotate without a restart.",
    )
    keys_env: str | None = Field(
        "PHOTOENHANCE_API_KEYS", description="Environment variable holding more such lines.",
    )
    requests_per_second: float = Field(20.0, gt=0, description="Per key, per ingress replica.")
    burst: int = Field(40, ge=1, description="Requests a key may send at once before 429.")
    max_jobs_in_flight: int = Field(
        16, ge=1, description="Unfinished (queued, running, paused) jobs per key."
    )
    max_items_in_flight: int = Field(
        100_000, ge=1, description="Unfinished items across a key's unfinished jobs."
    )

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        if self.enabled and self.keys_file is None and not self.keys_env:
            raise ValueError("auth.enabled needs auth.keys_file or auth.keys_env")
        return self


class HttpConfig(_Section):
    """What one HTTP client may hold: JSON shape, event streams, and the early-answer drain."""

    cors_origins: tuple[str, ...] = Field(
        (), description="Origins allowed to call the API from a browser; empty: CORS off."
    )
    max_streams: int = Field(
        32, ge=1, description="Open event streams (SSE + WebSocket) per ingress replica; at "
        "most half of ingress.max_ongoing_requests, so streams never fill the ingress.",
    )
    max_streams_per_job: int = Field(4, ge=1)
    max_streams_per_key: int | None = Field(
        None, ge=1, description="Open event streams one API key may hold per ingress replica "
        "(429 too_many_key_streams), so one key cannot take every slot; None: a quarter of "
        "max_streams (at least 1). Not applied with keys off.",
    )
    stream_heartbeat_s: float = Field(15.0, gt=0, description="Keep-alive comment interval.")
    stream_idle_timeout_s: float = Field(
        300.0, gt=0, description="A stream whose job has not changed for this long ends."
    )
    drain_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0,
        description="After an early answer (413, 401, ...), unread body bytes read and "
        "discarded so simple clients can read the answer; beyond this the connection closes.",
    )
    drain_timeout_s: float = Field(10.0, ge=0, description="Time bound of that drain.")

    def streams_per_key(self) -> int:
        """The per-key share of ``max_streams`` in force (never above it)."""
        share = self.max_streams_per_key or max(1, self.max_streams // 4)
        return min(share, self.max_streams)


class AppConfig(_Section):
    """Everything the application reads, as passed in a Serve config's ``args``."""

    name: str = APP_NAME
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    model: ModelDeploymentConfig = Field(default_factory=ModelDeploymentConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    def ingress_inflight(self) -> int:
        """Enhance requests one ingress replica lets past its door at once."""
        if self.ingress.max_inflight is not None:
            return self.ingress.max_inflight
        model_slots = self.model.max_ongoing_requests * self.model.autoscaling.max_replicas
        return max(1, -(-model_slots // self.ingress.num_replicas))

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if self.model.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("model.max_ongoing_requests must be >= batching.max_batch_size")
        if self.http.max_streams > self.ingress.max_ongoing_requests // 2:
            raise ValueError("http.max_streams must be <= ingress.max_ongoing_requests / 2")
        return self
