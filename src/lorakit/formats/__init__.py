"""Adapter files. Native lorakit files here; each foreign dialect gets its own module beside this one."""

from lorakit.formats.detect import DIALECTS, read_any, write
from lorakit.formats.native import load, read_info, save
from lorakit.formats.safetensors_io import atomic_write, read_header, read_safetensors, sha256_file, write_safetensors

__all__ = ["DIALECTS", "atomic_write", "load", "read_any", "read_header", "read_info", "read_safetensors",
           "save", "sha256_file", "write", "write_safetensors"]
