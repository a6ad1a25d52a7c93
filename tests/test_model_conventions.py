"""
CLI behaves like a transformers model where users and tools look: switching the attention implementation, the vision
outputs of `get_image_features`, `GenerationMixin`, torch's FLOP counter and inference mode, `device_map` warnings.
"""

import pytest
import torch
from test_modeling import single_image_inputs
from test_remote_code import run_offline
from tiny_models import native_twin, randomize_cli_modules, tiny_cli_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import GenerationMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_cli import CLIForConditionalGeneration


@pytest.fixture(scope="module")
def trained():
    model = tiny_cli_model(seed=3, attn_implementation="sdpa")
    randomize_cli_modules(model)
    return model, single_image_inputs(native_twin(model), (150, 40), seed=2)


def implementations_run(model, inputs, monkeypatch) -> dict[tuple[str, int], str]:
    """`{(layer kind, layer index): attention implementation}` of every attention call in one forward pass."""
    calls = {}
    get_interface = ALL_ATTENTION_FUNCTIONS.get_interface

    def recording_get_interface(implementation, default):
        function = get_interface(implementation, default)

        def recorded(module, *args, **kwargs):
            calls[(type(module).__name__, module.layer_idx if hasattr(module, "layer_idx") else id(module))] = implementation
            return function(module, *args, **kwargs)

        return recorded

    with monkeypatch.context() as patch:
        patch.setattr(ALL_ATTENTION_FUNCTIONS, "get_interface", recording_get_interface)
        with torch.no_grad():
            model(**inputs)
    return calls


def test_set_attn_implementation_switches_every_decoder_and_vision_layer(trained, monkeypatch):
    model, inputs = trained
    num_text_layers = model.config.text_config.num_hidden_layers
    num_vision_layers = model.config.vision_config.num_hidden_layers
    for implementation in ("eager", "sdpa", "eager"):
        model.set_attn_implementation(implementation)
        calls = implementations_run(model, inputs, monkeypatch)
        text = {index: impl for (kind, index), impl in calls.items() if kind == "Qwen2Attention"}
        vision = [impl for (kind, _), impl in calls.items() if kind == "SiglipAttention"]
        assert text == dict.fromkeys(range(num_text_layers), implementation)
        assert vision == [implementation] * num_vision_layers
    model.set_attn_implementation("sdpa")


def test_eager_and_sdpa_agree_with_the_injection_active(trained):
    model, inputs = trained
    logits = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            output = model(**inputs, output_gate_weights=True)
        assert output.gate_weights.abs().min() > 1e-3
        assert model.config.text_config._attn_implementation == implementation  # really switched
        logits[implementation] = output.logits
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() <= 1e-5
    assert model.config.text_config._attn_implementation == "sdpa"


def test_attn_implementation_at_from_pretrained(trained, tmp_path, monkeypatch):
    model, inputs = trained
    model.save_pretrained(tmp_path)
    loaded = CLIForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert set(implementations_run(loaded, inputs, monkeypatch).values()) == {"eager"}


def test_flash_attention_is_attempted_not_silently_ignored(trained):
    model, _ = trained
    try:  # flash-attn is not installable on CPU machines: then transformers must say so
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="FlashAttention2"):
            model.set_attn_implementation("flash_attention_2")
    else:
        model.set_attn_implementation("flash_attention_2")
        assert model.config.text_config._attn_implementation == "flash_attention_2"
    model.set_attn_implementation("sdpa")


def test_get_image_features_returns_the_vision_towers_hidden_states_and_attentions(trained):
    model, inputs = trained
    model.set_attn_implementation("eager")  # attention weights need the eager implementation
    native = native_twin(model)
    kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], output_hidden_states=True,
                  output_attentions=True)
    with torch.no_grad():
        ours = model.model.get_image_features(**kwargs)
        theirs = native.model.get_image_features(**kwargs)
        plain = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    model.set_attn_implementation("sdpa")
    assert len(ours.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert len(ours.attentions) == model.config.vision_config.num_hidden_layers
    for mine, reference in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions):
        assert torch.equal(mine, reference)
    assert plain.hidden_states is None and plain.attentions is None  # nothing is kept unless asked for


def test_generation_mixin_is_a_direct_base():
    assert GenerationMixin in CLIForConditionalGeneration.__bases__
    assert CLIForConditionalGeneration.can_generate()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_flop_counter_and_inference_mode(trained, context):
    model, inputs = trained
    native = native_twin(model)
    counts = {}
    for name, candidate in (("cli", model), ("native", native)):
        with context(), FlopCounterMode(display=False) as counter:
            candidate(**inputs)
        counts[name] = counter.get_total_flops()
    with torch.no_grad():
        expected = model(**inputs).logits
    with context():
        assert torch.equal(model(**inputs).logits, expected)
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
    # AMP projects K more feature sets and AGF reads them: more FLOPs than the one-to-one bridge, but a few percent
    assert counts["native"] < counts["cli"] < 1.5 * counts["native"]


def test_device_map_auto_does_not_warn_about_image_newline(trained, tmp_path):
    """In a fresh process, as a user loads it (pytest's own warning capture would drop modeling_cli's filter)."""
    model, _ = trained
    model.save_pretrained(tmp_path / "model")
    output = run_offline(
        f"""
        import warnings
        from transformers import AutoModel
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", append=True)
            model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True, device_map="auto",
                                              max_memory={{"cpu": "150KB"}}, offload_folder={str(tmp_path / "off")!r})
        assert "model.image_newline" in model.hf_device_map, model.hf_device_map  # the entry behind the warning
        print([str(w.message) for w in caught if "do not match any submodules" in str(w.message)])
        """,
        tmp_path,
    )
    assert output.strip().splitlines()[-1] == "[]", output
