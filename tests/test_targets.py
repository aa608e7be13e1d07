import pytest

from lorakit import TargetError, find_targets
from lorakit.targets import matches, parse_layers


@pytest.mark.parametrize("pattern,path,hit", [
    ("query", "encoder.layer.0.attention.self.query", True),
    ("self.query", "encoder.layer.0.attention.self.query", True),
    ("query", "encoder.layer.0.attention.self.myquery", False),  # whole segments only
    ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query", True),
    ("layer.*.output.dense", "encoder.layer.3.output.dense", True),
    ("layer.*.output.dense", "encoder.layer.3.attention.output.dense", False),
    ("re:.*\\.(query|value)$", "encoder.layer.3.attention.self.value", True),
    ("re:.*\\.(query|value)$", "encoder.layer.3.attention.self.key", False),
])
def test_matches(pattern, path, hit):
    assert matches(pattern, path) is hit


def test_presets_skip_head_and_pick_kinds(tiny):
    assert find_targets(tiny, ["all-linear"]) == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert find_targets(tiny, ["all-conv"]) == ["conv1", "conv2"]


def test_layer_ranges(tiny):
    assert parse_layers("0-1, 5") == {0, 1, 5}
    assert find_targets(tiny, ["all-linear"], layers="1-2") == ["blocks.1.0", "blocks.2.0"]
    assert find_targets(tiny, ["re:blocks\\..*"], layers=[0]) == ["blocks.0.0"]


def test_exclude(tiny):
    assert find_targets(tiny, ["all-linear", "head"], exclude=["blocks.1.0"]) == ["blocks.0.0", "blocks.2.0", "head"]


def test_errors_name_the_pattern(tiny):
    with pytest.raises(TargetError, match="'nope' matches no module"):
        find_targets(tiny, ["head", "nope"])
    with pytest.raises(TargetError, match="'blocks.0' matches only modules lorakit cannot adapt: blocks.0 \\(Seq"):
        find_targets(tiny, ["blocks.0"])
    with pytest.raises(TargetError, match="invalid regular expression"):
        find_targets(tiny, ["re:("])
    with pytest.raises(TargetError, match="select no module"):
        find_targets(tiny, ["head"], layers="0")
    with pytest.raises(TargetError, match="'0-x'"):
        parse_layers("0-x")


@pytest.mark.parametrize("pattern,path,hit", [
    ("**.dense", "encoder.layer.3.attention.output.dense", True),
    ("layer.[12].*.dense", "encoder.layer.1.output.dense", True),
    ("layer.[12].*.dense", "encoder.layer.3.output.dense", False),
    ("lay?r.0.*", "encoder.layer.0.output", True),
])
def test_glob_segments(pattern, path, hit):
    assert matches(pattern, path) is hit
