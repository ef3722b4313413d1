"""The soft-label store: writer, reader, manifest, codecs and the zarr / parquet backends."""

from distill.storage.codecs import ValueEncoding
from distill.storage.labels import SoftLabels, concat_labels, sampled_labels, topk_labels
from distill.storage.manifest import FORMAT_VERSION, Manifest, ShardRecord, StoreSpec
from distill.storage.reader import StoreReader, open_store
from distill.storage.writer import ShardWriter, StoreWriter, create_store, open_store_writer

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "ShardRecord",
    "ShardWriter",
    "SoftLabels",
    "StoreReader",
    "StoreSpec",
    "StoreWriter",
    "ValueEncoding",
    "concat_labels",
    "create_store",
    "open_store",
    "open_store_writer",
    "sampled_labels",
    "topk_labels",
]
