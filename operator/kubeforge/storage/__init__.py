"""Object storage: the S3 client and the checkpoint store (layout, atomic commit, resume, retention)."""

from .checkpoint import Checkpoint, CheckpointStore, CorruptCheckpoint, FileEntry, step_name
from .s3 import S3Uri, StorageError, make_client, retry

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "CorruptCheckpoint",
    "FileEntry",
    "S3Uri",
    "StorageError",
    "make_client",
    "retry",
    "step_name",
]
