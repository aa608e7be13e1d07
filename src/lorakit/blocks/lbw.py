"""LoRA Block Weight strings: ``"1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"`` ↔ block → strength.

An LBW string lists one strength per block of a vocabulary (17 or 26 blocks for SD1.5, 12 or 20 for SDXL); its
length tells which. Users also write the tool's preset names (``ALL``, ``INS``, ``OUTALL``…), which are defined for
the 17-block vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lorakit.blocks.unet import SD15_17, SD15_26, SDXL_12, SDXL_20
from lorakit.errors import LorakitError

#: Vocabularies by family and length.
VOCABULARIES: dict[str, dict[int, tuple[str, ...]]] = {
    "sd15": {17: SD15_17, 26: SD15_26},
    "sdxl": {12: SDXL_12, 20: SDXL_20},
}

#: LBW's stock presets over the SD1.5 17-block vocabulary.
PRESETS_17: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}


def vocabulary(family: str, size: int) -> tuple[str, ...]:
    """The LBW block names of ``family`` (``sd15`` or ``sdxl``) with ``size`` entries."""
    try:
        return VOCABULARIES[family][size]
    except KeyError:
        known = {f: sorted(v) for f, v in VOCABULARIES.items()}
        raise LorakitError(f"no LBW vocabulary of {size} blocks for family {family!r} (known: {known})") from None


def parse_lbw(spec: str, family: str = "sd15") -> dict[str, float]:
    """An LBW string or preset name → block → strength.

    Args:
        spec: comma-separated numbers (as many as one of the family's vocabularies has blocks) or a preset name
            (17-block SD1.5 presets only).
        family: ``sd15`` or ``sdxl``.

    Raises:
        LorakitError: unknown preset, a value that is not a number, or a count matching no vocabulary.
    """
    text = spec.strip()
    if family == "sd15" and text.upper() in PRESETS_17:
        text = PRESETS_17[text.upper()]
    parts = [p.strip() for p in text.split(",")]
    values = []
    for i, p in enumerate(parts):
        try:
            values.append(float(p))
        except ValueError:
            raise LorakitError(f"LBW string {spec!r}: entry {i} ({p!r}) is not a number or the string is not a "
                               f"preset (presets: {', '.join(PRESETS_17)})") from None
    names = vocabulary(family, len(values))
    return dict(zip(names, values, strict=True))


def format_lbw(strengths: Mapping[str, float], names: Sequence[str], default: float = 1.0) -> str:
    """Block → strength as an LBW string over the vocabulary ``names`` (absent blocks get ``default``)."""
    return ",".join(f"{float(strengths.get(n, default)):g}" for n in names)
