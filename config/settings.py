"""The one typed settings object. Every tunable is read here from LONGDOC_* env vars (or .env).

Nothing else in the project reads os.environ.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value (a secret key, a database URL with its password) is not
    # repeated in the error that start-up prints.
    model_config = SettingsConfigDict(env_prefix="LONGDOC_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(default=Path.home() / ".local" / "share" / "longdoc",
                           description="Embedded SQLite DB, blob store and scratch files live here.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; unset = SQLite under data_dir.")
    broker_url: str | None = Field(default=None, description="Celery broker (Redis) URL; unset = embedded mode.")
    blob_dir: Path | None = Field(default=None, description="Content-addressed upload store; default data_dir/blobs.")

    # --- HTTP API ------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(
        default=1, ge=1, description="`longdoc serve` processes (service mode only; each has its own DB pool).")
    auth_enabled: bool = Field(default=True, description="Require Bearer API keys on /v1 routes.")
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, description="Uploads over this answer 413.")
    secret_key: SecretStr | None = Field(
        default=None, description="Fernet key (urlsafe base64 of 32 bytes) that encrypts an upload's PDF password "
                                  "in the database until its parse ends (storage/passwords.py); the API and every "
                                  "parse worker need the same one. Unset: embedded mode makes data_dir/secret.key "
                                  "on first use; service mode refuses passwords (400 secret_key_missing).")
    auth_cache_s: float = Field(
        default=5.0, description="How long an API process trusts a key it has checked (0 = check every request); "
                                 "`longdoc keys revoke` evicts the key from every process at once (Postgres "
                                 "NOTIFY), and while a process's listener is down it checks every request.")

    # --- parsing and chunking --------------------------------------------------------------
    pdf_extractor: Literal["pdfium", "pypdf"] = "pdfium"
    max_pages: int = 2000
    parse_timeout_s: float = 300.0
    parse_memory_mb: int = 2048
    chunk_tokens: int = 512
    chunk_overlap_tokens: int = 64

    # --- model ----------------------------------------------------------------------------
    engine: Literal["auto", "mpt", "extractive"] = Field(
        default="auto", description="auto = MPT when CUDA and weights are present, else extractive CPU engine.")
    model: str = Field(default="mosaicml/mpt-7b-storywriter", description="Hub id or local dir of an MPT checkpoint.")
    max_seq_len: int = 65536
    device: str = "cuda"
    embedding_model: str = "all-MiniLM-L6-v2"
    prompt_family: Literal["auto", "completion", "instruct", "chat"] = Field(
        default="auto", description="MPT prompt format; auto = from the checkpoint name (chat / instruct / "
                                    "completion for StoryWriter and base MPT-7B), pipeline/tasks/mpt/prompts.py.")

    # --- the MPT serving engine (pipeline/engine/serving.py) -----------------------------------
    kv_block_size: int = Field(default=256, description="Tokens per KV block (prefix caching is per full block).")
    kv_cache_gb: float | None = Field(
        default=None, description="Cap on the KV block pool in GiB; unset = the GPU memory left after the weights "
                                  "and kv_reserve_gb (off CUDA: room for 4 full-length sequences).")
    kv_reserve_gb: float = Field(default=8.0, description="CUDA memory kept out of the pool (prefill activations).")
    engine_max_seqs: int = Field(default=64, description="Sequences decoding together at most.")
    engine_step_tokens: int = Field(default=16384, description="Tokens per engine step (prefill chunks + decodes).")
    engine_prefill_chunk: int = Field(default=16384, description="Prompt tokens of one sequence per step at most.")
    engine_warmup: bool = Field(
        default=True, description="Run synthetic requests through the engine at load, before it takes jobs, so "
                                  "kernel compiles and decode-graph captures do not stall the first documents "
                                  "(pipeline/engine/warmup.py; off CUDA a small variant).")
    gpu_documents_in_flight: int = Field(
        default=4, ge=1, description="Documents a gpu worker runs at once (their tasks share one engine batch).")
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of a gpu worker's Prometheus /metrics (engine counters, "
                                               "workers/engine_metrics.py); 0 = off. One port per worker process.")
    worker_metrics_host: str = Field(default="0.0.0.0", description="Address the gpu worker's /metrics binds.")

    # --- jobs and queue --------------------------------------------------------------------
    job_lease_s: int = Field(default=900, description="A running job whose lease expires is re-queued by the reaper.")
    max_attempts: int = 3
    reaper_interval_s: float = 30.0
    visibility_timeout_s: int = Field(default=4 * 3600, description="Broker redelivery timeout; > longest job.")
    embedded_workers: int = 2
    broker_key_prefix: str = Field(
        default="", description="Prefix for every broker key (several deployments or test runs on one Redis).")
    reconcile_grace_s: float = Field(
        default=300.0, description="Queued jobs / uploaded documents whose last message is this old are re-sent "
                                   "to the broker, at most once per this period (storage/jobs.py stale_queued_jobs).")

    @field_validator("secret_key")
    @classmethod
    def _is_a_fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Checked here, so a mistyped key stops the process at start-up, not the first password upload.
        # Empty (`LONGDOC_SECRET_KEY=`, compose's `${VAR:-}`) means unset.
        if value is None or not value.get_secret_value():
            return None
        try:
            ok = len(base64.urlsafe_b64decode(value.get_secret_value().encode("ascii"))) == 32
        except (binascii.Error, ValueError, UnicodeEncodeError):
            ok = False
        if not ok:
            raise ValueError("LONGDOC_SECRET_KEY must be a Fernet key (urlsafe base64 of 32 bytes), e.g. from "
                             "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'")
        return value

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: tasks run in-process."""
        return not self.broker_url

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'longdoc.db'}"

    @property
    def effective_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
