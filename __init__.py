"""distill: offline knowledge distillation through a soft-label store.

The stage functions are the Python API as well as the CLI's back end, importable from
here (loaded on first use, so ``import distill`` stays light):

    distill.generate_labels(GenerateConfig(...))   stage one
    distill.train_student(StudentConfig(...))      stage two
    distill.train_teacher(TrainConfig(...))
    distill.evaluate_model(EvaluateConfig(...)), distill.quantize_model(QuantizeConfig(...))
    distill.import_labels(ImportConfig(...))         a store from top-k labels made elsewhere
"""

__version__ = "0.1.0"

from distill.errors import ConfigError, CorruptStoreError, DistillError, StoreError  # noqa: E402

_LAZY = {
    "generate_labels": "distill.stages.generate", "GenerateConfig": "distill.stages.generate",
    "train_student": "distill.stages.train", "train_teacher": "distill.stages.train",
    "StudentConfig": "distill.stages.train", "TrainConfig": "distill.stages.train",
    "evaluate_model": "distill.stages.evaluate", "EvaluateConfig": "distill.stages.evaluate",
    "quantize_model": "distill.stages.quantize", "QuantizeConfig": "distill.stages.quantize",
    "import_labels": "distill.stages.importing", "ImportConfig": "distill.stages.importing",
}

__all__ = ["__version__", "DistillError", "ConfigError", "StoreError", "CorruptStoreError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
