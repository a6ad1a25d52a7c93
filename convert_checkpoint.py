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
are refused); the folder is written to a temporary sibling and renamed at the end, so a failed or interrupted run
(Ctrl-C, SIGTERM, SIGHUP) leaves nothing.

Sources are untrusted: DST's configs are built from allowlists of fields (a source's `auto_map`, `custom_pipelines`,
unknown keys and loader state never pass through; `auto_map` is ours and names only our three files), quantized
sources are refused, every size is checked against the checkpoint's own tensor headers before anything is allocated,
and NaN/inf weights are refused unless `--allow-nonfinite`.

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
import signal
import sys
import threading
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

# The allowlists DST's config.json is built from: nothing else of a source config is copied (no auto_map,
# custom_pipelines, quantization_config or unknown keys). Qwen2 fields, read from the fork's flat config.json or a
# llava-hf text_config (rope_theta / rope_scaling are the 4.x spelling of rope_parameters):
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers",
    "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "layer_types",
)
# SigLIP vision fields (a llava-hf vision_config or --vision-config; other towers: their config class's own fields)
SIGLIP_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "vision_use_head",
)
# top-level fields of a llava-hf LLaVA-OneVision config.json (vision_config / text_config are rebuilt field by field)
LLAVA_ONEVISION_FIELDS = (
    "image_token_index", "video_token_index", "projector_hidden_act", "vision_feature_select_strategy",
    "vision_feature_layer", "multimodal_projector_bias", "tie_word_embeddings", "image_grid_pinpoints",
    "vision_aspect_ratio",
)
# keys that make a loader run or fetch code; never carried, and named in a note when a source has them
CODE_REFERENCE_KEYS = ("auto_map", "custom_pipelines")
# generation_config.json fields carried from the source (decoding defaults); anything else is dropped
GENERATION_FIELDS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "max_length", "max_new_tokens", "min_length", "min_new_tokens",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "num_beams", "early_stopping", "use_cache",
)
# tokenizer_config.json fields DST keeps (what transformers' tokenizers save as settings); auto_map and
# processor_class are rewritten to ours, loader state (is_local, local_files_only, ...) and anything else is dropped
TOKENIZER_CONFIG_FIELDS = (
    "tokenizer_class", "backend", "model_max_length", "padding_side", "truncation_side", "model_input_names",
    "clean_up_tokenization_spaces", "split_special_tokens", "add_prefix_space", "add_bos_token", "add_eos_token",
    "errors", "legacy", "do_lower_case", "spaces_between_special_tokens", "bos_token", "eos_token", "unk_token",
    "sep_token", "pad_token", "cls_token", "mask_token", "extra_special_tokens", "additional_special_tokens",
    "added_tokens_decoder", "chat_template", "response_template", "chat_control_tokens",
)
TOKENIZER_AUTO_MAP = {"AutoProcessor": "processing_cli.CLIProcessor"}
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

# Bounds checked before anything is allocated (a hostile config must fail in milliseconds, not in a MemoryError):
# configuration_cli's documented maxima (MAX_LAYERS, MAX_HIDDEN_SIZE, ...), checked here before a Qwen2 / SigLIP config
# is even built, plus what only the converter reads.
MAX_JSON_BYTES = 64 * 2**20  # any JSON file read from the source (a 7B shard index is about 100 KB)
MAX_CONFIG_INT = 2**31 - 1  # a config integer without a documented maximum (max_position_embeddings, ...)
# Test hook: a path; after the first tensor is written the converter creates that file and waits (at most 60 s) so a
# test can interrupt a conversion mid-write deterministically. Not for users.
PAUSE_HOOK_ENV = "CLI_CONVERT_TEST_PAUSE_FILE"


class ConversionError(Exception):
    """A problem with the inputs or the destination; the message is meant for the user."""

    def __init__(self, message: str, written: bool = False):
        super().__init__(message)
        self.written = written  # DST was saved before the problem (e.g. the upload failed)


class ConversionInterrupted(BaseException):
    """SIGINT / SIGTERM / SIGHUP during a conversion (a BaseException, like KeyboardInterrupt, so cleanup runs)."""

    def __init__(self, signum: int, saved: Path | None = None):
        super().__init__(signum)
        self.signum = signum
        self.saved = saved  # set when the signal arrived after DST was complete

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


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


def show(value, limit: int = 60) -> str:
    """repr() of a (possibly hostile) value, shortened: huge ints and long lists must not flood a message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"{'-' if value < 0 else ''}~1e{int(math.log10(abs(value)))}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def clip(text: str, limit: int = 1500) -> str:
    """A message from a library about a hostile value, cut to a readable length."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def parse_json_text(text: str, what: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, ints over 4300 digits, absurd nesting
        raise ConversionError(f"{what} is not valid JSON: {clip(error, 300)}") from None


def read_json_file(path: Path, what: str | None = None):
    """A JSON file of the source, size-checked before it is read."""
    what = what or str(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ConversionError(f"cannot read {what}: {error.strerror or error}") from None
    if size > MAX_JSON_BYTES:
        raise ConversionError(f"{what} is {format_bytes(size)}; JSON files of at most {format_bytes(MAX_JSON_BYTES)} "
                              "are read.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"cannot read {what}: {error}") from None
    return parse_json_text(text, what)


def load_json_arg(value: str, what: str):
    """A JSON argument: a path to a JSON file or an inline JSON string (never evaluated as code)."""
    text = value.strip()
    if text[:1] in "[{":
        return parse_json_text(text, what)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConversionError(f"{what}: no such file {value!r} (give a JSON file or inline JSON).")
    return read_json_file(path, f"{what} {value!r}")


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


_SHARD_NAME = re.compile(r"[\w][\w.+-]*\.safetensors")  # a file of the folder itself: no path, no '..'


def list_source_tensors(src: Path) -> tuple[dict[str, SourceTensor], list[str]]:
    """Reads the tensor names, shapes and dtypes (headers only). Returns the tensors and the weight files used."""
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json_file(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(
                f"{index_path} is not a valid safetensors index: \"weight_map\" must be an object "
                f"{{tensor name: shard file}}, got {type(weight_map).__name__}."
            )
        bad = [(name, shard) for name, shard in weight_map.items()
               if not (isinstance(shard, str) and _SHARD_NAME.fullmatch(shard))]
        if bad:
            name, shard = bad[0]
            raise ConversionError(
                f"{index_path.name}: {len(bad)} weight_map entr{'y names' if len(bad) == 1 else 'ies name'} no shard file "
                f"of this folder, e.g. {show(name)} -> {show(shard)} (shards are plain *.safetensors file names)."
            )
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
    config = read_json_file(path)
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
    Bounded before the list is built (configuration_cli's MAX_GRID_PINPOINTS, MAX_CROPS_PER_IMAGE); CLIConfig checks
    the resolutions themselves.
    """
    from configuration_cli import MAX_CROPS_PER_IMAGE, MAX_GRID_PINPOINTS

    allowed = (f"at most {MAX_GRID_PINPOINTS} resolutions of at most {MAX_CROPS_PER_IMAGE} crops each "
               f"(LLaVA-OneVision uses (1x1),...,(6x6))")
    if isinstance(value, str):
        ranges = re.findall(r"\((\d{1,9})x(\d{1,9})\)", value)
        if ranges:
            (first_w, first_h), (last_w, last_h) = [tuple(map(int, pair)) for pair in (ranges[0], ranges[-1])]
            count = (last_w - first_w + 1) * (last_h - first_h + 1)
            if not (1 <= first_w <= last_w and 1 <= first_h <= last_h) or count > MAX_GRID_PINPOINTS \
                    or last_w * last_h > MAX_CROPS_PER_IMAGE:
                raise ConversionError(
                    f"image_grid_pinpoints {show(value)}: grids from {first_w}x{first_h} to {last_w}x{last_h} crops; "
                    f"allowed are {allowed}."
                )
            pairs = [
                (i * crop_size, j * crop_size)
                for i in range(first_w, last_w + 1)
                for j in range(first_h, last_h + 1)
            ]
        else:
            pairs = [(int(w), int(h)) for w, h in re.findall(r"[\[(]\s*(\d{1,12})\s*,\s*(\d{1,12})\s*[\])]", value)]
    elif isinstance(value, (list, tuple)):
        pairs = []
        for pair in value[: MAX_GRID_PINPOINTS + 1]:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
                raise ConversionError(
                    f"image_grid_pinpoints: cannot read {show(pair)}; expected [width, height] pairs of integers."
                )
            pairs.append((pair[0], pair[1]))
    else:
        raise ConversionError(f"image_grid_pinpoints: cannot read {show(value)}.")
    if not pairs:
        raise ConversionError(f"image_grid_pinpoints: {show(value)} holds no resolution.")
    if len(pairs) > MAX_GRID_PINPOINTS:
        raise ConversionError(f"image_grid_pinpoints {show(value)} holds more than {MAX_GRID_PINPOINTS} resolutions; "
                              f"allowed are {allowed}.")
    return [[height, width] for width, height in pairs]


# ----------------------------------------------------------------------------------------------------------------------
# config: DST's config.json is rebuilt from the allowlists above, every size is checked (against the checkpoint's own
# tensor headers where it holds them) before a config or the meta model is built


CONFIG_ERRORS = (TypeError, ValueError, KeyError, OverflowError, RecursionError)


def _config_errors():
    """The exceptions a transformers config raises for a bad value (huggingface_hub's strict dataclass errors are no
    ValueError)."""
    from huggingface_hub.errors import StrictDataclassError

    return (*CONFIG_ERRORS, StrictDataclassError)


# fields every transformers config has, or a LLaVA-NeXT fork writes and this converter reads or ignores on purpose:
# left out of DST without a note (only code references and genuinely unknown keys are reported)
_QUIET_CONFIG_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "torchscript", "pruned_heads", "tie_encoder_decoder", "_from_model_config",
    "text_config", "vision_config", "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution",
    "image_split_resolution", "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj",
    "vision_extraction_layers", "llm_injection_layers", "vision_exp_layers", "vlm_exp_layers", "amp_lora_rank",
    "amp_lora_alpha", "agf_num_heads", "agf_form", "initializer_factor", "license",
})


class SourceFields:
    """Keeps allowlisted fields of a source config and remembers what it left out, for one note."""

    def __init__(self):
        self.code_references: list[str] = []
        self.unknown: list[str] = []

    def keep(self, data: dict, fields, where: str) -> dict:
        kept = {key: data[key] for key in fields if key in data}
        for key in data:
            if key in kept:
                continue
            if key in CODE_REFERENCE_KEYS:
                self.code_references.append(f"{where}{key}")
            elif key not in _QUIET_CONFIG_KEYS and not str(key).startswith("mm_"):
                self.unknown.append(f"{where}{key}")
        return kept

    def scan_code_references(self, data, where: str) -> None:
        """Records code-referencing keys anywhere in `data` (nested objects included)."""
        if isinstance(data, dict):
            for key, value in data.items():
                if key in CODE_REFERENCE_KEYS:
                    self.code_references.append(f"{where}{key}")
                elif isinstance(value, dict):
                    self.scan_code_references(value, f"{where}{key}.")

    def notes(self) -> list[str]:
        notes = []
        if self.code_references:
            notes.append(
                "the source's code references are not carried into DST (it runs only "
                f"{', '.join(REMOTE_CODE_FILES)}): " + ", ".join(dict.fromkeys(self.code_references))
            )
        if self.unknown:
            unknown = list(dict.fromkeys(self.unknown))
            notes.append(
                f"{len(unknown)} source config field(s) CLI does not use are left out: "
                + ", ".join(show(name, 40) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            )
        return notes


def vision_fields(model_type) -> tuple[str, ...]:
    """The allowlist of a vision tower's config: SigLIP's fields, or the fields another transformers config declares."""
    if model_type == "siglip_vision_model":
        return SIGLIP_VISION_FIELDS
    import dataclasses

    from transformers import CONFIG_MAPPING, PretrainedConfig

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConversionError(
            f"vision config: unknown model_type {show(model_type)} (not a transformers config; SigLIP's vision config "
            "is 'siglip_vision_model')."
        )
    generic = {f.name for f in dataclasses.fields(PretrainedConfig)}
    return tuple(f.name for f in dataclasses.fields(CONFIG_MAPPING[model_type]) if f.name not in generic)


def _class_defaults(config_class) -> dict:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def vision_overrides_from_arg(value: str | None) -> dict | None:
    """--vision-config: SigLIP vision fields, or a full SigLIP config.json (its `vision_config` is used)."""
    if value is None:
        return None
    data = load_json_arg(value, "--vision-config")
    if not isinstance(data, dict):
        raise ConversionError(
            "--vision-config must hold a JSON object of SigLIP vision config fields (or SigLIP's own config.json)."
        )
    if isinstance(data.get("vision_config"), dict):  # e.g. google/siglip-so400m-patch14-384's config.json
        return dict(data["vision_config"])
    if data.get("model_type") == "siglip":
        raise ConversionError("--vision-config is a SigLIP config (model_type 'siglip') without a vision_config.")
    return data


def qwen2_text_fields(data: dict, where: str, fields: SourceFields) -> dict:
    """The Qwen2 fields of a fork's flat config.json or a llava-hf text_config, rope settings in the 5.x spelling."""
    text = {key: value for key, value in fields.keep(data, QWEN2_FIELDS, where).items() if value is not None}
    scaling, theta, rope = text.pop("rope_scaling", None), text.pop("rope_theta", None), text.pop("rope_parameters", None)
    if rope is not None and not isinstance(rope, dict):
        raise ConversionError(f"{where}rope_parameters must be an object, got {show(rope)}.")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConversionError(
            f"{where}rope_scaling must be an object such as "
            f'{{"type": "linear", "factor": 2.0}} or null, got {show(scaling)}.'
        )
    rope = dict(rope or {})
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        rope.update(scaling)
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", theta if theta is not None else 10000.0)
    text["rope_parameters"] = rope
    return text


@dataclass
class CheckpointProbe:
    """What the source's tensor headers say about the model's sizes, in the target layout (after the placement rules)."""

    text_layers: set[int] = field(default_factory=set)
    vision_layers: set[int] = field(default_factory=set)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # target name -> shape (base weights only)
    names: dict[str, str] = field(default_factory=dict)  # target name -> source name


def probe_checkpoint(sources: dict, rules: list, layout: str) -> CheckpointProbe:
    builtin = FORK_RULES if layout == "fork" else LLAVA_HF_RULES
    all_rules = rules + [Rule(name, re.compile(regex), repl) for name, regex, repl in builtin]
    probe = CheckpointProbe()
    for tensor in sources.values():
        rule = next((r for r in all_rules if r.pattern.fullmatch(tensor.name)), None)
        if rule is None or not isinstance(rule.replacement, str) or "{" in rule.replacement:
            continue
        try:
            target = rule.pattern.fullmatch(tensor.name).expand(rule.replacement)
        except (re.error, IndexError):
            continue
        if match := re.fullmatch(r"model\.language_model\.layers\.(\d{1,9})\..+", target):
            probe.text_layers.add(int(match.group(1)))
        elif match := re.fullmatch(r"model\.vision_tower\.encoder\.layers\.(\d{1,9})\..+", target):
            probe.vision_layers.add(int(match.group(1)))
        else:
            probe.shapes[target] = tensor.shape
            probe.names[target] = tensor.name
    return probe


def _size_maxima() -> dict[str, int]:
    import configuration_cli as cc

    return {
        "num_hidden_layers": cc.MAX_LAYERS, "hidden_size": cc.MAX_HIDDEN_SIZE,
        "intermediate_size": cc.MAX_INTERMEDIATE_SIZE, "num_attention_heads": cc.MAX_ATTENTION_HEADS,
        "num_key_value_heads": cc.MAX_ATTENTION_HEADS, "vocab_size": cc.MAX_VOCAB_SIZE, "image_size": cc.MAX_IMAGE_SIZE,
        "patch_size": cc.MAX_IMAGE_SIZE,
    }


def _check_int(value, name: str, where: str) -> int:
    maximum = _size_maxima().get(name, MAX_CONFIG_INT)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConversionError(f"{where}: {name} = {show(value)}; it must be an integer in 1..{maximum}.")
    return value


def _checked_layer_count(
    configured: int, present: set[int], what: str, where: str, notes: list, deleted_last: bool = False
) -> int:
    """The layer count of a config against the layers the checkpoint holds; returns the count to write."""
    if not present:  # the layers are not where the placement rules put them: the plan names what is missing
        return configured
    held = len(present)
    if present != set(range(held)):
        raise ConversionError(
            f"the checkpoint's {what} layers are not numbered 0..{held - 1}: it holds {held} numbered "
            f"{clip(compact_ints(present), 80)}."
        )
    if configured == held:
        return held
    if deleted_last and configured == held + 1:
        notes.append(
            f"{where} has {configured} encoder layers and the checkpoint holds {held} (layers 0-{held - 1}): "
            f"LLaVA-NeXT deletes SigLIP's last layer, so the converted config has {held}."
        )
        return held
    extra = " (one more is accepted: SigLIP's last layer, which LLaVA-NeXT deletes)" if deleted_last else ""
    raise ConversionError(
        f"{where} has {show(configured)} {what} layers but the checkpoint holds {held} (layers 0-{held - 1}){extra}."
    )


def check_model_sizes(text: dict, vision: dict, probe: CheckpointProbe, notes: list, text_where: str,
                      vision_where: str) -> None:
    """
    Bounds every size of the text and vision configs and checks them against the checkpoint's tensor headers, in
    place (`num_hidden_layers` of the vision config becomes the checkpoint's count when the config has SigLIP's
    deleted last layer). Runs before any config object or model is built.
    """
    from transformers import Qwen2Config, SiglipVisionConfig

    text_sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")
    vision_sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                    "image_size", "patch_size")
    text_full = {**_class_defaults(Qwen2Config), **text}
    vision_full = {**(_class_defaults(SiglipVisionConfig) if vision.get("model_type") == "siglip_vision_model"
                      else {}), **vision}
    for name in text_sizes:
        if text_full.get(name) is not None:
            _check_int(text_full[name], name, text_where)
    for name in vision_sizes:
        if vision_full.get(name) is not None:
            _check_int(vision_full[name], name, vision_where)

    text["num_hidden_layers"] = _checked_layer_count(
        text_full["num_hidden_layers"], probe.text_layers, "decoder", text_where, notes
    )
    if "num_hidden_layers" in vision_full:
        vision["num_hidden_layers"] = _checked_layer_count(
            vision_full["num_hidden_layers"], probe.vision_layers, "vision encoder", vision_where, notes,
            deleted_last=True,
        )

    def against(target: str, dim: int, config_name: str, value, where: str):
        shape = probe.shapes.get(target)
        if shape is not None and len(shape) > dim and shape[dim] != value:
            raise ConversionError(
                f"{where}: {config_name} = {show(value)} but the checkpoint's {probe.names[target]} is {tuple(shape)} "
                f"({config_name} {shape[dim]})."
            )

    against("model.language_model.embed_tokens.weight", 0, "vocab_size", text_full["vocab_size"], text_where)
    against("model.language_model.embed_tokens.weight", 1, "hidden_size", text_full["hidden_size"], text_where)
    patch = "model.vision_tower.embeddings.patch_embedding.weight"
    for dim, name in ((0, "hidden_size"), (1, "num_channels"), (2, "patch_size")):
        if name in vision_full:
            against(patch, dim, name, vision_full[name], vision_where)
    positions = probe.shapes.get("model.vision_tower.embeddings.position_embedding.weight")
    if positions and "image_size" in vision_full and "patch_size" in vision_full:
        expected = (vision_full["image_size"] // vision_full["patch_size"]) ** 2
        if positions[0] != expected:
            side = math.isqrt(positions[0]) * vision_full["patch_size"]
            raise ConversionError(
                f"{vision_where}: image_size {vision_full['image_size']} with patch_size {vision_full['patch_size']} "
                f"gives {expected} positions, but the checkpoint's position embedding has {positions[0]} "
                f"(image_size {side}?)."
            )


def _layer_setting(args_value, source_config: dict, names: tuple[str, ...]):
    if args_value is not None:
        return args_value
    for name in names:
        if source_config.get(name) is not None:
            return source_config[name]
    return None


def cli_settings(args, source_config: dict) -> dict:
    """The CLI fields: the options first, then the source config (CLIConfig bounds and checks them)."""
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


def make_cli_config(kwargs: dict):
    from configuration_cli import CLIConfig

    try:
        return CLIConfig(**kwargs)
    except _config_errors() as error:
        raise ConversionError(f"invalid CLI configuration: {clip(error)}") from None


def refuse_quantized(source_config: dict) -> None:
    """A quantized source is refused (not converted with its quantization dropped): see the message."""
    parts = [("config.json", source_config)] + [
        (f"config.json {name}", source_config[name])
        for name in ("text_config", "vision_config") if isinstance(source_config.get(name), dict)
    ]
    for where, config in parts:
        quantization = config.get("quantization_config")
        if quantization is None:
            continue
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConversionError(
            f"{where} has a quantization_config (quant_method {show(method)}): the source is a quantized checkpoint. "
            "This converter reads unquantized floating-point weights and never writes a quantization_config into DST "
            "(the packed weights would be copied as if they were plain floats, and loading DST would demand the "
            "quantization library). Convert the original, unquantized checkpoint instead, and quantize when you load "
            "the converted model, e.g. from_pretrained(DST, quantization_config=BitsAndBytesConfig(load_in_4bit=True))."
        )


def build_fork_config(source_config: dict, args, vision_overrides: dict | None, probe: CheckpointProbe | None = None,
                      notes: list | None = None, fields: SourceFields | None = None):
    """
    CLIConfig from the fork's flat config.json (+ --vision-config, + the layer options). `probe` (the checkpoint's
    tensor headers) confirms the sizes; `notes` and `fields` collect what the run should tell the user.
    """
    from transformers import Qwen2Config

    probe, notes, fields = probe or CheckpointProbe(), [] if notes is None else notes, fields or SourceFields()

    problems = []
    projector = source_config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        problems.append(f"mm_projector_type is {show(projector)}; CLI / LLaVA-OneVision use 'mlp2x_gelu'.")
    merge = source_config.get("mm_patch_merge_type", "spatial_unpad")
    if merge != "spatial_unpad":
        problems.append(f"mm_patch_merge_type is {show(merge)}; only 'spatial_unpad' (LLaVA-OneVision's) is supported.")
    aspect = source_config.get("image_aspect_ratio", "anyres_max_9")
    if not (isinstance(aspect, str) and re.fullmatch(r"anyres_max_\d{1,4}", aspect)):
        problems.append(f"image_aspect_ratio is {show(aspect)}; CLI packs images as 'anyres_max_N' (LLaVA-OneVision).")
    tower = str(source_config.get("mm_vision_tower", ""))
    if "siglip" not in tower.lower() and not (vision_overrides and "model_type" in vision_overrides):
        problems.append(
            f"mm_vision_tower is {show(tower)}, not a SigLIP tower; give its architecture with --vision-config "
            "(including model_type) if this is intended."
        )
    missing = [name for name in QWEN2_REQUIRED if name not in source_config]
    if missing:
        problems.append(f"config.json lacks the Qwen2 field(s) {', '.join(missing)}.")
    if problems:
        raise ConversionError("unsupported fork config:\n  " + "\n  ".join(problems))

    raw_vision = dict(SIGLIP_SO400M_DEFAULTS)
    if source_config.get("mm_hidden_size") is not None:
        raw_vision["hidden_size"] = source_config["mm_hidden_size"]
    raw_vision.update(vision_overrides or {})
    model_type = raw_vision.get("model_type", "siglip_vision_model")
    vision = {"model_type": model_type, **fields.keep(raw_vision, vision_fields(model_type), "--vision-config ")}
    vision_where = "--vision-config" if vision_overrides else (
        "the vision config (SigLIP-so400m's defaults: the fork's config.json does not describe the tower; give its "
        "sizes with --vision-config)"
    )
    text = qwen2_text_fields(source_config, "config.json ", fields)
    check_model_sizes(text, vision, probe, notes, "config.json", vision_where)
    if vision.get("hidden_size") != 1152 and "num_attention_heads" not in (vision_overrides or {}):
        raise ConversionError(
            f"the vision tower has hidden size {vision['hidden_size']}, not SigLIP-so400m's 1152, and its head count "
            "cannot be read from the weights: give it with --vision-config '{\"num_attention_heads\": H, ...}'."
        )
    try:
        text_config = Qwen2Config(**text).to_dict()
    except _config_errors() as error:
        raise ConversionError(f"cannot build the Qwen2 text config from config.json: {clip(error)}") from None
    tied = bool(source_config.get("tie_word_embeddings", False))

    pinpoints = parse_grid_pinpoints(
        source_config.get("image_grid_pinpoints", "(1x1),...,(6x6)"), vision.get("image_size", 384)
    )
    kwargs = dict(
        vision_config=vision,
        text_config=text_config,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect,
        # the fork's SigLIP tower always returns the last of its 26 layers (mm_vision_select_layer is ignored) and has
        # no CLS token, exactly what llava-hf's conversion encodes as -1 / "full"
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
        **cli_settings(args, source_config),
    )
    return make_cli_config(kwargs)


def build_llava_hf_config(source_config: dict, args, vision_overrides: dict | None,
                          probe: CheckpointProbe | None = None, notes: list | None = None,
                          fields: SourceFields | None = None):
    """CLIConfig from a transformers LLaVA-OneVision config.json (+ --vision-config, + the layer options)."""
    probe, notes, fields = probe or CheckpointProbe(), [] if notes is None else notes, fields or SourceFields()
    for name, what in (("text_config", "Qwen2"), ("vision_config", "SigLIP")):
        if not isinstance(source_config.get(name), dict):
            raise ConversionError(
                f"config.json has no {name} object (got {show(source_config.get(name))}); a llava-hf LLaVA-OneVision "
                f"config nests its {what} config there."
            )
    text_source = source_config["text_config"]
    text_type = text_source.get("model_type", "qwen2")
    if text_type != "qwen2":
        raise ConversionError(f"CLI needs a Qwen2 language model, got {show(text_type)}.")
    text = qwen2_text_fields(text_source, "config.json text_config.", fields)

    fields.scan_code_references(source_config["vision_config"], "config.json vision_config.")
    raw_vision = {**source_config["vision_config"], **(vision_overrides or {})}
    model_type = raw_vision.get("model_type", "siglip_vision_model")
    vision = {"model_type": model_type, **fields.keep(raw_vision, vision_fields(model_type), "config.json vision_config.")}
    top = fields.keep(source_config, LLAVA_ONEVISION_FIELDS, "config.json ")
    vision_where = "config.json vision_config" + (" with --vision-config" if vision_overrides else "")
    check_model_sizes(text, vision, probe, notes, "config.json text_config", vision_where)
    if "image_grid_pinpoints" in top:
        from configuration_cli import MAX_GRID_PINPOINTS

        value = top["image_grid_pinpoints"]
        if not isinstance(value, (list, tuple)):
            raise ConversionError(f"config.json image_grid_pinpoints must be a list of [height, width], got {show(value)}.")
        swapped = [list(reversed(pair)) if isinstance(pair, (list, tuple)) else pair for pair in value[: MAX_GRID_PINPOINTS + 1]]
        top["image_grid_pinpoints"] = parse_grid_pinpoints(swapped, vision.get("image_size", 384))
    return make_cli_config(
        {"vision_config": vision, "text_config": text, **top, **cli_settings(args, source_config)}
    )


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
    floating: bool = True  # the model holds a floating-point tensor here

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

    try:
        with torch.device("meta"):
            model = CLIForConditionalGeneration(copy.deepcopy(config))
    except (*_config_errors(), RuntimeError, AssertionError) as error:
        raise ConversionError(f"cannot build CLIForConditionalGeneration for this config: {clip(error)}") from None
    targets = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the input embeddings: transformers neither saves nor expects it
        targets[name] = Target(name, tuple(tensor.shape), "cli" if is_cli_target(name) else "base",
                               floating=tensor.dtype.is_floating_point)
    return targets


def plan_conversion(src: Path, args, sources: dict, files: list, layout: str, config, rules: list[Rule]) -> Plan:
    targets = expected_targets(config)
    builtin = FORK_RULES if layout == "fork" else LLAVA_HF_RULES
    all_rules = rules + [Rule(name, re.compile(regex), repl) for name, regex, repl in builtin]
    plan = Plan(src, layout, config, sources, files, targets, all_rules, seed=args.seed)
    problems = defaultdict(list)
    unknown, unexpected, mismatched, bad, unreadable, integral = [], [], [], [], [], []
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
            source_dtype = _ST_TO_TORCH.get(tensor.dtype)
            if source_dtype is None:
                unreadable.append((f"{tensor.name} -> {shown}", describe(tensor.shape, tensor.dtype)))
                reported.add(target_name)
                continue
            if target.floating and not source_dtype.is_floating_point:
                integral.append((f"{tensor.name} -> {shown}", describe(tensor.shape, tensor.dtype)))
                reported.add(target_name)
                continue
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
    if unreadable:
        problems[
            "tensors of a dtype this converter does not read (floating weights are F64, F32, F16, BF16, F8_E4M3 or "
            "F8_E5M2)"
        ] = group_lines(unreadable, indent="")
    if integral:
        problems[
            "integer tensors where the model holds floating-point weights (a quantized or corrupt checkpoint? "
            "--dtype casts floats only)"
        ] = group_lines(integral, indent="")
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


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """
    (NaN count, inf count) of a tensor. One reduction pass and no copy when every value is finite (aminmax propagates
    NaN); the counts themselves are only computed for a tensor that has non-finite values.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0, 0
    try:
        low, high = torch.aminmax(tensor)
        finite = bool(torch.isfinite(low) and torch.isfinite(high))
    except (RuntimeError, NotImplementedError):  # e.g. float8 on CPU: check in float32 chunks
        flat = tensor.reshape(-1)
        finite = all(bool(torch.isfinite(flat[i : i + 2**24].float()).all()) for i in range(0, flat.numel(), 2**24))
    if finite:
        return 0, 0
    values = tensor.float() if tensor.dtype.itemsize == 1 else tensor
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


@dataclass
class NonFinite:
    target: str
    sources: list[str]
    nan: int
    inf: int
    numel: int
    overflow_dtype: torch.dtype | None = None  # finite in the source, inf after the cast to this dtype

    def __str__(self) -> str:
        where = ", ".join(self.sources) or self.target
        if self.overflow_dtype is not None:
            return (f"{where} (finite in the source; {self.inf} of {self.numel} values overflow to inf in "
                    f"{str(self.overflow_dtype).removeprefix('torch.')})")
        return f"{where} ({self.nan} NaN, {self.inf} inf of {self.numel} values)"


def nonfinite_message(found: list[NonFinite], allowed: bool) -> str:
    listed = "; ".join(str(item) for item in found[:8]) + (f"; and {len(found) - 8} more" if len(found) > 8 else "")
    if allowed:
        return f"kept {len(found)} tensor(s) with NaN/inf values (--allow-nonfinite): {listed}"
    overflow = any(item.overflow_dtype is not None for item in found)
    return (
        f"{len(found)} tensor(s) hold NaN or inf values: {listed}. A model with non-finite weights computes NaN "
        "logits." + (" Values beyond the range of --dtype overflow: keep the source dtype (--dtype auto) or use "
                     "float32." if overflow else "")
        + " Pass --allow-nonfinite to convert them anyway (e.g. to debug the checkpoint)."
    )


class _StopWriting(Exception):
    pass


def _test_pause() -> None:
    """PAUSE_HOOK_ENV (tests only): create the file, then wait until it is removed, at most 60 s."""
    path = os.environ.get(PAUSE_HOOK_ENV)
    if not path:
        return
    Path(path).touch()
    deadline = time.monotonic() + 60
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def write_weights(plan: Plan, folder: Path, progress: bool = True, allow_nonfinite: bool = False) -> dict:
    """
    Streams every target tensor into `folder` (one tensor in memory at a time) and checks each for NaN/inf on the
    way. A non-finite tensor stops the writing (unless `allow_nonfinite`); the remaining tensors are then only read
    and checked, so the error names all of them. Returns statistics (`nonfinite`: what was found).
    """
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in plan.targets.values())
    count = len(plan.shards)
    names = ["model.safetensors"] if count == 1 else [
        f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
    ]
    initializer = CLIInitializer(plan.config, plan.seed) if any(t.init for t in plan.targets.values()) else None
    weight_map, nonfinite, produced = {}, [], []
    start = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress, leave=False)
    with TensorSource(plan) as reader:

        def build(target: Target) -> torch.Tensor:
            if target.init:
                return initializer.tensor(target.name)
            if target.pieces[0].slot is not None:
                slots = sorted(target.pieces, key=lambda piece: piece.slot)
                return torch.stack([reader.read(piece) for piece in slots])
            return reader.read(target.pieces[0])

        def check(target: Target, tensor: torch.Tensor) -> None:
            if target.init:  # _init_weights output, checked by CLIInitializer
                return
            nan, inf = count_nonfinite(tensor)
            if not (nan or inf):
                return
            sources = list(dict.fromkeys(piece.source for piece in target.pieces))
            overflow = None
            if not nan and tensor.dtype != _ST_TO_TORCH[plan.sources[sources[0]].dtype]:
                if not any(count_nonfinite(reader.read(piece)) != (0, 0) for piece in target.pieces):
                    overflow = tensor.dtype
            nonfinite.append(NonFinite(target.name, sources, nan, inf, tensor.numel(), overflow))
            if not allow_nonfinite:
                raise _StopWriting

        def produce(shard):
            for name in shard:
                if len(produced) == 1:  # the first tensor is written
                    _test_pause()
                target = plan.targets[name]
                tensor = build(target).to(target.dtype)
                yield tensor
                # checked once written: reading a freshly loaded tensor before write() makes the write about 2x
                # slower (measured, benchmarks/bench_convert.py), reading it after costs next to nothing
                check(target, tensor)
                produced.append(name)
                bar.update(target.nbytes)
                del tensor

        try:
            for file_name, shard in zip(names, plan.shards):
                entries = [(name, plan.targets[name].dtype, plan.targets[name].shape) for name in shard]
                write_safetensors_file(folder / file_name, entries, produce(shard))
                weight_map.update({name: file_name for name in shard})
        except _StopWriting:
            bar.close()
            done = set(produced) | {nonfinite[0].target}
            for target in plan.targets.values():
                if target.name not in done:
                    with contextlib.suppress(_StopWriting):
                        check(target, build(target).to(target.dtype))
            raise ConversionError(nonfinite_message(nonfinite, allowed=False)) from None
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
    return {"bytes": total, "seconds": time.perf_counter() - start, "files": names, "nonfinite": nonfinite}


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer, processor, generation config, model card


def load_tokenizer(src: Path, fields: SourceFields | None = None):
    """The source tokenizer, loaded with a transformers class (never remote code); its code references are noted."""
    if not any((src / name).is_file() for name in _TOKENIZER_FILES):
        raise ConversionError(f"{src} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}).")
    import transformers

    # keep the tokenizer class the source declares (AutoTokenizer would follow config.json's model_type instead)
    declared = None
    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        tokenizer_config = read_json_file(config_path)
        if not isinstance(tokenizer_config, dict):
            raise ConversionError(f"{config_path} must hold a JSON object.")
        declared = tokenizer_config.get("tokenizer_class")
        if fields is not None:
            fields.scan_code_references(tokenizer_config, "tokenizer_config.json ")
    tokenizer_class = getattr(transformers, declared, None) if isinstance(declared, str) else None
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, transformers.PreTrainedTokenizerBase)):
        tokenizer_class = transformers.AutoTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(os.fspath(src), trust_remote_code=False)
    except Exception as error:
        raise ConversionError(f"cannot load the tokenizer from {src}: {clip(error, 600)}") from None
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


def sanitize_tokenizer_config(folder: Path) -> None:
    """
    Rewrites the saved tokenizer_config.json from TOKENIZER_CONFIG_FIELDS: the source tokenizer's `init_kwargs`
    (which `save_pretrained` writes back) carry its auto_map, custom_pipelines, unknown keys and transformers'
    loader state (`is_local`, `local_files_only`); none of it stays. `auto_map` and `processor_class` are ours.
    """
    import transformers

    path = folder / "tokenizer_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    clean = {key: saved[key] for key in TOKENIZER_CONFIG_FIELDS if key in saved}
    clean["auto_map"] = dict(TOKENIZER_AUTO_MAP)
    clean["processor_class"] = "CLIProcessor"
    tokenizer_class = getattr(transformers, str(clean.get("tokenizer_class")), None)
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, transformers.PreTrainedTokenizerBase)):
        raise RuntimeError(f"internal: the saved tokenizer_class {clean.get('tokenizer_class')!r} is no transformers class")
    path.write_text(json.dumps(clean, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_generation_config(src: Path, config, tokenizer, fields: SourceFields | None = None):
    """generation_config.json from the source's decoding defaults (GENERATION_FIELDS only) + the qwen_1_5 stop token."""
    from transformers import GenerationConfig

    source = {}
    if (src / "generation_config.json").is_file():
        source = read_json_file(src / "generation_config.json")
        if not isinstance(source, dict):
            raise ConversionError(f"{src / 'generation_config.json'} must hold a JSON object.")
        source = (fields or SourceFields()).keep(source, GENERATION_FIELDS, "generation_config.json ")
    else:
        source = {"bos_token_id": config.text_config.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    rows = config.text_config.vocab_size
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = source.get(name)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < rows for i in ids):
            raise ConversionError(
                f"generation_config.json: {name} = {show(value)} is not a token id (or list of ids) of the {rows}-token "
                "vocabulary."
            )
    try:
        generation = GenerationConfig(**source)
        generation.validate()
    except _config_errors() as error:
        raise ConversionError(f"generation_config.json: {clip(error, 600)}") from None
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


# auto_map values DST may hold: classes of our three modules, nothing else (no other module, no "repo--module")
_OUR_CODE = re.compile(r"(?:configuration_cli|modeling_cli|processing_cli)\.CLI\w*")


def verify_no_foreign_code(folder: Path, code_files: list[str]) -> None:
    """
    The last check before DST is renamed into place: every file is ours to write, the only .py files are our remote
    code, and no JSON file holds a code reference (auto_map value, custom_pipelines) other than our classes.
    """
    problems = []

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "auto_map":
                    entries = item.values() if isinstance(item, dict) else [item]
                    flat = [e for entry in entries for e in (entry if isinstance(entry, list) else [entry])]
                    foreign = [e for e in flat if e is not None and not (isinstance(e, str) and _OUR_CODE.fullmatch(e))]
                    if foreign:
                        problems.append(f"{where}auto_map references {show(foreign)}")
                elif key in ("custom_pipelines", "quantization_config"):
                    problems.append(f"{where}{key}")
                else:
                    walk(item, f"{where}{key}.")
        elif isinstance(value, list):
            for item in value:
                walk(item, where)

    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            problems.append(f"{relative} is a link")
        elif path.suffix == ".py" and relative not in code_files:
            problems.append(f"{relative} is code that is not ours")
        elif path.suffix == ".json" and path.name != "tokenizer.json":  # tokenizer.json is the tokenizers schema
            walk(json.loads(path.read_text(encoding="utf-8")), f"{relative}: ")
    if problems:
        raise ConversionError(
            "internal safety check failed: DST would reference code other than ours: " + "; ".join(problems[:5])
            + ". Please report this."
        )


_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_REPO_ID = re.compile(r"[\w][\w.-]{0,95}/[\w][\w.-]{0,95}")
MAX_CARD_BYTES = 2**20
WIDGET_MAX_NEW_TOKENS = 48
CARD_TAGS = ["cli", "llava-onevision", "multimodal", "vision-language", "custom_code", "conversational"]


def source_card_metadata(src: Path) -> dict:
    """The YAML front matter of the source's README.md (huggingface_hub's parser, yaml.safe_load), {} if none."""
    path = src / "README.md"
    if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card whose front matter does not parse carries no metadata we can use
        return {}


def choose_license(args, card: dict, source_config: dict, notes: list) -> dict:
    """
    license (+ license_name / license_link for 'other'): --license, else the source card's, else config.json's
    `license`. None known: the card gets no license field and a note says so (a license is never guessed).
    """
    found, origin = None, None
    for value, where in ((card.get("license"), "the source's README.md"), (source_config.get("license"), "config.json")):
        if value is None:
            continue
        if isinstance(value, str) and _LICENSE_ID.fullmatch(value):
            found, origin = value, where
            break
        notes.append(f"{where} names license {show(value)}, which is no Hub license id; it is not carried.")
    if args.license is not None:
        if not _LICENSE_ID.fullmatch(args.license):
            raise ConversionError(
                f"--license {show(args.license)} is not a Hub license id (lowercase, e.g. apache-2.0, mit, "
                "cc-by-nc-4.0, llama3.1, other; see https://huggingface.co/docs/hub/repositories-licenses)."
            )
        if found and found != args.license:
            notes.append(f"the card says license {args.license} (--license); {origin} says {found}.")
        found, origin = args.license, "--license"
    if found is None:
        notes.append(
            "no license is known (the source has no license in its README.md front matter or config.json), so the "
            "card has none; pass --license ID (e.g. --license apache-2.0). The source's license applies to the "
            "converted weights either way."
        )
        return {}
    result = {"license": found}
    if found == "other" and origin == "the source's README.md":
        for key in ("license_name", "license_link"):
            if isinstance(card.get(key), str) and len(card[key]) <= 200:
                result[key] = card[key]
    return result


def guess_base_model(args, source_config: dict, src: Path | None = None) -> str | None:
    """--base-model, else the Hub id of --input (also read from a Hub cache path), else the config's _name_or_path."""
    if args.base_model:
        if not _REPO_ID.fullmatch(args.base_model):
            raise ConversionError(f"--base-model {show(args.base_model)} is not a Hub repo id (owner/name).")
        return args.base_model
    if not Path(args.input).expanduser().exists() and _REPO_ID.fullmatch(args.input):
        return args.input
    for part in (src.resolve().parts if src is not None else ()):  # .../models--owner--name/snapshots/<hash>
        match = re.fullmatch(r"models--([\w.-]+?)--([\w.-]+)", part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    name = source_config.get("_name_or_path")
    if isinstance(name, str) and _REPO_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None


def record_widget(folder: Path, processor, image_path: str, question: str, push_repo: str | None, out) -> dict:
    """
    `--widget IMAGE QUESTION`: bundles the image (re-encoded as PNG) under widget/ and records one greedy answer of the
    converted model, so the card's widget shows an output it really gave (hosted inference never runs custom code:
    a widget can only show recorded outputs). Loads the whole converted model once (memory = model size).
    """
    import processing_cli
    from modeling_cli import CLIForConditionalGeneration

    if not os.path.isfile(image_path):
        raise ConversionError(f"--widget: no such image file {image_path!r}.")
    if not question.strip() or len(question) > 1000:
        raise ConversionError("--widget: the question must be 1..1000 characters.")
    try:
        image = processing_cli.load_cli_image(image_path)
    except ValueError as error:
        raise ConversionError(f"--widget: {clip(error, 300)}") from None
    (folder / "widget").mkdir()
    stem = re.sub(r"[^\w.-]+", "_", Path(image_path).stem)[:60].strip("._") or "image"
    image_file = folder / "widget" / f"{stem}.png"
    image.save(image_file, format="PNG")
    model = CLIForConditionalGeneration.from_pretrained(os.fspath(folder)).eval()  # what was just written
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=WIDGET_MAX_NEW_TOKENS, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    del model
    print(f"Widget: {question!r} -> {answer!r} (greedy, at most {WIDGET_MAX_NEW_TOKENS} new tokens)", file=out)
    relative = f"widget/{image_file.name}"
    src = f"https://huggingface.co/{push_repo}/resolve/main/{relative}" if push_repo else relative
    return {"example_title": question[:60], "src": src, "text": question, "output": {"text": answer}}


def build_model_card(config, metadata: dict, source_label: str, layout: str, initialised: bool,
                     widget: dict | None):
    """The model card as a huggingface_hub ModelCard: metadata through ModelCardData (YAML written by yaml, checked
    by parsing it back), the body as Markdown."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(CARD_TAGS),
        **metadata,
        **({"widget": [widget]} if widget else {}),
    )
    vision, text = config.vision_config, config.text_config
    layout_name = "LLaVA-NeXT / CLI fork layout" if layout == "fork" else "transformers llava-hf layout"
    if initialised:
        state = (
            "The CLI modules (AMP LoRA, AGF gates) were **identity-initialised** by the converter: gates and LoRA B "
            "are zero, so until it is fine-tuned this model computes exactly what its base LLaVA-OneVision computes."
        )
    else:
        state = "The CLI modules (AMP LoRA, AGF gates) carry the trained weights of the source checkpoint."
    widget_note = (
        "The widget example shows an answer this model gave when it was converted (greedy decoding), recorded with "
        "`convert_checkpoint.py --widget`."
        if widget else ""
    )
    body = f"""
# CLI (Cross-Layer Injection): {source_label}

LLaVA-OneVision-Qwen2 with a many-to-many vision-language bridge (CLI, arXiv 2601.10710): AMP projects several vision
layers through the shared projector plus a per-layer LoRA, and AGF gates them into several LLM decoder layers.
Converted from `{source_label}` ({layout_name}) with `convert_checkpoint.py`. {state}

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

The model is remote code (`configuration_cli.py`, `modeling_cli.py`, `processing_cli.py` in this folder): load it
with transformers and `trust_remote_code=True`.

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

## Where CLI runs

CLI's injection (AMP and AGF) lives in this repository's remote code. Hosted inference (the Hub's widget and
inference services) never runs custom code, and serving engines' generic transformers backends do not run CLI's
injection: what they serve, if they load this repository at all, is not this model's output. Run it with transformers
and `trust_remote_code=True`. {widget_note}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    if card.data.to_dict() != data.to_dict():
        raise RuntimeError("internal: the model card's metadata does not parse back to what was written")
    return card


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

SAFETY_HELP = r"""
untrusted sources
  DST's config.json, generation_config.json, tokenizer_config.json and processor files are rebuilt from allowlists of
  fields: a source's auto_map, custom_pipelines (also nested in text_config / vision_config or in its tokenizer
  config), unknown keys and transformers' loader state (is_local, local_files_only) never reach DST, whose auto_map
  names only configuration_cli.py, modeling_cli.py and processing_cli.py. A source with a quantization_config is
  refused (convert the unquantized checkpoint and quantize when loading). Sizes are checked against the checkpoint's
  own tensor headers and configuration_cli's documented maxima (MAX_LAYERS, MAX_HIDDEN_SIZE, MAX_GRID_PINPOINTS, ...)
  before anything is allocated; NaN/inf weights are refused unless --allow-nonfinite. --output must not be a symbolic link. SIGINT, SIGTERM and SIGHUP remove the
  temporary folder (exit 128 + signal number); partial folders of dead runs are removed at the next start.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=(
            "Convert a CLI / LLaVA-OneVision-Qwen2 checkpoint (LLaVA-NeXT fork layout with mm_* config fields, or a "
            "transformers llava-hf LLaVA-OneVision checkpoint) into a self-contained CLI remote-code folder. "
            "Every source key is placed by a built-in rule or a --key-map rule; unknown keys, missing weights, "
            "shape or dtype mismatches and bad config values stop the run before anything is written."
        ),
        epilog=KEY_MAP_HELP + SAFETY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="source folder, or a Hub repo id (downloaded when online)")
    parser.add_argument("--output", help="destination folder (required unless --inspect; not a symbolic link)")
    parser.add_argument(
        "--vision-config",
        help="JSON file or inline JSON of SigLIP vision config fields overriding the so400m defaults (hidden 1152, "
        "intermediate 4304, 26 layers, 16 heads, image 384, patch 14; the fork's config does not store them), or "
        "SigLIP's own config.json (its vision_config is used). A config with one layer more than the checkpoint "
        "holds is what LLaVA-NeXT loaded (it deletes the last layer): accepted, and the converted config says the "
        "checkpoint's count",
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
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert weights holding NaN or inf (refused by default, naming the tensors)")
    parser.add_argument("--inspect", action="store_true",
                        help="print the source keys and the planned mapping, write nothing (exit 1 if it would fail)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="upload the result to this Hub repo (needs the network and a login; checked first)")
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
    parser.add_argument("--base-model", help="base_model of the model card (default: the Hub id of --input, or the "
                        "source config's _name_or_path when it is a Hub id)")
    parser.add_argument("--license", help="license of the model card, a Hub license id such as apache-2.0 (default: "
                        "the source's README.md front matter, else its config.json; none known: no license field, "
                        "and a note)")
    parser.add_argument(
        "--widget", nargs=2, metavar=("IMAGE", "QUESTION"),
        help="add a widget example to the model card: IMAGE (a local file, bundled as widget/NAME.png) with QUESTION "
        "and the answer the converted model gives (one greedy generate; loads the whole model once). Hosted "
        "inference never runs custom code, so a widget can only show such a recorded output; without --widget the "
        "card has none",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --init-cli's random (non-gate) parameters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prepare(args) -> tuple[Plan, dict]:
    """Everything up to the plan (reads configs and headers, never tensor data); bad values fail here."""
    src = resolve_source(args.input)
    source_config = read_source_config(src)
    layout = detect_layout(source_config)
    refuse_quantized(source_config)
    sources, files = list_source_tensors(src)
    vision_overrides = vision_overrides_from_arg(args.vision_config)
    rules = load_key_map(args.key_map)
    notes, fields = [], SourceFields()
    probe = probe_checkpoint(sources, rules, layout)
    if layout == "fork":
        config = build_fork_config(source_config, args, vision_overrides, probe, notes, fields)
    else:
        config = build_llava_hf_config(source_config, args, vision_overrides, probe, notes, fields)
        args.init_cli = True
    tokenizer = load_tokenizer(src, fields)
    image_id, video_id = tokenizer_ids(tokenizer, config)
    if layout == "llava-hf" and source_config.get("image_token_index", image_id) != image_id:
        raise ConversionError(
            f"config.json says image_token_index={show(source_config['image_token_index'])} but the tokenizer's "
            f"<image> is {image_id}."
        )
    config.image_token_id, config.video_token_id = image_id, video_id
    config.architectures = ["CLIForConditionalGeneration"]
    generation = build_generation_config(src, config, tokenizer, fields)
    plan = plan_conversion(src, args, sources, files, layout, config, rules)
    plan.notes[:0] = notes
    if layout == "fork" and source_config.get("mm_vision_select_layer", -1) != -1:
        plan.notes.append(
            f"mm_vision_select_layer={show(source_config['mm_vision_select_layer'])} is not used: LLaVA-NeXT's SigLIP "
            "tower always returns the last of its layers, which is vision_feature_layer=-1 here."
        )
    if layout == "llava-hf":
        plan.notes.append("llava-hf source: it holds no CLI weights, so they are identity-initialised (--init-cli).")
    plan.notes.extend(fields.notes())
    card = source_card_metadata(src)
    metadata = choose_license(args, card, source_config, plan.notes)
    base_model = guess_base_model(args, source_config, src)
    if base_model:
        metadata["base_model"] = base_model
    config.dtype = plan.model_dtype
    return plan, {"source_config": source_config, "tokenizer": tokenizer, "generation": generation,
                  "card_metadata": metadata}


# ----------------------------------------------------------------------------------------------------------------------
# the destination: checked before the work, written into a locked temporary sibling, renamed into place


class _SignalState:
    """SIGINT / SIGTERM / SIGHUP become one ConversionInterrupted; held back while DST is renamed into place."""

    def __init__(self):
        self.fired = False
        self.deferring = False
        self.pending: int | None = None
        self.saved: Path | None = None

    def handler(self, signum, frame):
        if self.fired:  # already unwinding: let the cleanup finish
            return
        if self.deferring:
            self.pending = signum
            return
        self.fired = True
        raise ConversionInterrupted(signum, self.saved)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            if self.pending is not None and not self.fired:
                self.fired = True
                raise ConversionInterrupted(self.pending, self.saved)


@contextlib.contextmanager
def interrupts_as_exceptions():
    """Handles SIGINT, SIGTERM and SIGHUP like Ctrl-C while converting (main thread only); restores the handlers."""
    state = _SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, state.handler) for signum in signals}
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def checked_output_path(value: str) -> Path:
    """--output as an absolute path with its parent resolved; a symbolic link (dangling or not) is refused."""
    given = Path(value).expanduser()
    if given.is_symlink():
        raise ConversionError(
            f"--output {value} is a symbolic link (to {os.readlink(given)}); the converter never writes through or "
            "replaces a link. Give the real folder path."
        )
    absolute = Path(os.path.abspath(given))
    if not absolute.name or absolute.name in (".", ".."):
        raise ConversionError(f"--output {value!r} names no folder.")
    return absolute.parent.resolve() / absolute.name


def check_output_parent(output: Path) -> None:
    """The nearest existing ancestor of --output must be a folder we may write into (checked before the work)."""
    ancestor = output.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"--output {output}: {ancestor} is not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(
            f"--output {output}: cannot write into {ancestor} (permission denied); choose a folder you can write to."
        )


def check_hub_push(repo: str) -> None:
    """--push-to-hub is checked before converting: a repo id, the network allowed, a login."""
    from huggingface_hub import constants, get_token

    if not _REPO_ID.fullmatch(repo):
        raise ConversionError(f"--push-to-hub {show(repo)} is not a Hub repo id (owner/name).")
    if constants.is_offline_mode():
        raise ConversionError(
            "--push-to-hub needs the Hub, but offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); convert "
            "without --push-to-hub and upload the folder later (hf upload REPO DST)."
        )
    if get_token() is None:
        raise ConversionError("--push-to-hub needs a Hub login (hf auth login, or the HF_TOKEN variable).")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it: never judge (partials are then left alone)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _lock(path: Path, blocking: bool = True) -> int | None:
    """flock() on a folder: held by a live run for its whole conversion, released by the kernel when it dies.
    Returns the descriptor, or None when another process holds the lock."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the pid in the name alone protects a live run's folder
        return -1
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a filesystem without flock: rely on the pid
        pass
    return fd


def _temporary_pattern(output: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(output.name)}\.(partial|old)-(\d{{1,10}})-[0-9a-f]{{8}}")


def remove_stale_partials(output: Path, err=None) -> list[Path]:
    """
    Removes `.<name>.partial-<pid>-*` (and `.old-*`) folders beside `output` left by dead runs: their process is gone
    and nobody holds their lock. Folders of live runs are never touched; an `.old-` folder is kept when DST is missing
    (it is then the only copy of the previous DST).
    """
    err = err or sys.stderr
    pattern, legacy = _temporary_pattern(output), re.compile(rf"\.{re.escape(output.name)}\.partial-[0-9a-f]{{8}}")
    removed = []
    try:
        entries = sorted(output.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            if legacy.fullmatch(entry.name):
                print(f"Note: {entry} looks like the partial folder of an older converter version (no owner "
                      "recorded); it is left alone: remove it by hand if no conversion is running.", file=err)
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid == os.getpid() or _process_alive(pid):
            continue
        if kind == "old" and not output.is_dir():
            print(f"Note: {entry} holds the previous {output.name} of a run that died while replacing it; it is left "
                  "for you to restore or remove.", file=err)
            continue
        fd = _lock(entry, blocking=False)
        if fd is None:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            if fd >= 0:
                os.close(fd)
        removed.append(entry)
        print(f"Removed {entry}: left by an interrupted conversion (process {pid} is gone).", file=err)
    return removed


def make_parents(output: Path) -> list[Path]:
    """Creates the missing parents of --output; returns them (deepest first) so a failed run can remove them."""
    missing, folder = [], output.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConversionError(f"cannot create {output.parent}: {error.strerror or error}.") from None
    return missing


def make_temporary(output: Path) -> tuple[Path, int]:
    """The locked temporary sibling `.<name>.partial-<pid>-<random>` the conversion is written into."""
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temporary.mkdir()
    except OSError as error:
        raise ConversionError(
            f"cannot create a folder in {output.parent}: {error.strerror or error} (is it writable?)."
        ) from None
    return temporary, _lock(temporary)


def finalize(temporary: Path, output: Path, force: bool) -> None:
    if output.is_symlink():
        raise ConversionError(f"--output {output} became a symbolic link; it is not replaced.")
    if os.path.lexists(output):
        if not force:
            raise ConversionError(f"--output {output} exists; pass --force to replace it.")
        old = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    output = None
    if args.output and not args.inspect:
        output = checked_output_path(args.output)
        if os.path.lexists(output) and not args.force:
            raise ConversionError(f"--output {output} exists; pass --force to replace it.")
        source = Path(args.input).expanduser().resolve()
        if source.exists() and (output == source or output in source.parents):
            raise ConversionError(f"--output {output} would replace the source folder {source}; choose another one.")
        check_output_parent(output)
        if args.push_to_hub:
            check_hub_push(args.push_to_hub)
    import modeling_cli  # noqa: F401  (the heavy imports, outside the timed part)
    import processing_cli  # noqa: F401

    with interrupts_as_exceptions() as state:
        started = time.perf_counter()
        plan, extras = prepare(args)
        report_plan(plan, out)
        if args.inspect:
            return plan
        if not plan.ok:
            raise ConversionError(
                f"cannot convert {plan.source}; nothing was written.\n{format_problems(plan.problems)}"
            )

        remove_stale_partials(output)
        created = make_parents(output)
        temporary, lock = None, -1
        try:
            temporary, lock = make_temporary(output)
            stats = write_weights(plan, temporary, progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
            print(f"Wrote {format_bytes(stats['bytes'])} in {len(stats['files'])} shard(s) in "
                  f"{stats['seconds']:.1f} s ({stats['bytes'] / 1e6 / max(stats['seconds'], 1e-9):.0f} MB/s)", file=out)
            if stats["nonfinite"]:
                print(f"Note: {nonfinite_message(stats['nonfinite'], allowed=True)}", file=out)
            plan.config.save_pretrained(os.fspath(temporary))
            extras["generation"].save_pretrained(os.fspath(temporary))
            processor = build_processor(plan.config, extras["tokenizer"])
            processor.save_pretrained(os.fspath(temporary))
            sanitize_tokenizer_config(temporary)
            code_files = copy_remote_code(temporary)
            widget = record_widget(temporary, processor, *args.widget, args.push_to_hub, out) if args.widget else None
            initialised = any(t.init for t in plan.targets.values())
            label = args.input if not Path(args.input).expanduser().exists() else Path(args.input).resolve().name
            card = build_model_card(plan.config, extras["card_metadata"], label, plan.layout, initialised, widget)
            card.save(temporary / "README.md")
            verify_no_foreign_code(temporary, code_files)
            with state.deferred():
                finalize(temporary, output, args.force)
                state.saved = output
        except BaseException as error:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise ConversionError(
                    f"no space left on device while writing {output} ({error}); nothing was written to --output and "
                    "the temporary folder was removed."
                ) from None
            if isinstance(error, OSError):
                raise ConversionError(
                    f"write error while converting into {output}: {error}; nothing was written to --output and the "
                    "temporary folder was removed."
                ) from None
            raise
        finally:
            if lock is not None and lock >= 0:
                os.close(lock)
        print(f"Saved {output} ({time.perf_counter() - started:.1f} s in all)", file=out)

        if args.push_to_hub:
            from huggingface_hub import HfApi

            try:
                api = HfApi()
                api.create_repo(args.push_to_hub, exist_ok=True, private=args.private)
                api.upload_folder(repo_id=args.push_to_hub, folder_path=os.fspath(output),
                                  commit_message="Add CLI checkpoint converted with convert_checkpoint.py")
            except Exception as error:
                raise ConversionError(
                    f"{output} is saved, but the upload to {args.push_to_hub} failed: {clip(error, 400)}; upload it "
                    f"later (hf upload {args.push_to_hub} {output}).", written=True
                ) from None
            print(f"Pushed to https://huggingface.co/{args.push_to_hub}", file=out)
    return output


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert(args)
    except ConversionError as error:
        message = str(error)
        if not error.written and "nothing was written" not in message:
            message = message.rstrip().rstrip(".") + "; nothing was written."
        print(f"error: {message}", file=sys.stderr)
        return 1
    except ConversionInterrupted as stop:
        if stop.saved is not None:
            print(f"error: interrupted by {stop.signal_name} after {stop.saved} was saved completely.", file=sys.stderr)
        else:
            print(f"error: interrupted by {stop.signal_name}; nothing was written (the temporary folder was removed).",
                  file=sys.stderr)
        return 128 + stop.signum
    if isinstance(result, Plan) and not result.ok:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
