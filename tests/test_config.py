"""CLIConfig: layer-list formats, fork aliases, defaults over the actual depths, and clear errors."""

import json

import pytest
from configuration_cli import CLIConfig, parse_layer_list
from tiny_models import tiny_config_kwargs


def make(**overrides) -> CLIConfig:
    return CLIConfig(**tiny_config_kwargs(**overrides))  # 5 vision layers, 6 text layers, text width 64, 4 heads


@pytest.mark.parametrize(
    "value, expected",
    [
        ("RANGE-1-28-4", [1, 5, 9, 13, 17, 21, 25]),
        ("range-0-3-1", [0, 1, 2]),
        ("1,5,9", [1, 5, 9]),
        (" 2, 3 ", [2, 3]),
        ([4, 1], [4, 1]),
        ((0, 2), [0, 2]),
        (3, [3]),
        (None, None),
    ],
)
def test_parse_layer_list_formats(value, expected):
    assert parse_layer_list(value, "field") == expected


@pytest.mark.parametrize("value", ["RANGE-1-28", "RANGE-a-b-c", "RANGE-1-28-0", "RANGE-5-1-1", "1;5", [1, "2"], [True], 1.5])
def test_parse_layer_list_rejects_malformed(value):
    with pytest.raises(ValueError, match="field"):
        parse_layer_list(value, "field")


def test_defaults_follow_the_actual_depths():
    config = make()
    assert config.vision_extraction_layers == [1, 5]  # RANGE-1-6-4 over hidden_states 0..5
    assert config.llm_injection_layers == [1, 5]  # RANGE-1-6-4 over decoder layers 0..5
    assert config.agf_num_heads == 4
    assert (config.amp_lora_rank, config.amp_lora_alpha) == (16, 32.0)


def test_cli_7b_proportions_give_the_published_layers():
    config = CLIConfig(text_config={"model_type": "qwen2", "num_hidden_layers": 28})
    assert config.vision_config.num_hidden_layers == 26
    assert config.vision_extraction_layers == [1, 5, 9, 13, 17, 21, 25]
    assert config.llm_injection_layers == [1, 5, 9, 13, 17, 21, 25]


def test_strings_are_stored_as_int_lists_and_round_trip(tmp_path):
    config = make(vision_extraction_layers="RANGE-1-6-2", llm_injection_layers="0,2,4", amp_lora_rank=8)
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["vision_extraction_layers"] == [1, 3, 5]
    assert on_disk["llm_injection_layers"] == [0, 2, 4]
    reloaded = CLIConfig.from_pretrained(tmp_path)
    assert reloaded.vision_extraction_layers == [1, 3, 5]
    assert reloaded.amp_lora_rank == 8


def test_fork_aliases():
    config = make(vision_exp_layers="RANGE-1-6-2", vlm_exp_layers="1,2")
    assert config.vision_extraction_layers == [1, 3, 5]
    assert config.llm_injection_layers == [1, 2]
    assert make(vlm_exp_layers=[3], llm_injection_layers=[3]).llm_injection_layers == [3]
    with pytest.raises(ValueError, match="llm_injection_layers.*vlm_exp_layers.*disagree"):
        make(vlm_exp_layers=[3], llm_injection_layers=[4])


def test_auto_map_names_every_auto_class():
    auto_map = make().auto_map
    assert auto_map["AutoConfig"] == "configuration_cli.CLIConfig"
    for auto_class in ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"):
        assert auto_map[auto_class] == "modeling_cli.CLIForConditionalGeneration"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_extraction_layers": [1, 6]}, r"vision_extraction_layers.*out-of-range.*\[6\].*0\.\.5"),
        ({"vision_extraction_layers": [-1]}, r"vision_extraction_layers.*out-of-range.*0\.\.5"),
        ({"llm_injection_layers": [6]}, r"llm_injection_layers.*out-of-range.*0\.\.5"),
        ({"llm_injection_layers": [1, 1]}, r"llm_injection_layers.*more than once.*\[1\]"),
        ({"vision_extraction_layers": []}, r"vision_extraction_layers.*at least one"),
        ({"llm_injection_layers": "RANGE-1-x-4"}, r"llm_injection_layers.*malformed"),
        ({"amp_lora_rank": 0}, r"amp_lora_rank.*>= 1"),
        ({"amp_lora_rank": -3}, r"amp_lora_rank.*>= 1"),
        ({"amp_lora_alpha": 0}, r"amp_lora_alpha.*> 0"),
        ({"agf_num_heads": 3}, r"agf_num_heads.*divisor.*64.*allowed: 1, 2, 4, 8, 16, 32, 64"),
        ({"agf_num_heads": 0}, r"agf_num_heads"),
        ({"vision_feature_layer": [-2, -1]}, r"vision_feature_layer.*single int"),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)
