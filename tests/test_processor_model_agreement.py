"""The processor's image-token count equals the number of features the model packs, for every image size."""

import math

import pytest
import torch
from configuration_cli import CLIConfig
from modeling_cli import CLIModel
from PIL import Image
from processing_cli import CLIImageProcessor, CLIProcessor
from tiny_cli import build_tiny_tokenizer
from transformers.image_processing_utils import select_best_resolution

# Sizes (height, width) where LLaVA-NeXT's truncating unpad and transformers' rounding give different token counts
# (found by tests/test_processing.py's search), plus ordinary sizes and the anyres_max_9 interpolation regime.
DIFFERING_SIZES = [(47, 423), (423, 47), (94, 423), (369, 820), (820, 1107)]
ORDINARY_SIZES = [(1, 1), (384, 384), (500, 333), (300, 4000), (1600, 1200)]


@pytest.fixture(scope="module")
def processor_and_model():
    tokenizer = build_tiny_tokenizer()
    processor = CLIProcessor(image_processor=CLIImageProcessor(), tokenizer=tokenizer)
    config = CLIConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2, image_size=384, patch_size=14, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=len(tokenizer),
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_extraction_layers=[1],
        llm_injection_layers=[0],
        amp_lora_rank=2,
    )
    torch.manual_seed(0)
    return processor, CLIModel(config).eval()


def transformers_rounding_count(height, width, side=27, crop=384):
    """transformers' count (rounding), written out here to show that the test sizes really disagree."""
    best_height, best_width = select_best_resolution((height, width), [[crop * r, crop * c] for r in range(1, 7) for c in range(1, 7)])
    rows, cols = side * best_height // crop, side * best_width // crop
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
    ratio = math.sqrt(rows * cols / (9 * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * (cols + 1)


@pytest.mark.parametrize("size", DIFFERING_SIZES + ORDINARY_SIZES)
def test_processor_token_count_equals_model_features(processor_and_model, size):
    processor, model = processor_and_model
    height, width = size
    image = Image.new("RGB", (width, height), (90, 140, 200))
    inputs = processor(images=image, text="<image>\nWhat is it?", return_tensors="pt")
    num_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert [f.shape[0] for f in features.pooler_output] == [num_tokens]
    assert all(layer[0].shape[0] == num_tokens for layer in features.deepstack_features)
    if size in DIFFERING_SIZES:
        assert transformers_rounding_count(height, width) != num_tokens
    else:
        assert transformers_rounding_count(height, width) == num_tokens
