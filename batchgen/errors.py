"""The errors batchgen raises for things a user can fix, and how any error is shown in one line.

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


def one_line(error: object, limit: int = 500, *, last: bool = False) -> str:
    """An error (or a message) as one line: its first, or with ``last`` its last line (a remote
    traceback ends with its cause), at most ``limit`` characters; the type's name if empty."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return (lines[-1] if last else lines[0])[:limit]
