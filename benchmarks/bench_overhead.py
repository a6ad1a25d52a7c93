# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
What CLI costs over the LLaVA-OneVision it extends: prefill time, decode time per token, peak memory beyond the
weights, parameters and FLOPs, measured on a native `LlavaOnevisionForConditionalGeneration` and a CLI model that
share the same base weights (CLI's LoRA `B` and gates random and non-zero, so AMP and the injection really run).

    python benchmarks/bench_overhead.py                 # CLI-7B's proportions scaled down: 9 cases, ~15-30 min on 2 cores
    python benchmarks/bench_overhead.py --crops 10 --batch-sizes 1 --sizes ''    # one 1476-token case, a few minutes
    python benchmarks/bench_overhead.py --threads 1 --clock cpu --json out.json   # on a shared CPU: thread CPU time
    python benchmarks/bench_overhead.py --tiny --repeats 1 --json /tmp/smoke.json   # smoke run (seconds)
    python benchmarks/bench_overhead.py --device cuda --dtype bfloat16

Inputs are built directly (`pixel_values`, `image_sizes`, `input_ids`), the number of image tokens of each image taken
from the model's own packing, so the benchmark does not depend on the processor. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LogitsProcessor  # noqa: E402
from transformers.models.llava_onevision.modeling_llava_onevision import (  # noqa: E402
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from configuration_cli import CLIConfig, parse_layer_list  # noqa: E402
from modeling_cli import CLIForConditionalGeneration  # noqa: E402
from processing_cli import unpadded_grid_shape  # noqa: E402

REAL_TILE = 384  # LLaVA-OneVision's crop side; --sizes are given in pixels at this tile size

# LLaVA-OneVision-Qwen2-7B / CLI-7B (SigLIP-so400m with its last layer deleted, Qwen2-7B, RANGE-1-28-4 twice).
REAL_7B = dict(
    vision_hidden=1152, vision_intermediate=4304, vision_layers=26, vision_heads=16, image_size=384, patch_size=14,
    text_hidden=3584, text_intermediate=18944, text_layers=28, text_heads=28, kv_heads=4, vocab=152064,
    extraction="RANGE-1-28-4", injection="RANGE-1-28-4", lora_rank=16,
)
# The benchmark model: every width / 8 (vision/LLM width 144/448 = 1152/3584, the FFN, head and vocab ratios kept:
# 7 heads of 64 with 1 KV head is Qwen2-7B's 28:4), all 26 + 28 layers and both layer lists kept, the real 384-pixel
# tile and anyres_max_9 grid, but 32-pixel patches: 12x12 = 144 tokens per crop instead of 27x27 = 729.
BENCH = dict(
    vision_hidden=144, vision_intermediate=538, vision_layers=26, vision_heads=2, image_size=384, patch_size=32,
    text_hidden=448, text_intermediate=2368, text_layers=28, text_heads=7, kv_heads=1, vocab=19008,
    extraction="RANGE-1-28-4", injection="RANGE-1-28-4", lora_rank=16,
)
# For the smoke test: seconds on a laptop CPU.
TINY = dict(
    vision_hidden=32, vision_intermediate=64, vision_layers=5, vision_heads=2, image_size=64, patch_size=16,
    text_hidden=64, text_intermediate=128, text_layers=4, text_heads=4, kv_heads=2, vocab=512,
    extraction="1,3,5", injection="1,3", lora_rank=4,
)

PREFIX_TOKENS = 14  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SUFFIX_TOKENS = 20  # "\n" after each image is separate; the question and "<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------------------------------
# models


def build_config(dims: dict) -> CLIConfig:
    tile = dims["image_size"]
    vocab = dims["vocab"]
    return CLIConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=dims["vision_hidden"],
            intermediate_size=dims["vision_intermediate"],
            num_hidden_layers=dims["vision_layers"],
            num_attention_heads=dims["vision_heads"],
            image_size=tile,
            patch_size=dims["patch_size"],
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=dims["text_hidden"],
            intermediate_size=dims["text_intermediate"],
            num_hidden_layers=dims["text_layers"],
            num_attention_heads=dims["text_heads"],
            num_key_value_heads=dims["kv_heads"],
            vocab_size=vocab,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
        ),
        image_token_index=vocab - 2,
        video_token_index=vocab - 1,
        image_grid_pinpoints=[[tile * h, tile * w] for h in range(1, 7) for w in range(1, 7)],  # anyres_max_9's grid
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        vision_extraction_layers=dims["extraction"],
        llm_injection_layers=dims["injection"],
        amp_lora_rank=dims["lora_rank"],
    )


def native_twin(cli_model: CLIForConditionalGeneration) -> LlavaOnevisionForConditionalGeneration:
    """transformers' own LLaVA-OneVision with a copy of the CLI model's base weights."""
    kwargs = cli_model.config.to_dict()
    for key in ("vision_extraction_layers", "llm_injection_layers", "amp_lora_rank", "amp_lora_alpha", "agf_num_heads",
                "auto_map", "model_type", "architectures"):
        kwargs.pop(key, None)
    config = LlavaOnevisionConfig(**kwargs)
    config._attn_implementation = cli_model.config._attn_implementation
    native = LlavaOnevisionForConditionalGeneration(config)
    base_state = {k: v for k, v in cli_model.state_dict().items() if ".amp." not in k and ".agf." not in k}
    native.load_state_dict(base_state, strict=True)
    return native.eval()


def randomize_cli_modules(model, seed: int = 1) -> None:
    """Non-zero LoRA `B`, gate weights and biases (zero at initialisation), so that AMP and the injection do work."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.text_config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("amp.lora_B"):
                scale = 0.02
            elif name.endswith("readout_vector"):
                scale = 1 / math.sqrt(2 * hidden)
            elif name.endswith("gate_bias"):
                scale = 0.5
            else:
                continue
            param.copy_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))


def build_models(dims: dict, dtype: torch.dtype, device: str, attn: str):
    torch.manual_seed(0)
    config = build_config(dims)
    config._attn_implementation = attn
    cli = CLIForConditionalGeneration(config).eval()
    randomize_cli_modules(cli)
    native = native_twin(cli).to(device=device, dtype=dtype)
    cli = cli.to(device=device, dtype=dtype)
    for model in (cli, native):
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
    return native, cli


def parameter_counts(native, cli) -> dict:
    native_params = sum(p.numel() for p in native.parameters())
    cli_params = sum(p.numel() for p in cli.parameters())
    amp = sum(p.numel() for p in cli.model.amp.parameters())
    agf = sum(p.numel() for p in cli.model.language_model.agf.parameters())
    return dict(native=native_params, cli=cli_params, added=cli_params - native_params, amp=amp, agf=agf,
                added_ratio=(cli_params - native_params) / native_params)


# --------------------------------------------------------------------------------------------------------------------
# inputs


def parse_size(text: str) -> list[tuple[int, int]]:
    """'768x768' -> one image (height, width); '384x384+384x384' -> a multi-image prompt."""
    images = []
    for part in text.split("+"):
        height, width = (int(v) for v in part.lower().split("x"))
        images.append((height, width))
    return images


def crops_scenario(crops: int) -> dict:
    """
    A single image seen as `crops` vision-tower crops: an image of `rows x cols` tiles, `rows * cols = crops - 1` as
    square as possible, plus the base view. A single image always has its base view and at least one tile (crops >= 2);
    one crop per image is how LLaVA-OV encodes each image of a multi-image prompt (`--sizes 384x384+384x384`).
    """
    if crops < 2:
        raise ValueError(
            f"--crops {crops}: a single image has its base view plus at least one tile (crops >= 2); for one crop per "
            "image use a multi-image prompt, e.g. --sizes 384x384+384x384."
        )
    tiles = crops - 1
    rows = max(r for r in range(1, int(math.isqrt(tiles)) + 1) if tiles % r == 0)
    cols = tiles // rows
    if cols > 6:
        raise ValueError(f"--crops {crops}: {rows}x{cols} tiles is beyond the 6x6 anyres grid; use 1..10, 13, 17, ...")
    return dict(name=f"crops={crops}", images=[(REAL_TILE * rows, REAL_TILE * cols)], base_view_only=False)


def size_scenario(text: str) -> dict:
    images = parse_size(text)
    return dict(name=text, images=images, base_view_only=len(images) > 1)


def build_inputs(model, scenario: dict, batch_size: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """`pixel_values`, `image_sizes`, `batch_num_images`, `input_ids`, `attention_mask` for `batch_size` equal prompts."""
    config = model.config
    tile = config.vision_config.image_size
    sizes = [(h * tile // REAL_TILE, w * tile // REAL_TILE) for h, w in scenario["images"]]
    num_images = len(sizes)
    if scenario["base_view_only"]:
        crops = [1] * num_images
    else:
        crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile) for size in sizes]
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(batch_size * num_images, max(crops), 3, tile, tile)
    for i in range(batch_size * num_images):
        n = crops[i % num_images]
        pixel_values[i, :n] = torch.rand((n, 3, tile, tile), generator=generator) * 2 - 1
    image_sizes = torch.tensor(sizes * batch_size, dtype=torch.long)
    # multi-image mode (base view per image) is what `batch_num_images > 1` selects
    per_sample = num_images
    batch_num_images = torch.full((batch_size,), per_sample, dtype=torch.long)
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values[:num_images].to(device, dtype),
            image_sizes[:num_images].to(device),
            batch_num_images=batch_num_images[:1].to(device),
        )
    tokens_per_image = [int(f.shape[0]) for f in features.pooler_output]
    text = torch.randint(0, min(1000, config.image_token_id), (PREFIX_TOKENS + num_images + SUFFIX_TOKENS,), generator=generator)
    pieces = [text[:PREFIX_TOKENS]]
    for i, n in enumerate(tokens_per_image):
        pieces += [torch.full((n,), config.image_token_id, dtype=torch.long), text[PREFIX_TOKENS + i : PREFIX_TOKENS + i + 1]]
    pieces.append(text[PREFIX_TOKENS + num_images :])
    input_ids = torch.cat(pieces).repeat(batch_size, 1)
    return dict(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        pixel_values=pixel_values.to(device, dtype),
        image_sizes=image_sizes.to(device),
        batch_num_images=batch_num_images.to(device),
        _crops=sum(crops),
        _tokens_per_image=tokens_per_image,
    )


def model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------------------------
# timing and memory


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (one torch thread) / time.process_time


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepClock(LogitsProcessor):
    """Time stamp after every forward of `generate()`: the 1st is the end of prefill, the others decode steps."""

    def __init__(self, device: str):
        self.device = device
        self.stamps = []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(CLOCK())
        return scores


def timed_generate(model, inputs: dict, new_tokens: int, device: str) -> tuple[float, float]:
    """One greedy `generate()` of exactly `new_tokens`; returns (prefill seconds, median decode seconds per token)."""
    clock = StepClock(device)
    synchronize(device)
    start = CLOCK()
    with torch.no_grad():
        model.generate(**model_inputs(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=[clock])
    prefill = clock.stamps[0] - start  # image encoding + prefill forward (generate encodes images right before it)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return prefill, statistics.median(steps) if steps else float("nan")


def peak_memory_beyond_start(model, inputs: dict, new_tokens: int, device: str) -> int:
    """
    Peak bytes of live tensors during one `generate()`, above what was live when it started (weights and inputs).

    CUDA: `torch.cuda.max_memory_allocated` after a reset. CPU: the allocation / free events that the CPU allocator
    reports to the profiler (`profile_memory=True`), summed in time order; the running maximum is the peak. Both count
    tensor bytes as the caching allocator / malloc are asked for them (not RSS, not allocator slack).
    """
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.no_grad():
            model.generate(**model_inputs(inputs), **kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        model.generate(**model_inputs(inputs), **kwargs)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.profiler.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------------------------------------------------
# where the prefill time goes


class StageTimer:
    """
    Exclusive wall time per stage of one prefill forward: each wrapped call adds its time minus its wrapped children's.
    The stages present in both models (vision tower, projector, packing, decoder layers, ...) compare like with like;
    `AMP LoRA` and `AGF` exist only in CLI; `get_image_features (rest)` and `model.forward (rest)` hold the glue around
    them (hidden-state stacking, the K + 1 feature sets' concatenations and layouts, the features for the injection).
    """

    def __init__(self, device: str):
        self.device = device
        self.totals = defaultdict(float)
        self.stack = []
        self.patched = []

    def wrap(self, owner, attr: str, stage: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in owner.__dict__

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            synchronize(self.device)
            start = CLOCK()
            self.stack.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                elapsed = CLOCK() - start
                children = self.stack.pop()
                self.totals[stage] += elapsed - children
                if self.stack:
                    self.stack[-1] += elapsed

        self.patched.append((owner, attr, had_own, owner.__dict__.get(attr)))
        if isinstance(owner, type(sys)):  # a module-level function
            setattr(owner, attr, wrapper)
        else:  # an instance attribute shadowing the class's method
            owner.__dict__[attr] = wrapper

    def install(self, model) -> None:
        inner = model.model
        self.wrap(model, "forward", "top-level forward (rest)")
        self.wrap(inner, "forward", "model.forward (rest)")
        self.wrap(inner, "get_image_features", "get_image_features (rest)")
        self.wrap(inner.vision_tower, "forward", "vision tower")
        self.wrap(inner.multi_modal_projector, "forward", "projector")
        self.wrap(inner, "pack_image_features", "packing")
        if hasattr(inner, "pack_into"):  # a CLI that packs into a preallocated buffer
            self.wrap(inner, "pack_into", "packing")
        self.wrap(inner.language_model, "forward", "LLM (rest: masks, rope, norm)")
        for layer in inner.language_model.layers:
            self.wrap(layer, "forward", "decoder layers")
        self.wrap(model.lm_head, "forward", "lm_head")
        if hasattr(inner, "amp"):
            self.wrap(inner.amp, "forward", "AMP LoRA")
            for agf in inner.language_model.agf.values():
                self.wrap(agf, "forward", "AGF (gates + injection)")

    def remove(self) -> None:
        for owner, attr, had_own, value in reversed(self.patched):
            if isinstance(owner, type(sys)):
                setattr(owner, attr, value)
            elif had_own:
                owner.__dict__[attr] = value
            else:
                del owner.__dict__[attr]
        self.patched.clear()


def decode_op_census(model, inputs: dict) -> dict:
    """aten ops (name -> calls) of one decode step after a prefill: the work a generated token costs, counted exactly."""
    from torch.profiler import ProfilerActivity, profile

    arguments = model_inputs(inputs)
    with torch.no_grad():
        prefill = model(**arguments, use_cache=True, logits_to_keep=1)
        token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat((arguments["attention_mask"], torch.ones_like(token)), dim=1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=token, attention_mask=mask, past_key_values=prefill.past_key_values, use_cache=True,
                  logits_to_keep=1)
    return {event.key: event.count for event in prof.key_averages() if event.key.startswith("aten::")}


STAGE_ORDER = [
    "vision tower", "get_image_features (rest)", "projector", "AMP LoRA", "packing", "model.forward (rest)",
    "AGF (gates + injection)", "decoder layers", "LLM (rest: masks, rope, norm)", "lm_head", "top-level forward (rest)",
]
SHARED_STAGES = ("vision tower", "decoder layers")  # the same computation in every variant: differences are noise


def stage_profile(variants: dict, inputs: dict, repeats: int, device: str) -> dict:
    """Median exclusive seconds per stage of one prefill forward (`logits_to_keep=1`, as in generate), interleaved."""
    samples = {name: defaultdict(list) for name in variants}
    names = list(variants)
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            timer = StageTimer(device)
            with variants[name] as model:
                timer.install(model)
                try:
                    with torch.no_grad():
                        model(**model_inputs(inputs[name]), use_cache=True, logits_to_keep=1)
                finally:
                    timer.remove()
            if r == 0:
                continue  # warm-up
            for stage in STAGE_ORDER:
                samples[name][stage].append(timer.totals.get(stage, 0.0))
    return {stage: {name: statistics.median(samples[name][stage]) for name in names} for stage in STAGE_ORDER}


# --------------------------------------------------------------------------------------------------------------------
# FLOPs


def count_image_tokens(dims: dict, image_size: tuple[int, int], base_view_only: bool) -> tuple[int, int]:
    """(crops, packed tokens) of one image, from the packing's shapes alone (LLaVA-NeXT unpad and anyres_max_9)."""
    tile, side = dims["image_size"], dims["image_size"] // dims["patch_size"]
    if base_view_only:
        return 1, side * side + 1
    pinpoints = [[tile * h, tile * w] for h in range(1, 7) for w in range(1, 7)]
    crops = image_size_to_num_patches(image_size, pinpoints, tile)
    grid_h, grid_w = get_anyres_image_grid_shape(image_size, pinpoints, tile)
    rows, cols = unpadded_grid_shape(image_size[0], image_size[1], grid_h * side, grid_w * side)
    ratio = math.sqrt(rows * cols / (9 * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return crops, side * side + rows * (cols + 1)


def flop_count(dims: dict, crops: int, image_tokens: int, seq_len: int, batch: int):
    """
    Multiply-adds x 2 of one prefill (images encoded + prompt forward, last-token logits) for the native model, and
    what CLI adds, by component. `crops` / `image_tokens` are per sample; `seq_len` the prompt length per sample.
    Element-wise work (GELU, softmax, masks, norms, bias adds, the packing's interpolation) is left out of both: it is
    under 1% of either side.
    """
    dv, iv, lv = dims["vision_hidden"], dims["vision_intermediate"], dims["vision_layers"]
    d, inter, lt = dims["text_hidden"], dims["text_intermediate"], dims["text_layers"]
    heads, kv, hd = dims["text_heads"], dims["kv_heads"], dims["text_hidden"] // dims["text_heads"]
    patches = (dims["image_size"] // dims["patch_size"]) ** 2
    k = len(parse_layer_list(dims["extraction"], "vision_extraction_layers"))
    j = len(parse_layer_list(dims["injection"], "llm_injection_layers"))
    r, agf_heads = dims["lora_rank"], dims.get("agf_heads", heads)
    crop_tokens = batch * crops * patches  # vision-tower tokens of the whole batch
    n = batch * image_tokens  # image tokens of the whole batch
    s = seq_len

    vision = crop_tokens * (2 * 3 * dims["patch_size"] ** 2 * dv + lv * 2 * (4 * dv * dv + 2 * dv * iv))
    vision += batch * crops * lv * 2 * 2 * patches * patches * dv  # QK^T and AV per crop
    projector_pass = 2 * (dv * d + d * d)  # per vision token
    projector = crop_tokens * projector_pass
    llm_linear = 2 * lt * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter)
    llm = batch * s * llm_linear + batch * lt * 2 * s * s * heads * hd  # causal: half of QK^T and of AV
    lm_head = batch * 2 * d * dims["vocab"]
    native = dict(vision_tower=vision, projector=projector, llm=llm, lm_head=lm_head)
    native["total"] = sum(native.values())

    # K extra projector passes: the baseline keeps its own slot even when its layer is also an extraction layer
    amp_projector = k * crop_tokens * projector_pass
    amp_lora = k * crop_tokens * 2 * r * (dv + d)
    # AGF per injection layer, as modeling_cli's CLISingleQueryAttention computes it (attention folded through the
    # gate readout w: w . MHA(q; X) = sum_h softmax(X u_h) . (X z_h) + c): one (tokens, d) x (d, 2 h) matmul per
    # attention, over the K feature sets (2 K N d 2h) and the context (2 B S d 2h); the folding itself, per call:
    # W_q q, W_o^T w, u = W_k^T Q, z = W_v^T r, 4 x 2 d^2 per attention, two attentions; injection sum_k g_k V_k: 2 K N d.
    # (The softmax-weighted sums are element-wise: not counted.)
    agf_vision = j * (2 * k * n * d * 2 * agf_heads)
    agf_context = j * (2 * batch * s * d * 2 * agf_heads)
    agf_small = j * (2 * 4 * 2 * d * d)
    injection = j * 2 * k * n * d
    cli = dict(amp_projector=amp_projector, amp_lora=amp_lora, agf_vision=agf_vision, agf_context=agf_context,
               agf_small=agf_small, injection=injection)
    cli["total"] = sum(cli.values())
    return dict(native=native, cli_extra=cli, ratio=(native["total"] + cli["total"]) / native["total"])


def real_parameter_ratio(dims: dict = REAL_7B) -> float:
    """Parameters CLI adds / LLaVA-OV's, from the dimensions (AMP: K LoRAs; AGF: 2 x 4 d x d (+ bias) + 2 queries + gate)."""
    dv, d, vocab = dims["vision_hidden"], dims["text_hidden"], dims["vocab"]
    k = len(parse_layer_list(dims["extraction"], "vision_extraction_layers"))
    j = len(parse_layer_list(dims["injection"], "llm_injection_layers"))
    heads, kv, hd = dims["text_heads"], dims["kv_heads"], dims["text_hidden"] // dims["text_heads"]
    patch = dims["patch_size"]
    vision = dims["vision_layers"] * (4 * dv * dv + 4 * dv + 2 * dv * dims["vision_intermediate"] + dv
                                      + dims["vision_intermediate"] + 4 * dv)
    vision += 3 * patch * patch * dv + dv + (dims["image_size"] // patch) ** 2 * dv + 2 * dv
    projector = dv * d + d + d * d + d + d  # + image_newline
    text_layer = d * heads * hd + heads * hd + 2 * (d * kv * hd + kv * hd) + heads * hd * d + 3 * d * dims["text_intermediate"] + 2 * d
    native = vision + projector + dims["text_layers"] * text_layer + 2 * vocab * d + d
    added = k * dims["lora_rank"] * (dv + d) + j * (2 * 4 * (d * d + d) + 2 * d + 2 * d + k)
    return added / native


def memory_floor(dims: dict, image_tokens: int, batch: int, bytes_per_element: int) -> int:
    """Bytes CLI must hold beyond the native model through the LLM pass: the K AMP feature sets, (K, N, d)."""
    k = len(parse_layer_list(dims["extraction"], "vision_extraction_layers"))
    return k * batch * image_tokens * dims["text_hidden"] * bytes_per_element


# --------------------------------------------------------------------------------------------------------------------
# main


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


class Plain:
    """A model as a context manager (`with models[name] as model`), so that a variant could patch and unpatch one."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return None


def run_case(models: dict, scenario: dict, batch: int, args, dims: dict) -> dict:
    """Timings, memory, FLOPs (and the stage profile) of one scenario at one batch size, every variant interleaved."""
    device, dtype, names = args.device, args.dtype, list(models)
    inputs = {}
    for name in names:
        with models[name] as model:
            inputs[name] = build_inputs(model, scenario, batch, device, dtype)
    counts = {name: inputs[name]["_tokens_per_image"] for name in names}
    if len({tuple(c) for c in counts.values()}) != 1:
        raise RuntimeError(f"{scenario['name']}: the variants pack different token counts {counts}")
    first = inputs[names[0]]
    seq_len, image_tokens, crops = first["input_ids"].shape[1], sum(first["_tokens_per_image"]), first["_crops"]
    result = dict(scenario=scenario["name"], batch_size=batch, crops_per_sample=crops,
                  image_tokens_per_sample=image_tokens, seq_len=seq_len)

    gate_means = []  # the gates of the timed runs really are non-zero: record them once, on the warm-up
    for name in names:
        with models[name] as model:
            hooks = [agf.register_forward_hook(lambda _m, _a, out: gate_means.append(float(out[1].abs().mean())))
                     for agf in getattr(model.model.language_model, "agf", {}).values()]
            try:
                timed_generate(model, inputs[name], min(3, args.new_tokens), device)  # warm-up
            finally:
                for hook in hooks:
                    hook.remove()
    result["mean_abs_gate"] = statistics.mean(gate_means) if gate_means else 0.0

    timings = {name: defaultdict(list) for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # A B, B A, ...: rotating order
            with models[name] as model:
                prefill, decode = timed_generate(model, inputs[name], args.new_tokens, device)
            timings[name]["prefill_s"].append(prefill)
            timings[name]["decode_s_per_token"].append(decode)
    for name in names:
        result[name] = {key: statistics.median(values) for key, values in timings[name].items()}
        result[name]["prefill_s_runs"] = timings[name]["prefill_s"]
        result[name]["decode_s_per_token_runs"] = timings[name]["decode_s_per_token"]
        with models[name] as model:
            result[name]["peak_bytes_beyond_weights"] = peak_memory_beyond_start(model, inputs[name], args.new_tokens, device)
    result["ratio"] = {
        name: {key: result[name][key] / result["native"][key]
               for key in ("prefill_s", "decode_s_per_token", "peak_bytes_beyond_weights")}
        for name in names if name != "native"
    }
    result["flops"] = flop_count(dims, crops, image_tokens, seq_len, batch)
    floor = memory_floor(dims, image_tokens, batch, torch.finfo(dtype).bits // 8)
    native_peak = result["native"]["peak_bytes_beyond_weights"]
    result["memory_floor_bytes"] = floor
    result["memory_floor_ratio"] = (native_peak + floor) / native_peak
    if args.profile and batch in args.profile_batch_sizes:
        stages = stage_profile(models, inputs, args.profile_repeats, device)
        result["stage_profile_s"] = stages
        native_total = sum(v["native"] for v in stages.values())
        result["prefill_ratio_from_stages"] = {
            name: 1 + sum(v[name] - v["native"] for k, v in stages.items() if k not in SHARED_STAGES) / native_total
            for name in names if name != "native"
        }
        census = {}
        for name in names:
            with models[name] as model:
                census[name] = decode_op_census(model, inputs[name])
        result["decode_extra_aten_ops"] = {  # ops a CLI decode step runs beyond the native one (expected: none)
            name: {op: n - census["native"].get(op, 0) for op, n in census[name].items() if n != census["native"].get(op, 0)}
            for name in names if name != "native"
        }
    return result


def print_case(result: dict, names: list) -> None:
    head = (f"{result['scenario']:>16} b={result['batch_size']} crops={result['crops_per_sample']:>2} "
            f"img_tok={result['image_tokens_per_sample']:>5} seq={result['seq_len']:>5} |g|={result['mean_abs_gate']:.2f}")
    print(head + f"  FLOPs x{result['flops']['ratio']:.4f}, memory floor x{result['memory_floor_ratio']:.3f}")
    for name in names:
        figures = result[name]
        line = (f"{'':>6}{name:<13} prefill {figures['prefill_s'] * 1e3:9.1f} ms  "
                f"decode {figures['decode_s_per_token'] * 1e3:7.2f} ms/tok  "
                f"peak {figures['peak_bytes_beyond_weights'] / 2**20:8.1f} MiB")
        if name != "native":
            ratio = result["ratio"][name]
            line += (f"  | x{ratio['prefill_s']:.3f} prefill, x{ratio['decode_s_per_token']:.3f} decode, "
                     f"x{ratio['peak_bytes_beyond_weights']:.3f} peak")
            if "prefill_ratio_from_stages" in result:
                line += f", x{result['prefill_ratio_from_stages'][name]:.3f} prefill from stages"
            if "decode_extra_aten_ops" in result:
                line += f", decode extra ops: {result['decode_extra_aten_ops'][name] or 'none'}"
        print(line)
    if "stage_profile_s" in result:
        print(f"{'':>6}{'prefill stage (ms, exclusive)':<32}" + "".join(f"{name:>14}" for name in names))
        for stage, values in result["stage_profile_s"].items():
            if not any(values.values()):
                continue
            print(f"{'':>6}{stage:<32}" + "".join(f"{values[name] * 1e3:14.2f}" for name in names))
    sys.stdout.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--sizes", default="768x768,1200x1600,384x384+384x384",
                        help="comma-separated image sizes HxW in pixels at LLaVA-OV's 384 tile ('+' joins the images "
                             "of a multi-image prompt), run at batch size 1; '' for none")
    parser.add_argument("--crops", default="2,4,10", help="vision-tower crops per image for the scaling runs; '' none")
    parser.add_argument("--batch-sizes", default="1,4", help="batch sizes of the --crops runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate() calls per variant and case")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per call (min = max)")
    parser.add_argument("--variants", default="native,cli",
                        help="'native' or 'native,cli' (the order of the interleaved runs starts here)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-stage prefill profile")
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--profile-batch-sizes", default="1", help="batch sizes that get the stage profile")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: perf_counter; cpu: CPU time of this thread (with --threads 1: all the compute, "
                             "minus the time other processes hold the core; for shared machines) or of the process")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.variants[0] != "native" or not set(args.variants) <= {"native", "cli"} or len(set(args.variants)) != len(args.variants):
        parser.error("--variants: 'native' or 'native,cli'")
    args.profile_batch_sizes = {int(b) for b in args.profile_batch_sizes.split(",") if b.strip()}
    if args.tiny and args.new_tokens == parser.get_default("new_tokens"):
        args.new_tokens = 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            raise SystemExit("--clock cpu is for --device cpu")
        CLOCK = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    dims = TINY if args.tiny else BENCH
    native, cli = build_models(dims, args.dtype, args.device, args.attn)
    params = parameter_counts(native, cli)
    available = {"native": Plain(native), "cli": Plain(cli)}
    models = {name: available[name] for name in args.variants}
    scenarios = []
    for crops in [int(c) for c in args.crops.split(",") if c.strip()]:
        for batch in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
            scenarios.append((crops_scenario(crops), batch))
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        scenarios.append((size_scenario(size), 1))

    machine = machine_name(args.device)
    print(f"machine: {machine}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {args.clock} clock, device={args.device}, "
          f"dtype={str(args.dtype).removeprefix('torch.')}, torch {torch.__version__}")
    print(f"parameters: native {params['native'] / 1e6:.2f} M, CLI adds {params['added'] / 1e6:.3f} M "
          f"(AMP {params['amp'] / 1e6:.3f} M, AGF {params['agf'] / 1e6:.3f} M) = x{1 + params['added_ratio']:.4f}; "
          f"at CLI-7B size: x{1 + real_parameter_ratio():.4f}")
    results = []
    for scenario, batch in scenarios:
        result = run_case(models, scenario, batch, args, dims)
        # the same prompts on the real CLI-7B (729 tokens per crop): the FLOP ratio it would have
        real = [count_image_tokens(REAL_7B, size, scenario["base_view_only"]) for size in scenario["images"]]
        real_crops, real_tokens = sum(c for c, _ in real), sum(t for _, t in real)
        real_seq = result["seq_len"] - result["image_tokens_per_sample"] + real_tokens
        result["flops_real_7b"] = flop_count(REAL_7B, real_crops, real_tokens, real_seq, batch)
        result["flops_real_7b"]["image_tokens_per_sample"] = real_tokens
        results.append(result)
        print_case(result, args.variants)
        print(f"{'':>6}FLOPs: CLI adds {result['flops']['cli_extra']['total'] / 1e9:.2f} GFLOP to "
              f"{result['flops']['native']['total'] / 1e9:.1f} (x{result['flops']['ratio']:.4f}); the same prompt on "
              f"CLI-7B ({real_tokens} image tokens): x{result['flops_real_7b']['ratio']:.4f}")
    report = dict(
        machine=machine, cpus=os.cpu_count(), device=args.device, dtype=str(args.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), clock=args.clock, torch=torch.__version__, new_tokens=args.new_tokens, repeats=args.repeats,
        variants=args.variants, dims=dims, parameters=params, results=results,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
