"""
The CLI model against independent references:
- transformers' own LlavaOnevisionForConditionalGeneration with the same base weights (identity at initialisation);
- a plain per-sample, unfolded implementation of AGF written here with torch's multi-head attention.
"""

import pytest
import torch
from torch import nn
from tiny_models import (
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PINPOINTS,
    native_twin,
    randomize_cli_modules,
    tiny_cli_model,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

TOLERANCE = 1e-5
# (height, width): square base-only grid, landscape and portrait with unpad, and large grids that trigger the
# anyres_max_9 down-interpolation (ratio > 1.1). All sizes where LLaVA-NeXT's truncating unpad and transformers'
# rounding agree, so the native model is a valid reference.
IMAGE_SIZES = [(28, 28), (50, 90), (150, 40), (168, 168), (300, 120)]


def random_pixels(size, generator):
    crops = image_size_to_num_patches(size, PINPOINTS, IMAGE_SIZE)
    return torch.randn(1, crops, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def count_image_tokens(native, pixel_values, image_sizes, batch_num_images=None):
    features = native.model.get_image_features(pixel_values, image_sizes, batch_num_images=batch_num_images)
    return [feature.shape[0] for feature in features.pooler_output]


def prompt(num_image_tokens, before=(1, 2, 3), after=(4, 5, 6, 7)):
    return list(before) + [IMAGE_TOKEN_ID] * num_image_tokens + list(after)


@pytest.fixture(scope="module", params=["attention", "folded"])
def models(request):
    """A fresh CLI model (zero gates) in either AGF form, and its native twin: the identity tests run for both."""
    cli = tiny_cli_model()
    native = native_twin(cli)
    return (cli.fold_agf() if request.param == "folded" else cli), native


@pytest.fixture(scope="module")
def trained_models():
    """A CLI model whose gates and LoRA are non-zero, with its native twin."""
    cli = tiny_cli_model(seed=3)
    randomize_cli_modules(cli)
    return cli, native_twin(cli)


def single_image_inputs(native, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = random_pixels(size, generator)
    image_sizes = torch.tensor([size])
    (num_tokens,) = count_image_tokens(native, pixel_values, image_sizes)
    return {"input_ids": torch.tensor([prompt(num_tokens)]), "pixel_values": pixel_values, "image_sizes": image_sizes}


# ----------------------------------------------------------------------------------------------------------------------
# Identity at initialisation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_identity_at_init_one_image(models, size):
    cli, native = models
    inputs = single_image_inputs(native, size)
    with torch.no_grad():
        expected = native(**inputs).logits
        actual = cli(**inputs).logits
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_identity_at_init_two_images_in_one_prompt(models):
    cli, native = models
    generator = torch.Generator().manual_seed(1)
    sizes = [(50, 90), (150, 40)]
    pixel_values = torch.cat([random_pixels(size, generator)[:, :1] for size in sizes])  # base view of each image
    image_sizes = torch.tensor(sizes)
    batch_num_images = torch.tensor([2])
    counts = count_image_tokens(native, pixel_values, image_sizes, batch_num_images)
    assert counts == [16 + 1, 16 + 1]  # multi-image: base view + one newline per image
    ids = [1, 2] + [IMAGE_TOKEN_ID] * counts[0] + [3] + [IMAGE_TOKEN_ID] * counts[1] + [4, 5]
    inputs = dict(
        input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_sizes=image_sizes, batch_num_images=batch_num_images
    )
    with torch.no_grad():
        assert (cli(**inputs).logits - native(**inputs).logits).abs().max().item() <= TOLERANCE


def test_identity_at_init_text_only(models):
    cli, native = models
    input_ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        assert (cli(input_ids=input_ids).logits - native(input_ids=input_ids).logits).abs().max().item() <= TOLERANCE


def left_padded_batch(native, sizes=((50, 90), (168, 168)), seed=2):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = [random_pixels(size, generator)[0] for size in sizes]
    max_crops = max(p.shape[0] for p in pixel_values)
    padded_pixels = torch.zeros(len(sizes), max_crops, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, p in enumerate(pixel_values):
        padded_pixels[i, : p.shape[0]] = p
    image_sizes = torch.tensor(sizes)
    counts = count_image_tokens(native, padded_pixels, image_sizes)
    rows = [prompt(counts[0], after=(4, 5, 6, 7, 8, 9, 10)), prompt(counts[1], after=(11,))]
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=padded_pixels, image_sizes=image_sizes)


def test_identity_at_init_left_padded_batch(models):
    cli, native = models
    inputs = left_padded_batch(native)
    assert inputs["attention_mask"].sum(-1).tolist()[0] != inputs["attention_mask"].sum(-1).tolist()[1]
    with torch.no_grad():
        expected = native(**inputs).logits
        actual = cli(**inputs).logits
    keep = inputs["attention_mask"].bool()
    assert (actual - expected)[keep].abs().max().item() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------------------
# AGF against a plain reference
# ----------------------------------------------------------------------------------------------------------------------


def reference_attention(attention, tokens):
    """Standard, unfolded multi-head attention of the module's query over `tokens` (T, d), with torch's implementation."""
    d = attention.query_vector.shape[0]
    output, _ = nn.functional.multi_head_attention_forward(
        attention.query_vector.view(1, 1, d),
        tokens.unsqueeze(1),
        tokens.unsqueeze(1),
        embed_dim_to_check=d,
        num_heads=attention.num_heads,
        in_proj_weight=torch.cat([attention.query_weight, attention.key_weight, attention.value_weight]),
        in_proj_bias=torch.cat([attention.query_bias, attention.key_bias, attention.value_bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=attention.output_weight,
        out_proj_bias=attention.output_bias,
        training=False,
        need_weights=False,
    )
    return output.view(d)


def reference_gates(agf, hidden_states, layer_features, image_mask, context_mask):
    """g[b, k] = tanh(w . [MHA_v(q_v; V_bk) ; MHA_h(q_h; H_b[ctx])] + c_k), one sample and one layer at a time."""
    gates = torch.zeros(hidden_states.shape[0], layer_features.shape[0])
    token_sample = image_mask.nonzero()[:, 0]
    for b in range(hidden_states.shape[0]):
        if not (token_sample == b).any():
            continue
        context = reference_attention(agf.context_attention, hidden_states[b][context_mask[b]])
        gate_weight = torch.cat([agf.vision_attention.readout_vector, agf.context_attention.readout_vector])
        for k in range(layer_features.shape[0]):
            vision = reference_attention(agf.vision_attention, layer_features[k][token_sample == b])
            gates[b, k] = torch.tanh(gate_weight @ torch.cat([vision, context]) + agf.gate_bias[k])
    return gates


def reference_injection(hidden_states, layer_features, image_mask, gates):
    injected = hidden_states.clone()
    token_sample = image_mask.nonzero()[:, 0]
    for t, (b, s) in enumerate(image_mask.nonzero().tolist()):
        injected[b, s] += sum(gates[b, k] * layer_features[k, t] for k in range(layer_features.shape[0]))
    assert token_sample.numel() == layer_features.shape[1]
    return injected


def test_folded_agf_equals_plain_multi_head_attention(trained_models):
    cli, _ = trained_models
    agf = cli.model.language_model.agf["1"]
    generator = torch.Generator().manual_seed(5)
    batch, seq, d = 3, 12, cli.config.text_config.hidden_size
    hidden_states = torch.randn(batch, seq, d, generator=generator)
    image_mask = torch.zeros(batch, seq, dtype=torch.bool)
    image_mask[0, 2:6] = True
    image_mask[2, 5:11] = True  # sample 1 has no image
    context_mask = torch.ones(batch, seq, dtype=torch.bool)
    context_mask[0, :2] = False  # left padding
    context_mask[2, 11:] = False  # a training target
    layer_features = torch.randn(len(cli.config.vision_extraction_layers), int(image_mask.sum()), d, generator=generator)
    with torch.no_grad():
        injected, gates = agf(hidden_states, layer_features, image_mask.nonzero(as_tuple=True), context_mask)
        expected_gates = reference_gates(agf, hidden_states, layer_features, image_mask, context_mask)
        expected = reference_injection(hidden_states, layer_features, image_mask, expected_gates)
    assert gates.shape == (batch, layer_features.shape[0])
    assert gates[1].abs().max() == 0  # no image, no gate
    assert gates[[0, 2]].abs().min() > 0
    assert (gates - expected_gates).abs().max().item() <= TOLERANCE
    assert (injected - expected).abs().max().item() <= TOLERANCE


def test_nonzero_gates_change_only_image_positions_by_the_gated_sum(trained_models):
    """At the first injection layer, CLI's input = native's input + sum_k g_k V_k at image positions, nothing else."""
    cli, native = trained_models
    inputs = single_image_inputs(native, (50, 90), seed=4)
    first_layer = cli.config.llm_injection_layers[0]
    captured = {}

    def capture(name):
        def hook(module, args, kwargs):
            captured[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    handles = [
        cli.model.language_model.layers[first_layer].register_forward_pre_hook(capture("cli"), with_kwargs=True),
        native.model.language_model.layers[first_layer].register_forward_pre_hook(capture("native"), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            cli_out = cli(**inputs, output_gate_weights=True)
            native(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    # V_k built independently: native vision tower hidden states -> native projector + the LoRA -> native packing
    with torch.no_grad():
        vision = native.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states
        amp = cli.model.amp
        per_layer = []
        for k, layer in enumerate(cli.config.vision_extraction_layers):
            features = vision[layer]
            projected = native.model.multi_modal_projector(features) + amp.scaling * (
                features @ amp.lora_A[k].T @ amp.lora_B[k].T
            )
            packed, _ = native.model.pack_image_features(
                [projected], inputs["image_sizes"], image_newline=native.model.image_newline
            )
            per_layer.append(packed[0])
        layer_features = torch.stack(per_layer)

    image_mask = inputs["input_ids"] == IMAGE_TOKEN_ID
    context_mask = torch.ones_like(image_mask)
    agf = cli.model.language_model.agf[str(first_layer)]
    with torch.no_grad():
        gates = reference_gates(agf, captured["native"], layer_features, image_mask, context_mask)
        expected = reference_injection(captured["native"], layer_features, image_mask, gates)

    difference = captured["cli"] - captured["native"]
    assert difference[~image_mask].abs().max().item() == 0
    assert difference[image_mask].abs().max().item() > 1e-3
    assert (captured["cli"] - expected).abs().max().item() <= TOLERANCE
    assert (cli_out.gate_weights[0] - gates).abs().max().item() <= TOLERANCE


def test_gate_weights_output_shape(trained_models):
    cli, native = trained_models
    inputs = left_padded_batch(native)
    with torch.no_grad():
        output = cli(**inputs, output_gate_weights=True)
        assert cli(**inputs).gate_weights is None
    num_injection, num_extraction = len(cli.config.llm_injection_layers), len(cli.config.vision_extraction_layers)
    assert output.gate_weights.shape == (num_injection, 2, num_extraction)
    assert torch.all(output.gate_weights.abs() < 1)  # tanh


def test_batch_equals_single_samples(trained_models):
    """Per-sample image features and gates stay with their sample in a left-padded batch."""
    cli, native = trained_models
    inputs = left_padded_batch(native)
    with torch.no_grad():
        batched = cli(**inputs, output_gate_weights=True)
    for i in range(2):
        keep = inputs["attention_mask"][i].bool()
        crops = image_size_to_num_patches(tuple(inputs["image_sizes"][i].tolist()), PINPOINTS, IMAGE_SIZE)
        single = dict(
            input_ids=inputs["input_ids"][i : i + 1, keep],
            pixel_values=inputs["pixel_values"][i : i + 1, :crops],
            image_sizes=inputs["image_sizes"][i : i + 1],
        )
        with torch.no_grad():
            alone = cli(**single, output_gate_weights=True)
        assert (batched.logits[i, keep] - alone.logits[0]).abs().max().item() <= 1e-4
        assert (batched.gate_weights[:, i] - alone.gate_weights[:, 0]).abs().max().item() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_image_token_count_mismatch_is_a_clear_error(models):
    cli, native = models
    inputs = single_image_inputs(native, (50, 90))
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :3], inputs["input_ids"][:, 5:]], dim=1)  # 2 fewer
    with pytest.raises(ValueError, match=r"holds 134 image tokens .* give 136 features"):
        cli(**inputs)


def test_pixel_values_without_image_tokens_is_a_clear_error(models):
    cli, native = models
    inputs = single_image_inputs(native, (50, 90))
    inputs["input_ids"] = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="holds 0 image tokens"):
        cli(**inputs)


def test_image_tokens_without_pixels_embed_as_plain_tokens(models):
    cli, native = models
    input_ids = torch.tensor([[1, 2, IMAGE_TOKEN_ID, 3]])
    with torch.no_grad():
        assert (cli(input_ids=input_ids).logits - native(input_ids=input_ids).logits).abs().max().item() <= TOLERANCE


def test_video_inputs_are_refused_clearly(models):
    cli, _ = models
    with pytest.raises(ValueError, match="video"):
        cli(input_ids=torch.tensor([[1, 2]]), pixel_values_videos=torch.zeros(1, 1, 3, IMAGE_SIZE, IMAGE_SIZE))
