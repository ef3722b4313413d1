"""The store as train-student and evaluate use it: complete, and made for the data and the model at hand.

A store is joined to its data by example index, so a store made from other data (another
split, --seq-len or --limit) would silently pair the wrong labels with every example: the
dataset fingerprint in its manifest must equal the data's. Likewise its vocabulary must be
the model's output size.
"""

from __future__ import annotations

from distill.errors import ConfigError, StoreError
from distill.pipeline.chat import chat_rule_difference
from distill.pipeline.data import ExampleSet
from distill.storage import StoreReader, open_store

__all__ = ["open_complete_store", "check_store_matches"]


def open_complete_store(url: str) -> StoreReader:
    """The store at ``url``, refused unless every shard is complete."""
    store = open_store(url)
    if not store.complete:
        raise StoreError(f"the store {url} is not complete ({len(store.complete_shards())} of "
                         f"{store.spec.num_shards} shards): finish it with `distill generate-labels` first")
    return store


def check_store_matches(store: StoreReader, url: str, data: ExampleSet, output_size: int, what: str) -> None:
    """Refuse a store made from other data, or for another output size than the ``what`` (student, model) has.

    A causal LM with more outputs than the store's vocabulary (an embedding padded to a
    multiple of 64, say) is accepted: the caller restricts it with ``LoadedModel.use_vocabulary``.
    """
    spec = store.spec
    chat = chat_rule_difference(spec.extra.get("data", {}).get("chat"), data.stats.get("chat"))
    if data.fingerprint() != spec.dataset_fingerprint and chat:
        raise ConfigError(f"the store {url} was made from chat data {chat}")
    if data.fingerprint() != spec.dataset_fingerprint:
        raise ConfigError(f"the store {url} was made from other data (dataset fingerprint "
                          f"{spec.dataset_fingerprint[:19]}..., this data {data.fingerprint()[:19]}...): pass the "
                          "same --data, --split, --seq-len and --limit as generate-labels")
    padded = output_size > spec.vocab_size and (spec.task or data.task) == "causal-lm"
    if output_size < spec.vocab_size and (spec.task or data.task) == "causal-lm":
        raise ConfigError(f"the {what} outputs {output_size:,} values but the teacher's vocabulary is "
                          f"{spec.vocab_size:,}: use a {what} with at least {spec.vocab_size:,} outputs (a larger, "
                          "padded vocabulary is fine)")
    if output_size != spec.vocab_size and not padded:
        raise ConfigError(f"the {what} outputs {output_size} values but the store's vocabulary is "
                          f"{spec.vocab_size}: use a {what} with the teacher's output size")
