"""``resources`` and ``storage``: how a job runs on the cluster, and how it reaches object
storage. Neither changes an output row, so neither is part of the fingerprint."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from batchgen.spec.base import _Section


class ResourcesSpec(_Section):
    replicas: int = Field(default=1, ge=1, description="Model replicas (Ray actors).")
    gpus_per_replica: float = Field(
        default=0.0, ge=0.0, description="GPUs each replica reserves; 0 runs on CPU."
    )
    cpus_per_replica: float = Field(
        default=1.0,
        gt=0.0,
        description="CPUs each replica reserves; on CPU it is also the replica's torch thread "
        "count, so replicas do not fight over cores.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        description="Sequences decoded together at most. Larger batches give more throughput "
        "until memory or compute saturates.",
    )
    max_batch_tokens: int = Field(
        default=32768,
        ge=1,
        description="Token budget of a batch: rows x (longest prompt + max_new_tokens). Bounds "
        "the KV cache, so long prompts get smaller batches instead of running out of memory.",
    )
    shard_rows: int = Field(
        default=1000,
        ge=1,
        description="Input rows per shard, the unit of scheduling, commit and retry. Small shards "
        "lose less work on a failure; large ones cost fewer commits.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Attempts per shard before it is recorded as failed."
    )


class StorageSpec(_Section):
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, SeaweedFS, a test server). Credentials come "
        "from the environment (AWS_ACCESS_KEY_ID, ...), never from the spec.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec/s3fs options, e.g. {anon: true}. Credentials are refused here.",
    )

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        # One rule for run, submit and resume: job.json and a submitted job's runtime_env would
        # hold them in plain text. The rule is secrets.redact's, which job.json is written with.
        from batchgen.spec.secrets import secret_keys

        keys = secret_keys(options, "storage.options")
        if keys:
            raise ValueError(
                f"credentials do not belong in the spec ({', '.join(keys)}); take them from the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), a "
                "profile (AWS_PROFILE) or the nodes' own role; `submit --env NAME` hands one to a job"
            )
        return options
