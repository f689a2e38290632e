"""Credentials never belong in a spec: what looks like one, at any depth of a mapping.

One rule for every command: a spec with credentials in ``storage.options`` is refused
(``StorageSpec``), ``job.json`` is written with them redacted, and a submitted job's runtime_env
is checked again before it is sent.
"""

from __future__ import annotations

from typing import Any

_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")
# Names with a secret word that name no secret: the KMS key id of server-side encryption, the
# checksum of a customer key (the key itself, SSECustomerKey, is a secret).
_NOT_SECRETS = ("ssekmskeyid", "sse_kms_key_id", "ssecustomerkeymd5")
REDACTED = "<redacted>"


def _is_secret(key: Any, value: Any) -> bool:
    name = str(key).lower()
    # A yes/no or a number is a setting (BucketKeyEnabled: true), never a credential.
    return (any(w in name for w in _SECRET_WORDS) and name not in _NOT_SECRETS
            and not isinstance(value, (dict, list, bool, int, float)) and value is not None)


def redact(options: Any) -> Any:
    """Storage options with anything that looks like a credential replaced."""
    if isinstance(options, dict):
        return {k: REDACTED if _is_secret(k, v) else redact(v) for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


def secret_keys(options: Any, prefix: str) -> list[str]:
    """Dotted names of the values ``redact`` would replace, e.g. ``prefix.client_kwargs.secret``."""
    found = []
    if isinstance(options, dict):
        for k, v in options.items():
            found += [f"{prefix}.{k}"] if _is_secret(k, v) else secret_keys(v, f"{prefix}.{k}")
    elif isinstance(options, list):
        for i, v in enumerate(options):
            found += secret_keys(v, f"{prefix}.{i}")
    return found
