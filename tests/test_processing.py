# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Tests of `processing_cli`: LLaVA-NeXT-faithful image processing and token counts, the `qwen_1_5` chat template,
save/load as remote code, and clear errors on bad input.

Two references: transformers' own LLaVA-OneVision processor configured like CLI (same tokenizer, pinpoints, mean/std
0.5), and an independent plain-PIL / torch re-implementation of LLaVA-NeXT's `process_anyres_image`, `expand2square`
and feature packing (`unpad_image` + `anyres_max_9` interpolation) written below from the LLaVA-NeXT source.
"""

import base64
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

import processing_cli
from tiny_cli import build_tiny_tokenizer
from processing_cli import (
    CLI_CHAT_TEMPLATE,
    CLIImageProcessor,
    CLIProcessor,
    add_cli_special_tokens,
    unpadded_grid_shape,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

# (height, width): tiny, square, portrait, landscape, extreme aspect ratios, up to 4000x300 both ways.
SIZES = [
    (1, 1),
    (1, 7),
    (7, 1),
    (27, 400),
    (100, 100),
    (384, 384),
    (383, 385),
    (300, 500),
    (500, 300),
    (480, 640),
    (1000, 37),
    (900, 1100),
    (300, 4000),
    (4000, 300),
]


# ---------------------------------------------------------------------------------------------------------------------
# Independent LLaVA-NeXT reference (llava/mm_utils.py, llava/model/llava_arch.py, SigLipImageProcessor), plain PIL/torch.
# ---------------------------------------------------------------------------------------------------------------------
def next_select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def next_resize_and_pad_image(image, target_resolution):
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def next_siglip_preprocess(image):
    image = image.convert("RGB").resize((384, 384), Image.BICUBIC)
    array = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    array = (array - np.float32(0.5)) / np.float32(0.5)
    return array.transpose(2, 0, 1)


def next_process_anyres_image(image, grid_pinpoints=PINPOINTS):
    best = next_select_best_resolution(image.size, grid_pinpoints)
    padded = next_resize_and_pad_image(image, best)
    patches = [
        padded.crop((left, top, left + 384, top + 384))
        for top in range(0, padded.height, 384)
        for left in range(0, padded.width, 384)
    ]
    views = [image.resize((384, 384))] + patches
    return np.stack([next_siglip_preprocess(view) for view in views])


def next_expand2square(image, background_color=(127, 127, 127)):
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def next_num_image_tokens(height, width, patch=27, max_num_patches=9):
    """Tokens of one image in LLaVA-NeXT's spatial_unpad + anyres_max_9 packing, on an actual tensor."""
    best_width, best_height = next_select_best_resolution((width, height), PINPOINTS)
    feature = torch.zeros(1, best_height // 384 * patch, best_width // 384 * patch)
    current_height, current_width = feature.shape[1:]
    if width / height > current_width / current_height:
        new_height = int(height * (current_width / width))
        padding = (current_height - new_height) // 2
        feature = feature[:, padding : current_height - padding, :]
    else:
        new_width = int(width * (current_height / height))
        padding = (current_width - new_width) // 2
        feature = feature[:, :, padding : current_width - padding]
    _, kept_height, kept_width = feature.shape
    times = math.sqrt(kept_height * kept_width / (max_num_patches * patch**2))
    if times > 1.1:
        feature = torch.nn.functional.interpolate(
            feature[None], [int(kept_height // times), int(kept_width // times)], mode="bilinear"
        )[0]
    _, rows, cols = feature.shape
    return patch * patch + rows * (cols + 1)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------
class TransformersReferenceProcessor(LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor, unchanged except that it takes no video processor (none without
    torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return CLIProcessor(CLIImageProcessor(), tokenizer)


@pytest.fixture(scope="module")
def reference(tokenizer):
    image_processor = LlavaOnevisionImageProcessorPil(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], image_grid_pinpoints=PINPOINTS
    )
    return TransformersReferenceProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        chat_template=CLI_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def random_image(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + 7 * height + 13 * width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def prompt(question="What is this?", images=1):
    return f"{SYSTEM}<|im_start|>user\n" + "<image>\n" * images + f"{question}<|im_end|>\n<|im_start|>assistant\n"


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def test_add_cli_special_tokens():
    tokenizer = build_tiny_tokenizer(add_multimodal_tokens=False)
    length = len(tokenizer)
    ids = add_cli_special_tokens(tokenizer)
    assert ids == {"image_token_id": length, "video_token_id": length + 1}
    assert add_cli_special_tokens(tokenizer) == ids and len(tokenizer) == length + 2  # idempotent
    for token_id in ids.values():
        added = tokenizer.added_tokens_decoder[token_id]
        assert added.special and not added.normalized and not added.lstrip and not added.rstrip
    assert tokenizer(" a<image> b").input_ids.count(ids["image_token_id"]) == 1
    with pytest.raises(ValueError, match="add_cli_special_tokens"):
        CLIProcessor(CLIImageProcessor(), build_tiny_tokenizer(add_multimodal_tokens=False))


# ---------------------------------------------------------------------------------------------------------------------
# Image processing
# ---------------------------------------------------------------------------------------------------------------------
def test_image_processor_defaults():
    image_processor = CLIImageProcessor()
    assert isinstance(image_processor, LlavaOnevisionImageProcessorPil)
    assert tuple(image_processor.image_mean) == tuple(image_processor.image_std) == (0.5, 0.5, 0.5)
    assert image_processor.resample == Image.BICUBIC
    assert (image_processor.size.height, image_processor.size.width) == (384, 384)
    assert image_processor.image_grid_pinpoints == PINPOINTS and len(PINPOINTS) == 36
    assert image_processor.rescale_factor == pytest.approx(1 / 255)
    assert image_processor.do_pad and image_processor.do_convert_rgb and image_processor.do_normalize
    assert image_processor.backend == "pil"  # PIL/NumPy backend: no torchvision needed
    processor = CLIProcessor(image_processor, build_tiny_tokenizer())
    assert processor.get_attributes() == ["image_processor", "tokenizer"]
    assert processor.chat_template == CLI_CHAT_TEMPLATE
    assert processor.num_image_tokens == 729 and processor.vision_feature_select_strategy == "full"


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_pixel_values_match_transformers_and_llava_next(size, processor, reference):
    image = random_image(*size)
    ours = processor.image_processor(image, return_tensors="pt")
    theirs = reference.image_processor(image, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist() == [list(size)]
    assert ours["batch_num_images"].tolist() == [1]
    llava_next = torch.from_numpy(next_process_anyres_image(image))
    assert ours["pixel_values"].shape[1:] == llava_next.shape
    assert torch.equal(ours["pixel_values"][0], llava_next)  # bit-identical


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_image_token_count_follows_llava_next_packing(size, processor, reference):
    image = random_image(*size)
    ours = processor(images=image, text=prompt(), return_tensors="pt")
    theirs = reference(images=image, text=prompt(), return_tensors="pt")
    count = int((ours["input_ids"] == processor.image_token_id).sum())
    assert count == next_num_image_tokens(*size)
    if reference._get_number_of_features(*size, 384, 384) == count:  # both unpad formulas agree
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert set(ours.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}


def test_truncation_and_rounding_differ_and_we_truncate(processor, reference):
    found = [
        (height, width)
        for height in range(1, 120)
        for width in range(400, 430)
        if processor._get_number_of_features(height, width, 384, 384)
        != reference._get_number_of_features(height, width, 384, 384)
    ]
    # e.g. 47x423 -> 1x2 crops, a 27x54 grid: 47 * (54 / 423) = 5.999...; LLaVA-NeXT truncates to 5 (padding 11,
    # 5 rows kept), transformers rounds to 6 (padding 10, 7 rows kept): 729 + 5 * 55 = 1004 vs 729 + 7 * 55 = 1114.
    assert (47, 423) in found and (94, 423) in found, found
    for height, width in found:
        assert processor._get_number_of_features(height, width, 384, 384) == next_num_image_tokens(height, width)
    image = random_image(47, 423)
    ours = processor(images=image, text=prompt(), return_tensors="pt")
    theirs = reference(images=image, text=prompt(), return_tensors="pt")
    ours_count = int((ours["input_ids"] == processor.image_token_id).sum())
    theirs_count = int((theirs["input_ids"] == processor.image_token_id).sum())
    assert ours_count == next_num_image_tokens(47, 423) == 1004 and theirs_count == 1114
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    # the public helper the model packs features with
    assert processing_cli.anyres_feature_grid(47, 423, 1, 2) == unpadded_grid_shape(47, 423, 27, 54) == (5, 54)


def test_multi_image_prompt_uses_base_view_only(processor, reference):
    images = [random_image(300, 500), random_image(100, 40)]
    ours = processor(images=[images], text=prompt(images=2), return_tensors="pt")
    theirs = reference(images=[images], text=prompt(images=2), return_tensors="pt")
    assert ours["pixel_values"].shape == (2, 1, 3, 384, 384)
    assert ours["batch_num_images"].tolist() == [2]
    assert int((ours["input_ids"] == processor.image_token_id).sum()) == 2 * (729 + 1)
    for key in ("pixel_values", "image_sizes", "input_ids", "batch_num_images"):
        assert torch.equal(ours[key], theirs[key]), key
    for index, image in enumerate(images):
        expected = torch.from_numpy(next_siglip_preprocess(next_expand2square(image)))
        torch.testing.assert_close(ours["pixel_values"][index, 0], expected, rtol=0, atol=1e-6)
    # a flat list is grouped by the markers of each prompt (transformers would treat it as one image per prompt)
    flat = processor(images=images, text=prompt(images=2), return_tensors="pt")
    assert torch.equal(flat["input_ids"], ours["input_ids"]) and torch.equal(flat["pixel_values"], ours["pixel_values"])


def test_batch_mixing_single_and_multi_image_matches_transformers(processor, reference):
    single, pair = [random_image(200, 700)], [random_image(64, 64), random_image(640, 480)]
    texts = [prompt("One?"), prompt("Two?", images=2)]
    ours = processor(images=[single, pair], text=texts, padding=True, return_tensors="pt")
    theirs = reference(images=[single, pair], text=texts, padding=True, return_tensors="pt")
    for key in ("pixel_values", "image_sizes", "input_ids", "attention_mask", "batch_num_images"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["batch_num_images"].tolist() == [1, 2]


def test_batch_with_a_text_only_prompt(processor, reference):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": random_image(50, 40)}, {"type": "text", "text": "?"}]}],
        [{"role": "user", "content": "Text only."}],
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    ours = processor.apply_chat_template(conversations, processor_kwargs={"padding": True}, **kwargs)
    theirs = reference.apply_chat_template(conversations, processor_kwargs={"padding": True}, **kwargs)
    assert ours["batch_num_images"].tolist() == [1] and ours["pixel_values"].shape[0] == 1
    for key in ("pixel_values", "image_sizes", "input_ids", "attention_mask", "batch_num_images"):
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "I;16", "1", "RGB"])
def test_every_mode_converts_to_rgb_like_llava_next(mode, processor):
    base = random_image(40, 56)
    if mode == "I;16":
        values = np.asarray(base.convert("L"), dtype=np.uint16) * 3
        image = Image.fromarray(values)
        assert image.mode == "I;16"
    elif mode in ("RGBA", "LA", "PA"):
        image = base.convert("RGBA")
        alpha = np.zeros((40, 56), dtype=np.uint8)
        alpha[:, 28:] = 255
        image.putalpha(Image.fromarray(alpha))
        image = image.convert(mode)
    else:
        image = base.convert(mode)
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    expected = torch.from_numpy(next_process_anyres_image(image.convert("RGB")))
    torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-6)


def test_transparency_is_dropped_not_composited_on_white(processor, reference):
    image = Image.new("RGBA", (30, 20), (10, 200, 30, 0))  # fully transparent green
    ours = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    theirs = reference.image_processor(image, return_tensors="pt")["pixel_values"]
    green = (torch.tensor([10, 200, 30]) / 255 - 0.5) / 0.5
    torch.testing.assert_close(ours[0, 0, :, 5, 5], green.float(), rtol=0, atol=1e-6)
    assert torch.allclose(theirs[0, 0, :, 5, 5], torch.ones(3))  # transformers: white


def test_one_pixel_image_end_to_end(processor):
    out = processor(images=Image.new("L", (1, 1), 200), text=prompt(), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 2, 3, 384, 384)
    assert out["image_sizes"].tolist() == [[1, 1]]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == next_num_image_tokens(1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------------------
def render(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, **kwargs)


def test_chat_template_one_image_and_question(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert render(processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(processor, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?"
        "<|im_end|>\n"
    )


def test_chat_template_two_images_interleaved(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Differences?"}]}
    ]
    assert render(processor, messages, add_generation_prompt=True) == prompt("Differences?", images=2)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First: "},
                {"type": "image"},
                {"type": "text", "text": "second: "},
                {"type": "image"},
                {"type": "text", "text": "same?"},
            ],
        }
    ]
    assert render(processor, messages, add_generation_prompt=True) == (
        f"{SYSTEM}<|im_start|>user\nFirst: <image>\nsecond: <image>\nsame?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_text_only_string_content_and_system(processor):
    assert render(processor, [{"role": "user", "content": "Hello"}], add_generation_prompt=True) == (
        f"{SYSTEM}<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
    ]
    assert render(processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_multi_turn(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "Its colour?"},
        {"role": "assistant", "content": "Black."},
    ]
    expected = (
        f"{SYSTEM}<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nIts colour?<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n"
    )
    assert render(processor, messages) == expected
    assert render(processor, messages[:3], add_generation_prompt=True) == (
        expected[: expected.index("<|im_start|>assistant\nBlack.")] + "<|im_start|>assistant\n"
    )
    out = processor.apply_chat_template(
        messages[1:], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [token for token, keep in zip(out["input_ids"][0], out["assistant_masks"][0]) if keep]
    assert processor.tokenizer.decode(masked) == "A cat.<|im_end|>\nBlack.<|im_end|>\n"


def test_apply_chat_template_loads_pil_path_and_base64(processor, tmp_path):
    image = random_image(90, 160)
    path = tmp_path / "picture.png"
    image.save(path)
    encoded = base64.b64encode(png_bytes(image)).decode()
    sources = [
        {"type": "image", "image": image},
        {"type": "image", "path": str(path)},
        {"type": "image", "url": f"data:image/png;base64,{encoded}"},
        {"type": "image", "base64": encoded},
    ]
    outputs = []
    for source in sources:
        messages = [{"role": "user", "content": [source, {"type": "text", "text": "What is this?"}]}]
        outputs.append(
            processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        )
    direct = processor(images=image, text=prompt(), return_tensors="pt")
    for out in outputs:
        assert set(out.keys()) == set(direct.keys())
        for key in direct:
            assert torch.equal(out[key], direct[key]), key


def test_post_process_image_text_to_text(processor):
    ids = processor.tokenizer(["A cat.<|im_end|>", "Two dogs<|endoftext|><|endoftext|>"], padding=True)["input_ids"]
    assert processor.post_process_image_text_to_text(torch.tensor(ids)) == ["A cat.", "Two dogs"]


# ---------------------------------------------------------------------------------------------------------------------
# Save / load as remote code
# ---------------------------------------------------------------------------------------------------------------------
def test_save_and_load_with_auto_processor_in_fresh_process(processor, tmp_path):
    save_dir = tmp_path / "saved"
    processor.save_pretrained(save_dir)
    assert (save_dir / "processing_cli.py").is_file() and (save_dir / "chat_template.jinja").is_file()
    config = json.loads((save_dir / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_cli.CLIProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == "processing_cli.CLIImageProcessor"

    images = [random_image(47, 423), random_image(300, 500)]
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
    texts = [prompt("One?"), prompt("Two?", images=2)]
    groups = [[images[0]], [images[0], images[1]]]
    expected = processor(images=groups, text=texts, padding=True, return_tensors="pt")
    expected_text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )

    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from PIL import Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(save_dir)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "CLIProcessor", type(processor)
        assert type(processor.image_processor).__name__ == "CLIImageProcessor"
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range(2)]
        out = processor(images=[[images[0]], [images[0], images[1]]], text={texts!r}, padding=True,
                        return_tensors="pt")
        torch.save(dict(out), {str(tmp_path / "out.pt")!r})
        text = processor.apply_chat_template(
            [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Hi"}}]}}],
            add_generation_prompt=True)
        print(json.dumps({{"text": text, "image_token_id": processor.image_token_id}}))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported == {"text": expected_text, "image_token_id": processor.image_token_id}
    loaded = torch.load(tmp_path / "out.pt")
    assert set(loaded) == set(expected.keys())
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_marker_and_image_count_mismatch(processor):
    image = random_image(30, 30)
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but 1 image"):
        processor(images=[image], text=prompt(images=2))
    with pytest.raises(ValueError, match=r"1 <image> marker\(s\) but 2 image"):
        processor(images=[image, image], text=prompt())
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text=prompt())
    with pytest.raises(ValueError, match=r"per prompt"):
        processor(images=[[image, image], []], text=[prompt(), prompt()])


def test_unreadable_and_truncated_images(processor, tmp_path):
    data = png_bytes(random_image(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    for source in (str(truncated), truncated):
        with pytest.raises(ValueError, match="Cannot decode image"):
            processor(images=source, text=prompt())
    with Image.open(truncated) as lazy:  # opened fine, fails when decoded
        with pytest.raises(ValueError, match="Cannot decode image"):
            processor(images=lazy, text=prompt())
    with pytest.raises(ValueError, match="Cannot read image"):
        processor(images=str(not_an_image), text=prompt())
    with pytest.raises(ValueError, match="not an existing file"):
        processor(images=str(tmp_path / "missing.png"), text=prompt())
    with pytest.raises(ValueError, match="empty"):
        processor(images=Image.new("RGB", (0, 5)), text=prompt())
    messages = [{"role": "user", "content": [{"type": "image", "path": str(truncated)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="Cannot decode image"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)


def test_decompression_bomb_is_a_clear_error(processor, tmp_path, monkeypatch):
    warned, refused = tmp_path / "big.png", tmp_path / "huge.png"
    Image.new("RGB", (40, 30)).save(warned)  # 1200 px: over the limit (PIL warns)
    Image.new("RGB", (50, 50)).save(refused)  # 2500 px: over twice the limit (PIL raises)
    in_memory = Image.new("RGB", (40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"40x30 = 1200 pixels.*limit of 1000 pixels"):
        processor(images=str(warned), text=prompt())
    with pytest.raises(ValueError, match=r"2500 pixels.*limit of 1000 pixels"):
        processor(images=str(refused), text=prompt())
    with pytest.raises(ValueError, match=r"40x30 = 1200 pixels.*MAX_IMAGE_PIXELS"):
        processor(images=in_memory, text=prompt())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert processor(images=str(refused), text=prompt(), return_tensors="pt")["pixel_values"].shape[0] == 1


def test_video_content_is_refused(processor):
    with pytest.raises(ValueError, match="images only"):
        processor(text="<video>", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="message 0, item 0: video items are not supported; CLI handles images"):
        processor.apply_chat_template(messages)


def test_paths_are_not_exif_rotated_like_llava_next(processor, tmp_path):
    image = random_image(20, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    out = processor(images=str(path), text=prompt(), return_tensors="pt")
    assert out["image_sizes"].tolist() == [[20, 60]]  # as stored, like Image.open(path).convert("RGB")
