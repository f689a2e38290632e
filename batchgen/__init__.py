"""batchgen: batch text generation over Parquet datasets with Hugging Face causal LMs on Ray.

The package is cut into wings by role; imports point one way, from the top down (a test,
``tests/test_layout.py``, fails on one that points back up):

    cli.py, submission.py   the commands; jobs on a remote cluster through Ray's Jobs SDK
    job/                    the driver side: plan, prepare, Ray scheduler, commit, lock, status
    shard/                  one shard on one replica: rows, prompts, engine calls, output rows
    engine/                 token ids in, token ids out: loading, decoding, sampling, constraints
    io/                     every byte in or out of storage, the model cache, model files
    spec/                   the job spec: frozen pydantic models, YAML loading
    errors.py               the errors a user can fix (every wing raises them)
"""
