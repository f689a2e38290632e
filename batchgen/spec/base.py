"""What every section of the spec shares: frozen models that refuse unknown keys and YAML's
booleans where a number or a text is meant, and the check of a path that must name something."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for a number; YAML reads yes/no/on/off as booleans. A job
        # that says `n: yes` or `top_k: no` means something, but not 1 or 0.
        if info.field_name is None:
            return value
        kinds = _kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("expected a number, not a YAML boolean (an unquoted yes/no/on/off/"
                             "true/false)")
        if str in kinds and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if not isinstance(item, str) and item is not None:
                    raise ValueError(_not_text(item, f"item {i + 1}"))
        return value


def _kinds(annotation: Any) -> set[type]:
    """The plain types an annotation admits: ``int | None`` -> {int, NoneType};
    ``tuple[str, ...] | None`` -> {str, NoneType}."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return set().union(*(_kinds(a) for a in args)) if len(args) == 1 else set()
    return {annotation} if isinstance(annotation, type) else set()


def _not_text(value: Any, what: str) -> str:
    if isinstance(value, bool):
        return (f"{what} is a YAML boolean (an unquoted yes/no/on/off/true/false), not text; "
                "quote each item, e.g. ['yes', 'no'], in the file and in --set alike")
    return (f"{what} is {'the number ' + str(value) if isinstance(value, (int, float)) else 'a ' + type(value).__name__}, "
            "not text; quote each item, in the file and in --set alike")


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
