"""Operator settings, read from the environment (prefix KUBEFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """Everything the operator can be tuned by; the Helm chart sets these as env vars."""

    model_config = SettingsConfigDict(env_prefix="KUBEFORGE_", extra="ignore")

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch (JSON list); empty = the whole cluster."""
    resync_seconds: float = 300.0
    """Every object is reconciled at least this often, besides on events and the requeues a reconcile asks
    for: a safety net, not the way the operator converges (a short one costs API calls per object)."""
    reconcile_workers: int = Field(default=8, ge=1)
    """Reconciles that run at once (each object is reconciled by one at a time)."""
    api_concurrency: int = Field(default=16, ge=1)
    """API calls in flight at once for independent children (a gang's pods, its Service, RBAC and ConfigMap
    go out together); the client's connection pool is sized to it and the reconcile workers."""
    trainer_image: str = "ghcr.io/kubeforge/trainer:0.1.0"
    """Default image of training pods when a spec names none."""
    serve_image: str = "ghcr.io/kubeforge/vllm-serve:0.1.0"
    """Default image of vLLM engine pods."""
    router_image: str = "ghcr.io/kubeforge/router:0.1.0"
    """Default image of router pods."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Secrets (names, JSON list) every workload pod pulls its images with, in the pod's own namespace."""
    python: str = "python"
    """Interpreter the rendered commands start (the images put kubeforge's on PATH)."""
    webhook: bool = False
    """Serve the validating admission webhook (needs a reachable address)."""
    webhook_configuration: str = "validate.kubeforge.dev"
    """ValidatingWebhookConfiguration the operator creates and keeps pointing at itself (dev clusters);
    empty: someone else owns it (the Helm chart renders it with a Service clientConfig)."""
    webhook_host: str | None = None
    """Host name the API server uses to reach the webhook (e.g. the Service DNS name)."""
    webhook_listen: str = "0.0.0.0"
    """Address the webhook server binds."""
    webhook_port: int = 9443
    """Port the webhook server binds."""
    webhook_certfile: str | None = None
    """TLS certificate of the webhook; a self-signed one is generated when unset."""
    webhook_keyfile: str | None = None
    """TLS key of the webhook."""
    liveness_port: int | None = None
    """Serve kopf's /healthz on this port."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at /metrics on this port."""
    peering: str | None = None
    """kopf peering name: replicas elect one active operator (the others stand by); unset: standalone."""
    gang_backoff_max_seconds: int = 300
    """Cap of the exponential backoff between gang restarts."""
    autoscale_interval_seconds: float = 10.0
    """How often serving pools' signals are read from the routers."""
    malloc_arenas: int = Field(default=2, ge=0)
    """glibc malloc arenas of the operator process (0: glibc's default, up to 8 per core): each thread's own
    arena keeps the peak of the last burst resident."""
    memory_trim_seconds: float = Field(default=30.0, ge=0)
    """How often freed memory is given back to the system (malloc_trim); 0: never."""
