# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""Processor of CLI: LLaVA-NeXT-faithful image processing, the `qwen_1_5` chat template and the tokenizer."""


def unpadded_grid_shape(
    original_height: int, original_width: int, current_height: int, current_width: int
) -> tuple[int, int]:
    """
    Height and width of an anyres feature grid after its letterbox padding is cut away, as LLaVA-NeXT computes them.

    LLaVA-NeXT truncates (`int(original * scale)`); transformers rounds (`int(round(x, 7))`), which gives one row or
    column more for some sizes. CLI checkpoints were trained with truncation, so both the processor's image-token count
    and the model's feature packing use this one function.

    Args:
        original_height, original_width: size of the image before preprocessing, in pixels.
        current_height, current_width: size of the padded feature grid (crops x patches per crop side).

    Returns:
        `(kept_height, kept_width)`: the grid size once the symmetric padding `(current - int(original * scale)) // 2`
        is removed from both sides of the padded dimension.
    """
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return current_height - 2 * padding, current_width
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return current_height, current_width - 2 * padding
