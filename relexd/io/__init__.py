"""Checkpoint I/O: the safetensors format, lazy weight readers, run layouts, atomic publishing."""

from relexd.io.atomic import (
    fsync_dir,
    publish_dir,
    remove_tree,
    write_bytes_atomic,
    write_json_atomic,
)
from relexd.io.layouts import (
    CheckpointRef,
    ScanResult,
    checkpoint_step,
    scan_run,
    size_signature,
)
from relexd.io.reader import WeightInfo, WeightReader, is_temp_name, open_weights
from relexd.io.safetensors_file import (
    DTYPES,
    SafetensorsFile,
    SafetensorsHeader,
    StreamingSafetensorsWriter,
    TensorInfo,
    dtype_code,
    read_header,
)

__all__ = [
    "DTYPES",
    "CheckpointRef",
    "SafetensorsFile",
    "SafetensorsHeader",
    "ScanResult",
    "StreamingSafetensorsWriter",
    "TensorInfo",
    "WeightInfo",
    "WeightReader",
    "checkpoint_step",
    "dtype_code",
    "fsync_dir",
    "is_temp_name",
    "open_weights",
    "publish_dir",
    "read_header",
    "remove_tree",
    "scan_run",
    "size_signature",
    "write_bytes_atomic",
    "write_json_atomic",
]
