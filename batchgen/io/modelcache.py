"""Models in object storage: ``model.path: s3://...`` is copied once per node into a local cache.

``from_pretrained`` reads local folders (or the hub), not S3, so a replica first materialises the
model folder on its node's disk. The cache key is the URL plus every file's name, size and ETag:
a model overwritten in place gets a new folder, an unchanged one is never downloaded again.
Replicas on one node share a folder; a file lock beside it makes exactly one of them download
(into a temporary folder, renamed into place when whole) while the others wait and reuse it.

The driver only checks the config and tokenizer, so it fetches everything except the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path

from filelock import FileLock

from batchgen.errors import ModelError
from batchgen.io.storage import storage_options
from batchgen.spec import JobSpec, ModelSpec

REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
COMPLETE = ".batchgen-complete"


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def cache_root(model: ModelSpec) -> Path:
    root = model.cache_dir or os.environ.get("BATCHGEN_MODEL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "batchgen" / "models"


def local_model(spec: JobSpec, *, weights: bool = True) -> tuple[ModelSpec, bool]:
    """``spec.model`` with ``path`` pointing at a local copy when it is remote.

    Returns (model spec, whether this call downloaded it). ``weights=False`` leaves out weight
    files (enough for config and tokenizer)."""
    model = spec.model
    if not is_remote(model.path) or model.engine == "echo":
        return model, False
    local, downloaded = fetch(
        model.path,
        storage_options(model.path, spec.storage.endpoint_url, spec.storage.options),
        cache_root(model),
        weights=weights,
    )
    return model.model_copy(update={"path": str(local)}), downloaded


def fetch(url: str, options: dict, root: Path, *, weights: bool = True) -> tuple[Path, bool]:
    from fsspec.core import url_to_fs

    try:
        fs, base = url_to_fs(url.rstrip("/"), **options)
        listing = fs.find(base, detail=True)
    except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many types
        raise ModelError(f"model.path {url}: cannot list the model folder: {e}") from None
    files = {
        posixpath.relpath(name, base): info
        for name, info in listing.items()
        if info.get("type") != "directory" and not name.endswith("/")
    }
    if not weights:
        files = {k: v for k, v in files.items() if not k.endswith(WEIGHT_SUFFIXES)}
    if "config.json" not in files:
        raise ModelError(
            f"model.path {url}: no config.json there; expected a folder written by save_pretrained"
        )
    identity = json.dumps(
        [url.rstrip("/"), sorted((k, v.get("size"), str(v.get("ETag") or v.get("etag") or ""))
                                 for k, v in files.items())]
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = posixpath.basename(base.rstrip("/")) or "model"
    target = root / f"{name}-{key}{'' if weights else '-config'}"
    if (target / COMPLETE).exists():
        return target, False
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE).exists():  # another replica on this node finished it meanwhile
            return target, False
        tmp = root / f".{target.name}.tmp-{uuid.uuid4().hex}"
        try:
            for rel in sorted(files):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(posixpath.join(base, rel), str(dest))
            (tmp / COMPLETE).write_text(identity)
            os.replace(tmp, target)  # whole, with its marker, or not at all
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"model.path {url}: download into {root} failed: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, True
