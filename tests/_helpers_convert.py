"""Synthetic source checkpoints for the converter tests and benchmark (LLaVA-NeXT fork layout and llava-hf layout)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from configuration_cli import CLIConfig

# Tiny SigLIP sizes (tests/tiny_models.py), given to the converter with --vision-config: the fork's config.json does
# not hold the vision tower's architecture.
TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4, image_size=28,
                   patch_size=7)


def tiny_source_model(vocab_size: int, image_token_id: int, tied: bool = False, seed: int = 0):
    """A random tiny CLI model (identity CLI modules) whose base weights make the source checkpoint."""
    from tiny_models import tiny_config_kwargs

    from modeling_cli import CLIForConditionalGeneration

    kwargs = tiny_config_kwargs(image_token_index=image_token_id, video_token_index=image_token_id + 1)
    kwargs["text_config"] = {**kwargs["text_config"], "vocab_size": vocab_size, "tie_word_embeddings": tied}
    kwargs["tie_word_embeddings"] = tied
    config = CLIConfig(**kwargs, vision_extraction_layers=[1, 3, 5], llm_injection_layers=[1, 3], amp_lora_rank=4)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return CLIForConditionalGeneration(config).eval()


def fork_key(name: str) -> str | None:
    """Our state-dict key -> the LLaVA-NeXT fork's key (None for the CLI modules)."""
    if name.startswith("model.amp.") or name.startswith("model.language_model.agf."):
        return None
    if name.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
    if name.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + name.rsplit(".", 1)[1]
    if name.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + name.rsplit(".", 1)[1]
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name  # model.image_newline, lm_head.weight


def llava_hf_key(name: str, legacy: bool) -> str | None:
    """Our key -> transformers 4.x (legacy) or 5.x llava-hf key."""
    if name.startswith("model.amp.") or name.startswith("model.language_model.agf."):
        return None
    if not legacy:
        return name
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
    return name.removeprefix("model.")


def base_state(model) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if not (k.startswith("model.amp.") or ".agf." in k)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """One model.safetensors, or `num_shards` shards + model.safetensors.index.json."""
    names = list(tensors)
    if num_shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, folder / "model.safetensors", metadata={"format": "pt"})
        return
    per_shard = math.ceil(len(names) / num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        file_name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[i * per_shard : (i + 1) * per_shard]
        save_file({k: tensors[k].contiguous() for k in chunk}, folder / file_name, metadata={"format": "pt"})
        weight_map.update({k: file_name for k in chunk})
        total += sum(tensors[k].numel() * tensors[k].element_size() for k in chunk)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def fork_config(model, pinpoints: str = "string", layers=("RANGE-1-6-2", "1,3")) -> dict:
    """The flat config.json of a LLaVA-NeXT fork checkpoint (Qwen2 fields + mm_* fields) for `model`."""
    text = model.config.text_config
    crop = model.config.vision_config.image_size
    if pinpoints == "string":
        grid = "(1x1),...,(6x6)"
    else:  # LLaVA-NeXT lists (width, height) pairs
        grid = [[crop * w, crop * h] for w in range(1, 7) for h in range(1, 7)]
    config = {
        "_name_or_path": "/mnt/train/cli-tiny",
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "max_window_layers": 21,
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "vocab_size": text.vocab_size,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "image_aspect_ratio": "anyres_max_9",
        "image_crop_resolution": None,
        "image_grid_pinpoints": grid,
        "image_split_resolution": None,
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_vision_tower_lr": 2e-06,
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
    }
    if layers is not None:
        config["vision_exp_layers"], config["vlm_exp_layers"] = layers
    return config


def write_tokenizer(folder: Path):
    """The source's tokenizer: Qwen2-like, without <image>/<video> (LLaVA-NeXT adds none to the saved tokenizer)."""
    from tiny_cli import build_tiny_tokenizer

    return build_tiny_tokenizer(folder, add_multimodal_tokens=False)


def make_fork_checkpoint(
    folder: Path,
    model,
    num_shards: int = 1,
    dtype: torch.dtype | None = None,
    pinpoints: str = "string",
    extra: dict[str, torch.Tensor] | None = None,
    layers=("RANGE-1-6-2", "1,3"),
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {fork_key(k): v for k, v in base_state(model).items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors.update(extra or {})
    save_tensors(folder, tensors, num_shards)
    (folder / "config.json").write_text(json.dumps(fork_config(model, pinpoints, layers), indent=2))
    tokenizer = write_tokenizer(folder)
    eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": None, "eos_token_id": eos_token_id}))
    return folder


def make_llava_hf_checkpoint(folder: Path, model, legacy: bool) -> Path:
    """A transformers LLaVA-OneVision checkpoint: 4.x keys (legacy) or 5.x keys, config.json of llava_onevision."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {llava_hf_key(k, legacy): v for k, v in base_state(model).items()}
    save_tensors(folder, tensors, 1)
    config = model.config.to_dict()
    for key in ("vision_extraction_layers", "llm_injection_layers", "amp_lora_rank", "amp_lora_alpha",
                "agf_num_heads", "auto_map", "architectures"):
        config.pop(key, None)
    config["model_type"] = "llava_onevision"
    config["architectures"] = ["LlavaOnevisionForConditionalGeneration"]
    if legacy:  # the 4.x spelling of the rope settings
        config["text_config"]["rope_theta"] = config["text_config"].pop("rope_parameters")["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    from tiny_cli import build_tiny_tokenizer

    build_tiny_tokenizer(folder, add_multimodal_tokens=True)
    return folder


def vision_config_arg() -> str:
    return json.dumps(TINY_VISION)


def env_with_repo() -> dict:
    """Environment for a fresh subprocess: offline, repo root and tests on PYTHONPATH."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    return env
