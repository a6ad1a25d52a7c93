# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Tiny offline builders shared by the tests, the examples and the benchmarks (nothing here is needed to use CLI):

- [`tiny_bpe_tokenizer`]: a byte-level BPE tokenizer trained by the `tokenizers` library (`BpeTrainer`, Qwen2's
  normalizer, pre-tokenizer and decoder) on a small fixed corpus, plus Qwen2's three special tokens. It imports only
  `tokenizers`, for callers that must not import transformers (the benchmarks' checkpoint builders).
- [`build_tiny_tokenizer`]: the same vocabulary as a real `transformers.Qwen2Tokenizer` with `<image>` / `<video>`
  added the way LLaVA-NeXT adds them.
- [`tiny_cli_config`], [`tiny_processor`], [`build_tiny_cli`], [`build_tiny_cli_checkpoint`]: a tiny random CLI model
  (48 x 48 views, a 4-layer Qwen2 of width 128), its processor, and a saved remote-code folder of both.
- [`cli_7b_config`], [`summary_7b`], [`format_summary_table`]: CLI-7B's configuration and its trainable-parameter
  tables, computed on the meta device (no weights).

Importing this module imports nothing but the standard library; torch, transformers and the CLI modules are imported
by the functions that need them.
"""

from __future__ import annotations

import os
import re

# ----------------------------------------------------------------------------------------------------------------------
# The tiny tokenizer
# ----------------------------------------------------------------------------------------------------------------------

TINY_CORPUS = """
You are a helpful assistant. Describe this image in detail. What is in the picture? The image shows a cat sitting on
a red chair next to a window, and a dog is sleeping on the floor. There are two people walking in the street.
What is the difference between the two images? The first image is brighter than the second one.
How many objects are there? There are 3 apples, 12 oranges and 2024 bananas. Answer the question using a single
word or phrase. Please answer yes or no. Yes. No. The answer is A. Options: A, B, C, D.
user assistant system image video question answer layer vision language model cross injection
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
<image>
What is shown here?<|im_end|>
<|im_start|>assistant
A small house with a garden.<|im_end|>
"""
# The words of examples/shapes/shapes_data.py's questions and answers, so that each is a single token.
SHAPES_CORPUS = """
What color is the circle? What color is the square? What color is the triangle?
How many circles are there? How many squares are there? How many triangles are there?
Is the circle on the left? Is the square on the left? Is the triangle on the left?
red
green
blue
yellow
yes
no
"""
# Qwen2's special tokens (151643..151645 in Qwen2), in that order after the BPE vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MULTIMODAL_TOKENS = ("<image>", "<video>")
# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX; a test checks).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# An upper bound the corpus never reaches: BPE runs to completion, so every word of the corpus is one token.
TINY_VOCAB_SIZE = 4096


def tiny_bpe_tokenizer(corpus: str = TINY_CORPUS + SHAPES_CORPUS, vocab_size: int = TINY_VOCAB_SIZE):
    """
    A `tokenizers.Tokenizer` in Qwen2's layout, identical on every call and in every process: Qwen2's NFC normalizer,
    regex split + byte-level pre-tokenizer and byte-level decoder; a BPE model trained by `tokenizers`' `BpeTrainer` on
    `corpus` (the 256 byte symbols first, then the merges, at most `vocab_size` entries in all); then `<|endoftext|>`,
    `<|im_start|>`, `<|im_end|>` as special added tokens. The special tokens (and `<image>` / `<video>`) are cut out
    of the training text, as they never take part in BPE. Only `tokenizers` is imported.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    pieces = re.split("|".join(re.escape(token) for token in SPECIAL_TOKENS + MULTIMODAL_TOKENS), corpus)
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def build_tiny_tokenizer(
    save_dir: str | os.PathLike | None = None,
    add_multimodal_tokens: bool = True,
    corpus: str = TINY_CORPUS + SHAPES_CORPUS,
):
    """
    The tiny tokenizer as a real `transformers.Qwen2Tokenizer`, identical on every call.

    Layout (Qwen2's, scaled down): the byte symbols and the BPE merges of [`tiny_bpe_tokenizer`], then `<|endoftext|>`
    (also pad), `<|im_start|>`, `<|im_end|>` (also eos), then, with `add_multimodal_tokens`, `<image>` (id = the
    tokenizer's length before it, as 151646 is for Qwen2) and `<video>`, added by
    [`processing_cli.add_cli_special_tokens`] (special, not normalised, not stripped). No bos token, as in Qwen2.
    Saved with `save_pretrained` to `save_dir` if given (`AutoTokenizer.from_pretrained` loads it back).
    """
    import json

    from transformers import AddedToken, Qwen2Tokenizer

    from processing_cli import add_cli_special_tokens

    trained = json.loads(tiny_bpe_tokenizer(corpus).to_str())
    vocab = dict(trained["model"]["vocab"])
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in trained["model"]["merges"]]
    for added in trained["added_tokens"]:  # the special tokens, after the BPE vocabulary
        vocab[added["content"]] = added["id"]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False) for token in SPECIAL_TOKENS],
        special_tokens=True,
    )
    if add_multimodal_tokens:
        add_cli_special_tokens(tokenizer)
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Tiny CLI models
# ----------------------------------------------------------------------------------------------------------------------

TINY_IMAGE_SIZE = 48  # one 48 x 48 view, 16-pixel patches: 3 x 3 = 9 tokens per view
TINY_PATCH_SIZE = 16
TINY_PINPOINTS = [[TINY_IMAGE_SIZE * rows, TINY_IMAGE_SIZE * cols] for rows in range(1, 4) for cols in range(1, 4)]


def tiny_cli_config(tokenizer, patch_size: int = TINY_PATCH_SIZE, **overrides):
    """
    The `CLIConfig` of a tiny CLI model for `tokenizer` (vocabulary, `<image>`, eos and pad ids): a 2-layer SigLIP
    (48 x 48 views, `patch_size`-pixel patches), a 4-layer Qwen2 of width 128, AMP on vision layers [1, 2] and AGF
    before decoder layers [1, 2]. `overrides` replace top-level `CLIConfig` arguments; `text_config` / `vision_config`
    dicts are merged into the defaults.
    """
    from configuration_cli import CLIConfig
    from processing_cli import add_cli_special_tokens

    vision_config = dict(
        model_type="siglip_vision_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text_config = dict(
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    vision_config.update(overrides.pop("vision_config", {}))
    text_config.update(overrides.pop("text_config", {}))
    ids = add_cli_special_tokens(tokenizer)
    kwargs = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids["image_token_id"],
        video_token_index=ids["video_token_id"],
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        vision_extraction_layers=[1, 2],
        llm_injection_layers=[1, 2],
        amp_lora_rank=8,
        amp_lora_alpha=16,
        tie_word_embeddings=text_config["tie_word_embeddings"],
        eos_token_id=text_config["eos_token_id"],
        pad_token_id=text_config["pad_token_id"],
    )
    kwargs.update(overrides)
    return CLIConfig(**kwargs)


def tiny_processor(tokenizer, patch_size: int = TINY_PATCH_SIZE):
    """A `CLIProcessor` for the tiny models: 48 x 48 views, tiny pinpoints, `(48 // patch_size) ** 2` tokens a view."""
    from processing_cli import CLIImageProcessor, CLIProcessor

    image_processor = CLIImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_grid_pinpoints=TINY_PINPOINTS
    )
    return CLIProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(TINY_IMAGE_SIZE // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def build_tiny_cli(seed: int = 0, patch_size: int = TINY_PATCH_SIZE, **config_overrides):
    """
    `(model, processor)`: a randomly initialised tiny CLI model (eval mode, fp32) and its processor; `patch_size`
    divides the 48-pixel view, `config_overrides` go to [`tiny_cli_config`].
    """
    import torch

    from modeling_cli import CLIForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    processor = tiny_processor(tokenizer, patch_size)
    config = tiny_cli_config(tokenizer, patch_size, **config_overrides)
    torch.manual_seed(seed)
    model = CLIForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model, processor


def build_tiny_cli_checkpoint(folder: str | os.PathLike, seed: int = 0, **config_overrides) -> str:
    """A random tiny CLI model + tokenizer + processor saved to `folder` (`training_cli.save_cli_folder`)."""
    from training_cli import save_cli_folder

    model, processor = build_tiny_cli(seed, **config_overrides)
    return save_cli_folder(model, processor, folder)


# ----------------------------------------------------------------------------------------------------------------------
# CLI-7B on the meta device: configuration and trainable-parameter tables
# ----------------------------------------------------------------------------------------------------------------------

# CLI-7B: LLaVA-OneVision-Qwen2-7B (SigLIP-so400m-patch14-384 without its last layer, mlp2x_gelu, Qwen2-7B) with AMP on
# vision layers RANGE-1-28-4 and AGF before decoder layers RANGE-1-28-4 (the model card's setting).
CLI_7B_VISION_CONFIG = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=False,
)
CLI_7B_TEXT_CONFIG = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def cli_7b_config(**overrides):
    """The CLI-7B `CLIConfig` (no weights needed), e.g. to count parameters on the meta device."""
    from configuration_cli import CLIConfig

    kwargs = dict(
        vision_config=CLI_7B_VISION_CONFIG,
        text_config=CLI_7B_TEXT_CONFIG,
        image_token_index=151646,
        video_token_index=151647,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        vision_extraction_layers="RANGE-1-28-4",
        llm_injection_layers="RANGE-1-28-4",
    )
    kwargs.update(overrides)
    return CLIConfig(**kwargs)


def summary_7b(trainable: str = "cli", lora_rank: int | None = None, **config_overrides) -> dict[str, tuple[int, int]]:
    """
    The trainable-parameter summary of CLI-7B for `set_trainable(trainable)`, computed from the configuration alone
    (the model is built on the meta device: no memory, no weights). With `lora_rank`, instead: LoRA of that rank on the
    LLM's decoder projections + AMP/AGF as PEFT `modules_to_save` (`training_cli.cli_peft_config`).
    """
    import torch

    from modeling_cli import CLIForConditionalGeneration

    with torch.device("meta"):
        model = CLIForConditionalGeneration(cli_7b_config(**config_overrides))
    if lora_rank is None:
        return model.set_trainable(trainable, verbose=False)
    from peft import get_peft_model

    from training_cli import cli_peft_config, trainable_summary

    model.set_trainable("cli", verbose=False)
    with torch.device("meta"):
        peft_model = get_peft_model(model, cli_peft_config(model, r=lora_rank, lora_alpha=2 * lora_rank))
    return trainable_summary(peft_model)


def format_summary_table(summaries: dict[str, dict[str, tuple[int, int]]]) -> str:
    """One column of trainable counts per setting (`{setting: {group: (trainable, total)}}`) beside the totals."""
    settings = list(summaries)
    groups = []
    for summary in summaries.values():
        groups.extend(group for group in summary if group not in groups)
    width = max(14, *(len(s) + 2 for s in settings))
    header = f"{'group':<14}{'total':>16}" + "".join(f"{s:>{width}}" for s in settings)
    lines = [header, "-" * len(header)]
    for group in groups:
        total = max(summary.get(group, (0, 0))[1] for summary in summaries.values())
        cells = "".join(f"{summary.get(group, (0, 0))[0]:>{width},}" for summary in summaries.values())
        lines.append(f"{group:<14}{total:>16,}{cells}")
    grand_total = sum(count[1] for count in next(iter(summaries.values())).values())
    cells = "".join(f"{sum(c[0] for c in summary.values()):>{width},}" for summary in summaries.values())
    lines.append(f"{'all':<14}{grand_total:>16,}{cells}")
    percents = "".join(
        f"{f'{100 * sum(c[0] for c in summary.values()) / sum(c[1] for c in summary.values()):.2f}%':>{width}}"
        for summary in summaries.values()
    )
    lines.append(f"{'% trainable':<14}{'':>16}{percents}")
    return "\n".join(lines)


__all__ = [
    "CLI_7B_TEXT_CONFIG",
    "CLI_7B_VISION_CONFIG",
    "MULTIMODAL_TOKENS",
    "QWEN2_PRETOKENIZE_REGEX",
    "SHAPES_CORPUS",
    "SPECIAL_TOKENS",
    "TINY_CORPUS",
    "TINY_IMAGE_SIZE",
    "TINY_PATCH_SIZE",
    "TINY_PINPOINTS",
    "build_tiny_cli",
    "build_tiny_cli_checkpoint",
    "build_tiny_tokenizer",
    "cli_7b_config",
    "format_summary_table",
    "summary_7b",
    "tiny_bpe_tokenizer",
    "tiny_cli_config",
    "tiny_processor",
]
