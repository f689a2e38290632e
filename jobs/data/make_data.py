"""Writes the small input datasets the example jobs in jobs/ read. Run from the repo root:

    python jobs/data/make_data.py
"""

import json
import random
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


LEVELS = ["beginner", "expert"]


def qa_topics() -> list[dict]:
    """The seed of the synthetic Q&A job: one JSON object per topic and level."""
    return [{"topic_id": f"q{i:03d}", "topic": t, "level": LEVELS[i % 2]}
            for i, t in enumerate(TOPICS + TOPICS[:8])]


WORDS = ("the a river robot garden moon city bird song bread mountain winter train library sea "
         "clock bee old new quiet bright long small green cold warm walks sings builds remembers "
         "finds keeps carries under over near after before slowly softly and but").split()


def corpus() -> pa.Table:
    """Documents to summarize: mostly short, a few far longer than the tiny model's context
    (512 tokens), so the chunked map-then-reduce path runs. Seeded: the same bytes every time."""
    rng = random.Random(5)
    docs = []
    for i in range(24):
        sentences = rng.choice([3, 5, 8]) if i % 8 else [60, 90, 130][i // 8]  # docs 0, 8, 16 long
        text = " ".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
            for _ in range(sentences))
        docs.append({"doc_id": f"d{i:03d}", "title": f"Document {i}", "text": text})
    return pa.Table.from_pylist(docs)


CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Dakar"]


def tool_requests() -> list[dict]:
    """Conversations for the function-calling job: one request each, some after a first
    exchange (multi-turn), as chat datasets ship them."""
    rows = []
    for i, city in enumerate(CITIES * 2):
        ask = [f"What will the weather be in {city} for the next {2 + i % 5} days?",
               f"What time is it in {city} right now?",
               f"Find me two books about {TOPICS[i]}."][i % 3]
        messages = [{"role": "user", "content": ask}]
        if i % 4 == 3:
            messages = [{"role": "user", "content": "Hello!"},
                        {"role": "assistant", "content": "Hello! How can I help?"}] + messages
        rows.append({"request_id": f"c{i:03d}", "messages": messages})
    return rows


def candidate_answers() -> list[dict]:
    """Candidate answers to rank by log-likelihood: per question one answer in the style the
    tiny model was trained on, and others that are not."""
    rows = []
    for i, topic in enumerate(TOPICS[:8]):
        candidates = [("fluent", "The cat sees a red apple today."),
                      ("odd", "Apple red a sees cat the today."),
                      ("off-topic", f"{topic.capitalize()} {topic} {topic} 42 %% ##.")]
        for j, (kind, text) in enumerate(candidates):
            rows.append({"question_id": f"s{i:03d}", "candidate_id": f"s{i:03d}-{j}",
                         "question": f"Write one sentence about {topic}.", "kind": kind,
                         "answer": text})
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    # Small row groups so shards and row-group reads are exercised even on this tiny input.
    pq.write_table(demo_prompts(), here / "demo-prompts.parquet", row_group_size=16)
    with open(here / "qa-topics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in qa_topics())
    pq.write_table(corpus(), here / "corpus.parquet", row_group_size=8)
    for name, rows in (("tool-requests.jsonl", tool_requests()),
                       ("candidates.jsonl", candidate_answers())):
        with open(here / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    for name in ("demo-prompts.parquet", "qa-topics.jsonl", "corpus.parquet",
                 "tool-requests.jsonl", "candidates.jsonl"):
        print(f"wrote {here / name}")
