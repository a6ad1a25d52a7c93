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
        ({"vision_extraction_layers": [-7]}, r"vision_extraction_layers.*out-of-range.*\[-7\].*0\.\.5.*-6\.\.-1"),
        ({"llm_injection_layers": [-1, 5]}, r"llm_injection_layers.*more than once.*\[5\]"),
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


def test_negative_layer_indices_count_from_the_end_and_are_stored_normalised(tmp_path):
    config = make(vision_extraction_layers=[1, -1], llm_injection_layers="-2,0", vision_feature_layer=-2)
    assert config.vision_extraction_layers == [1, 5]  # hidden_states 0..5: -1 is the last layer's output
    assert config.llm_injection_layers == [4, 0]  # decoder layers 0..5
    assert config.vision_feature_layer == -2  # LLaVA-OneVision's own field keeps its Python-style value
    config.save_pretrained(tmp_path)
    assert CLIConfig.from_pretrained(tmp_path).vision_extraction_layers == [1, 5]


def test_wrong_types_raise_value_error_naming_the_field():
    # huggingface_hub's strict dataclasses raise their own exception type, which `except ValueError` would miss
    for overrides, message in [
        ({"vision_extraction_layers": [1.5]}, r"`vision_extraction_layers`=\[1\.5\] has the wrong type; allowed: a list"),
        ({"llm_injection_layers": ["1"]}, r"`llm_injection_layers`=\['1'\] has the wrong type"),
        ({"amp_lora_rank": "4"}, r"`amp_lora_rank`='4' has the wrong type; allowed: an int >= 1"),
        ({"agf_form": 3}, r"`agf_form`=3 has the wrong type"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(**overrides)
    kwargs = tiny_config_kwargs()
    kwargs["text_config"]["num_hidden_layers"] = "3"
    with pytest.raises(ValueError, match=r"`text_config\.num_hidden_layers`='3' has the wrong type; allowed: int"):
        CLIConfig(**kwargs)
    kwargs = tiny_config_kwargs()
    kwargs["vision_config"]["hidden_size"] = 1.5
    with pytest.raises(ValueError, match=r"`vision_config\.hidden_size`=1\.5 has the wrong type"):
        CLIConfig(**kwargs)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 1e308, -1.0])
def test_lora_alpha_must_be_finite_and_bounded(alpha):
    with pytest.raises(ValueError, match=r"amp_lora_alpha.*finite number > 0 and <= 1e\+06"):
        make(amp_lora_alpha=alpha)


def test_vision_feature_layer_is_range_checked():
    with pytest.raises(ValueError, match=r"vision_feature_layer.*\[99\].*0\.\.5"):
        make(vision_feature_layer=99)  # used to become 99 % 6 silently
    with pytest.raises(ValueError, match=r"vision_feature_layer.*\[-7\]"):
        make(vision_feature_layer=-7)


@pytest.mark.parametrize(
    "part, field, value, maximum",
    [
        ("text_config", "num_hidden_layers", 10**7, "1024"),
        ("text_config", "hidden_size", 10**30, "65536"),
        ("text_config", "vocab_size", 10**30, "16777216"),
        ("vision_config", "num_hidden_layers", 10**7, "1024"),
        ("vision_config", "hidden_size", 0, "65536"),
    ],
)
def test_sizes_are_bounded_before_anything_is_built(part, field, value, maximum):
    kwargs = tiny_config_kwargs()
    kwargs[part][field] = value
    with pytest.raises(ValueError, match=rf"`{part}\.{field}`={value} is out of range; allowed: 1\.\.{maximum}\."):
        CLIConfig(**kwargs)


def test_huge_layer_lists_and_pinpoints_fail_fast_with_short_messages():
    with pytest.raises(ValueError, match=r"selects 300000000 layers; at most 1024") as error:
        make(vision_extraction_layers="RANGE-0-300000000-1")
    with pytest.raises(ValueError, match=r"lists 5000 layers; at most 1024"):
        make(llm_injection_layers=list(range(5000)))
    with pytest.raises(ValueError, match=r"out-of-range indices \[6, 7, 8, 9, 10, \.\.\. \(994 in all\)\]") as error:
        make(llm_injection_layers=list(range(1000)))
    assert len(str(error.value)) < 300
    with pytest.raises(ValueError, match=r"image_grid_pinpoints.*\[20000, 20000\].*at most 64 crops"):
        make(image_grid_pinpoints=[[28, 28], [20000, 20000]])
    with pytest.raises(ValueError, match=r"image_grid_pinpoints.*multiples of the crop size 28"):
        make(image_grid_pinpoints=[[30, 28]])
    with pytest.raises(ValueError, match=r"amp_lora_rank.*at most the smaller width 48.*1000000000"):
        make(amp_lora_rank=10**9)


def test_vision_aspect_ratio_must_be_anyres_max_n():
    assert make(vision_aspect_ratio="anyres_max_4").vision_aspect_ratio == "anyres_max_4"
    for value in ("anyres", "pad", "anyres_max_0", "anyres_max_x"):
        with pytest.raises(ValueError, match=r"vision_aspect_ratio.*'anyres_max_N'"):
            make(vision_aspect_ratio=value)


def test_agf_form_is_validated_and_round_trips(tmp_path):
    assert make().agf_form == "attention"
    make(agf_form="folded").save_pretrained(tmp_path)
    assert CLIConfig.from_pretrained(tmp_path).agf_form == "folded"
    with pytest.raises(ValueError, match=r"agf_form.*\('attention', 'folded'\).*'fold'"):
        make(agf_form="fold")


@pytest.mark.parametrize("missing", ["text_config", "vision_config"])
def test_a_saved_cli_config_without_a_tower_config_is_refused(tmp_path, missing):
    make().save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    del on_disk[missing]
    (tmp_path / "config.json").write_text(json.dumps(on_disk))
    with pytest.raises(ValueError, match=rf"no `{missing}`"):
        CLIConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"no `{missing}`"):
        CLIConfig.from_dict(on_disk)


def test_default_config_still_builds():
    config = CLIConfig()  # transformers' own config tests build it with no arguments
    assert config.text_config.num_hidden_layers == 32 and config.vision_config.num_hidden_layers == 26
    assert CLIConfig.from_dict(config.to_dict()).llm_injection_layers == config.llm_injection_layers
