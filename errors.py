"""The errors a user can cause. The CLI prints each as one line and exits with status 2."""

import errno

__all__ = ["DistillError", "ConfigError", "StoreError", "CorruptStoreError", "IncompatibleStoreError", "WriteError",
           "write_error"]


class DistillError(Exception):
    """Base of every error the user can fix; the message names the problem and the fix."""

    exit_code = 2


class ConfigError(DistillError):
    """A flag, config file or spec is wrong."""


class StoreError(DistillError):
    """A soft-label store is missing, unreadable or not in the state an operation needs."""


class CorruptStoreError(StoreError):
    """Stored bytes do not match their checksum; the message names the shard."""

    def __init__(self, message: str, shard: int | None = None):
        super().__init__(message)
        self.shard = shard


class IncompatibleStoreError(StoreError):
    """The store was written for other data, another teacher, settings or a newer format."""


class WriteError(DistillError):
    """An output cannot be written (disk full, read-only, no permission); nothing half-written is marked complete."""


def write_error(err: BaseException, what: str) -> WriteError:
    """A one-line WriteError for an error met while writing ``what`` (a path or a description)."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return WriteError(f"no space left writing {what}: free some space (or choose another path) and rerun the same "
                          "command; what is complete is kept and the rest is redone")
    reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:160] or type(err).__name__
    return WriteError(f"cannot write {what} ({reason}): check that the path is a writable directory with free space, "
                      "or choose another")
