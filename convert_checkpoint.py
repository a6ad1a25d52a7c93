# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Converts a CLI / LLaVA-OneVision-Qwen2 checkpoint into a self-contained CLI remote-code folder.

Sources:
- the LLaVA-NeXT fork layout of the official CLI checkpoints (and of lmms-lab's LLaVA-OneVision checkpoints):
  `config.json` with `mm_*` fields, `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`,
  `model.layers.*`, ... in safetensors;
- a transformers LLaVA-OneVision checkpoint (llava-hf layout, 4.x keys `language_model.model.*` or 5.x keys
  `model.language_model.*`): it holds no CLI weights, so they are identity-initialised (`--init-cli` is implied).

The destination holds the weights in the state-dict layout of `CLIForConditionalGeneration`, `config.json` (a
`CLIConfig` with `auto_map`), the remote-code `.py` files, processor, tokenizer (with `<image>` / `<video>`), chat
template, `generation_config.json` and a model card. Weights are streamed tensor by tensor (safetensors only, pickles
are refused); the folder is written to a temporary sibling and renamed at the end, so a failed run leaves nothing.

Run `python convert_checkpoint.py --help` for the options and the `--key-map` format.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open


KEY_MAP_HELP = r"""
--key-map format
  A JSON file (or an inline JSON string) holding a list of [regex, replacement] pairs (a JSON object
  {regex: replacement} works too). Every source key is tried against the rules in order with re.fullmatch; the first
  match wins and user rules take precedence over the built-in ones. The replacement names a key of the target layout
  (the state dict of CLIForConditionalGeneration, see --inspect) and may use the regex groups (\1, \g<name>). Extras:
    {inj:I}      the I-th LLM injection layer (llm_injection_layers[I]); AGF modules are keyed by decoder layer
                 number, e.g. model.language_model.agf.{inj:\1}.gate_bias for a source numbered 0..J-1.
    {ext:I}      the I-th vision extraction layer (vision_extraction_layers[I]).
    NAME[I]      slot I (0-based) along dim 0 of a stacked target: AMP stores model.amp.lora_A as (K, r, d_vision)
                 and model.amp.lora_B as (K, d_text, r), so a per-layer source tensor goes to model.amp.lora_A[\1].
    NAME[@V]     the slot of vision layer V (its position in vision_extraction_layers), for sources numbered by
                 vision layer: model.amp.lora_B[@\1].
    null         drop the source key (an explicit, logged decision).
    [T1, T2, ..] split the source tensor into equal chunks along dim 0, one per target (e.g. a fused
                 nn.MultiheadAttention in_proj_weight -> query_weight, key_weight, value_weight).
  Every stacked slot must be filled exactly once; shapes are checked before anything is written.
  Example (a hypothetical fork naming):
    [["model\\.cli_amp\\.(\\d+)\\.lora_A\\.weight", "model.amp.lora_A[\\1]"],
     ["model\\.cli_amp\\.(\\d+)\\.lora_B\\.weight", "model.amp.lora_B[\\1]"],
     ["model\\.cli_agf\\.(\\d+)\\.attn_v\\.in_proj_(weight|bias)",
      ["model.language_model.agf.{inj:\\1}.vision_attention.query_\\2",
       "model.language_model.agf.{inj:\\1}.vision_attention.key_\\2",
       "model.language_model.agf.{inj:\\1}.vision_attention.value_\\2"]],
     ["model\\.cli_agf\\.(\\d+)\\.attn_v\\.out_proj\\.(weight|bias)",
      "model.language_model.agf.{inj:\\1}.vision_attention.output_\\2"],
     ["model\\.cli_agf\\.(\\d+)\\.unused_buffer", null]]
"""

# SigLIP-so400m-patch14-384 as LLaVA-OneVision uses it (the fork deletes the 27th layer and the pooling head).
SIGLIP_SO400M_DEFAULTS = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}

# Qwen2 fields read from the fork's (flat) config.json into text_config; nothing else is copied.
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "layer_types",
)
QWEN2_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Built-in placement rules: (name, source regex, replacement). None drops the key (logged).
_DROP_RULES = [
    ("non-persistent rotary buffer", r"(?:.+\.)?rotary_emb\.inv_freq", None),
    ("non-persistent position_ids buffer", r"(?:.+\.)?embeddings\.position_ids", None),
]
FORK_RULES = _DROP_RULES + [
    ("fork vision tower", r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"model.vision_tower.\1"),
    ("fork projector linear_1", r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    ("fork projector linear_2", r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    ("image newline", r"model\.image_newline", "model.image_newline"),
    ("fork language model", r"model\.(embed_tokens\..+|layers\.\d+\..+|norm\..+)", r"model.language_model.\1"),
    ("lm head", r"lm_head\.weight", "lm_head.weight"),
]
LLAVA_HF_RULES = _DROP_RULES + [
    ("llava-hf 4.x language model", r"(?:model\.)?language_model\.model\.(.+)", r"model.language_model.\1"),
    ("llava-hf 4.x lm head", r"(?:model\.)?language_model\.lm_head\.weight", "lm_head.weight"),
    ("llava-hf 5.x language model", r"model\.language_model\.(.+)", r"model.language_model.\1"),
    ("llava-hf vision tower", r"(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)", r"model.vision_tower.\1"),
    ("llava-hf projector", r"(?:model\.)?multi_modal_projector\.(.+)", r"model.multi_modal_projector.\1"),
    ("image newline", r"(?:model\.)?image_newline", "model.image_newline"),
    ("lm head", r"lm_head\.weight", "lm_head.weight"),
]

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {dtype: name for name, dtype in _ST_TO_TORCH.items()}
_DTYPE_CHOICES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")
REMOTE_CODE_FILES = ("configuration_cli.py", "modeling_cli.py", "processing_cli.py")


class ConversionError(Exception):
    """A problem with the inputs or the destination; the message is meant for the user."""


# ----------------------------------------------------------------------------------------------------------------------
# small helpers


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes (decimal units like transformers, binary with 'i')."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def format_bytes(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(num) < 1000:
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.2f} {unit}"
        num /= 1000
    return f"{num:.2f} TB"


def load_json_arg(value: str, what: str):
    """A JSON argument: a path to a JSON file or an inline JSON string (never evaluated as code)."""
    text = value.strip()
    try:
        if text[:1] in "[{":
            return json.loads(text)
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConversionError(f"{what}: no such file {value!r} (give a JSON file or inline JSON).") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{what}: invalid JSON in {value!r}: {error}") from None


_NUMBER = re.compile(r"(?<=[.\[])\d+(?=[.\[\] ]|$)")  # a layer number: '.12.', '.12' at the end, a slot '[12]'


def collapse_numbers(name: str) -> tuple[str, tuple[int, ...]]:
    """'model.layers.12.mlp.weight' -> ('model.layers.N.mlp.weight', (12,)): layer numbers collapsed to N."""
    numbers = tuple(int(n) for n in re.findall(_NUMBER, name))
    return re.sub(_NUMBER, "N", name), numbers


def compact_ints(values) -> str:
    """[0, 1, 2, 3, 7, 9] -> '0-3,7,9'."""
    values = sorted(set(values))
    parts, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def group_lines(entries, indent: str = "    ") -> list[str]:
    """
    entries: (name, description) pairs, e.g. ('model.layers.3.mlp.up_proj.weight', '(128, 64) BF16').
    Returns one line per (collapsed name, description) with the layer numbers it covers.
    """
    groups: dict[tuple[str, str], list[tuple[int, ...]]] = {}
    for name, description in entries:
        pattern, numbers = collapse_numbers(name)
        groups.setdefault((pattern, description), []).append(numbers)
    rows = []
    natural = lambda item: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0][0])]  # noqa: E731
    for (pattern, description), numbers in sorted(groups.items(), key=natural):
        if numbers and numbers[0]:
            first = compact_ints(n[0] for n in numbers if n)
            label = f"N={first} ({len(numbers)})"
        else:
            label = ""
        rows.append((pattern, label, description))
    width = max((len(r[0]) for r in rows), default=0)
    label_width = max((len(r[1]) for r in rows), default=0)
    return [f"{indent}{p:<{width}}  {l:<{label_width}}  {d}".rstrip() for p, l, d in rows]


def describe(shape, dtype) -> str:
    dtype_name = dtype if isinstance(dtype, str) else _TORCH_TO_ST.get(dtype, str(dtype))
    return f"{tuple(shape)} {dtype_name}"


# ----------------------------------------------------------------------------------------------------------------------
# source


@dataclass
class SourceTensor:
    name: str
    file: str  # file name inside the source folder
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name (BF16, F32, ...)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_TO_TORCH[self.dtype].itemsize if self.dtype in _ST_TO_TORCH else 0


def resolve_source(src: str) -> Path:
    """A local folder, or a Hub repo id downloaded with huggingface_hub (safetensors, JSON and tokenizer files only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"--input {src!r} is a file; give the checkpoint folder (config.json, *.safetensors).")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        raise ConversionError(f"--input {src!r}: no such folder (and it does not look like a Hub repo id owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                src,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md", "tokenizer*"],
            )
        )
    except Exception as error:  # offline, unknown repo, gated, ...
        raise ConversionError(f"--input {src!r} is not a local folder and could not be downloaded: {error}") from None


def list_source_tensors(src: Path) -> tuple[dict[str, SourceTensor], list[str]]:
    """Reads the tensor names, shapes and dtypes (headers only). Returns the tensors and the weight files used."""
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index_path} is not a valid safetensors index: {error}") from None
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (src / name).is_file()]
        if missing:
            raise ConversionError(
                f"{index_path.name} names shard(s) that are not in {src}: {', '.join(missing)} "
                "(incomplete download?)."
            )
    else:
        weight_map = None
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(
                f"{src} holds only pickle weight files ({', '.join(pickles[:4])}"
                f"{', ...' if len(pickles) > 4 else ''}). "
                "This converter loads safetensors only, because unpickling can run arbitrary code. Convert them to "
                "safetensors first, in an environment you trust (e.g. torch.load(..., weights_only=True) + "
                "safetensors.torch.save_file)."
            )
        raise ConversionError(f"{src} holds no *.safetensors weights.")

    tensors: dict[str, SourceTensor] = {}
    for file_name in files:
        try:
            with safe_open(src / file_name, framework="pt") as handle:
                for name in handle.keys():
                    if weight_map is not None and weight_map.get(name) != file_name:
                        continue  # the index is the truth (transformers reads only what it names)
                    if name in tensors:
                        raise ConversionError(
                            f"tensor {name!r} is stored twice ({tensors[name].file} and {file_name})."
                        )
                    tensor_slice = handle.get_slice(name)
                    tensors[name] = SourceTensor(
                        name, file_name, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                    )
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(
                f"{src / file_name} is not a readable safetensors file (truncated or corrupt download?): {error}"
            ) from None
    if weight_map is not None:
        absent = [name for name in weight_map if name not in tensors]
        if absent:
            raise ConversionError(
                f"{index_path.name} lists {len(absent)} tensor(s) that their shard does not hold, e.g. "
                f"{absent[0]!r} in {weight_map[absent[0]]}."
            )
    return tensors, files


def read_source_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object.")
    return config


def detect_layout(source_config: dict) -> str:
    """'fork' (LLaVA-NeXT / CLI fork, flat config with mm_* fields) or 'llava-hf' (transformers LLaVA-OneVision)."""
    model_type = source_config.get("model_type")
    if any(key.startswith("mm_") for key in source_config):
        return "fork"
    if model_type == "llava_onevision":
        return "llava-hf"
    if model_type == "cli":
        raise ConversionError("config.json is already a CLI config (model_type 'cli'): nothing to convert.")
    raise ConversionError(
        f"config.json (model_type {model_type!r}) has no mm_* fields (mm_vision_tower, mm_projector_type, ...) and is "
        "not a transformers LLaVA-OneVision config (model_type 'llava_onevision'): cannot tell how to read it. "
        "Expected a LLaVA-NeXT/CLI-fork checkpoint or a llava-hf LLaVA-OneVision checkpoint."
    )


def parse_grid_pinpoints(value, crop_size: int) -> list[list[int]]:
    """
    The fork's `image_grid_pinpoints` -> transformers' `[[height, width], ...]`.

    LLaVA-NeXT accepts a list of (width, height) pairs, a string holding such a list, or a range string
    '(1x1),...,(6x6)' meaning every (i x j) grid between the first and last pair, in multiples of the crop size.
    The order is kept (it breaks ties in the best-resolution search); each pair is swapped to (height, width).
    """
    if isinstance(value, str):
        ranges = re.findall(r"\((\d+)x(\d+)\)", value)
        if ranges:
            (first_w, first_h), (last_w, last_h) = ranges[0], ranges[-1]
            pairs = [
                (i * crop_size, j * crop_size)
                for i in range(int(first_w), int(last_w) + 1)
                for j in range(int(first_h), int(last_h) + 1)
            ]
        else:
            pairs = [(int(w), int(h)) for w, h in re.findall(r"[\[(]\s*(\d+)\s*,\s*(\d+)\s*[\])]", value)]
    elif isinstance(value, (list, tuple)):
        pairs = []
        for pair in value:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                raise ConversionError(f"image_grid_pinpoints: cannot read {pair!r}; expected [width, height] pairs.")
            pairs.append((pair[0], pair[1]))
    else:
        raise ConversionError(f"image_grid_pinpoints: cannot read {value!r}.")
    if not pairs:
        raise ConversionError(f"image_grid_pinpoints: {value!r} holds no resolution.")
    return [[height, width] for width, height in pairs]


# ----------------------------------------------------------------------------------------------------------------------
# config


def _layer_setting(args_value, source_config: dict, names: tuple[str, ...]):
    if args_value is not None:
        return args_value
    for name in names:
        if source_config.get(name) is not None:
            return source_config[name]
    return None


def _cli_settings(args, source_config: dict) -> dict:
    settings = {
        "vision_extraction_layers": _layer_setting(
            args.vision_extraction_layers, source_config,
            ("vision_extraction_layers", "vision_exp_layers", "mm_vision_exp_layers"),
        ),
        "llm_injection_layers": _layer_setting(
            args.llm_injection_layers, source_config, ("llm_injection_layers", "vlm_exp_layers", "mm_vlm_exp_layers")
        ),
    }
    for name in ("amp_lora_rank", "amp_lora_alpha", "agf_num_heads"):
        value = getattr(args, name)
        if value is None:
            value = source_config.get(name)
        if value is not None:
            settings[name] = value
    return settings


def build_fork_config(source_config: dict, args, vision_overrides: dict | None):
    """CLIConfig from the fork's flat config.json (+ --vision-config, + the layer options)."""
    from transformers import Qwen2Config

    from configuration_cli import CLIConfig

    problems = []
    projector = source_config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        problems.append(f"mm_projector_type is {projector!r}; CLI / LLaVA-OneVision use 'mlp2x_gelu'.")
    merge = source_config.get("mm_patch_merge_type", "spatial_unpad")
    if merge != "spatial_unpad":
        problems.append(f"mm_patch_merge_type is {merge!r}; only 'spatial_unpad' (LLaVA-OneVision's) is supported.")
    aspect = source_config.get("image_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
        problems.append(f"image_aspect_ratio is {aspect!r}; CLI packs images as 'anyres_max_N' (LLaVA-OneVision).")
    tower = str(source_config.get("mm_vision_tower", ""))
    if "siglip" not in tower.lower() and not (vision_overrides and "model_type" in vision_overrides):
        problems.append(
            f"mm_vision_tower is {tower!r}, not a SigLIP tower; give its architecture with --vision-config "
            "(including model_type) if this is intended."
        )
    missing = [name for name in QWEN2_REQUIRED if name not in source_config]
    if missing:
        problems.append(f"config.json lacks the Qwen2 field(s) {', '.join(missing)}.")
    if problems:
        raise ConversionError("unsupported fork config:\n  " + "\n  ".join(problems))

    vision = dict(SIGLIP_SO400M_DEFAULTS)
    if source_config.get("mm_hidden_size") is not None:
        vision["hidden_size"] = source_config["mm_hidden_size"]
    vision.update(vision_overrides or {})
    if vision["hidden_size"] != 1152 and "num_attention_heads" not in (vision_overrides or {}):
        raise ConversionError(
            f"the vision tower has hidden size {vision['hidden_size']}, not SigLIP-so400m's 1152, and its head count "
            "cannot be read from the weights: give it with --vision-config '{\"num_attention_heads\": H, ...}'."
        )

    text = {name: source_config[name] for name in QWEN2_FIELDS if source_config.get(name) is not None}
    rope = dict(text.pop("rope_scaling", None) or {})
    if rope:
        rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = text.pop("rope_theta", 10000.0)
    text["rope_parameters"] = rope
    try:
        text_config = Qwen2Config(**text).to_dict()
    except (TypeError, ValueError) as error:
        raise ConversionError(f"cannot build the Qwen2 text config from config.json: {error}") from None
    tied = bool(source_config.get("tie_word_embeddings", False))

    pinpoints = parse_grid_pinpoints(
        source_config.get("image_grid_pinpoints", "(1x1),...,(6x6)"), int(vision["image_size"])
    )
    kwargs = dict(
        vision_config=vision,
        text_config=text_config,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=str(aspect),
        # the fork's SigLIP tower always returns the last of its 26 layers (mm_vision_select_layer is ignored) and has
        # no CLS token, exactly what llava-hf's conversion encodes as -1 / "full"
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
        **_cli_settings(args, source_config),
    )
    try:
        return CLIConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid CLI configuration: {error}") from None


def build_llava_hf_config(source_config: dict, args, vision_overrides: dict | None):
    """CLIConfig from a transformers LLaVA-OneVision config.json (+ the layer options)."""
    from transformers import LlavaOnevisionConfig

    from configuration_cli import CLIConfig

    fields = {k: v for k, v in source_config.items() if k not in ("model_type", "architectures", "auto_map")}
    try:
        base = LlavaOnevisionConfig(**fields).to_dict()
    except (TypeError, ValueError) as error:
        raise ConversionError(f"cannot read config.json as a LLaVA-OneVision config: {error}") from None
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        base.pop(key, None)
    if vision_overrides:
        base["vision_config"] = {**base["vision_config"], **vision_overrides}
    if base.get("text_config", {}).get("model_type") != "qwen2":
        text_type = base.get("text_config", {}).get("model_type")
        raise ConversionError(f"CLI needs a Qwen2 language model, got {text_type!r}.")
    try:
        return CLIConfig(**base, **_cli_settings(args, source_config))
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid CLI configuration: {error}") from None


# ----------------------------------------------------------------------------------------------------------------------
# key mapping


@dataclass
class Rule:
    name: str
    pattern: re.Pattern
    replacement: object  # str, list[str] or None
    user: bool = False
    hits: int = 0


def load_key_map(value: str | None) -> list[Rule]:
    if value is None:
        return []
    data = load_json_arg(value, "--key-map")
    if isinstance(data, dict):
        data = list(data.items())
    if not isinstance(data, list):
        raise ConversionError("--key-map must hold a JSON list of [regex, replacement] pairs.")
    rules = []
    for i, item in enumerate(data):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConversionError(f"--key-map rule #{i}: expected [regex, replacement], got {item!r}.")
        regex, replacement = item
        valid = replacement is None or isinstance(replacement, str) or (
            isinstance(replacement, list) and replacement and all(isinstance(r, str) for r in replacement)
        )
        if not valid:
            raise ConversionError(
                f"--key-map rule #{i}: the replacement must be a string, a list of strings or null, "
                f"got {replacement!r}."
            )
        try:
            pattern = re.compile(regex)
        except re.error as error:
            raise ConversionError(f"--key-map rule #{i}: invalid regex {regex!r}: {error}") from None
        rules.append(Rule(f"--key-map #{i}", pattern, replacement, user=True))
    return rules


@dataclass
class Piece:
    """One source tensor (or one dim-0 chunk of it) feeding a target tensor (or one slot of a stacked target)."""

    source: str
    chunk: tuple[int, int] | None = None  # (index, count)
    slot: int | None = None


@dataclass
class Target:
    name: str
    shape: tuple[int, ...]
    kind: str  # "base" or "cli"
    pieces: list[Piece] = field(default_factory=list)
    init: bool = False
    dtype: torch.dtype | None = None  # output dtype, set once the plan is complete

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_SLOT = re.compile(r"(?P<name>[^\[\]]+)\[(?P<at>@?)(?P<index>-?\d+)\]")
_LAYER_REF = re.compile(r"\{(inj|ext):(-?\d+)\}")


def _resolve_target(text: str, config) -> tuple[str, int | None]:
    """Expands {inj:I} / {ext:I} and splits a trailing slot NAME[I] / NAME[@V]."""
    lists = {"inj": config.llm_injection_layers, "ext": config.vision_extraction_layers}

    def layer(match):
        kind, index = match.group(1), int(match.group(2))
        if not 0 <= index < len(lists[kind]):
            raise ValueError(f"{{{kind}:{index}}} is out of range ({len(lists[kind])} layers: {lists[kind]})")
        return str(lists[kind][index])

    text = _LAYER_REF.sub(layer, text)
    match = _SLOT.fullmatch(text)
    if match is None:
        if "[" in text or "{" in text:
            raise ValueError(f"cannot read target {text!r} (slots are NAME[I] or NAME[@V], layers {{inj:I}}/{{ext:I}})")
        return text, None
    index = int(match.group("index"))
    if match.group("at"):
        if index not in config.vision_extraction_layers:
            raise ValueError(f"vision layer {index} is not an extraction layer {config.vision_extraction_layers}")
        index = config.vision_extraction_layers.index(index)
    return match.group("name"), index


def is_cli_target(name: str) -> bool:
    return name.startswith("model.amp.") or name.startswith("model.language_model.agf.")


def cli_module_of(name: str) -> str:
    """The module that owns a CLI target: 'model.amp' or 'model.language_model.agf.<j>'."""
    if name.startswith("model.amp."):
        return "model.amp"
    return ".".join(name.split(".")[:4])


@dataclass
class Plan:
    source: Path
    layout: str
    config: object
    sources: dict[str, SourceTensor]
    files: list[str]
    targets: dict[str, Target]
    rules: list[Rule]
    routes: list[tuple[str, str, Rule]] = field(default_factory=list)  # (source, target text, rule)
    dropped: list[tuple[str, Rule]] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model_dtype: torch.dtype = torch.float32
    shards: list[list[str]] = field(default_factory=list)
    seed: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())


def expected_targets(config) -> dict[str, Target]:
    """The state dict of CLIForConditionalGeneration(config), built on the meta device (no memory)."""
    from modeling_cli import CLIForConditionalGeneration

    with torch.device("meta"):
        model = CLIForConditionalGeneration(copy.deepcopy(config))
    targets = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the input embeddings: transformers neither saves nor expects it
        targets[name] = Target(name, tuple(tensor.shape), "cli" if is_cli_target(name) else "base")
    return targets


def plan_conversion(src: Path, args, sources: dict, files: list, layout: str, config, rules: list[Rule]) -> Plan:
    targets = expected_targets(config)
    builtin = FORK_RULES if layout == "fork" else LLAVA_HF_RULES
    all_rules = rules + [Rule(name, re.compile(regex), repl) for name, regex, repl in builtin]
    plan = Plan(src, layout, config, sources, files, targets, all_rules, seed=args.seed)
    problems = defaultdict(list)
    unknown, unexpected, mismatched, bad = [], [], [], []
    reported = set()  # targets already in a problem list (not reported missing again)

    for tensor in sources.values():
        rule = next((r for r in all_rules if r.pattern.fullmatch(tensor.name)), None)
        if rule is None:
            unknown.append((tensor.name, describe(tensor.shape, tensor.dtype)))
            continue
        rule.hits += 1
        if rule.replacement is None:
            plan.dropped.append((tensor.name, rule))
            continue
        if tensor.name == "lm_head.weight" or rule.replacement == "lm_head.weight":
            if config.tie_word_embeddings:
                # transformers (and the fork, which loads through it) ties lm_head to the embeddings and ignores it
                tied = Rule("tied to embed_tokens (tie_word_embeddings)", rule.pattern, None)
                plan.dropped.append((tensor.name, tied))
                continue
        match = rule.pattern.fullmatch(tensor.name)
        replacements = rule.replacement if isinstance(rule.replacement, list) else [rule.replacement]
        for chunk_index, replacement in enumerate(replacements):
            try:
                target_text = match.expand(replacement)
                target_name, slot = _resolve_target(target_text, config)
            except (ValueError, re.error, IndexError) as error:
                bad.append(f"{tensor.name} ({rule.name}): {error}")
                continue
            shown = target_name if slot is None else f"{target_name}[{slot}]"
            plan.routes.append((tensor.name, shown, rule))
            target = targets.get(target_name)
            if target is None:
                unexpected.append((f"{tensor.name} -> {shown}", describe(tensor.shape, tensor.dtype)))
                continue
            chunk = (chunk_index, len(replacements)) if len(replacements) > 1 else None
            shape = tensor.shape
            if chunk is not None:
                if not shape or shape[0] % chunk[1]:
                    bad.append(f"{tensor.name} {tuple(shape)} cannot be split into {chunk[1]} equal chunks along dim 0")
                    reported.add(target_name)
                    continue
                shape = (shape[0] // chunk[1], *shape[1:])
            expected = target.shape if slot is None else target.shape[1:]
            if slot is not None and not (target.shape and 0 <= slot < target.shape[0]):
                bad.append(f"{tensor.name} -> {target_text}: slot {slot} is out of range for {target_name} "
                           f"{target.shape}")
                reported.add(target_name)
                continue
            if tuple(shape) != tuple(expected):
                where = target_name if slot is None else f"{target_name}[{slot}]"
                mismatched.append((f"{tensor.name} -> {where}", f"got {tuple(shape)}, expected {tuple(expected)}"))
                reported.add(target_name)
                continue
            target.pieces.append(Piece(tensor.name, chunk, slot))

    if unknown:
        problems[
            "unknown source keys (no rule places them; add a --key-map rule, or map them to null to drop them)"
        ] = group_lines(unknown, indent="")
    if unexpected:
        problems["keys mapped to names our model does not have (source -> target)"] = group_lines(unexpected, indent="")
    if mismatched:
        problems["shape mismatches (source -> target)"] = group_lines(mismatched, indent="")
    problems["invalid --key-map results"].extend(bad)

    missing_base, missing_cli = [], []
    for target in targets.values():
        if target.name in reported:
            continue
        slots = [piece.slot for piece in target.pieces]
        whole = slots.count(None)
        if whole > 1 or (whole and len(slots) > 1) or len(set(slots)) != len(slots):
            sources_text = ", ".join(
                piece.source + ("" if piece.slot is None else f" (slot {piece.slot})") for piece in target.pieces
            )
            problems["targets filled more than once"].append(f"{target.name} <- {sources_text}")
            continue
        if slots and None not in slots:
            absent = sorted(set(range(target.shape[0])) - set(slots))
            if absent:
                (missing_cli if target.kind == "cli" else missing_base).append(
                    (f"{target.name}[slots {compact_ints(absent)}]", describe(target.shape, "")))
            continue
        if not target.pieces:
            (missing_cli if target.kind == "cli" else missing_base).append((target.name, describe(target.shape, "")))

    if missing_base:
        problems["missing weights of the base model (the source does not hold them)"] = group_lines(
            missing_base, indent=""
        )
    if missing_cli:
        if args.init_cli:
            for name, _ in missing_cli:
                name = name.split("[")[0]
                targets[name].init = True
                targets[name].pieces = []  # a partially filled stack is initialised whole
        else:
            problems[
                "missing CLI weights (pass --init-cli for identity initialisation, or map them with --key-map)"
            ] = group_lines(missing_cli, indent="")
    plan.problems = {title: lines for title, lines in problems.items() if lines}
    if layout == "fork" and any("vision_tower" in line for lines in plan.problems.values() for line in lines):
        plan.problems["hint"] = [
            "the fork's config.json does not describe the vision tower: its sizes come from --vision-config, else "
            "SigLIP-so400m's (hidden 1152, intermediate 4304, 26 layers, 16 heads, image 384, patch 14)"
        ]

    # dtypes: keep each tensor's (auto) or cast every floating tensor; initialised tensors take the model's dtype
    float_bytes = Counter()
    for tensor in sources.values():
        dtype = _ST_TO_TORCH.get(tensor.dtype)
        if dtype is not None and dtype.is_floating_point:
            float_bytes[dtype] += tensor.nbytes
    source_dtype = float_bytes.most_common(1)[0][0] if float_bytes else torch.float32
    plan.model_dtype = _DTYPE_CHOICES[args.dtype] if args.dtype != "auto" else source_dtype
    for target in targets.values():
        if target.init or not target.pieces:
            target.dtype = plan.model_dtype
            continue
        dtype = _ST_TO_TORCH[sources[target.pieces[0].source].dtype]
        target.dtype = plan.model_dtype if args.dtype != "auto" and dtype.is_floating_point else dtype
    if len(float_bytes) > 1:
        plan.notes.append(
            "source mixes floating dtypes " + ", ".join(_TORCH_TO_ST[d] for d in float_bytes) +
            (f"; all are cast to {args.dtype}" if args.dtype != "auto" else "; each keeps its own (--dtype auto)")
        )

    # shards, in state-dict order
    shard, shard_bytes = [], 0
    for target in targets.values():
        if shard and shard_bytes + target.nbytes > args.max_shard_size:
            plan.shards.append(shard)
            shard, shard_bytes = [], 0
        shard.append(target.name)
        shard_bytes += target.nbytes
    if shard:
        plan.shards.append(shard)
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# reporting


def report_plan(plan: Plan, out) -> None:
    config = plan.config
    total = sum(t.nbytes for t in plan.sources.values())
    dtypes = Counter(t.dtype for t in plan.sources.values())
    layout = {"fork": "LLaVA-NeXT / CLI fork (mm_* config)", "llava-hf": "transformers LLaVA-OneVision (llava-hf)"}
    print(f"Source: {plan.source}", file=out)
    print(f"  layout: {layout[plan.layout]}; {len(plan.sources)} tensors, {format_bytes(total)} in "
          f"{len(plan.files)} file(s); dtypes: " + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common()), file=out)
    print("Source keys (layer numbers collapsed to N):", file=out)
    for line in group_lines((t.name, describe(t.shape, t.dtype)) for t in plan.sources.values()):
        print(line, file=out)

    print("Planned mapping (rule: source regex -> target, tensors):", file=out)
    per_rule = Counter(rule.name for _, _, rule in plan.routes)
    seen = set()
    for source, target, rule in plan.routes:
        if rule.name in seen:
            continue
        seen.add(rule.name)
        replacement = rule.replacement if isinstance(rule.replacement, str) else " | ".join(rule.replacement)
        print(f"    [{rule.name}] {rule.pattern.pattern} -> {replacement}  ({per_rule[rule.name]})", file=out)
        if rule.user:  # show how the first key resolves ({inj:I}, slots, chunks)
            resolved = " | ".join(t for s, t, r in plan.routes if s == source and r is rule)
            print(f"        e.g. {source} -> {resolved}", file=out)
    if plan.dropped:
        print("Dropped source keys (explicit rules):", file=out)
        reasons = defaultdict(list)
        for name, rule in plan.dropped:
            reasons[rule.name].append((name, describe(plan.sources[name].shape, plan.sources[name].dtype)))
        for reason, entries in reasons.items():
            print(f"  [{reason}]", file=out)
            for line in group_lines(entries, indent="    "):
                print(line, file=out)
    initialised = [(t.name, describe(t.shape, t.dtype)) for t in plan.targets.values() if t.init]
    if initialised:
        print(f"Identity-initialised CLI weights (--init-cli, seed {plan.seed}; gates and LoRA B are zero):", file=out)
        for line in group_lines(initialised):
            print(line, file=out)

    out_bytes = sum(t.nbytes for t in plan.targets.values())
    print(f"Target: CLIForConditionalGeneration, {len(plan.targets)} tensors, {format_bytes(out_bytes)} in "
          f"{len(plan.shards)} shard(s), dtype {str(plan.model_dtype).removeprefix('torch.')}", file=out)
    print(f"  vision_extraction_layers={config.vision_extraction_layers} llm_injection_layers="
          f"{config.llm_injection_layers} amp_lora_rank={config.amp_lora_rank} amp_lora_alpha={config.amp_lora_alpha} "
          f"agf_num_heads={config.agf_num_heads}", file=out)
    vision, text = config.vision_config, config.text_config
    print(f"  vision: {vision.num_hidden_layers} layers, hidden {vision.hidden_size}, "
          f"heads {vision.num_attention_heads},"
          f" image {vision.image_size}/patch {vision.patch_size}; text: {text.num_hidden_layers} layers, hidden "
          f"{text.hidden_size}, vocab {text.vocab_size}, tied embeddings {config.tie_word_embeddings}; "
          f"{len(config.image_grid_pinpoints)} grid pinpoints, {config.vision_aspect_ratio}", file=out)
    for note in plan.notes:
        print(f"Note: {note}", file=out)
    if plan.ok:
        print("Problems: none", file=out)
    else:
        print(format_problems(plan.problems), file=out)


def format_problems(problems: dict[str, list[str]]) -> str:
    lines = [f"Problems ({sum(len(v) for v in problems.values())} line(s)):"]
    for title, entries in problems.items():
        lines.append(f"  {title}:")
        lines.extend(f"    {entry}" for entry in entries)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# writing


def _safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def write_safetensors_file(path: Path, entries, tensors) -> None:
    """
    Writes a safetensors file tensor by tensor: the header first (shapes and dtypes are known from the plan), then
    each tensor's bytes as `tensors` yields it, so only one tensor is in memory at a time.
    """
    entries = list(entries)
    with open(path, "wb") as handle:
        handle.write(_safetensors_header(entries, {"format": "pt"}))
        for (name, dtype, shape), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            if sys.byteorder != "little":
                raise ConversionError("writing safetensors needs a little-endian machine.")
            flat = tensor.contiguous().reshape(-1)
            if flat.numel():
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
            del flat, tensor


class TensorSource:
    """
    Reads source tensors with safetensors' safe_open. The file is opened for each read and closed right after:
    safe_open memory-maps the file, and pages read through a mapping stay in the process's resident set until it is
    unmapped, so a handle kept open would grow the RSS by everything read from that file.
    """

    def __init__(self, plan: Plan):
        self.plan = plan

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def read(self, piece: Piece) -> torch.Tensor:
        tensor = self.plan.sources[piece.source]
        with safe_open(self.plan.source / tensor.file, framework="pt") as handle:
            if piece.chunk is None:
                return handle.get_tensor(piece.source)
            index, count = piece.chunk
            size = tensor.shape[0] // count
            return handle.get_slice(piece.source)[index * size : (index + 1) * size].clone()


class CLIInitializer:
    """
    Identity initialisation of the CLI modules with the model's own `_init_weights` (gates and LoRA B zero), one module
    at a time (AMP, or one AGF layer), seeded per module so the result does not depend on order or sharding.
    """

    def __init__(self, config, seed: int):
        from modeling_cli import CLIForConditionalGeneration

        with torch.device("meta"):
            self.model = CLIForConditionalGeneration(copy.deepcopy(config))
        self.seed = seed
        self.cache_name, self.cache = None, {}

    def tensor(self, name: str) -> torch.Tensor:
        module_name = cli_module_of(name)
        if module_name != self.cache_name:
            self.cache_name, self.cache = module_name, self._init_module(module_name)
        return self.cache[name]

    def _init_module(self, module_name: str) -> dict[str, torch.Tensor]:
        module = copy.deepcopy(self.model.get_submodule(module_name)).to_empty(device="cpu").float()
        with torch.no_grad():
            for tensor in module.parameters():
                tensor.fill_(float("nan"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + zlib.crc32(module_name.encode()))
            for submodule in module.modules():
                self.model._init_weights(submodule)
        state = {f"{module_name}.{key}": value for key, value in module.state_dict().items()}
        not_set = [key for key, value in state.items() if value.isnan().any()]
        if not_set:
            raise RuntimeError(f"internal: _init_weights left {not_set} uninitialised.")
        return state


def write_weights(plan: Plan, folder: Path, progress: bool = True) -> dict:
    """Streams every target tensor into `folder`; returns statistics."""
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in plan.targets.values())
    count = len(plan.shards)
    names = ["model.safetensors"] if count == 1 else [
        f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
    ]
    initializer = CLIInitializer(plan.config, plan.seed) if any(t.init for t in plan.targets.values()) else None
    weight_map = {}
    start = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress, leave=False)
    with TensorSource(plan) as reader:

        def produce(shard):
            for name in shard:
                target = plan.targets[name]
                if target.init:
                    tensor = initializer.tensor(name)
                elif target.pieces[0].slot is not None:
                    slots = sorted(target.pieces, key=lambda piece: piece.slot)
                    tensor = torch.stack([reader.read(piece) for piece in slots])
                else:
                    tensor = reader.read(target.pieces[0])
                tensor = tensor.to(target.dtype)
                bar.update(target.nbytes)
                yield tensor

        for file_name, shard in zip(names, plan.shards):
            entries = [(name, plan.targets[name].dtype, plan.targets[name].shape) for name in shard]
            write_safetensors_file(folder / file_name, entries, produce(shard))
            weight_map.update({name: file_name for name in shard})
    bar.close()
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # a cheap check of what was written: headers only
    for file_name in names:
        with safe_open(folder / file_name, framework="pt") as handle:
            keys = set(handle.keys())
        if keys != {name for name, f in weight_map.items() if f == file_name}:
            raise RuntimeError(f"internal: {file_name} does not hold the planned tensors.")
    return {"bytes": total, "seconds": time.perf_counter() - start, "files": names}


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer, processor, generation config, model card


def load_tokenizer(src: Path):
    if not any((src / name).is_file() for name in _TOKENIZER_FILES):
        raise ConversionError(f"{src} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}).")
    import transformers

    # keep the tokenizer class the source declares (AutoTokenizer would follow config.json's model_type instead)
    declared = None
    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError, AttributeError):
            declared = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
    tokenizer_class = getattr(transformers, declared, None) if isinstance(declared, str) else None
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, transformers.PreTrainedTokenizerBase)):
        tokenizer_class = transformers.AutoTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(os.fspath(src))
    except Exception as error:
        raise ConversionError(f"cannot load the tokenizer from {src}: {error}") from None
    add_multimodal_tokens(tokenizer)
    return tokenizer


def add_multimodal_tokens(tokenizer) -> None:
    """`<image>` and `<video>` as LLaVA-NeXT adds them (special, not normalised, no strip); kept if already there."""
    import processing_cli

    processing_cli.add_cli_special_tokens(tokenizer)


def tokenizer_ids(tokenizer, config) -> tuple[int, int]:
    vocab = tokenizer.get_vocab()
    image_id, video_id = vocab["<image>"], vocab["<video>"]
    rows = config.text_config.vocab_size
    if max(image_id, video_id) >= rows:
        raise ConversionError(
            f"the tokenizer's <image>/<video> ids ({image_id}, {video_id}) do not fit the {rows}-row embedding "
            "matrix; resizing the embeddings is not supported by this converter."
        )
    return image_id, video_id


def build_processor(config, tokenizer):
    """CLIProcessor (LLaVA-NeXT image processing, qwen_1_5 chat template) around the source tokenizer."""
    import processing_cli

    vision = config.vision_config
    # the qwen_1_5 template for the tokenizer too (a source tokenizer may carry Qwen's own), so both loaders agree
    tokenizer.chat_template = processing_cli.CLI_CHAT_TEMPLATE
    image_processor = processing_cli.CLIImageProcessor(
        size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    return processing_cli.CLIProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=processing_cli.CLI_CHAT_TEMPLATE,
    )


def build_generation_config(src: Path, config, tokenizer):
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(os.fspath(src))
    else:
        generation = GenerationConfig(
            bos_token_id=config.text_config.bos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    eos = generation.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    # LLaVA-NeXT's qwen_1_5 conversations stop at <|im_end|>
    for token in ("<|im_end|>", tokenizer.eos_token):
        token_id = tokenizer.get_vocab().get(token) if token else None
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos or None
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return generation


def model_card(config, base_model: str | None, source_label: str, layout: str, initialised: bool) -> str:
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if base_model:
        header.append(f"base_model: {base_model}")
    header += ["tags:", "- cli", "- llava-onevision", "- image-text-to-text", "- multimodal", "- custom_code", "---"]
    vision, text = config.vision_config, config.text_config
    layout_name = "LLaVA-NeXT / CLI fork layout" if layout == "fork" else "transformers llava-hf layout"
    if initialised:
        state = (
            "The CLI modules (AMP LoRA, AGF gates) were **identity-initialised** by the converter: gates and LoRA B "
            "are zero, so until it is fine-tuned this model computes exactly what its base LLaVA-OneVision computes."
        )
    else:
        state = "The CLI modules (AMP LoRA, AGF gates) carry the trained weights of the source checkpoint."
    return "\n".join(header) + f"""

# CLI (Cross-Layer Injection) — {source_label}

LLaVA-OneVision-Qwen2 with a many-to-many vision-language bridge (CLI, arXiv 2601.10710): AMP projects several vision
layers through the shared projector plus a per-layer LoRA, and AGF gates them into several LLM decoder layers.
Converted from `{source_label}` ({layout_name})
with `convert_checkpoint.py`. {state}

## Layer configuration

| setting | value |
|---|---|
| vision extraction layers (`vision_extraction_layers`) | `{config.vision_extraction_layers}` |
| LLM injection layers (`llm_injection_layers`) | `{config.llm_injection_layers}` |
| AMP LoRA rank / alpha | {config.amp_lora_rank} / {config.amp_lora_alpha} |
| AGF heads | {config.agf_num_heads} |
| vision tower | SigLIP, {vision.num_hidden_layers} layers, {vision.image_size} px, patch {vision.patch_size} |
| language model | Qwen2, {text.num_hidden_layers} layers, hidden {text.hidden_size} |
| images | {config.vision_aspect_ratio}, {len(config.image_grid_pinpoints)} grid pinpoints |

## Usage

The model is remote code: load it with `trust_remote_code=True`.

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "path/or/repo-of-this-model"
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe this image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("image.jpg"), text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`model(..., output_gate_weights=True)` returns the AGF gates `(num_injection_layers, batch, num_extraction_layers)`.
"""


def guess_base_model(args, source_config: dict) -> str | None:
    if args.base_model:
        return args.base_model
    if not Path(args.input).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", args.input):
        return args.input
    name = source_config.get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def copy_remote_code(folder: Path) -> list[str]:
    """Copies the remote-code files and every file they import relatively (what `trust_remote_code` loads)."""
    import importlib

    from transformers.dynamic_module_utils import get_relative_import_files

    files = set()
    for name in REMOTE_CODE_FILES:
        path = Path(importlib.import_module(name.removesuffix(".py")).__file__)
        files.add(path)
        files.update(Path(f) for f in get_relative_import_files(os.fspath(path)))
    for path in sorted(files):
        shutil.copy2(path, folder / path.name)
    return sorted(path.name for path in files)


# ----------------------------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=(
            "Convert a CLI / LLaVA-OneVision-Qwen2 checkpoint (LLaVA-NeXT fork layout with mm_* config fields, or a "
            "transformers llava-hf LLaVA-OneVision checkpoint) into a self-contained CLI remote-code folder. "
            "Every source key is placed by a built-in rule or a --key-map rule; unknown keys, missing weights or "
            "shape mismatches stop the run before anything is written."
        ),
        epilog=KEY_MAP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="source folder, or a Hub repo id (downloaded when online)")
    parser.add_argument("--output", help="destination folder (required unless --inspect)")
    parser.add_argument(
        "--vision-config",
        help="JSON file or inline JSON of SigLIP config fields overriding the so400m defaults (hidden 1152, "
        "intermediate 4304, 26 layers, 16 heads, image 384, patch 14); the fork's config does not store them",
    )
    parser.add_argument(
        "--init-cli", action="store_true",
        help="identity-initialise CLI weights the source does not hold (gates and LoRA B zero); implied for "
        "llava-hf sources, which cannot hold CLI weights",
    )
    parser.add_argument("--key-map", help="JSON file or inline JSON: extra [regex, replacement] rules (see below)")
    parser.add_argument("--dtype", choices=["auto", *_DTYPE_CHOICES], default="auto",
                        help="output dtype of floating tensors (auto: keep the source's, e.g. bfloat16)")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest output shard (default 5GB; e.g. 2GB, 500MB)")
    parser.add_argument("--inspect", action="store_true",
                        help="print the source keys and the planned mapping, write nothing (exit 1 if it would fail)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this Hub repo (needs a login)")
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    parser.add_argument(
        "--vision-extraction-layers", "--vision_exp_layers", dest="vision_extraction_layers",
        help="vision layers AMP reads, e.g. RANGE-1-28-4 or 1,5,9 (default: the source config's "
        "vision_exp_layers, else CLIConfig's default)",
    )
    parser.add_argument(
        "--llm-injection-layers", "--vlm_exp_layers", dest="llm_injection_layers",
        help="LLM decoder layers AGF injects into, same formats (default: the source config's vlm_exp_layers, else "
        "CLIConfig's default)",
    )
    parser.add_argument("--amp-lora-rank", type=int, help="AMP LoRA rank (default: source config, else 16)")
    parser.add_argument("--amp-lora-alpha", type=float, help="AMP LoRA alpha (default: source config, else 32)")
    parser.add_argument("--agf-num-heads", type=int, help="AGF attention heads (default: the LLM's head count)")
    parser.add_argument("--base-model", help="base_model for the model card (default: the Hub id of --input if any)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init-cli's random (non-gate) parameters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prepare(args) -> tuple[Plan, dict]:
    """Everything up to the plan (reads configs and headers, never tensor data)."""
    src = resolve_source(args.input)
    source_config = read_source_config(src)
    layout = detect_layout(source_config)
    sources, files = list_source_tensors(src)
    vision_overrides = load_json_arg(args.vision_config, "--vision-config") if args.vision_config else None
    if vision_overrides is not None and not isinstance(vision_overrides, dict):
        raise ConversionError("--vision-config must hold a JSON object of SigLIP config fields.")
    rules = load_key_map(args.key_map)
    if layout == "fork":
        config = build_fork_config(source_config, args, vision_overrides)
    else:
        config = build_llava_hf_config(source_config, args, vision_overrides)
        args.init_cli = True
    tokenizer = load_tokenizer(src)
    image_id, video_id = tokenizer_ids(tokenizer, config)
    if layout == "llava-hf" and source_config.get("image_token_index", image_id) != image_id:
        raise ConversionError(
            f"config.json says image_token_index={source_config['image_token_index']} but the tokenizer's <image> "
            f"is {image_id}."
        )
    config.image_token_id, config.video_token_id = image_id, video_id
    config.architectures = ["CLIForConditionalGeneration"]
    plan = plan_conversion(src, args, sources, files, layout, config, rules)
    if layout == "fork" and source_config.get("mm_vision_select_layer", -1) != -1:
        plan.notes.append(
            f"mm_vision_select_layer={source_config['mm_vision_select_layer']} is not used: LLaVA-NeXT's SigLIP tower "
            "always returns the last of its layers, which is vision_feature_layer=-1 here."
        )
    if layout == "llava-hf":
        plan.notes.append("llava-hf source: it holds no CLI weights, so they are identity-initialised (--init-cli).")
    config.dtype = plan.model_dtype
    return plan, {"source_config": source_config, "tokenizer": tokenizer}


def finalize(temporary: Path, output: Path, force: bool) -> None:
    if output.exists():
        if not force:
            raise ConversionError(f"--output {output} exists; pass --force to replace it.")
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
        try:
            os.replace(temporary, output)
        except BaseException:
            os.replace(old, output)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(temporary, output)


def convert(args, out=None) -> Path | Plan:
    out = out or sys.stdout
    if not args.inspect and not args.output:
        raise ConversionError("--output is required (or use --inspect).")
    output = Path(args.output).expanduser().resolve() if args.output else None
    if output is not None and not args.inspect:
        if output.exists() and not args.force:
            raise ConversionError(f"--output {output} exists; pass --force to replace it.")
        source = Path(args.input).expanduser().resolve()
        if source.exists() and (output == source or output in source.parents):
            raise ConversionError(f"--output {output} would replace the source folder {source}; choose another one.")
    import modeling_cli  # noqa: F401  (the heavy imports, outside the timed part)
    import processing_cli  # noqa: F401

    started = time.perf_counter()
    plan, extras = prepare(args)
    report_plan(plan, out)
    if args.inspect:
        return plan
    if not plan.ok:
        raise ConversionError(
            f"cannot convert {plan.source}; nothing was written.\n{format_problems(plan.problems)}"
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        stats = write_weights(plan, temporary, progress=not args.no_progress)
        print(f"Wrote {format_bytes(stats['bytes'])} in {len(stats['files'])} shard(s) in {stats['seconds']:.1f} s "
              f"({stats['bytes'] / 1e6 / max(stats['seconds'], 1e-9):.0f} MB/s)", file=out)
        plan.config.save_pretrained(os.fspath(temporary))
        generation = build_generation_config(plan.source, plan.config, extras["tokenizer"])
        generation.save_pretrained(os.fspath(temporary))
        processor = build_processor(plan.config, extras["tokenizer"])
        processor.save_pretrained(os.fspath(temporary))
        copy_remote_code(temporary)
        initialised = any(t.init for t in plan.targets.values())
        label = args.input if not Path(args.input).expanduser().exists() else Path(args.input).resolve().name
        card = model_card(
            plan.config, guess_base_model(args, extras["source_config"]), label, plan.layout, initialised
        )
        (temporary / "README.md").write_text(card, encoding="utf-8")
        finalize(temporary, output, args.force)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise ConversionError(
                f"no space left on device while writing {output} ({error}); nothing was written to --output and the "
                "temporary folder was removed."
            ) from None
        if isinstance(error, OSError):
            raise ConversionError(
                f"write error while converting into {output}: {error}; nothing was written to --output and the "
                "temporary folder was removed."
            ) from None
        raise
    print(f"Saved {output} ({time.perf_counter() - started:.1f} s in all)", file=out)

    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True, private=args.private)
        api.upload_folder(repo_id=args.push_to_hub, folder_path=os.fspath(output),
                          commit_message="Add CLI checkpoint converted with convert_checkpoint.py")
        print(f"Pushed to https://huggingface.co/{args.push_to_hub}", file=out)
    return output


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if isinstance(result, Plan) and not result.ok:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
