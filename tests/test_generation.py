"""generate(): cache modes, beams, sampled returns, static cache, chunked prefill, offloading; injection only at prefill."""

import pytest
import torch
from test_modeling import left_padded_batch, single_image_inputs
from tiny_models import IMAGE_SIZE, PINPOINTS, native_twin, randomize_cli_modules, tiny_cli_model
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_and_inputs():
    cli = tiny_cli_model(seed=7)
    randomize_cli_modules(cli, seed=8)
    native = native_twin(cli)
    return cli, single_image_inputs(native, (150, 40), seed=9), left_padded_batch(native, sizes=((50, 90), (60, 30)), seed=10)


def greedy(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    return model.generate(**inputs, **kwargs)[:, -NEW_TOKENS:]


def count_agf_calls(model):
    calls = []
    handles = [agf.register_forward_hook(lambda *_: calls.append(1)) for agf in model.model.language_model.agf.values()]
    return calls, handles


def test_greedy_with_and_without_cache_and_static_cache_agree(model_and_inputs):
    cli, inputs, _ = model_and_inputs
    with_cache = greedy(cli, inputs)
    assert torch.equal(with_cache, greedy(cli, inputs, use_cache=False))
    assert torch.equal(with_cache, greedy(cli, inputs, cache_implementation="static"))


def test_injection_runs_once_per_prompt_at_prefill(model_and_inputs):
    cli, inputs, batch = model_and_inputs
    for model_inputs in (inputs, batch):
        calls, handles = count_agf_calls(cli)
        try:
            greedy(cli, model_inputs)
        finally:
            for handle in handles:
                handle.remove()
        assert len(calls) == len(cli.config.llm_injection_layers)  # one call per AGF layer, none on decode steps


def test_greedy_batch_equals_each_prompt_alone(model_and_inputs):
    cli, _, batch = model_and_inputs
    batched = greedy(cli, batch)
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        crops = image_size_to_num_patches(tuple(batch["image_sizes"][i].tolist()), PINPOINTS, IMAGE_SIZE)
        alone = dict(
            input_ids=batch["input_ids"][i : i + 1, keep],
            pixel_values=batch["pixel_values"][i : i + 1, :crops],
            image_sizes=batch["image_sizes"][i : i + 1],
        )
        assert torch.equal(batched[i], greedy(cli, alone)[0])


def test_beam_search_expands_the_injected_features_per_prompt(model_and_inputs):
    cli, inputs, batch = model_and_inputs
    beams = greedy(cli, batch, num_beams=2)
    assert torch.equal(beams, greedy(cli, batch, num_beams=2, use_cache=False))
    # each prompt's beams must read that prompt's images: the batch gives what each prompt gives alone
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        crops = image_size_to_num_patches(tuple(batch["image_sizes"][i].tolist()), PINPOINTS, IMAGE_SIZE)
        alone = dict(
            input_ids=batch["input_ids"][i : i + 1, keep],
            pixel_values=batch["pixel_values"][i : i + 1, :crops],
            image_sizes=batch["image_sizes"][i : i + 1],
        )
        assert torch.equal(beams[i], greedy(cli, alone, num_beams=2)[0])


def test_num_return_sequences_with_sampling(model_and_inputs):
    cli, _, batch = model_and_inputs
    sample = dict(do_sample=True, num_return_sequences=2, top_k=0, temperature=1.0)
    torch.manual_seed(0)
    first = greedy(cli, batch, **sample)
    torch.manual_seed(0)
    second = greedy(cli, batch, **sample)
    assert first.shape == (4, NEW_TOKENS)
    assert torch.equal(first, second)
    # top_k=1 makes sampling greedy: every returned sequence then equals its prompt's greedy answer, which holds only
    # if the injected features were expanded with their prompt
    near_greedy = greedy(cli, batch, do_sample=True, num_return_sequences=2, top_k=1)
    expected = greedy(cli, batch).repeat_interleave(2, dim=0)
    assert torch.equal(near_greedy, expected)


def test_chunked_prefill_with_images_is_refused(model_and_inputs):
    cli, inputs, _ = model_and_inputs
    with pytest.raises(ValueError, match="prefill_chunk_size=16 cannot be used with images"):
        greedy(cli, inputs, prefill_chunk_size=16)


def test_image_tokens_after_a_cached_prefix_are_refused(model_and_inputs):
    cli, inputs, _ = model_and_inputs
    with torch.no_grad():
        prefix = cli(input_ids=inputs["input_ids"][:, :2], use_cache=True)
        with pytest.raises(ValueError, match="continues a cache of 2 tokens.*prefilled from an empty cache"):
            cli(**{**inputs, "input_ids": inputs["input_ids"][:, 2:]}, past_key_values=prefix.past_key_values)


def test_text_only_chunked_prefill_matches(model_and_inputs):
    cli, _, _ = model_and_inputs
    text = {"input_ids": torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])}
    assert torch.equal(greedy(cli, text, prefill_chunk_size=4), greedy(cli, text))


def test_device_map_auto_with_disk_offload_generates_the_same_tokens(model_and_inputs, tmp_path):
    cli, inputs, _ = model_and_inputs
    cli.save_pretrained(tmp_path / "model")
    offloaded = type(cli).from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": "150KB"},
        offload_folder=str(tmp_path / "offload"),
        attn_implementation="eager",
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    assert torch.equal(greedy(offloaded, inputs), greedy(cli, inputs))
