# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""Configuration of CLI (Cross-Layer Injection, arXiv 2601.10710) on top of LLaVA-OneVision."""

import dataclasses
import functools
import math
import re

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import LlavaOnevisionConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

_RANGE_PATTERN = re.compile(r"RANGE-(-?\d+)-(-?\d+)-(-?\d+)")
_ASPECT_RATIO_PATTERN = re.compile(r"anyres_max_(\d+)")

# Written into config.json so that the saved folder loads with `trust_remote_code=True` from every auto class.
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_cli.CLIConfig",
    "AutoModel": "modeling_cli.CLIForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_cli.CLIForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_cli.CLIForConditionalGeneration",
}

# The names the official LLaVA-NeXT fork uses for the two layer lists.
_FORK_ALIASES = {"vision_exp_layers": "vision_extraction_layers", "vlm_exp_layers": "llm_injection_layers"}

AGF_FORMS = ("attention", "folded")

# Documented maxima, checked before anything is allocated. They sit far above every published SigLIP / Qwen2 /
# LLaVA-OneVision size (CLI-7B: 26 + 28 layers, widths 1152 / 3584, vocabulary 152,064, 36 crops at most) and far below
# sizes whose config or model could not even be built in memory, so a broken or hostile config fails at once.
MAX_LAYERS = 1024  # num_hidden_layers of either tower, and the length of a layer list
MAX_HIDDEN_SIZE = 65536
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_ATTENTION_HEADS = 1024
MAX_VOCAB_SIZE = 1 << 24
MAX_IMAGE_SIZE = 4096  # the vision tower's input side, in pixels
MAX_CROPS_PER_IMAGE = 64  # crops of one grid pinpoint (anyres_max_9 uses at most 36)
MAX_GRID_PINPOINTS = 1024
MAX_LORA_ALPHA = 1e6

# (config part, field, maximum) for the sizes that decide how much the config and the model allocate
_SIZE_LIMITS = (
    ("text_config", "num_hidden_layers", MAX_LAYERS),
    ("text_config", "hidden_size", MAX_HIDDEN_SIZE),
    ("text_config", "intermediate_size", MAX_INTERMEDIATE_SIZE),
    ("text_config", "num_attention_heads", MAX_ATTENTION_HEADS),
    ("text_config", "num_key_value_heads", MAX_ATTENTION_HEADS),
    ("text_config", "vocab_size", MAX_VOCAB_SIZE),
    ("vision_config", "num_hidden_layers", MAX_LAYERS),
    ("vision_config", "hidden_size", MAX_HIDDEN_SIZE),
    ("vision_config", "intermediate_size", MAX_INTERMEDIATE_SIZE),
    ("vision_config", "num_attention_heads", MAX_ATTENTION_HEADS),
    ("vision_config", "image_size", MAX_IMAGE_SIZE),
    ("vision_config", "patch_size", MAX_IMAGE_SIZE),
)

# What each CLI field accepts, for the messages of type errors.
_ALLOWED_FORMS = {
    "vision_extraction_layers": "a list of ints, 'RANGE-a-b-s' or '1,5,9'",
    "llm_injection_layers": "a list of ints, 'RANGE-a-b-s' or '1,5,9'",
    "amp_lora_rank": "an int >= 1",
    "amp_lora_alpha": "a finite number > 0",
    "agf_num_heads": "an int dividing the LLM hidden_size, or null",
    "agf_form": f"one of {AGF_FORMS}",
    "vision_feature_layer": "one int (a vision hidden_states index)",
}


def _shown(values, limit: int = 5) -> str:
    """A few of `values` for a message, never millions."""
    values = list(values)
    head = ", ".join(map(str, values[:limit]))
    return f"[{head}, ... ({len(values)} in all)]" if len(values) > limit else f"[{head}]"


def parse_layer_list(value, field: str) -> list[int] | None:
    """
    Turns a layer specification into a list of ints (indices are not range-checked here).

    Accepts `None`, an int, a list/tuple of ints, `"RANGE-a-b-s"` (meaning `list(range(a, b, s))`, the fork's syntax)
    or a comma-separated string such as `"1,5,9"`. Raises `ValueError` naming `field` for anything else, and for lists
    longer than `MAX_LAYERS` (checked before a range is expanded).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"`{field}` must be a list of layer indices, got {value!r}.")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 16 * MAX_LAYERS:
            raise ValueError(f"`{field}`: a layer string of {len(text)} characters is too long to be a layer list.")
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
            layers = range(start, stop, step)
            if not layers:
                raise ValueError(f"`{field}`: {value!r} selects no layer (range({start}, {stop}, {step}) is empty).")
            if len(layers) > MAX_LAYERS:
                raise ValueError(
                    f"`{field}`: {value!r} selects {len(layers)} layers; at most {MAX_LAYERS} are allowed."
                )
            return list(layers)
        try:
            value = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"`{field}`: cannot read {value!r}; use a list of ints, 'RANGE-a-b-s' or a string like '1,5,9'."
            ) from None
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LAYERS:
            raise ValueError(f"`{field}` lists {len(value)} layers; at most {MAX_LAYERS} are allowed.")
        wrong = [item for item in value if not isinstance(item, int) or isinstance(item, bool)]
        if wrong:
            raise ValueError(f"`{field}` must hold integers only, got {_shown(map(repr, wrong))}.")
        return list(value)
    raise ValueError(f"`{field}` must be a list of ints, 'RANGE-a-b-s' or '1,5,9', got {type(value).__name__}.")


def normalize_layers(layers: list[int], field: str, num_indices: int, what: str) -> list[int]:
    """
    Checks the layer indices of `field` against `num_indices` valid ones (`-num_indices..num_indices - 1`, negative
    counting from the end as in Python) and returns them normalised to `0..num_indices - 1`.
    """
    if not layers:
        raise ValueError(f"`{field}` must name at least one layer; allowed indices are 0..{num_indices - 1} ({what}).")
    out_of_range = [index for index in layers if not -num_indices <= index < num_indices]
    if out_of_range:
        raise ValueError(
            f"`{field}` has out-of-range indices {_shown(out_of_range)}; allowed indices are 0..{num_indices - 1} "
            f"({what}), or -{num_indices}..-1 counting from the end."
        )
    normalized = [index % num_indices for index in layers]
    duplicates = sorted({index for index in normalized if normalized.count(index) > 1})
    if duplicates:
        raise ValueError(f"`{field}` lists layers more than once: {_shown(duplicates)}; each layer may appear once.")
    return normalized


def _check_sizes(part: str, values) -> None:
    """Checks the allocation-deciding sizes of one sub-config (a dict or a config object) against the maxima."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name, None)
    for config_part, name, maximum in _SIZE_LIMITS:
        value = get(name) if config_part == part else None
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= maximum:
            raise ValueError(f"`{part}.{name}`={_short(value)} is out of range; allowed: 1..{maximum}.")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_error_message(error: StrictDataclassError, config_class, given: dict, prefix: str = "") -> str:
    """A `ValueError` message for huggingface_hub's strict type check: the field, what was given, what is allowed."""
    match = re.search(r"field '(\w+)'", str(error))
    field = match.group(1) if match else "?"
    allowed = _ALLOWED_FORMS.get(field) if not prefix else None
    if allowed is None:
        try:
            annotation = {item.name: item.type for item in dataclasses.fields(config_class)}.get(field)
        except TypeError:
            annotation = None
        allowed = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    value = f"={_short(given[field])}" if field in given else ""
    return f"`{prefix}{field}`{value} has the wrong type; allowed: {allowed}."


def _raise_value_errors(init):
    """Makes the strict type checks of `init` (huggingface_hub's own exception type) raise `ValueError`."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(_type_error_message(error, type(self), kwargs)) from None

    return __init__


@strict
class CLIConfig(LlavaOnevisionConfig):
    r"""
    Configuration of a CLI model: a [`LlavaOnevisionConfig`] plus the cross-layer injection settings.

    vision_extraction_layers (`list[int]` or `str`, *optional*):
        Indices into the vision tower's `hidden_states` (0 = embeddings, `num_hidden_layers` = last layer; negative
        indices count from the end, `-1` = the last) whose features AMP projects. Accepts a list, `"RANGE-a-b-s"`
        (`list(range(a, b, s))`) or `"1,5,9"`; the fork's name `vision_exp_layers` is accepted too. Stored
        normalised (non-negative). Defaults to every 4th layer from 1 (`RANGE-1-(L+1)-4`).
    llm_injection_layers (`list[int]` or `str`, *optional*):
        0-based indices of the LLM decoder layers whose input hidden states receive the gated injection (negative
        counts from the end). Same formats; the fork's name is `vlm_exp_layers`. Defaults to every 4th layer from 1
        (`RANGE-1-L-4`, the CLI-7B setting).
    amp_lora_rank (`int`, *optional*, defaults to 16):
        Rank `r` of the per-layer LoRA (`A_k: d_v -> r`, `B_k: r -> d`) beside the shared projector; at most the
        smaller of the two widths.
    amp_lora_alpha (`float`, *optional*, defaults to 32.0):
        LoRA scaling numerator: the LoRA branch is multiplied by `amp_lora_alpha / amp_lora_rank` (2 by default, the
        common PEFT choice of alpha = 2r). Finite, in `(0, 1e6]`.
    agf_num_heads (`int`, *optional*):
        Heads of AGF's two single-query attentions. Defaults to the LLM's `num_attention_heads`; must divide the
        LLM's `hidden_size`.
    agf_form (`str`, *optional*, defaults to `"attention"`):
        How AGF's attentions are parameterised. `"attention"`: the paper's `d x d` query/key/value/output projections
        (what fork checkpoints convert into). `"folded"`: only what the gates depend on, per head a score vector and a
        value vector (`(d, heads)` each) and a constant per readout: the same outputs from ~250x fewer parameters at
        CLI-7B. [`CLIForConditionalGeneration.fold_agf`] turns the first into the second exactly.

    Sizes are bounded before anything is built (`MAX_LAYERS`, `MAX_HIDDEN_SIZE`, ... in this module); every invalid
    value raises a `ValueError` naming the field and what is allowed.

    Example:

    ```python
    >>> from configuration_cli import CLIConfig
    >>> config = CLIConfig(vision_extraction_layers="RANGE-1-27-4", llm_injection_layers="1,5,-1")
    >>> config.llm_injection_layers
    [1, 5, 31]
    ```
    """

    model_type = "cli"

    vision_extraction_layers: list[int] | str | int | None = None
    llm_injection_layers: list[int] | str | int | None = None
    amp_lora_rank: int = 16
    amp_lora_alpha: float | int = 32.0
    agf_num_heads: int | None = None
    agf_form: str = "attention"

    def __post_init__(self, **kwargs):
        for alias, field in _FORK_ALIASES.items():
            if alias in kwargs:
                aliased = parse_layer_list(kwargs.pop(alias), alias)
                current = parse_layer_list(getattr(self, field), field)
                if current is not None and current != aliased:
                    raise ValueError(f"`{field}`={current} and its alias `{alias}`={aliased} disagree; give one.")
                setattr(self, field, aliased)
        self._build_sub_configs()
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(DEFAULT_AUTO_MAP)

        num_vision_layers = self.vision_config.num_hidden_layers
        num_text_layers = self.text_config.num_hidden_layers
        if isinstance(self.vision_feature_layer, bool) or not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                f"`vision_feature_layer` must be a single int for CLI (AMP shares the projector, whose input is one "
                f"vision layer), got {_short(self.vision_feature_layer)}."
            )
        normalize_layers(
            [self.vision_feature_layer], "vision_feature_layer", num_vision_layers + 1, "vision hidden_states"
        )
        self._check_image_settings()

        vision_layers = parse_layer_list(self.vision_extraction_layers, "vision_extraction_layers")
        text_layers = parse_layer_list(self.llm_injection_layers, "llm_injection_layers")
        self.vision_extraction_layers = normalize_layers(
            vision_layers if vision_layers is not None else list(range(1, num_vision_layers + 1, 4)),
            "vision_extraction_layers",
            num_vision_layers + 1,
            f"vision hidden_states of a {num_vision_layers}-layer tower, 0 = embeddings",
        )
        self.llm_injection_layers = normalize_layers(
            text_layers if text_layers is not None else list(range(1, num_text_layers, 4)),
            "llm_injection_layers",
            num_text_layers,
            f"decoder layers of a {num_text_layers}-layer LLM",
        )
        self._check_cli_sizes()

    def _build_sub_configs(self) -> None:
        """
        Builds `vision_config` / `text_config` from dicts after checking their sizes, so that a bad size or type fails
        before anything is allocated and its `ValueError` names the sub-config.
        """
        for part, spec in self.sub_configs_defaults.items():
            value = getattr(self, part)
            if isinstance(value, PreTrainedConfig) or (value is None and spec.optional):
                continue
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"`{part}` must be a dict or a config, got {type(value).__name__}.")
            _check_sizes(part, value if value is not None else spec.init_kwargs)
            model_type = (value or {}).get("model_type", spec.model_type)
            if part == "text_config" and model_type != "qwen2":
                raise ValueError(f"CLI needs a Qwen2 language model: `text_config.model_type` must be 'qwen2', got {_short(model_type)}.")
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"`{part}.model_type`={_short(model_type)} is not a model type transformers knows.")
            try:
                sub_config, _ = spec.create_subconfig(part, value)
            except StrictDataclassError as error:
                raise ValueError(
                    _type_error_message(error, CONFIG_MAPPING[model_type], value or {}, prefix=f"{part}.")
                ) from None
            setattr(self, part, sub_config)
        _check_sizes("text_config", self.text_config)
        _check_sizes("vision_config", self.vision_config)
        text = self.text_config
        if text.num_attention_heads % (text.num_key_value_heads or text.num_attention_heads):
            raise ValueError(
                f"`text_config.num_key_value_heads`={text.num_key_value_heads} must divide "
                f"`text_config.num_attention_heads`={text.num_attention_heads}."
            )

    def _check_image_settings(self) -> None:
        crop_size = self.vision_config.image_size
        match = _ASPECT_RATIO_PATTERN.fullmatch(str(self.vision_aspect_ratio))
        if match is None or not 1 <= int(match.group(1)) <= MAX_CROPS_PER_IMAGE:
            raise ValueError(
                f"`vision_aspect_ratio`={_short(self.vision_aspect_ratio)} is not supported; CLI packs images as "
                f"LLaVA-OneVision does: 'anyres_max_N' with 1 <= N <= {MAX_CROPS_PER_IMAGE} (e.g. 'anyres_max_9')."
            )
        pinpoints = self.image_grid_pinpoints
        if not isinstance(pinpoints, (list, tuple)) or not 1 <= len(pinpoints) <= MAX_GRID_PINPOINTS:
            raise ValueError(
                f"`image_grid_pinpoints` must be a list of 1..{MAX_GRID_PINPOINTS} [height, width] pairs, got "
                f"{_short(pinpoints)}."
            )
        bad = [
            point
            for point in pinpoints
            if not (
                isinstance(point, (list, tuple))
                and len(point) == 2
                and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in point)
                and point[0] % crop_size == 0
                and point[1] % crop_size == 0
                and (point[0] // crop_size) * (point[1] // crop_size) <= MAX_CROPS_PER_IMAGE
            )
        ]
        if bad:
            raise ValueError(
                f"`image_grid_pinpoints` has invalid entries {_shown(map(_short, bad))}; each must be [height, width] "
                f"in positive multiples of the crop size {crop_size} with at most {MAX_CROPS_PER_IMAGE} crops "
                f"(height * width / {crop_size}^2)."
            )

    def _check_cli_sizes(self) -> None:
        hidden_size = self.text_config.hidden_size
        max_rank = min(hidden_size, self.vision_config.hidden_size)
        if isinstance(self.amp_lora_rank, bool) or not 1 <= self.amp_lora_rank <= max_rank:
            raise ValueError(
                f"`amp_lora_rank` must be an integer >= 1 and at most the smaller width {max_rank}, got "
                f"{_short(self.amp_lora_rank)}."
            )
        alpha = self.amp_lora_alpha
        if isinstance(alpha, bool) or not (math.isfinite(alpha) and 0 < alpha <= MAX_LORA_ALPHA):
            raise ValueError(f"`amp_lora_alpha` must be a finite number > 0 and <= {MAX_LORA_ALPHA:g}, got {alpha!r}.")
        if self.agf_num_heads is None:
            self.agf_num_heads = self.text_config.num_attention_heads
        if isinstance(self.agf_num_heads, bool) or self.agf_num_heads <= 0 or hidden_size % self.agf_num_heads != 0:
            divisors = [n for n in range(1, math.isqrt(hidden_size) + 1) if hidden_size % n == 0]
            divisors = sorted(set(divisors + [hidden_size // n for n in divisors]))
            shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
            raise ValueError(
                f"`agf_num_heads`={_short(self.agf_num_heads)} must be a positive divisor of the LLM hidden_size "
                f"{hidden_size} (allowed: {shown})."
            )
        if self.agf_form not in AGF_FORMS:
            raise ValueError(f"`agf_form` must be one of {AGF_FORMS}, got {_short(self.agf_form)}.")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """
        [`PreTrainedConfig.from_dict`], refusing a CLI config that lacks `text_config` or `vision_config`: a saved CLI
        folder always holds both, and the defaults (a 4096-wide, 32-layer LLM) would silently build a different and
        huge model. `CLIConfig()` itself keeps its defaults.
        """
        cli_fields = {"vision_extraction_layers", "llm_injection_layers", *_FORK_ALIASES}
        if isinstance(config_dict, dict) and (
            config_dict.get("model_type") == cls.model_type or cli_fields & config_dict.keys()
        ):
            missing = [part for part in ("text_config", "vision_config") if config_dict.get(part) is None]
            if missing:
                raise ValueError(
                    f"This CLI config has no {' and no '.join(f'`{part}`' for part in missing)}; a CLI config must "
                    "describe both towers (a saved CLI folder's config.json always does). Nothing was built."
                )
        return super().from_dict(config_dict, **kwargs)


CLIConfig.__init__ = _raise_value_errors(CLIConfig.__init__)

__all__ = ["AGF_FORMS", "CLIConfig", "normalize_layers", "parse_layer_list"]
