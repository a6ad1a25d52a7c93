# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
What CLI costs over the LLaVA-OneVision it extends: prefill time, decode time per token, peak memory beyond the
weights, parameters and FLOPs, measured on a native `LlavaOnevisionForConditionalGeneration` and a CLI model that
share the same base weights (CLI's LoRA `B` and gates random and non-zero, so AMP and the injection really run).

    python benchmarks/bench_overhead.py                 # CLI-7B's proportions scaled down: 9 cases, ~15-30 min on 2 cores
    python benchmarks/bench_overhead.py --crops 10 --batch-sizes 1 --sizes ''    # one 1476-token case, a few minutes
    python benchmarks/bench_overhead.py --threads 1 --clock cpu --variants native,cli,cli_proposed --json out.json
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
from modeling_cli import CLIForConditionalGeneration, CLIImageFeaturesOutput  # noqa: E402
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
            elif name.endswith("gate_weight"):
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
    A single image seen as `crops` vision-tower crops. crops >= 2: an image of `rows x cols` tiles, `rows * cols =
    crops - 1` as square as possible, plus the base view. crops == 1: the base view alone, which is how LLaVA-OV encodes
    each image of a multi-image prompt (selected by `batch_num_images` > 1 for the sample).
    """
    if crops == 1:
        return dict(name="crops=1", images=[(REAL_TILE, REAL_TILE)], base_view_only=True)
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
    # multi-image mode (base view per image) is what `batch_num_images > 1` selects; a one-image sample in that mode
    # says 2 (only n == 1 selects anyres): the model reads nothing else from it
    per_sample = max(num_images, 2) if scenario["base_view_only"] else num_images
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
        self.wrap(sys.modules[__name__], "_proposed_pack", "packing")
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
# proposed changes to modeling_cli.py, run here as an experiment (`--variants native,cli,cli_proposed`)
#
# 1. AMP one slot at a time: project (+ LoRA, added in place with `addmm_`) and pack the baseline and each extraction
#    layer straight into its slot of one (N, K + 1, d) buffer: no (K + 1)-wide stack / index / cat / permute copies,
#    and the only full-size transient is one slot's projection, as in LLaVA-OV (AMP's extra memory is the buffer).
# 2. Packing channels-last: unpad / interpolate / newline on (rows, cols, C) with C contiguous (interpolate runs
#    channels-last), written in place: no (C, rows, cols) transposes.
# 3. One feature buffer: `get_image_features` keeps the packed (N, K + 1, d) buffer (`pooler_output` and
#    `deepstack_features` are views of it) and the LLM reads it directly: no `torch.stack(torch.cat(...))` copy, so
#    only one copy of the K feature sets lives through the LLM pass.
# 4. AGF folded through the gate: s_k and s_h are only used as w . s, so w . MHA(q; X) = sum_h softmax(X u_h) . (X z_h)
#    + c with parameter-only u, z, c (cached in inference): no pooled (K, h, B, d) tensors, no d x d value / output
#    projections, no W_q / W_k / W_v / W_o reads per call. The vision side does not depend on the hidden states, so all
#    J layers' vision terms come from one (N K, d) x (d, 2 J h) matmul at the first injection layer; each layer then
#    reads H once (context term) and the features once (the injection, a (N, 1, K) x (N, K, d) bmm, no permute copy).


def _pack_plans(model, crops_per_image, image_sizes, vision_aspect_ratio):
    """Per image: `None` (base view only) or the grid's (height, width, top, left, kept h, kept w, interpolate, out h,
    out w), and its packed token count, as `CLIModel.pack_image_features` computes them (with newlines)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    max_num_crops = int(vision_aspect_ratio.removeprefix("anyres_max_"))
    plans = []
    for crops, image_size in zip(crops_per_image, image_sizes):
        if crops == 1:
            plans.append((None, side * side + 1))
            continue
        grid_height, grid_width = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints,
                                                              config.vision_config.image_size)
        rows, cols = grid_height * side, grid_width * side
        kept_height, kept_width = unpadded_grid_shape(int(image_size[0]), int(image_size[1]), rows, cols)
        top, left = (rows - kept_height) // 2, (cols - kept_width) // 2
        ratio = math.sqrt(kept_height * kept_width / (max_num_crops * side**2))
        interpolate = ratio > 1.1
        out_height, out_width = (int(kept_height // ratio), int(kept_width // ratio)) if interpolate else (kept_height, kept_width)
        plan = (grid_height, grid_width, top, left, kept_height, kept_width, interpolate, out_height, out_width)
        plans.append((plan, side * side + out_height * (out_width + 1)))
    return plans


def _proposed_pack(side, image_features, plans, image_newline, out):
    """
    `CLIModel.pack_image_features` channels-last, written into `out` (`(N, C)`, any row stride): unpad, interpolate
    (channels-last kernel) and newline on `(rows, cols, C)` with C contiguous, no `(C, rows, cols)` transposes.
    """
    offset = 0
    for image_feature, (plan, num_tokens) in zip(image_features, plans):
        dest = out[offset : offset + num_tokens]
        offset += num_tokens
        dest[: side * side] = image_feature[0]
        if plan is None:
            dest[side * side] = image_newline
            continue
        grid_height, grid_width, top, left, kept_height, kept_width, interpolate, out_height, out_width = plan
        channels = image_feature.shape[-1]
        grid = image_feature[1:].view(grid_height, grid_width, side, side, channels).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(grid_height * side, grid_width * side, channels)[top : top + kept_height, left : left + kept_width]
        if interpolate:
            grid = grid.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
            grid = torch.nn.functional.interpolate(grid, [out_height, out_width], mode="bilinear")[0].permute(1, 2, 0)
        rows = dest[side * side :].unflatten(0, (out_height, out_width + 1))
        rows[:, :out_width] = grid
        rows[:, out_width] = image_newline


def _proposed_get_image_features(model, pixel_values, image_sizes, vision_feature_layer=None,
                                 vision_feature_select_strategy=None, vision_aspect_ratio=None, batch_num_images=None,
                                 **kwargs):
    """
    `CLIModel.get_image_features` one layer slot at a time: project (+ LoRA) and pack the baseline and each extraction
    layer straight into its slot of one `(N, K + 1, d)` buffer, so the only full-size transient is one slot's
    `(crops, patches, d)` projection (as in LLaVA-OV), not K + 1 of them plus their concatenations.
    """
    config = model.config
    vision_feature_layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    vision_feature_select_strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
    vision_aspect_ratio = vision_aspect_ratio or config.vision_aspect_ratio
    tile = config.vision_config.image_size
    if batch_num_images is None:
        crops_per_image = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile) for size in image_sizes]
    else:
        crops_per_image = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, tile) if num == 1 else 1
            for size, num in zip(image_sizes, (n for n in batch_num_images for _ in range(n)))
        ]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([crops[:num] for crops, num in zip(pixel_values, crops_per_image)], dim=0)
    base_layer = vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
    extraction = list(config.vision_extraction_layers)
    slots = [base_layer] + extraction  # a base layer that is also extracted gets its own slot (LoRA must not touch it)
    for key in ("output_hidden_states", "return_dict"):
        kwargs.pop(key, None)
    outputs = model.vision_tower(pixel_values, output_hidden_states=sorted(set(slots)), return_dict=True, **kwargs)
    plans = _pack_plans(model, crops_per_image, image_sizes, vision_aspect_ratio)
    counts = [n for _, n in plans]
    hidden_size = config.text_config.hidden_size
    side = tile // config.vision_config.patch_size
    buffer = model.image_newline.new_empty(sum(counts), len(slots), hidden_size)
    amp = model.amp
    for slot, layer in enumerate(slots):
        features = outputs.hidden_states[layer]
        if vision_feature_select_strategy == "default":
            features = features[:, 1:]
        projected = model.multi_modal_projector(features)  # (crops, patches, d)
        if slot > 0:  # AMP: + (alpha / r) B_k A_k F_k, in place
            low_rank = features.flatten(0, 1) @ amp.lora_A[slot - 1].T
            projected.flatten(0, 1).addmm_(low_rank, amp.lora_B[slot - 1].T, alpha=amp.scaling)
        _proposed_pack(side, torch.split(projected, crops_per_image, dim=0), plans, model.image_newline, buffer[:, slot])
        del projected
    images = torch.split(buffer, counts, dim=0)
    result = CLIImageFeaturesOutput(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=[image[:, 0] for image in images],
        deepstack_features=[[image[:, 1 + k] for image in images] for k in range(len(extraction))],
    )
    result.feature_buffer = buffer  # (N, K + 1, d): slot 0 the baseline, slots 1.. the AMP features
    return result


def _proposed_model_forward(model, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None,
                            position_ids=None, past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                            vision_feature_select_strategy=None, vision_aspect_ratio=None, batch_num_images=None,
                            use_cache=None, mm_encoder_outputs=None, labels=None, output_gate_weights=None, **kwargs):
    """`CLIModel.forward` (inference subset) feeding the LLM the `(N, K + 1, d)` buffer, without a stacked copy."""
    import modeling_cli

    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    image_outputs = (mm_encoder_outputs or {}).get("image")
    if image_outputs is None and pixel_values is not None:
        image_outputs = model.get_image_features(pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                                                 vision_feature_select_strategy=vision_feature_select_strategy,
                                                 vision_aspect_ratio=vision_aspect_ratio, batch_num_images=batch_num_images)
    cli_features = image_positions = context_mask = None
    image_features = None
    if image_outputs is not None:
        image_features = torch.cat(list(image_outputs.pooler_output), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds)[0][..., 0]
        inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], image_features)
        cli_features = getattr(image_outputs, "feature_buffer", None)
        if cli_features is None or cli_features.shape[0] != image_features.shape[0]:  # e.g. expanded for beams
            cli_features = torch.stack(
                [image_features] + [torch.cat(list(layer), dim=0) for layer in image_outputs.deepstack_features], dim=1
            )
        image_positions = image_mask.nonzero(as_tuple=True)
        if hasattr(modeling_cli, "attended_positions"):
            context_mask = modeling_cli.attended_positions(attention_mask, image_mask.shape)
        else:
            context_mask = torch.ones_like(image_mask)
            if attention_mask is not None and attention_mask.dim() == 2:
                context_mask = attention_mask[:, -image_mask.shape[1] :].bool()
        if labels is not None:
            context_mask = context_mask & (labels.to(context_mask.device) == -100)
    outputs = model.language_model(
        attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
        inputs_embeds=inputs_embeds, use_cache=use_cache, cli_features=cli_features, image_positions=image_positions,
        context_mask=context_mask, output_gate_weights=bool(output_gate_weights), **kwargs,
    )
    return modeling_cli.CLIModelOutputWithPast(
        last_hidden_state=outputs.last_hidden_state, past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions, image_hidden_states=image_features,
        gate_weights=outputs.gate_weights,
    )


def _gate_folding(attention, query_vector, gate_weight):
    """
    AGF only uses an attention output `s` through its gate, `w . s`, so fold that too: with `r = W_o^T w` split per
    head, `z_h = W_v[h]^T r_h` and `c = r . b_v + w . b_o`, `w . MHA(q; X) = sum_h softmax(X u_h + shift_h) . (X z_h)
    + c` (exact algebra). Returns `u, z` (d, heads), `shift` (heads,), `c` (); parameter-only, so cached in inference.
    """
    heads, head_dim = attention.num_heads, attention.head_dim
    query = (query_vector @ attention.query_weight.T + attention.query_bias).view(heads, head_dim) * head_dim**-0.5
    folded_keys = torch.einsum("hc,hcd->dh", query, attention.key_weight.view(heads, head_dim, -1))
    shift = (query * attention.key_bias.view(heads, head_dim)).sum(-1)
    gate_through_output = (gate_weight @ attention.output_weight).view(heads, head_dim)  # r = W_o^T w
    folded_values = torch.einsum("hc,hcd->dh", gate_through_output, attention.value_weight.view(heads, head_dim, -1))
    constant = (gate_through_output.flatten() * attention.value_bias).sum() + gate_weight @ attention.output_bias
    return folded_keys, folded_values, shift, constant


def _folded_agf(cache, agf):
    """The vision and context foldings of one AGF, recomputed when a parameter changed (or always, with grad)."""
    params = [p for p in agf.parameters()]
    key = tuple((p.data_ptr(), p._version) for p in params)
    entry = cache.get(id(agf))
    if torch.is_grad_enabled() or entry is None or entry[0] != key:
        vision_gate, context_gate = agf.gate_weight.chunk(2)
        entry = (key, _gate_folding(agf.vision_attention, agf.vision_query, vision_gate),
                 _gate_folding(agf.context_attention, agf.context_query, context_gate))
        cache[id(agf)] = entry
    return entry[1], entry[2]


def _vision_terms(cache, buffer, sample_index, batch_size):
    """`w_v . s_k` of every AGF layer, (K, batch) each, in one read of the K feature sets (no hidden-state input)."""
    agfs = cache["agfs"]
    num_tokens, num_slots, hidden = buffer.shape
    heads = agfs[0].vision_attention.num_heads
    foldings = [_folded_agf(cache, agf)[0] for agf in agfs]
    keys, values, shifts, constants = (torch.cat([f[i].reshape(hidden, -1) if i < 2 else f[i].reshape(-1)
                                                  for f in foldings], dim=-1) for i in range(4))
    projected = (buffer.view(-1, hidden) @ torch.cat((keys, values), dim=1)).view(num_tokens, num_slots, -1)[:, 1:]
    scores, token_values = projected.float().chunk(2, dim=-1)  # (N, K, J h) each
    token_in_sample = sample_index[None, :] == torch.arange(batch_size, device=sample_index.device)[:, None]
    scores = (scores + shifts.float()).permute(1, 2, 0).unsqueeze(2)  # (K, J h, 1, N)
    weights = scores.masked_fill(~token_in_sample, torch.finfo(torch.float32).min).softmax(dim=-1)  # (K, J h, B, N)
    terms = torch.einsum("kmbn,nkm->kmb", weights, token_values)  # (K, J h, B)
    terms = terms.unflatten(1, (len(agfs), heads)).sum(2) + constants.float()[None, :, None]  # (K, J, B)
    return list(terms.to(buffer.dtype).unbind(1)), token_in_sample


def _proposed_agf_forward(agf, cache, hidden_states, layer_features, image_positions, context_mask):
    batch_size = hidden_states.shape[0]
    sample_index, seq_index = image_positions
    key = (layer_features.data_ptr(), tuple(layer_features.shape), batch_size)
    if cache.get("features") != key:  # the first AGF layer of a prefill: every layer's vision side at once
        cache["features"] = key
        cache["terms"], cache["token_in_sample"] = _vision_terms(cache, layer_features, sample_index, batch_size)
    vision_term = cache["terms"][cache["agfs"].index(agf)]  # (K, B)
    (keys, values, shift, constant) = _folded_agf(cache, agf)[1]
    heads = keys.shape[1]
    projected = (hidden_states @ torch.cat((keys, values), dim=1)).float()  # (B, S, 2 h): one read of H
    scores = (projected[..., :heads] + shift.float()).masked_fill(~context_mask[..., None], torch.finfo(torch.float32).min)
    context_term = (scores.softmax(dim=1) * projected[..., heads:]).sum((1, 2)) + constant.float()  # (B,)
    gates = torch.tanh(vision_term.T + context_term.to(vision_term.dtype)[:, None] + agf.gate_bias)
    gates = gates * cache["token_in_sample"].any(dim=-1, keepdim=True)
    token_gates = gates.index_select(0, sample_index).to(layer_features.dtype)  # (N, K)
    injection = torch.bmm(token_gates[:, None], layer_features[:, 1:]).squeeze(1)  # (N, d), one read of the features
    hidden_states = hidden_states.index_put((sample_index, seq_index), injection.to(hidden_states.dtype), accumulate=True)
    return hidden_states, gates


class ProposedPatch:
    """Installs / removes the proposed implementations on one CLI model instance (instance attributes only)."""

    def __enter__(self):
        self.install()
        return self.cli

    def __exit__(self, *exc):
        self.remove()

    def __init__(self, cli):
        self.cli = cli
        self.cache = {"agfs": list(cli.model.language_model.agf.values())}

    def install(self):
        inner = self.cli.model
        inner.__dict__["get_image_features"] = functools.partial(_proposed_get_image_features, inner)
        functools.update_wrapper(inner.__dict__["get_image_features"], type(inner).get_image_features)
        inner.__dict__["forward"] = functools.partial(_proposed_model_forward, inner)
        for agf in self.cache["agfs"]:
            agf.__dict__["forward"] = functools.partial(_proposed_agf_forward, agf, self.cache)

    def remove(self):
        inner = self.cli.model
        for owner, attr in [(inner, "get_image_features"), (inner, "forward")] + [(a, "forward") for a in self.cache["agfs"]]:
            owner.__dict__.pop(attr, None)
        for key in ("features", "terms", "token_in_sample"):
            self.cache.pop(key, None)


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


def flop_count(dims: dict, crops: int, image_tokens: int, seq_len: int, batch: int, base_in_extraction: bool = False):
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

    extra_passes = k - (1 if base_in_extraction else 0)
    amp_projector = extra_passes * crop_tokens * projector_pass
    amp_lora = k * crop_tokens * 2 * r * (dv + d)
    # AGF per injection layer, folded single-query attentions (u = W_k^T W_q q costs O(d^2), per layer, not per token):
    #   vision scores V_k @ u: 2 K N d h; pooling over each sample's tokens (the (K, h*B, N) x (K, N, d) matmul reads
    #   every sample's tokens for every sample, B x the useful work): 2 K h B N d; value/output projections of the
    #   (K, B) summaries and the context ones: 2 (K + 1) B (h d + d^2) + the folding 2 * 2 (d^2 + d^2);
    #   context scores and pooling: 2 B S d h + 2 B h S d; injection sum_k g_k V_k: 2 K N d
    agf_vision = j * (2 * k * n * d * agf_heads + 2 * k * agf_heads * batch * n * d)
    agf_context = j * (2 * batch * s * d * agf_heads * 2)
    agf_small = j * (2 * (k + 1) * batch * (agf_heads * d + d * d) + 4 * 2 * d * d)
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
    """A model used as it is (context-manager twin of `ProposedPatch`)."""

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
    if "cli" in models and "cli_proposed" in models:  # the proposed changes compute the same thing
        logits = {}
        for name in ("cli", "cli_proposed"):
            with models[name] as model, torch.no_grad():
                logits[name] = model(**model_inputs(inputs[name]), logits_to_keep=1).logits.float()
        result["cli_proposed_max_abs_logit_diff"] = float((logits["cli"] - logits["cli_proposed"]).abs().max())
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
    print(head + f"  FLOPs x{result['flops']['ratio']:.4f}, memory floor x{result['memory_floor_ratio']:.3f}"
          + (f", proposed vs cli max |logit diff| {result['cli_proposed_max_abs_logit_diff']:.1e}"
             if "cli_proposed_max_abs_logit_diff" in result else ""))
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
    parser.add_argument("--crops", default="1,4,10", help="vision-tower crops per image for the scaling runs; '' none")
    parser.add_argument("--batch-sizes", default="1,4", help="batch sizes of the --crops runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate() calls per variant and case")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per call (min = max)")
    parser.add_argument("--variants", default="native,cli",
                        help="native, cli, cli_proposed (CLI with the changes proposed in README, monkeypatched)")
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
    if args.variants[0] != "native" or not set(args.variants) <= {"native", "cli", "cli_proposed"}:
        parser.error("--variants: 'native' first, then any of 'cli', 'cli_proposed'")
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
    available = {"native": Plain(native), "cli": Plain(cli), "cli_proposed": ProposedPatch(cli)}
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
