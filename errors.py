"""The errors a user can cause. The CLI prints each as one line and exits with status 2."""

__all__ = ["DistillError", "ConfigError", "StoreError", "CorruptStoreError", "IncompatibleStoreError"]


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
