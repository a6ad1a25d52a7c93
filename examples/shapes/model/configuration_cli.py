# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""Configuration of CLI (Cross-Layer Injection, arXiv 2601.10710) on top of LLaVA-OneVision."""

import re

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig

_RANGE_PATTERN = re.compile(r"RANGE-(-?\d+)-(-?\d+)-(-?\d+)")

# Written into config.json so that the saved folder loads with `trust_remote_code=True` from every auto class.
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_cli.CLIConfig",
    "AutoModel": "modeling_cli.CLIForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_cli.CLIForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_cli.CLIForConditionalGeneration",
}

# The names the official LLaVA-NeXT fork uses for the two layer lists.
_FORK_ALIASES = {"vision_exp_layers": "vision_extraction_layers", "vlm_exp_layers": "llm_injection_layers"}


def parse_layer_list(value, field: str) -> list[int] | None:
    """
    Turns a layer specification into a list of ints.

    Accepts `None`, an int, a list/tuple of ints, `"RANGE-a-b-s"` (meaning `list(range(a, b, s))`, the fork's syntax)
    or a comma-separated string such as `"1,5,9"`. Raises `ValueError` naming `field` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"`{field}` must be a list of layer indices, got {value!r}.")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if text.upper().startswith("RANGE"):
            match = _RANGE_PATTERN.fullmatch(text.upper())
            if match is None:
                raise ValueError(
                    f"`{field}`: malformed range {value!r}; expected 'RANGE-a-b-s' with integers a, b and a step "
                    "s > 0, meaning list(range(a, b, s)), e.g. 'RANGE-1-28-4'."
                )
            start, stop, step = (int(group) for group in match.groups())
            if step <= 0:
                raise ValueError(f"`{field}`: the step of {value!r} must be > 0, got {step}.")
            layers = list(range(start, stop, step))
            if not layers:
                raise ValueError(f"`{field}`: {value!r} selects no layer (range({start}, {stop}, {step}) is empty).")
            return layers
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"`{field}`: cannot read {value!r}; use a list of ints, 'RANGE-a-b-s' or a string like '1,5,9'."
            ) from None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise ValueError(f"`{field}` must hold integers only, got {list(value)!r}.")
        return list(value)
    raise ValueError(f"`{field}` must be a list of ints, 'RANGE-a-b-s' or '1,5,9', got {type(value).__name__}.")


def _check_layers(layers: list[int], field: str, num_indices: int, what: str) -> None:
    if not layers:
        raise ValueError(f"`{field}` must name at least one layer; allowed indices are 0..{num_indices - 1} ({what}).")
    out_of_range = [index for index in layers if not 0 <= index < num_indices]
    if out_of_range:
        raise ValueError(
            f"`{field}` has out-of-range indices {out_of_range}; allowed indices are 0..{num_indices - 1} ({what})."
        )
    duplicates = sorted({index for index in layers if layers.count(index) > 1})
    if duplicates:
        raise ValueError(f"`{field}` lists layers more than once: {duplicates}; each layer may appear only once.")


@strict
class CLIConfig(LlavaOnevisionConfig):
    r"""
    Configuration of a CLI model: a [`LlavaOnevisionConfig`] plus the cross-layer injection settings.

    vision_extraction_layers (`list[int]` or `str`, *optional*):
        Indices into the vision tower's `hidden_states` (0 = embeddings, `num_hidden_layers` = last layer) whose
        features AMP projects. Accepts a list, `"RANGE-a-b-s"` (`list(range(a, b, s))`) or `"1,5,9"`; the fork's
        name `vision_exp_layers` is accepted too. Defaults to every 4th layer from 1 (`RANGE-1-(L+1)-4`).
    llm_injection_layers (`list[int]` or `str`, *optional*):
        0-based indices of the LLM decoder layers whose input hidden states receive the gated injection. Same formats;
        the fork's name is `vlm_exp_layers`. Defaults to every 4th layer from 1 (`RANGE-1-L-4`, the CLI-7B setting).
    amp_lora_rank (`int`, *optional*, defaults to 16):
        Rank `r` of the per-layer LoRA (`A_k: d_v -> r`, `B_k: r -> d`) beside the shared projector.
    amp_lora_alpha (`float`, *optional*, defaults to 32.0):
        LoRA scaling numerator: the LoRA branch is multiplied by `amp_lora_alpha / amp_lora_rank` (2 by default, the
        common PEFT choice of alpha = 2r).
    agf_num_heads (`int`, *optional*):
        Heads of AGF's two single-query attentions. Defaults to the LLM's `num_attention_heads`; must divide the
        LLM's `hidden_size`.

    Example:

    ```python
    >>> from configuration_cli import CLIConfig
    >>> config = CLIConfig(vision_extraction_layers="RANGE-1-27-4", llm_injection_layers="1,5,9")
    >>> config.llm_injection_layers
    [1, 5, 9]
    ```
    """

    model_type = "cli"

    vision_extraction_layers: list[int] | str | int | None = None
    llm_injection_layers: list[int] | str | int | None = None
    amp_lora_rank: int = 16
    amp_lora_alpha: float | int = 32.0
    agf_num_heads: int | None = None

    def __post_init__(self, **kwargs):
        for alias, field in _FORK_ALIASES.items():
            if alias in kwargs:
                aliased = parse_layer_list(kwargs.pop(alias), alias)
                current = parse_layer_list(getattr(self, field), field)
                if current is not None and current != aliased:
                    raise ValueError(f"`{field}`={current} and its alias `{alias}`={aliased} disagree; give one.")
                setattr(self, field, aliased)
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(DEFAULT_AUTO_MAP)
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                f"`vision_feature_layer` must be a single int for CLI (AMP shares the projector, whose input is one "
                f"vision layer), got {self.vision_feature_layer!r}."
            )

        num_vision_layers = self.vision_config.num_hidden_layers
        num_text_layers = self.text_config.num_hidden_layers
        vision_layers = parse_layer_list(self.vision_extraction_layers, "vision_extraction_layers")
        text_layers = parse_layer_list(self.llm_injection_layers, "llm_injection_layers")
        self.vision_extraction_layers = vision_layers if vision_layers is not None else list(
            range(1, num_vision_layers + 1, 4)
        )
        self.llm_injection_layers = text_layers if text_layers is not None else list(range(1, num_text_layers, 4))
        _check_layers(
            self.vision_extraction_layers,
            "vision_extraction_layers",
            num_vision_layers + 1,
            f"vision hidden_states of a {num_vision_layers}-layer tower, 0 = embeddings",
        )
        _check_layers(
            self.llm_injection_layers,
            "llm_injection_layers",
            num_text_layers,
            f"decoder layers of a {num_text_layers}-layer LLM",
        )

        if isinstance(self.amp_lora_rank, bool) or self.amp_lora_rank <= 0:
            raise ValueError(f"`amp_lora_rank` must be an integer >= 1, got {self.amp_lora_rank!r}.")
        if self.amp_lora_alpha <= 0:
            raise ValueError(f"`amp_lora_alpha` must be > 0, got {self.amp_lora_alpha!r}.")
        hidden_size = self.text_config.hidden_size
        if self.agf_num_heads is None:
            self.agf_num_heads = self.text_config.num_attention_heads
        if self.agf_num_heads <= 0 or hidden_size % self.agf_num_heads != 0:
            divisors = [n for n in range(1, hidden_size + 1) if hidden_size % n == 0]
            shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
            raise ValueError(
                f"`agf_num_heads`={self.agf_num_heads} must be a positive divisor of the LLM hidden_size "
                f"{hidden_size} (allowed: {shown})."
            )


__all__ = ["CLIConfig", "parse_layer_list"]
