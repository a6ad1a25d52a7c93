"""
Bad model inputs fail fast with a `ValueError` naming both sides (not deep inside `split_with_sizes` or a division),
`generate(output_gate_weights=True)` returns the prefill's gates, and reusing a cache with new images says why it
cannot work.
"""

import pytest
import torch
from test_modeling import count_image_tokens, left_padded_batch, random_pixels, single_image_inputs
from tiny_models import IMAGE_TOKEN_ID, native_twin, randomize_cli_modules, tiny_cli_model


@pytest.fixture(scope="module")
def trained():
    model = tiny_cli_model(seed=3)
    randomize_cli_modules(model)
    native = native_twin(model)
    return model, native, single_image_inputs(native, (150, 40), seed=5)


def forward(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {"image_sizes": torch.cat([i["image_sizes"]] * 2)}, r"pixel_values` holds 1 images but `image_sizes` describes 2"),
        (lambda i: {"image_sizes": torch.tensor([[0, 40]])}, r"image_sizes` must be positive .*\[\(0, 40\)\]"),
        (lambda i: {"image_sizes": torch.tensor([[-150, 40]])}, r"image_sizes` must be positive"),
        (lambda i: {"image_sizes": torch.tensor([[150.0, 40.0]])}, r"image_sizes` must be integer \(height, width\) pairs"),
        (lambda i: {"image_sizes": torch.tensor([150, 40])}, r"image_sizes` must be integer \(height, width\) pairs"),
        (lambda i: {"image_sizes": torch.tensor([[150, 400]])}, r"Image 0 of size \(150, 400\) needs \d+ crops but `pixel_values` holds at most 13"),
        (lambda i: {"pixel_values": i["pixel_values"][0, :5]}, r"pixel_values` holds 5 crops but `image_sizes` describes images of 13 crops"),
        (lambda i: {"pixel_values": i["pixel_values"][0, 0]}, r"pixel_values` must have 4 or 5 dimensions, got shape \(3, 28, 28\)"),
        (lambda i: {"batch_num_images": torch.tensor([2])}, r"batch_num_images` \[2\] adds up to 2 images but `image_sizes` describes 1"),
        (lambda i: {"batch_num_images": torch.tensor([-1, 2])}, r"batch_num_images"),
        (lambda i: {"vision_aspect_ratio": "anyres"}, r"vision_aspect_ratio`='anyres' is not supported.*'anyres_max_N'"),
        (lambda i: {"vision_aspect_ratio": "anyres_max_x"}, r"vision_aspect_ratio"),
        (lambda i: {"vision_feature_layer": 99}, r"vision_feature_layer`=99 is out of range .* 6 hidden states \(allowed: -6\.\.5\)"),
        (lambda i: {"vision_feature_layer": [-2, -1]}, r"vision_feature_layer` must be one int"),
    ],
)
def test_contradicting_image_inputs_name_both_sides(trained, change, message):
    model, _, inputs = trained
    assert inputs["pixel_values"].shape[1] == 13  # (150, 40): a 6 x 2 grid + the base view
    with pytest.raises(ValueError, match=message):
        forward(model, **{**inputs, **change(inputs)})


def test_four_dimensional_pixel_values_are_checked_too(trained):
    model, _, inputs = trained
    flat = inputs["pixel_values"][0]  # (13 crops, 3, H, W)
    reference = forward(model, **inputs).logits
    assert torch.equal(forward(model, **{**inputs, "pixel_values": flat}).logits, reference)
    with pytest.raises(ValueError, match="holds 14 crops but `image_sizes` describes images of 13 crops"):
        forward(model, **{**inputs, "pixel_values": torch.cat([flat, flat[:1]])})


def test_generate_returns_the_prefill_gates(trained):
    model, native, _ = trained
    inputs = left_padded_batch(native)
    with torch.no_grad():
        expected = model(**inputs, output_gate_weights=True).gate_weights
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_gate_weights=True,
                                return_dict_in_generate=True)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False, output_gate_weights=True,
                               return_dict_in_generate=True)
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(output.sequences, plain)
    assert output.gate_weights.shape == expected.shape == (2, 2, 3)
    assert (output.gate_weights - expected).abs().max().item() <= 1e-6
    # generate expands every prompt for its beams before prefill: rows 2b and 2b + 1 belong to prompt b
    assert (beams.gate_weights - expected.repeat_interleave(2, dim=1)).abs().max().item() <= 1e-6
    assert not hasattr(model, "_prefill_gate_weights")  # nothing is left on the model


def test_generate_gate_weights_need_a_dict_output(trained):
    model, _, inputs = trained
    with pytest.raises(ValueError, match=r"output_gate_weights=True.*return_dict_in_generate=True"):
        model.generate(**inputs, max_new_tokens=2, output_gate_weights=True)


def test_a_second_turn_with_images_on_a_reused_cache_says_why_it_cannot_work(trained):
    model, native, inputs = trained
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    generator = torch.Generator().manual_seed(6)
    pixel_values = random_pixels((50, 90), generator)
    (count,) = count_image_tokens(native, pixel_values, torch.tensor([(50, 90)]))
    second_turn = torch.cat([first.sequences, torch.tensor([[7] + [IMAGE_TOKEN_ID] * count + [8]])], dim=1)
    with pytest.raises(ValueError, match=r"continues a cache of \d+ tokens \(a second chat turn on a reused "
                                         r"`past_key_values`.*without `past_key_values`"):
        model.generate(input_ids=second_turn, pixel_values=pixel_values, image_sizes=torch.tensor([(50, 90)]),
                       past_key_values=first.past_key_values, max_new_tokens=2)
