"""The input files of a job: listing them, identifying them, and reading row ranges.

An input path is a file, a directory (searched recursively, ``_``/``.``-prefixed names skipped),
a glob, or an ``s3://`` URL of any of those, holding Parquet or JSON Lines. A ``Shard`` is a row
range of one input file: the unit the planner cuts, the driver schedules and a replica reads.
Files are identified by content (local) or ETag (object stores), so a resume knows whether its
input changed.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from fsspec.core import url_to_fs

from batchgen.errors import InputError, one_line

GLOB_CHARS = set("*?[")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    etag: str
    rows: int


@dataclass(frozen=True)
class Shard:
    shard_id: str
    file: str
    row_start: int
    row_count: int
    row_offset: int  # global index of the shard's first row across all input files


def list_input_files(path: str, options: dict, fmt: str = "auto", *,
                     by_content: bool = True) -> list[tuple[str, int, str]]:
    """``(url, size, identity)`` of every input file the input path names, sorted by URL. The
    identity is the ETag on object stores; a local file's modification time says nothing about
    its content (a fresh checkout, a ``cp``, a ``touch``), so local files are identified by
    content: a digest of the Parquet footer, or of the whole file for JSON Lines.

    Directories are searched recursively; files and folders whose names start with ``_`` or
    ``.`` are skipped (the Hive/Spark convention), so the output folder of an earlier batchgen
    job can be an input without its staging files.
    """
    try:
        fs, root = url_to_fs(path, **options)
        if set(root) & GLOB_CHARS:
            infos = [i for i in fs.glob(root, detail=True).values() if i["type"] != "directory"]
            if not infos:
                raise InputError(f"input.path {path}: the glob matches no files")
        elif fs.isdir(root):
            # (Not *.json by default: a batchgen output holds job.json, plan.json...)
            suffixes = {"parquet": (".parquet",), "jsonl": JSONL_SUFFIXES}.get(
                fmt, (".parquet", ".jsonl", ".ndjson"))
            infos = [
                i
                for p, i in fs.find(root, detail=True).items()
                if p.lower().endswith(suffixes) and not hidden(posixpath.relpath(p, root))
            ]
            if not infos:
                raise InputError(
                    f"input.path {path}: the directory holds no {'/'.join('*' + x for x in suffixes)} files")
        elif fs.isfile(root):
            infos = [fs.info(root)]
        else:
            raise InputError(f"input.path {path}: no such file or directory")
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"input.path {path}: cannot list it: {e}") from None
    odd = [i["name"] for i in infos if i.get("type") not in ("file", None)]
    if odd:  # a FIFO or device would block the footer read forever
        raise InputError(f"input.path {path}: {odd[0]} is not a regular file; remove it or "
                         "name the input files with a glob")
    local = not ("://" in path and not path.startswith("file://"))
    result = []
    for info in infos:
        url = fs.unstrip_protocol(info["name"]) if "://" in path else info["name"]
        if local and by_content:
            etag = _content_identity(info["name"], int(info.get("size") or 0), file_format(url, fmt))
        else:
            etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        result.append((url, int(info.get("size") or 0), etag.strip('"')))
    return sorted(result)


def _content_identity(path: str, size: int, fmt: str) -> str:
    """A digest of what a local file holds: the Parquet footer (schema, row groups, their
    offsets and statistics; read with one seek) or a whole JSON Lines file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if fmt == "parquet" and size >= 12:
                f.seek(size - 8)
                tail = f.read(8)
                footer_len = int.from_bytes(tail[:4], "little")
                if tail[4:] == b"PAR1" and footer_len + 8 <= size:
                    f.seek(size - 8 - footer_len)
                    digest.update(f.read(footer_len))
                    return f"footer:{digest.hexdigest()[:32]}"
                f.seek(0)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror or e}") from None
    return f"sha256:{digest.hexdigest()[:32]}"


def hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def read_schema(url: str, options: dict, fmt: str = "auto"):
    """(Arrow schema, row count) of one input file: from the footer for Parquet; a JSON Lines
    file has no footer, so it is read (seed datasets are small). Raises InputError."""
    import pyarrow.parquet as pq

    if file_format(url, fmt) == "jsonl":
        try:
            table = read_jsonl(url, options)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{url}: not a readable JSON Lines file (one object per line): "
                             f"{one_line(e)}") from None
        return table.schema, table.num_rows
    try:
        with open_input(url, options) as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise InputError(f"{url}: not a readable Parquet file: {e}") from None


def open_input(url: str, options: dict):
    fs, path = url_to_fs(url, **options)
    return fs.open(path, "rb")


def file_format(url: str, declared: str = "auto") -> str:
    """'parquet' or 'jsonl' for an input file: as declared, else by its extension."""
    if declared != "auto":
        return declared
    return "jsonl" if url.lower().endswith(JSONL_SUFFIXES) else "parquet"


def read_jsonl(url: str, options: dict):
    """A whole JSON Lines file as a table (one object per line; types inferred per file).
    pyarrow parses in blocks that must each hold whole lines (a document of several MB is one
    line), so the file, read whole anyway, is one block (up to pyarrow's 2 GiB)."""
    import io

    import pyarrow.json as pj

    with open_input(url, options) as f:
        data = f.read()
    block = min(max(1 << 20, len(data) + 1), (1 << 31) - 1)
    return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(use_threads=False,
                                                                       block_size=block))


def read_rows(url: str, row_start: int, row_count: int, columns: list[str], options: dict,
              fmt: str = "auto"):
    """Rows ``[row_start, row_start + row_count)`` of an input file. For Parquet only the row
    groups that overlap them are read; a JSON Lines file is read whole and sliced."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file_format(url, fmt) == "jsonl":
        table = read_jsonl(url, options)
        return table.select(columns).slice(row_start, row_count) if columns else table.slice(
            row_start, row_count)
    with open_input(url, options) as f:
        pf = pq.ParquetFile(f)
        groups, first_row, offset = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset + n > row_start and offset < row_start + row_count:
                groups.append(i)
                first_row = offset if first_row is None else first_row
            offset += n
        if not groups:
            return pa.table({c: pa.array([], pf.schema_arrow.field(c).type) for c in columns})
        table = pf.read_row_groups(groups, columns=columns or None, use_threads=False)
    return table.slice(row_start - first_row, row_count)
