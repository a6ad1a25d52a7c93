"""
AGF's folded form (`agf_form="folded"`, `fold_agf()`) against the attention form as the reference: the same logits,
gates and tokens from the same weights, a folder that reloads as folded, CLI-7B's parameter counts, and training.
"""

import copy
import json

import pytest
import torch
from test_modeling import (
    IMAGE_SIZES,
    count_image_tokens,
    left_padded_batch,
    random_pixels,
    single_image_inputs,
)
from test_remote_code import run_offline
from tiny_models import IMAGE_TOKEN_ID, native_twin, randomize_cli_modules, tiny_cli_model
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from configuration_cli import CLIConfig
from modeling_cli import CLIFoldedSingleQueryAttention, CLIForConditionalGeneration, CLISingleQueryAttention

LOGIT_TOLERANCE = 1e-5
GATE_TOLERANCE = 1e-6


def attention_and_folded(attn_implementation="eager", seed=3):
    attention = tiny_cli_model(seed=seed, attn_implementation=attn_implementation)
    randomize_cli_modules(attention)
    folded = copy.deepcopy(attention).fold_agf()
    return attention, folded


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def twins(request):
    attention, folded = attention_and_folded(request.param)
    return attention, folded, native_twin(attention)


def assert_same_outputs(attention, folded, inputs):
    with torch.no_grad():
        expected = attention(**inputs, output_gate_weights=True)
        actual = folded(**inputs, output_gate_weights=True)
    keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    assert (actual.logits - expected.logits)[keep].abs().max().item() <= LOGIT_TOLERANCE
    assert (actual.gate_weights - expected.gate_weights).abs().max().item() <= GATE_TOLERANCE
    return expected


def test_fold_agf_replaces_every_attention_and_updates_the_config():
    attention, folded = attention_and_folded()
    assert attention.config.agf_form == "attention" and folded.config.agf_form == "folded"
    for agf in folded.model.language_model.agf.values():
        for module in (agf.vision_attention, agf.context_attention):
            assert isinstance(module, CLIFoldedSingleQueryAttention)
            assert module.score_vectors.shape == (64, 4) and module.value_vectors.shape == (64, 4)
    assert isinstance(attention.model.language_model.agf["3"].context_attention, CLISingleQueryAttention)
    assert folded.fold_agf() is folded  # folding twice changes nothing
    attention_params = sum(p.numel() for n, p in attention.named_parameters() if ".agf." in n)
    folded_params = sum(p.numel() for n, p in folded.named_parameters() if ".agf." in n)
    # per injection layer: 2 x (4 d^2 + 4 d biases + query + readout) -> 2 x (2 d heads + 1), plus K gate biases
    assert attention_params == 2 * (2 * (4 * 64 * 64 + 6 * 64) + 3)
    assert folded_params == 2 * (2 * (2 * 64 * 4 + 1) + 3)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_folded_equals_attention_form_for_single_images(twins, size):
    attention, folded, native = twins
    expected = assert_same_outputs(attention, folded, single_image_inputs(native, size, seed=7))
    assert expected.gate_weights.abs().min() > 1e-3  # the injection really runs


def test_folded_equals_attention_form_for_a_multi_image_prompt(twins):
    attention, folded, native = twins
    generator = torch.Generator().manual_seed(8)
    sizes = [(50, 90), (150, 40)]
    pixel_values = torch.cat([random_pixels(size, generator)[:, :1] for size in sizes])
    image_sizes, batch_num_images = torch.tensor(sizes), torch.tensor([2])
    counts = count_image_tokens(native, pixel_values, image_sizes, batch_num_images)
    ids = [1, 2] + [IMAGE_TOKEN_ID] * counts[0] + [3] + [IMAGE_TOKEN_ID] * counts[1] + [4, 5]
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_sizes=image_sizes,
                  batch_num_images=batch_num_images)
    assert_same_outputs(attention, folded, inputs)


def test_folded_equals_attention_form_for_a_left_padded_batch_with_a_text_only_sample(twins):
    attention, folded, native = twins
    image_inputs = single_image_inputs(native, (150, 40), seed=9)
    image_row = image_inputs["input_ids"][0].tolist()
    text_row = [9, 8, 7, 6, 5]
    length = len(image_row)
    inputs = dict(
        input_ids=torch.tensor([image_row, [0] * (length - len(text_row)) + text_row]),
        attention_mask=torch.tensor([[1] * length, [0] * (length - len(text_row)) + [1] * len(text_row)]),
        pixel_values=image_inputs["pixel_values"],
        image_sizes=image_inputs["image_sizes"],
    )
    expected = assert_same_outputs(attention, folded, inputs)
    assert expected.gate_weights[:, 1].abs().max() == 0  # the text-only sample gets no injection
    assert_same_outputs(attention, folded, left_padded_batch(native))  # two images of different sizes


def test_folded_generates_the_same_greedy_and_beam_tokens(twins):
    attention, folded, native = twins
    inputs = left_padded_batch(native)
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        with torch.no_grad():
            expected = attention.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **kwargs)
            actual = folded.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **kwargs)
        assert torch.equal(actual, expected), kwargs


def test_zero_gates_fold_to_exactly_the_base_model():
    """A fresh model (zero gates) stays LLaVA-OneVision after folding, and a fresh folded model is one too."""
    fresh = tiny_cli_model(seed=4)
    fresh_folded = tiny_cli_model(seed=4, agf_form="folded")
    for model, native in ((copy.deepcopy(fresh).fold_agf(), native_twin(fresh)), (fresh_folded, native_twin(fresh_folded))):
        inputs = single_image_inputs(native, (150, 40))
        with torch.no_grad():
            expected = native(**inputs).logits
            output = model(**inputs, output_gate_weights=True)
        assert output.gate_weights.abs().max() == 0
        assert (output.logits - expected).abs().max().item() <= LOGIT_TOLERANCE


def test_fold_keeps_the_model_dtype():
    attention, _ = attention_and_folded()
    folded = copy.deepcopy(attention).to(torch.bfloat16).fold_agf()
    agf = folded.model.language_model.agf["1"]
    assert agf.vision_attention.score_vectors.dtype == torch.bfloat16
    # the float64 fold, rounded once: closer to the exact vectors than a bf16 computation of them would be
    exact = attention.model.language_model.agf["1"].vision_attention.fold(torch.float64)[0]
    error = (agf.vision_attention.score_vectors.double() - exact).abs().max()
    assert error <= exact.abs().max() * 2**-8


def test_saved_folded_model_reloads_as_folded_in_a_fresh_process(tmp_path):
    attention, folded = attention_and_folded()
    folded.save_pretrained(tmp_path / "folded")
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert config["agf_form"] == "folded"
    with open(tmp_path / "folded" / "model.safetensors", "rb") as handle:
        header = handle.read(8 + int.from_bytes(handle.read(8), "little"))
    assert b"score_vectors" in header and b"query_weight" not in header
    native = native_twin(attention)
    inputs = single_image_inputs(native, (50, 90), seed=11)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = attention(**inputs, output_gate_weights=True)
    torch.save({"logits": expected.logits, "gates": expected.gate_weights}, tmp_path / "expected.pt")
    output = run_offline(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "folded")!r}, trust_remote_code=True).eval()
        assert model.config.agf_form == "folded", model.config.agf_form
        assert type(model.model.language_model.agf["1"].vision_attention).__name__ == "CLIFoldedSingleQueryAttention"
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            output = model(**inputs, output_gate_weights=True)
        print((output.logits - expected["logits"]).abs().max().item(), (output.gate_weights - expected["gates"]).abs().max().item())
        """,
        tmp_path,
    )
    logit_error, gate_error = map(float, output.split())
    assert logit_error <= LOGIT_TOLERANCE and gate_error <= GATE_TOLERANCE


def cli_7b_config(agf_form):
    """CLI-7B's sizes: Qwen2-7B, SigLIP-so400m without its last layer (26), RANGE-1-28-4 for both layer lists."""
    text = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
    return CLIConfig(text_config=text, vision_extraction_layers="RANGE-1-28-4", llm_injection_layers="RANGE-1-28-4",
                     agf_form=agf_form)


def parameter_counts(model) -> dict[str, int]:
    counts = {}
    for name, param in model.named_parameters():
        group = CLIForConditionalGeneration.parameter_group(name)
        counts[group] = counts.get(group, 0) + param.numel()
    return counts


def test_cli_7b_parameter_counts_from_the_config_alone():
    with torch.device("meta"):
        folded = parameter_counts(CLIForConditionalGeneration(cli_7b_config("folded")))
        attention = parameter_counts(CLIForConditionalGeneration(cli_7b_config("attention")))
        base_config = cli_7b_config("attention").to_dict()
        for key in ("vision_extraction_layers", "llm_injection_layers", "amp_lora_rank", "amp_lora_alpha",
                    "agf_num_heads", "agf_form", "auto_map", "model_type", "architectures"):
            base_config.pop(key, None)
        native = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**base_config))
        native_total = sum(p.numel() for p in native.parameters())
    heads, width, injections, extractions = 28, 3584, 7, 7
    assert folded["agf"] == injections * (2 * (2 * width * heads + 1) + extractions)  # 2,809,919
    assert folded["agf"] <= 3_000_000
    assert attention["agf"] == injections * (2 * (4 * width * width + 6 * width) + extractions)
    for group in ("vision_tower", "projector", "llm"):
        assert folded[group] == attention[group]
    assert folded["vision_tower"] + folded["projector"] + folded["llm"] == native_total  # the base is LLaVA-OV-7B
    additions = folded["amp"] + folded["agf"]
    assert additions / native_total <= 0.0005  # <= 0.05 % of LLaVA-OV-7B (the attention form adds ~9 %)
    assert (attention["amp"] + attention["agf"]) / native_total > 0.08


def test_folded_form_trains_the_cli_modules_only():
    """set_trainable("cli") on a folded model: a few steps move AMP and the folded AGF, the base stays bit-identical."""
    model = tiny_cli_model(seed=5, agf_form="folded").train()
    summary = model.set_trainable("cli", verbose=False)
    assert summary["agf"] == (sum(p.numel() for n, p in model.named_parameters() if ".agf." in n),) * 2
    native = native_twin(model)
    inputs = single_image_inputs(native, (150, 40), seed=12)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -3:] = inputs["input_ids"][0, -3:]
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        group = CLIForConditionalGeneration.parameter_group(name)
        if group in ("amp", "agf"):
            assert changed or name.endswith("lora_A"), name  # A only moves once B is non-zero
        else:
            assert not changed, name
    with torch.no_grad():
        gates = model(**inputs, output_gate_weights=True).gate_weights
    assert gates.abs().min() > 0  # the folded gates left zero


def test_folded_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_cli_model(seed=6, agf_form="folded")
    randomize_cli_modules(model)
    model.set_trainable("cli", verbose=False)
    model.train()
    inputs = single_image_inputs(native_twin(model), (50, 90), seed=13)
    labels = inputs["input_ids"].clone()

    def gradients():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any(".agf." in n for n in plain)
    for name in plain:
        assert (plain[name] - checkpointed[name]).abs().max().item() <= 1e-6, name


def test_folded_form_with_peft_modules_to_save():
    peft = pytest.importorskip("peft")
    from training_cli import cli_peft_config

    model = tiny_cli_model(seed=7, agf_form="folded")
    randomize_cli_modules(model)
    inputs = single_image_inputs(native_twin(model), (50, 90), seed=14)
    peft_model = peft.get_peft_model(model, cli_peft_config(model, r=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("score_vectors" in n for n in trainable) and any("value_vectors" in n for n in trainable)
    assert any("lora_A" in n and "language_model.layers" in n for n in trainable)
    with torch.no_grad():
        before = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()
        assert (merged(**inputs).logits - before).abs().max().item() <= 1e-5
