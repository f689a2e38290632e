"""Print each question's candidate answers best first, from a scoring job's output (the
`make demo-score` job, jobs/score-answers.yaml). Run from the repo root:

    python jobs/rank_answers.py .demo/scores
"""

import sys
from collections import defaultdict

import pyarrow.dataset as ds

rows = ds.dataset(f"{sys.argv[1]}/data", format="parquet").to_table().to_pylist()
by_question = defaultdict(list)
for r in rows:
    if r["completion_logprob"] is not None:
        by_question[r["question_id"]].append(r)
for question, answers in sorted(by_question.items())[:4]:
    print(f"{question}: {answers[0]['question']}")
    for rank, r in enumerate(sorted(answers, key=lambda r: -r["completion_logprob"]), 1):
        print(f"  {rank}. {r['completion_logprob']:9.3f}  ppl {r['perplexity']:9.3g}  "
              f"[{r['kind']}] {r['completion']!r}")
print(f"... {len(by_question)} questions, {len(rows)} answers scored")
