"""The errors a user can cause. The CLI prints each as one line and exits with status 2."""

import errno

__all__ = ["DistillError", "ConfigError", "StoreError", "CorruptStoreError", "IncompatibleStoreError", "WriteError",
           "write_error", "is_write_failure", "first_line", "listed"]


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


def is_write_failure(err: BaseException) -> bool:
    """True when a library reports a failed write (a full disk) as something other than OSError:
    torch.save, torch.jit.save and safetensors raise RuntimeError or SafetensorError."""
    text = str(err)
    return isinstance(err, OSError) or any(s in text for s in ("No space left", "file write failed", "unexpected pos",
                                                               "I/O error"))


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err``'s message (at most ``limit`` characters), or its type's name when it has none.

    Third-party errors (torch, transformers, pyarrow) often carry a whole traceback or a
    paragraph; a one-line user error quotes only this.
    """
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line[:limit] if limit is not None else line


def listed(names: list[str], n: int = 4) -> str:
    """The first ``n`` of ``names`` joined by commas, then how many more: ``a, b, c, d and 7 more``."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
