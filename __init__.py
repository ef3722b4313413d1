"""distill: offline knowledge distillation through a soft-label store."""

__version__ = "0.1.0"

from distill.errors import ConfigError, CorruptStoreError, DistillError, StoreError  # noqa: E402

__all__ = ["__version__", "DistillError", "ConfigError", "StoreError", "CorruptStoreError"]
