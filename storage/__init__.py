"""The soft-label store: writer, reader, manifest, codecs and the zarr / parquet backends."""

from distill.storage.backend import BACKENDS, Backend, get_backend
from distill.storage.codecs import VALUE_ENCODINGS, ValueEncoding
from distill.storage.labels import (SAMPLINGS, SoftLabels, compiled_topk_applies, concat_labels, draw, sampled_labels,
                                    topk_labels)
from distill.storage.manifest import FORMAT_VERSION, METHODS, Manifest, ShardRecord, StoreSpec
from distill.storage.reader import StoreReader, open_store
from distill.storage.shards import decode_shard, encode_shard
from distill.storage.stats import figure_shards, label_figures
from distill.storage.writer import ShardWriter, StoreWriter, create_store, empty_labels, open_store_writer

__all__ = [
    "BACKENDS",
    "Backend",
    "FORMAT_VERSION",
    "METHODS",
    "Manifest",
    "ShardRecord",
    "SAMPLINGS",
    "ShardWriter",
    "SoftLabels",
    "StoreReader",
    "StoreSpec",
    "StoreWriter",
    "VALUE_ENCODINGS",
    "ValueEncoding",
    "compiled_topk_applies",
    "concat_labels",
    "create_store",
    "decode_shard",
    "draw",
    "empty_labels",
    "encode_shard",
    "figure_shards",
    "get_backend",
    "label_figures",
    "open_store",
    "open_store_writer",
    "sampled_labels",
    "topk_labels",
]
