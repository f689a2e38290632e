"""One shard on one model replica: rows in, one staged Parquet file out. No Ray.

Contract: ``worker.ShardWorker.run(shard)`` reads the shard's rows, renders each one's prompt
(``prompts``: a column, a Jinja2 template in a bounded sandbox, a conversation, the chat
template), tokenizes and fits it (``longdocs``: huge rows cut before tokenizing, or documents
summarized window by window), calls the engine, and assembles exactly one output row per
(input row, sample index) (``rows``), parsed and checked (``postprocess``, ``responses``). A row
that cannot be processed becomes an error row and the shard goes on. The file is written
locally, checked, and uploaded whole to staging; only the driver commits.
"""
