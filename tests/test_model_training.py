"""Loss and gradients, AGF's context excluding training targets, gradient checkpointing, attention backends."""

import sys

import pytest
import torch
from test_modeling import left_padded_batch, single_image_inputs
from tiny_models import IMAGE_TOKEN_ID, native_twin, randomize_cli_modules, tiny_cli_model

CLI_PARAMETER_MARKERS = (".amp.", ".agf.")


def answer_labels(input_ids, answer_length=3):
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer_length:] = input_ids[:, -answer_length:]
    return labels


@pytest.fixture(scope="module")
def trained():
    cli = tiny_cli_model(seed=11)
    randomize_cli_modules(cli, seed=12)
    return cli, single_image_inputs(native_twin(cli), (50, 90), seed=13)


def cli_gradients(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss, {
        name: param.grad.clone()
        for name, param in model.named_parameters()
        if any(marker in name for marker in CLI_PARAMETER_MARKERS)
    }


def test_labels_give_a_loss_and_gradients_reach_every_cli_parameter(trained):
    cli, inputs = trained
    cli.train()
    try:
        loss, gradients = cli_gradients(cli, inputs, answer_labels(inputs["input_ids"]))
    finally:
        cli.eval()
    assert torch.isfinite(loss) and loss.item() > 0
    cli_names = [n for n, _ in cli.named_parameters() if any(m in n for m in CLI_PARAMETER_MARKERS)]
    assert sorted(gradients) == sorted(cli_names)
    # The key bias only shifts every score of a head by the same amount, so its gradient is exactly zero in exact
    # arithmetic; every other CLI parameter must receive a real gradient.
    for name, grad in gradients.items():
        if name.endswith("key_bias"):
            assert grad.abs().max() < 1e-6, name
        else:
            assert grad.abs().max() > 0, name


def test_fresh_cli_modules_get_gradients_through_the_zero_gates():
    """At initialisation only the gates (and the LoRA B, through nothing) can move: the gates get a gradient."""
    cli = tiny_cli_model(seed=14)
    inputs = single_image_inputs(native_twin(cli), (150, 40), seed=15)
    cli.train()
    _, gradients = cli_gradients(cli, inputs, answer_labels(inputs["input_ids"]))
    for name, grad in gradients.items():
        if name.endswith(("readout_vector", "gate_bias")):
            assert grad.abs().max() > 0, name


def test_training_targets_are_excluded_from_agf_context(trained):
    cli, inputs = trained
    labels = answer_labels(inputs["input_ids"])
    changed = inputs["input_ids"].clone()
    changed[:, -3:] = torch.tensor([100, 101, 102])  # other answer tokens, same prompt
    assert not torch.equal(changed, inputs["input_ids"])
    with torch.no_grad():
        gates = cli(**inputs, labels=labels, output_gate_weights=True).gate_weights
        gates_changed = cli(**{**inputs, "input_ids": changed}, labels=labels, output_gate_weights=True).gate_weights
        gates_unmasked = cli(**inputs, output_gate_weights=True).gate_weights
        gates_unmasked_changed = cli(**{**inputs, "input_ids": changed}, output_gate_weights=True).gate_weights
    assert torch.equal(gates, gates_changed)  # the answer never reaches the gate
    assert not torch.allclose(gates_unmasked, gates_unmasked_changed)  # ...while an unlabelled context would see it
    assert not torch.allclose(gates, gates_unmasked)


def test_gradient_checkpointing_gives_the_same_gradients(trained):
    cli, inputs = trained
    labels = answer_labels(inputs["input_ids"])
    cli.train()
    try:
        loss, reference = cli_gradients(cli, inputs, labels)
        cli.activation_checkpointing_enable()
        assert cli.model.language_model.gradient_checkpointing
        loss_checkpointed, checkpointed = cli_gradients(cli, inputs, labels)
    finally:
        cli.activation_checkpointing_disable()
        cli.eval()
    assert abs(loss.item() - loss_checkpointed.item()) <= 1e-6
    for name in reference:
        assert (reference[name] - checkpointed[name]).abs().max().item() <= 1e-5, name


def test_eager_and_sdpa_agree():
    eager = tiny_cli_model(seed=16, attn_implementation="eager")
    randomize_cli_modules(eager, seed=17)
    sdpa = tiny_cli_model(seed=16, attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    inputs = left_padded_batch(native_twin(eager), seed=18)
    with torch.no_grad():
        expected = eager(**inputs, output_gate_weights=True)
        actual = sdpa(**inputs, output_gate_weights=True)
    keep = inputs["attention_mask"].bool()
    assert (expected.logits - actual.logits)[keep].abs().max().item() <= 1e-5
    assert (expected.gate_weights - actual.gate_weights).abs().max().item() <= 1e-5


def test_flash_attention_2_is_declared_and_not_imported():
    from modeling_cli import CLIForConditionalGeneration

    assert CLIForConditionalGeneration._supports_flash_attn
    assert CLIForConditionalGeneration._supports_sdpa
    if "flash_attn" not in sys.modules:  # importing our model must not pull flash-attn in
        import modeling_cli  # noqa: F401

        assert "flash_attn" not in sys.modules


def test_image_tokens_sampled_at_decode_embed_as_plain_tokens(trained):
    cli, inputs = trained
    with torch.no_grad():
        prefill = cli(**inputs, use_cache=True)
        step = cli(input_ids=torch.tensor([[IMAGE_TOKEN_ID]]), past_key_values=prefill.past_key_values)
    assert torch.isfinite(step.logits).all()


def test_set_trainable_selects_parameter_groups():
    cli = tiny_cli_model(seed=24)
    summary = cli.set_trainable("cli", verbose=False)
    for name, param in cli.named_parameters():
        assert param.requires_grad == any(marker in name for marker in CLI_PARAMETER_MARKERS), name
    assert summary["vision_tower"][0] == summary["llm"][0] == summary["projector"][0] == 0
    assert summary["amp"][0] == summary["amp"][1] == cli.model.amp.lora_A.numel() + cli.model.amp.lora_B.numel()
    assert sum(total for _, total in summary.values()) == sum(p.numel() for p in cli.parameters())
    summary = cli.set_trainable("cli+llm", verbose=False)
    assert summary["llm"][0] == summary["llm"][1] > 0 and summary["vision_tower"][0] == 0
    assert cli.lm_head.weight.requires_grad and not cli.model.multi_modal_projector.linear_1.weight.requires_grad
    summary = cli.set_trainable("all", verbose=False)
    assert all(param.requires_grad for param in cli.parameters())
    with pytest.raises(ValueError, match=r"set_trainable\('lora'\): choose one of"):
        cli.set_trainable("lora")
