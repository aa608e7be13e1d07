"""Operations on adapter data: split/join, partial loading, run-time control, compose, SVD tools, merge, analyse.

Every function here is pure on :class:`lorakit.Adapter` values (inputs are never modified); the ones that touch
files say so, and the ones that touch a live model take it as their first argument.
"""

from lorakit.ops.analyse import block_stats, module_stats, plot_block_energy
from lorakit.ops.compose import ComposeReport, compose, concat_modules
from lorakit.ops.control import bake_strengths, block_strengths, export_lbw, set_block_strengths, set_part_strengths
from lorakit.ops.join import attach_parts, attach_split, join, load_parts, load_selected, recombine
from lorakit.ops.merge import merge_state_dict, save_merged
from lorakit.ops.package import load_split, read_manifest, save_split
from lorakit.ops.split import MODES, Part, Split, module_type, split
from lorakit.ops.svd import ResizeReport, extract, extract_module, module_kinds, resize

__all__ = [
    "MODES", "ComposeReport", "Part", "ResizeReport", "Split", "attach_parts", "attach_split", "bake_strengths",
    "block_stats", "block_strengths", "compose", "concat_modules", "export_lbw", "extract", "extract_module",
    "join", "load_parts", "load_selected", "load_split", "merge_state_dict", "module_kinds", "module_stats",
    "module_type", "plot_block_energy", "read_manifest", "recombine", "resize", "save_merged", "save_split",
    "set_block_strengths", "set_part_strengths", "split",
]
