"""Server settings: defaults < YAML file < environment (CLASSIFIER_*) < command-line flags.

    python -m service --config serve.yaml --max-batch-size 16
    CLASSIFIER_MAX_BATCH_SIZE=16 python -m service

Every field below is a flag (``--max-batch-size``), an environment variable
(``CLASSIFIER_MAX_BATCH_SIZE``; lists as JSON) and a YAML key (``max_batch_size``).
``python -m service --help`` lists them all with their defaults. Settings are validated at
start; each bad field gets its own line in the error.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from service.model.cores import cpu_count
from service.model.flags import NONE_WORDS
from service.model.image_header import ImageLimits
from service.model.runner_options import DEFAULT_PROVIDERS, RunnerOptions
from service.server.config_rules import auto_worker_count, check_consistent

ENV_PREFIX = "CLASSIFIER_"
YAML_FILE: ContextVar[Path | None] = ContextVar("YAML_FILE", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- network --------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="address to bind (0.0.0.0: all)")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0: any free)")
    http_port: int | None = Field(
        default=8000,
        ge=0,
        le=65535,
        description="HTTP port: Open Inference Protocol REST, upload routes, /docs and the "
        "page at / (0: any free; none: off)",
    )
    metrics_port: int | None = Field(
        default=9090,
        ge=0,
        le=65535,
        description="Prometheus /metrics port (0: any free; none: off)",
    )
    prediction_watch: bool = Field(
        default=True, description="count each answer's top-1 class and score in /metrics"
    )
    prediction_classes_max: int = Field(
        default=50,
        ge=0,
        description="classes counted by name in classifier_predictions_total; later "
        "classes of a model count as 'other' (bounds the series)",
    )
    max_receive_message_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="largest gRPC request accepted"
    )
    max_send_message_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="on SIGTERM, after the drain, how long in-flight calls may finish",
    )
    drain_seconds: float = Field(
        default=5.0,
        ge=0,
        description="on SIGTERM, how long health answers NOT_SERVING while calls are still "
        "served, so load balancers stop routing here before the port closes",
    )

    # --- transport security -------------------------------------------------------------
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain: serve TLS (re-read when it changes)"
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA bundle: require client certificates it signed (mTLS)"
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="if set, calls need 'authorization: Bearer <token>' (visible in ps as a "
        "flag: prefer the env variable or auth_token_file)",
    )
    auth_token_file: Path | None = Field(
        default=None,
        description="file of accepted tokens, one per line (several at once for rotation; "
        "re-read when it changes)",
    )

    # --- connections --------------------------------------------------------------------
    max_connection_age_seconds: float = Field(
        default=300.0,
        ge=0,
        description="close each client connection after this long (GOAWAY; clients "
        "reconnect and re-resolve, so new replicas get traffic; 0: never)",
    )
    max_connection_age_grace_seconds: float = Field(
        default=30.0, ge=0, description="time for a closing connection's calls to finish"
    )
    keepalive_time_seconds: float = Field(
        default=60.0, gt=0, description="ping idle connections this often to find dead peers"
    )
    keepalive_timeout_seconds: float = Field(
        default=20.0, gt=0, description="a ping unanswered this long closes the connection"
    )
    min_client_ping_interval_seconds: float = Field(
        default=10.0,
        ge=0,
        description="clients may send keepalive pings this often (more often: GOAWAY)",
    )
    max_concurrent_streams: int = Field(
        default=0, ge=0, description="concurrent calls per connection (0: gRPC's default)"
    )
    max_stream_requests: int = Field(
        default=64,
        gt=0,
        description="requests of one ModelStreamInfer stream in progress at once (the "
        "stream reads no further until one is answered)",
    )

    # --- models ---------------------------------------------------------------------
    model_repository: Path = Field(
        default=Path("models"), description="folder of <name>/<version>/model.onnx"
    )
    models: list[str] = Field(default_factory=list, description="names to serve (empty: all)")
    version_policy: Literal["latest", "all", "specific"] = "latest"
    versions: dict[str, list[int]] = Field(
        default_factory=dict, description="policy 'specific': {model: [versions]}"
    )
    version_weights: dict[str, dict[int, float]] = Field(
        default_factory=dict,
        description="traffic split of calls that name no version, {model: {version: "
        "weight}}, e.g. {demo: {1: 90, 2: 10}}; only ready versions share it",
    )
    repository_poll_seconds: float = Field(
        default=0.0, ge=0, description="rescan the repository this often (0: never)"
    )
    repository_settle_seconds: float = Field(
        default=1.0,
        ge=0,
        description="a model file modified this recently is watched until it stops changing "
        "before it is loaded (a copy still in progress is never loaded)",
    )

    # --- processes ------------------------------------------------------------------
    workers: int = Field(
        default=0,
        ge=0,
        description="server processes on the same ports (0: auto, one per core with the CPU "
        "provider, one with a GPU provider). Each has its own batcher, ONNX Runtime session "
        "and its share of the cores; the kernel spreads connections over them",
    )

    # --- ONNX Runtime ---------------------------------------------------------------
    providers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="execution providers, preferred first",
    )
    instances: int = Field(default=1, ge=1, description="concurrent executions per model")
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime threads per execution (0: auto, timed at load: one "
        "thread for a light model so the other cores decode, all of them for a heavy one)",
    )
    inter_op_threads: int = Field(default=1, ge=0)
    allow_spinning: bool = Field(
        default=False,
        description="let ONNX Runtime threads busy-wait between runs (burns CPU that "
        "decoding and gRPC need)",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    optimized_model_dir: Path | None = Field(
        default=None, description="cache optimized graphs here"
    )
    device_id: int = Field(default=0, ge=0)
    trt_fp16: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="TensorRT in FP16: auto runs FP16 only for a model whose FP16 accuracy "
        "gate passed at export (its ModelSpec records it); on and off force it",
    )
    trt_engine_cache_dir: Path | None = Field(
        default=Path(".cache/tensorrt"),
        description="TensorRT engines and timing caches, kept across restarts (mount a "
        "volume here in a container)",
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        default="EXHAUSTIVE",
        description="how the CUDA provider picks convolution algorithms (exhaustive: "
        "slowest to warm up, fastest after; warm-up runs every batch size first)",
    )

    # --- dynamic batching (Triton's names) ---------------------------------------------
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_us: int = Field(
        default=0,
        ge=0,
        description="longest wait for more images before a batch goes (batches also grow "
        "while every execution slot is busy, so 0 still batches under load)",
    )
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        description="images per model version being decoded or waiting for a batch; "
        "requests beyond it are refused before they are decoded",
    )

    # --- requests and images ----------------------------------------------------------
    max_images_per_request: int = Field(default=64, ge=1)
    max_json_depth: int = Field(
        default=32,
        ge=4,
        description="REST: nesting of JSON arrays and objects in a request body (a tensor's "
        "data takes one level per dimension); deeper bodies are refused before they are "
        "walked",
    )
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_image_aspect_ratio: float = Field(
        default=20.0,
        ge=1,
        description="longer side / shorter side; thinner images cannot be resized sensibly",
    )
    max_decode_pixels: int = Field(
        default=80_000_000,
        ge=1,
        description="pixels being decoded at once across all calls (about 4 bytes each "
        "while decoding), server-wide: worker processes share it; a call waits for room, "
        "within its deadline",
    )
    max_inflight_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1,
        description="image bytes of the calls being served at once, server-wide (worker "
        "processes share it); beyond it calls are refused with RESOURCE_EXHAUSTED (retry "
        "later)",
    )
    jpeg_draft_factor: float = Field(
        default=0.0,
        ge=0,
        description="for models whose ModelSpec decodes fully: decode JPEGs at 1/2, 1/4 or "
        "1/8 scale while both sides stay >= this many times the resize target (0: never, "
        "as they were evaluated). Models exported with decode 'jpeg_draft' always decode at "
        "the smallest scale that covers the target",
    )
    preprocess_threads: int = Field(
        default=0,
        ge=0,
        description="decode/resize threads (0: two per core, which hides "
        "the GIL hand-offs between Pillow's C code and Python)",
    )
    decode_device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="where JPEGs are decoded and resized for a model on a GPU: gpu "
        "(nvImageCodec into device memory, resized there; other formats and what it cannot "
        "decode go to the CPU image by image), cpu (Pillow), or auto (gpu when the model "
        "runs on a GPU and nvImageCodec is installed and starts; a model that cannot have "
        "it with gpu fails to load)",
    )
    gpu_decoders: int = Field(
        default=2, ge=1, description="nvImageCodec decoders per model on a GPU (calls at once)"
    )
    default_top_k: int = Field(default=5, ge=1)
    heatmap_max_side: int = Field(default=224, ge=8)

    # --- logging ----------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = Field(
        default=True,
        description="one INFO line per call: method, model, version, images, code, ms, "
        "request id, peer",
    )

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(value))

    @field_validator("http_port", "metrics_port", mode="before")
    @classmethod
    def _port_off(cls, value: Any) -> Any:
        # "none" turns a port off, whether it comes from a flag, the environment or YAML.
        if isinstance(value, str) and value.strip().lower() in NONE_WORDS:
            return None
        return value

    @field_validator("trt_fp16", mode="before")
    @classmethod
    def _fp16_from_bool(cls, value: Any) -> Any:
        # Earlier configs said true/false: they mean on/off.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return "on" if value.lower() == "true" else "off"
        return value

    @field_validator("providers")
    @classmethod
    def _some_provider(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one execution provider is needed")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        check_consistent(self)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: flags (passed as init values) > environment > YAML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = YAML_FILE.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    # --- views for the parts that use them ----------------------------------------------

    @property
    def decode_threads(self) -> int:
        return self.preprocess_threads or 2 * cpu_count()

    def worker_count(self) -> int:
        """``workers``, with 0 ("auto") resolved by ``auto_worker_count``."""
        return self.workers or auto_worker_count(self.providers)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_aspect_ratio=self.max_image_aspect_ratio,
            jpeg_draft_factor=self.jpeg_draft_factor,
        )

    def runner_options(self) -> RunnerOptions:
        return RunnerOptions(
            providers=tuple(self.providers),
            instances=self.instances,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            allow_spinning=self.allow_spinning,
            graph_optimization=self.graph_optimization,
            optimized_model_dir=self.optimized_model_dir,
            device_id=self.device_id,
            trt_fp16=self.trt_fp16,
            trt_engine_cache_dir=self.trt_engine_cache_dir,
            max_batch_size=self.max_batch_size,
            opt_batch_size=max(self.preferred_batch_sizes, default=0),
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
        )
