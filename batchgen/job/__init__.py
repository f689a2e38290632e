"""The driver side of a job: plan, prepare, run on Ray, commit, and report. No torch.

Contract: ``driver.run_job(spec)`` runs a job to its end or resumes it from its output. ``plan``
cuts shards from Parquet footers once and stores the plan with the job's ``fingerprint``;
``prepare`` checks everything cheap before any replica starts; ``scheduler`` feeds shards to
replica actors and owns retries (with ``driver``, the only Ray users); ``commit`` publishes a
staged file at its final key, then its done marker (exactly once, under ``lock``: one driver per
output); ``progress`` and ``status`` write and read ``status.json``; ``estimate`` counts prompt
tokens for ``batchgen plan`` without a model.
"""
