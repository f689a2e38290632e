"""Writes the small input datasets the example jobs in jobs/ read. Run from the repo root:

    python jobs/data/make_data.py
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music",
          "bread", "mountains", "winter", "trains", "libraries", "the sea", "clocks", "bees"]
STYLES = ["short", "happy", "quiet", "strange"]


def demo_prompts() -> pa.Table:
    rows = [(f"t{i:03d}", TOPICS[i % len(TOPICS)], STYLES[i // len(TOPICS) % len(STYLES)])
            for i in range(64)]
    ids, topics, styles = zip(*rows)
    return pa.table({"id": list(ids), "topic": list(topics), "style": list(styles)})


if __name__ == "__main__":
    here = Path(__file__).parent
    # Small row groups so shards and row-group reads are exercised even on this tiny input.
    pq.write_table(demo_prompts(), here / "demo-prompts.parquet", row_group_size=16)
    print(f"wrote {here / 'demo-prompts.parquet'}")
