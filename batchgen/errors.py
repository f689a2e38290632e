"""The errors batchgen raises for things a user can fix.

The CLI prints a `BatchgenError` as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class BatchgenError(Exception):
    """A mistake the user can fix: the message says what, where, and how."""


class SpecError(BatchgenError):
    """The job spec is invalid (file, dotted key, expected value)."""


class InputError(BatchgenError):
    """The input data is missing, unreadable, or lacks a column the spec names."""


class ModelError(BatchgenError):
    """The model or tokenizer cannot be loaded or does not fit the spec."""


class StorageError(BatchgenError):
    """The output location cannot be written, or holds something else."""


class ShardError(BatchgenError):
    """A shard could not be processed; the driver may retry it."""


class JobFailed(BatchgenError):
    """The job ended with shards that ran out of attempts."""


class Cancelled(BatchgenError):
    """The user stopped the job (Ctrl-C or SIGTERM); committed shards are kept."""
