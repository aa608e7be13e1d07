"""lorakit: LoRA adapters as data.

Inject adapters into any PyTorch model, train them, extract them as plain data, save them as safetensors, and
attach, merge or detach them again. See README.md for the tour.
"""

from lorakit.adapter import KINDS, Adapter, ModuleLora, adapters_equal, lora_scale
from lorakit.errors import (AdapterStateError, AdapterValidationError, AttachError, FileFormatError,
                            FormatVersionError, LorakitError, TargetError)
from lorakit.formats import load, read_any, save
from lorakit.inject import (InjectReport, adapter_names, attach, detach, disabled, extract, inject, lora_layers,
                            merge, merge_into_base, mixed_batch, set_enabled, set_strength, trainable_parameters,
                            unmerge)
from lorakit.layers import LoraLayer
from lorakit.record import InjectionRecord, get_record
from lorakit.targets import find_targets

__version__ = "0.1.0"

__all__ = [
    "KINDS", "Adapter", "AdapterStateError", "AdapterValidationError", "AttachError", "FileFormatError",
    "FormatVersionError", "InjectReport", "InjectionRecord", "LoraLayer", "LorakitError", "ModuleLora", "TargetError",
    "adapter_names", "adapters_equal", "attach", "detach", "disabled", "extract", "find_targets", "get_record", "inject", "load",
    "lora_layers", "lora_scale", "merge", "merge_into_base", "mixed_batch", "read_any", "save", "set_enabled",
    "set_strength", "trainable_parameters", "unmerge",
]
