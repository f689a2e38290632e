"""What every section of the spec shares: frozen models that refuse unknown keys, and the
check of a path that must name something."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checked_path(path: str) -> str:
    # An empty output.path used to become "/" (a whole job written into the filesystem root),
    # and an empty input.path meant "every file under the current directory".
    if not path.strip():
        raise ValueError("must not be empty (is a shell variable unset?)")
    scheme, sep, rest = path.partition("://")
    if sep and not rest.strip("/"):
        raise ValueError(f"names no {'bucket' if scheme in ('s3', 's3a') else 'directory'}")
    if not path.strip("/"):
        raise ValueError("must not be the filesystem root")
    return path
