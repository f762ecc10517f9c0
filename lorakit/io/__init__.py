"""File I/O: lazy, validated safetensors reading; incremental atomic writing; input resolution."""

from lorakit.io.atomic import atomic_output, check_output_path
from lorakit.io.safetensors_file import SafetensorsFile, TensorInfo, read_header
from lorakit.io.writer import SafetensorsWriter, write_safetensors

__all__ = [
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "atomic_output",
    "check_output_path",
    "read_header",
    "write_safetensors",
]
