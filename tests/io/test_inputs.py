"""Input files: JSON Lines of any line length, read as pyarrow reads them."""

from __future__ import annotations

import json

from batchgen.io.inputs import read_jsonl, read_rows


def test_a_json_lines_file_with_a_line_over_the_block_size_is_read(tmp_path):
    # One valid line of ~3 MB was refused ("straddling object ... increase block size").
    long = "word " * 600_000
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                            for i, t in enumerate(["short", long, "also short"])))
    table = read_jsonl(str(path), {})
    assert table.column("id").to_pylist() == [0, 1, 2]
    assert table.column("text").to_pylist()[1] == long
    assert read_rows(str(path), 1, 2, ["id"], {}).column("id").to_pylist() == [1, 2]
