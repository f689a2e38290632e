"""model.path: s3://... — downloaded once per node into the cache, then from_pretrained."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import s3fs
from conftest import spec_dict

from batchgen.errors import ModelError
from batchgen.io.modelcache import COMPLETE, fetch, local_model
from batchgen.spec.load import parse_spec

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_model(s3_endpoint, s3_bucket, tiny_model) -> str:
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    url = f"{s3_bucket}/models/tiny"
    fs.put(tiny_model.rstrip("/") + "/", url.removeprefix("s3://") + "/", recursive=True)
    return url


def _fetch(args):
    url, endpoint, root = args
    from batchgen.io.storage import storage_options

    path, downloaded = fetch(url, storage_options(url, endpoint), Path(root))
    return str(path), downloaded


def test_concurrent_replicas_download_once(s3_model, s3_endpoint, tmp_path):
    # Four processes on one node ask at the same moment: one downloads, three wait and reuse.
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fetch, [(s3_model, s3_endpoint, str(tmp_path))] * 4)
    assert len({p for p, _ in results}) == 1
    assert sorted(d for _, d in results) == [False, False, False, True]
    folder = Path(results[0][0])
    assert (folder / COMPLETE).exists() and (folder / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [folder.name]  # no temp left


def test_cached_model_loads_and_generates_like_the_local_one(s3_model, s3_endpoint, tiny_model,
                                                             tmp_path):
    from batchgen.engine.engine import Engine, Request

    raw = spec_dict("in.parquet", str(tmp_path / "out"), s3_model,
                    storage={"endpoint_url": s3_endpoint},
                    model={"cache_dir": str(tmp_path / "cache")})
    spec = parse_spec(raw)
    model, downloaded = local_model(spec)
    assert downloaded and model.path.startswith(str(tmp_path / "cache"))
    assert local_model(spec) == (model, False)  # second time: from the cache
    config_only, _ = local_model(spec, weights=False)
    assert not (Path(config_only.path) / "model.safetensors").exists()
    assert (Path(config_only.path) / "tokenizer.json").exists()

    local = spec.model.model_copy(update={"path": tiny_model})
    texts = []
    for m in (model, local):
        engine = Engine.load(m, spec.generation, spec.resources)
        ids = engine.tokenize(["Write one sentence about tea."])[0]
        texts.append(engine.generate([Request(engine.fit(ids), seed=1)])[0].text)
    assert texts[0] == texts[1]


def test_changed_model_gets_a_new_folder(s3_model, s3_endpoint, tmp_path):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    from batchgen.io.storage import storage_options

    opts = storage_options(s3_model, s3_endpoint)
    first, _ = fetch(s3_model, opts, tmp_path)
    fs.pipe(s3_model.removeprefix("s3://") + "/generation_config.json", b'{"do_sample": false}')
    second, downloaded = fetch(s3_model, opts, tmp_path)
    assert downloaded and second != first


def test_bad_model_urls_say_what_and_where(s3_bucket, s3_endpoint, tmp_path):
    from batchgen.io.storage import storage_options

    url = f"{s3_bucket}/not-a-model"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).pipe(f"{url.removeprefix('s3://')}/x.txt", b"x")
    with pytest.raises(ModelError, match=r"model.path s3://.*/not-a-model: no config.json there"):
        fetch(url, storage_options(url, s3_endpoint), tmp_path)
    missing = f"s3://no-such-bucket-{tmp_path.name[-6:].lower()}/m"
    with pytest.raises(ModelError, match="model.path s3://no-such-bucket"):
        fetch(missing, storage_options(missing, s3_endpoint), tmp_path)
