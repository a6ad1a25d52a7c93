# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Does the many-to-many bridge beat the one-to-one projector where fine visual detail matters? A laptop-scale
replication of the paper's comparison (issue 15), one command:

    python benchmarks/bench_fusion.py                 # the full benchmark (5 arms x 3 seeds; <= 60 min on 2 cores)
    python benchmarks/bench_fusion.py --quick         # the same pipeline on a small budget (a few minutes)
    python benchmarks/bench_fusion.py --jobs 1 --arms one_to_one,cli --seeds 0 --steps 50   # pieces of it

It writes `benchmarks/fusion_results.json` (`--json`) and PNG figures (`--figures`, default `benchmarks/figures/`).

Design (fixed before any CLI arm was run; see benchmarks/README.md, "Does CLI help?", for the pilots and results)
------------------------------------------------------------------------------------------------------------------
Task. 48 x 48 images, a 2 x 2 grid of 24-pixel cells (`examples/shapes/shapes_data.py`'s scenes: 1-4 objects, a
shape among circle / square / triangle, a colour among red / green / blue / yellow), and one *fine* attribute: each
object independently (p = 1/2) carries a 4 x 4-pixel black dot near its centre (jittered by up to 2 pixels). Four
question kinds, equally frequent:

    color       What color is the square?                  coarse (the last vision layer answers it)
    count       How many circles are there?                coarse
    dot         Does the triangle have a dot?              fine   (yes / no)
    dot_color   What color is the shape with the dot?      fine   (exactly one object has a dot)

Vision tower. A SigLIP-shaped tower (6 layers, width 64, 4 heads, FFN 256, 12-pixel patches: 16 patches a view),
pretrained once (seed 0) and then frozen and shared by every arm. Pretraining is a coarse task in which the dot is a
nuisance: per grid cell, classify the shape (or empty) and the colour (or none) from the last layer's patch features
of the cell, plus an invariance term that makes the last layer ignore the dot: each scene is rendered twice with the
dots drawn anew, and the squared difference of the two renders' last-layer features, relative to those features'
variance over the batch, is added with weight 1000 (as contrastive vision pretraining becomes invariant to its
augmentations); 600 steps of 64 scenes, AdamW at 1e-3. The patch embedding keeps its random initialisation (frozen,
as MoCo v3 does for stability), so that the pixels' detail reaches the first layer whatever the pretraining does; what
the transformer layers keep of it is what the probes measure. Probes: for every vision hidden state 0..6, a linear (multinomial logistic) probe
per attribute (shape, colour over all cells; dot over occupied cells) on the concatenated 4 patch features of a cell,
trained on 3,000 images and scored on 1,000 others.

VLM. LLaVA-OneVision layout at tiny scale: the tower above, the `mlp2x_gelu` projector, a 4-layer Qwen2 (width 128, 4
heads / 2 KV heads, FFN 256, initializer range 0.1) and the project's tiny tokenizer, prompts through `CLIProcessor`'s
qwen_1_5 chat template (36 image tokens: base view + one tile of 16 patches each, newlines). The projector and the
whole LLM are trained from scratch (random init, the same initial values in every arm for a given seed); the tower is
frozen. Arms (only the bridge differs):

    one_to_one   transformers' own LlavaOnevisionForConditionalGeneration: last vision layer -> projector -> LLM input.
    deepstack    + AMP (shared projector + rank-8 LoRA per layer) features of vision layers [1, 3, 5] added, unit
                 weight and no gate, to the image positions entering decoder layers [1, 2, 3], paired in order
                 (1 -> 1, 3 -> 2, 5 -> 3: Qwen3-VL's DeepStack, one vision level per LLM layer).
    shallow      + AMP features of vision layer 1 alone added, unit weight and no gate, before decoder layer 1.
    cli          + AMP on [1, 3, 5] and AGF before [1, 2, 3] (the project's `CLIForConditionalGeneration`, attention form).
    cli_folded   the same with `agf_form="folded"` trained directly (when the installed modeling_cli has it).

The static arms are `CLIForConditionalGeneration` with every AGF module replaced by `StaticInjection` (a fixed 0/1
weight matrix), so AMP, packing, the injection positions and everything else are the project's own code.

Training, identical for every arm: AdamW (betas 0.9 / 0.98, no weight decay), learning rate 1e-3 for every trainable
parameter, 30 warm-up steps then cosine decay to 0, gradient clipping at 1.0, batch 32, 1,000 steps (`--quick`: 150),
one thread per run. For seed `s`: the base initialisation, the CLI modules' initialisation and the
training stream (`s`-seeded, the four kinds cycling) are the same across arms. Seeds 0, 1, 2. Evaluation: 200
held-out questions per kind (data seed 777, the same for every run), exact match of the greedy answer (measured with
teacher forcing: every answer token and the closing `<|im_end|>` must be the argmax, which is exactly when greedy
decoding produces the answer), and for AGF arms the gates `(J, K)` of every held-out question (prefill pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, os.path.join(ROOT, "examples", "shapes")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import ImageDraw  # noqa: E402
from torch import nn  # noqa: E402

import shapes_data  # noqa: E402
import tiny_cli  # noqa: E402
from modeling_cli import CLIForConditionalGeneration  # noqa: E402
from shapes_recipe import fit_linear_probe, pixel_values, twin_invariance, warmup_cosine  # noqa: E402
from training_cli import CLIDataCollator  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------------

IMAGE_SIZE, GRID, CELL = shapes_data.IMAGE_SIZE, shapes_data.GRID, shapes_data.CELL  # 48, 2, 24
PATCH_SIZE = 12  # 4 x 4 patches a view, 2 x 2 patches a cell
DOT_SIZE, DOT_JITTER = 4, 2
SHAPES, COLORS, PLURALS = shapes_data.SHAPES, tuple(shapes_data.COLORS), shapes_data.PLURALS
KINDS = ("color", "count", "dot", "dot_color")
DETAIL_KINDS = ("dot", "dot_color")
ATTRIBUTES = ("shape", "color", "dot")
FUSION_CORPUS = """
Does the circle have a dot? Does the square have a dot? Does the triangle have a dot?
What color is the shape with the dot?
"""


@dataclass(frozen=True)
class DottedObject:
    shape: str
    color: str
    row: int
    col: int
    dot: bool
    dot_offset: tuple[int, int] = (0, 0)


def random_scene(rng: random.Random) -> list[DottedObject]:
    """shapes_data's scene distribution (1-4 objects in distinct cells), each object dotted with probability 1/2."""
    return [redraw_dot(DottedObject(o.shape, o.color, o.row, o.col, False), rng) for o in shapes_data.random_scene(rng)]


def redraw_dot(obj: DottedObject, rng: random.Random, dot: bool | None = None) -> DottedObject:
    """The object with its dot drawn anew (present with probability 1/2 unless `dot` is given, a new jitter)."""
    dot = rng.random() < 0.5 if dot is None else dot
    offset = (rng.randint(-DOT_JITTER, DOT_JITTER), rng.randint(-DOT_JITTER, DOT_JITTER))
    return DottedObject(obj.shape, obj.color, obj.row, obj.col, dot, offset)


def render(scene: list[DottedObject]):
    """The scene as a 48 x 48 RGB PIL image: shapes_data's drawing, then the dots."""
    image = shapes_data.render_scene([shapes_data.ShapeObject(o.shape, o.color, o.row, o.col) for o in scene])
    draw = ImageDraw.Draw(image)
    margin = (CELL - shapes_data.SHAPE_SIZE) // 2
    for obj in scene:
        if not obj.dot:
            continue
        left, top = obj.col * CELL + margin, obj.row * CELL + margin
        # the interior centre: the middle of a circle or square, two thirds down a triangle (its widest dotted part)
        centre_x = left + shapes_data.SHAPE_SIZE // 2
        centre_y = top + (shapes_data.SHAPE_SIZE * 2) // 3 if obj.shape == "triangle" else top + shapes_data.SHAPE_SIZE // 2
        x0, y0 = centre_x + obj.dot_offset[0] - DOT_SIZE // 2, centre_y + obj.dot_offset[1] - DOT_SIZE // 2
        draw.rectangle((x0, y0, x0 + DOT_SIZE - 1, y0 + DOT_SIZE - 1), fill=(0, 0, 0))
    return image


def ask(scene: list[DottedObject], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A `(question, answer)` of `kind` about the scene, or None when the scene cannot answer it unambiguously."""
    unique = [o for o in scene if sum(other.shape == o.shape for other in scene) == 1]
    if kind == "color":
        if not unique:
            return None
        obj = rng.choice(unique)
        return f"What color is the {obj.shape}?", obj.color
    if kind == "count":
        shape = rng.choice(SHAPES)
        return f"How many {PLURALS[shape]} are there?", str(sum(o.shape == shape for o in scene))
    if kind == "dot":
        if not unique:
            return None
        obj = rng.choice(unique)
        return f"Does the {obj.shape} have a dot?", "yes" if obj.dot else "no"
    if kind == "dot_color":
        dotted = [o for o in scene if o.dot]
        if len(dotted) != 1:
            return None
        return "What color is the shape with the dot?", dotted[0].color
    raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}.")


def make_example(rng: random.Random, kind: str) -> dict:
    """One example in the layout of `shapes_data.make_example` (`messages`, `images`, `question`, `answer`, `kind`)."""
    while True:
        scene = random_scene(rng)
        qa = ask(scene, kind, rng)
        if qa is not None:
            break
    question, answer = qa
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {
        "messages": messages, "images": [render(scene)], "question": question, "answer": answer, "kind": kind,
        "scene": scene,
    }


def blind_ceiling(examples: list[dict]) -> dict[str, float]:
    """
    What a model that sees everything but the dots can score on the detail kinds: `dot` -> the majority answer's share;
    `dot_color` -> the mean over questions of (objects of the most common colour) / (objects).
    """
    ceiling = {}
    dot = [e["answer"] for e in examples if e["kind"] == "dot"]
    if dot:
        ceiling["dot"] = max(dot.count("yes"), dot.count("no")) / len(dot)
    colors = [[o.color for o in e["scene"]] for e in examples if e["kind"] == "dot_color"]
    if colors:
        ceiling["dot_color"] = float(np.mean([max(c.count(x) for x in c) / len(c) for c in colors]))
    return ceiling


def generate_examples(num: int, seed: int) -> list[dict]:
    """`num` examples, the kinds cycling (each equally frequent), reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_example(rng, KINDS[i % len(KINDS)]) for i in range(num)]


def cell_labels(scene: list[DottedObject]) -> dict[str, list[int]]:
    """Per cell (row-major): shape (0 = empty, 1 + index), colour (0 = none, 1 + index), dot (-1 = empty, 0, 1)."""
    labels = {"shape": [0] * GRID**2, "color": [0] * GRID**2, "dot": [-1] * GRID**2}
    for obj in scene:
        cell = obj.row * GRID + obj.col
        labels["shape"][cell] = 1 + SHAPES.index(obj.shape)
        labels["color"][cell] = 1 + COLORS.index(obj.color)
        labels["dot"][cell] = int(obj.dot)
    return labels


# ----------------------------------------------------------------------------------------------------------------------
# The vision tower: pretrained on the coarse task with the dot as a nuisance, then frozen
# ----------------------------------------------------------------------------------------------------------------------

VISION_CONFIG = dict(
    model_type="siglip_vision_model",
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    vision_use_head=False,
)


def build_tower(seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(**{k: v for k, v in VISION_CONFIG.items() if k != "model_type"})
    return SiglipVisionModel(config)


def cell_features(hidden: torch.Tensor) -> torch.Tensor:
    """`(N, patches, width)` patch features of a view -> `(N, cells, 4 * width)`: each cell's 2 x 2 patches, concatenated."""
    side = IMAGE_SIZE // PATCH_SIZE
    per_cell = side // GRID
    grid = hidden.view(hidden.shape[0], GRID, per_cell, GRID, per_cell, hidden.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(hidden.shape[0], GRID * GRID, per_cell * per_cell * hidden.shape[-1])


class CoarseHead(nn.Module):
    """Per cell: mean of its patch features -> LayerNorm -> shape logits (4) and colour logits (5)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.color = nn.Linear(width, 1 + len(COLORS))

    def forward(self, hidden: torch.Tensor):
        cells = cell_features(hidden).unflatten(-1, (-1, hidden.shape[-1])).mean(-2)  # (N, cells, width)
        cells = self.norm(cells)
        return self.shape(cells), self.color(cells)


def pretrain_tower(steps: int, batch_size: int = 64, invariance_weight: float = 1.0, lr: float = 1e-3, seed: int = 0,
                   log=print) -> tuple[nn.Module, list[dict]]:
    """
    Pretrains the tower on the coarse task (see the module docstring) and returns it frozen, with its loss log.
    Every scene is rendered twice with the dots drawn anew; both renders get the coarse loss.
    """
    tower = build_tower(seed)
    head = CoarseHead(VISION_CONFIG["hidden_size"])
    tower.embeddings.patch_embedding.requires_grad_(False)
    params = [p for p in list(tower.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=min(30, steps))
    rng = random.Random(seed)
    history = []
    tower.train()
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch_size)]
        twins = [[redraw_dot(o, rng) for o in scene] for scene in scenes]
        pixels = pixel_values([render(s) for s in scenes] + [render(s) for s in twins])
        labels = [cell_labels(s) for s in scenes]
        shape_target = torch.tensor([l["shape"] for l in labels]).repeat(2, 1)
        color_target = torch.tensor([l["color"] for l in labels]).repeat(2, 1)
        last = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        shape_logits, color_logits = head(last)
        coarse = nn.functional.cross_entropy(shape_logits.flatten(0, 1), shape_target.flatten()) + (
            nn.functional.cross_entropy(color_logits.flatten(0, 1), color_target.flatten())
        )
        invariance = twin_invariance(last)
        loss = coarse + invariance_weight * invariance
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "coarse": round(float(coarse.detach()), 4), "invariance": round(float(invariance.detach()), 4)})
            log(f"  tower step {step:>5}: coarse loss {history[-1]['coarse']:.4f}, invariance {history[-1]['invariance']:.4f}")
    tower.eval().requires_grad_(False)
    return tower, history


def probe_tower(tower, num_train: int = 3000, num_test: int = 1000, seed: int = 4242) -> dict[str, list[float]]:
    """Linear-probe accuracy of every vision hidden state (0..L) for each attribute (see the module docstring)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(num_train + num_test)]
    labels = [cell_labels(s) for s in scenes]
    with torch.no_grad():
        hidden = []
        for start in range(0, len(scenes), 500):
            pixels = pixel_values([render(s) for s in scenes[start : start + 500]])
            hidden.append(torch.stack(tower(pixel_values=pixels, output_hidden_states=True).hidden_states))
        hidden = torch.cat(hidden, dim=1)  # (L + 1, N, patches, width)
    targets = {attribute: torch.tensor([l[attribute] for l in labels]).flatten() for attribute in ATTRIBUTES}
    split = num_train * GRID * GRID
    classes = {"shape": 1 + len(SHAPES), "color": 1 + len(COLORS), "dot": 2}
    probes = {attribute: [] for attribute in ATTRIBUTES}
    for layer_hidden in hidden:
        features = cell_features(layer_hidden).flatten(0, 1)  # (N * cells, 4 * width)
        for attribute in ATTRIBUTES:
            target = targets[attribute]
            keep = target >= 0
            train = keep.clone()
            train[split:] = False
            test = keep.clone()
            test[:split] = False
            probes[attribute].append(
                round(fit_linear_probe(features[train], target[train], features[test], target[test], classes[attribute]), 4)
            )
    return probes


# ----------------------------------------------------------------------------------------------------------------------
# The VLM arms
# ----------------------------------------------------------------------------------------------------------------------

EXTRACTION_LAYERS = [1, 3, 5]  # RANGE-1-7-2: every other vision layer below the last (CLI-7B: RANGE-1-28-4 of 26)
INJECTION_LAYERS = [1, 2, 3]  # every decoder layer after the first (CLI-7B: RANGE-1-28-4 of 28)
TEXT_CONFIG = dict(initializer_range=0.1)  # the shapes recipe's finding: with 0.02 a from-scratch LLM stalls
ARMS = {
    "one_to_one": dict(bridge="native"),
    "deepstack": dict(bridge="static", extraction=EXTRACTION_LAYERS, injection=INJECTION_LAYERS,
                      weights=[[1.0 if k == j else 0.0 for k in range(3)] for j in range(3)]),
    "shallow": dict(bridge="static", extraction=[1], injection=[1], weights=[[1.0]]),
    "cli": dict(bridge="agf", extraction=EXTRACTION_LAYERS, injection=INJECTION_LAYERS, agf_form="attention"),
    "cli_folded": dict(bridge="agf", extraction=EXTRACTION_LAYERS, injection=INJECTION_LAYERS, agf_form="folded"),
}


def folded_agf_available() -> bool:
    """Whether this checkout has the folded AGF form (issue 13): a `CLIConfig.agf_form` field and `fold_agf()`."""
    from configuration_cli import CLIConfig

    return "agf_form" in getattr(CLIConfig, "__annotations__", {}) and hasattr(CLIForConditionalGeneration, "fold_agf")


class StaticInjection(nn.Module):
    """
    A gate-free injection with the interface of `CLIAdaptiveGatingFusion`: `H[image positions] += sum_k w_k V_k` with
    fixed weights `w` (a buffer, not trained). Returns the weights as its "gates" `(batch, K)`.
    """

    def __init__(self, weights: list[float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, hidden_states, layer_features, image_positions, context_mask):
        sample_index, seq_index = image_positions
        injection = torch.einsum("k,knd->nd", self.weights.to(layer_features.dtype), layer_features)
        hidden_states = hidden_states.index_put(
            (sample_index, seq_index), injection.to(hidden_states.dtype), accumulate=True
        )
        return hidden_states, self.weights.to(hidden_states.dtype).expand(hidden_states.shape[0], -1)


class StaticBridgeForConditionalGeneration(CLIForConditionalGeneration):
    """
    CLI with every AGF module replaced by a [`StaticInjection`]: row `j` of `config.static_injection_weights` (one
    weight per extraction layer) is what decoder layer `config.llm_injection_layers[j]` receives. The deepstack and
    shallow arms; AMP, packing and the injection positions are CLI's own.
    """

    def __init__(self, config):
        super().__init__(config)
        weights = config.static_injection_weights
        for row, layer in zip(weights, config.llm_injection_layers, strict=True):
            self.model.language_model.agf[str(layer)] = StaticInjection(row)


def build_tokenizer_and_processor():
    corpus = tiny_cli.TINY_CORPUS + tiny_cli.SHAPES_CORPUS + FUSION_CORPUS
    tokenizer = tiny_cli.build_tiny_tokenizer(corpus=corpus)
    return tokenizer, tiny_cli.tiny_processor(tokenizer, PATCH_SIZE)


def arm_config(arm: str, tokenizer):
    """The `CLIConfig` of an arm (for `one_to_one`, of the `cli` arm: its base part is what the native model uses)."""
    spec = ARMS[arm] if ARMS[arm]["bridge"] != "native" else ARMS["cli"]
    overrides = dict(
        vision_config={k: v for k, v in VISION_CONFIG.items()},
        text_config=dict(TEXT_CONFIG),
        vision_extraction_layers=spec["extraction"],
        llm_injection_layers=spec["injection"],
    )
    if spec.get("agf_form", "attention") != "attention":
        overrides["agf_form"] = spec["agf_form"]
    config = tiny_cli.tiny_cli_config(tokenizer, PATCH_SIZE, **overrides)
    if spec["bridge"] == "static":
        config.static_injection_weights = spec["weights"]
    return config


def native_config(cli_config):
    """transformers' `LlavaOnevisionConfig` of a CLI config's base model."""
    from transformers import LlavaOnevisionConfig

    kwargs = cli_config.to_dict()
    for key in ("vision_extraction_layers", "llm_injection_layers", "amp_lora_rank", "amp_lora_alpha", "agf_num_heads",
                "agf_form", "auto_map", "model_type", "architectures", "static_injection_weights"):
        kwargs.pop(key, None)
    return LlavaOnevisionConfig(**kwargs)


def build_arm(arm: str, seed: int, tower_state: dict, tokenizer) -> nn.Module:
    """
    The arm's model for `seed`: base weights (projector, LLM, `image_newline`) from transformers' LLaVA-OneVision
    initialised with `seed` (so they are the same in every arm), the pretrained tower, CLI modules initialised with
    `seed`. The tower is frozen; everything else trains.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    config = arm_config(arm, tokenizer)
    torch.manual_seed(seed)
    native = LlavaOnevisionForConditionalGeneration(native_config(config))
    native.model.vision_tower.load_state_dict(tower_state)
    if ARMS[arm]["bridge"] == "native":
        model = native
    else:
        torch.manual_seed(seed)
        model_class = StaticBridgeForConditionalGeneration if ARMS[arm]["bridge"] == "static" else CLIForConditionalGeneration
        model = model_class(config)
        missing, unexpected = model.load_state_dict(native.state_dict(), strict=False)
        stray = [k for k in missing if not k.startswith(("model.amp.", "model.language_model.agf.")) and k != "lm_head.weight"]
        if unexpected or stray:
            raise RuntimeError(f"base weights do not fit the {arm} model: missing {stray}, unexpected {unexpected}")
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("model.vision_tower."))
    return model


class BatchEncoder:
    """
    `CLIDataCollator`'s batches without its per-batch processor call: every (question, answer) pair is rendered through
    the processor's chat template once and cached (all images are 48 x 48, so the prompt does not depend on the image),
    and the pixel values are the processor's normalisation of the 48 x 48 image, base view and its one tile.
    `tests/test_fusion.py` checks that the batches equal `CLIDataCollator`'s.
    """

    def __init__(self, processor):
        self.processor = processor
        self.collator = CLIDataCollator(processor)
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.cache = {}

    def row(self, example):
        key = (example["question"], example["answer"])
        if key not in self.cache:
            single = self.collator([{"messages": example["messages"], "images": example["images"]}])
            self.cache[key] = (single["input_ids"][0], single["labels"][0])
        return self.cache[key]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [self.row(example) for example in examples]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, (ids, row_labels) in enumerate(rows):
            input_ids[index, : len(ids)], labels[index, : len(ids)], attention_mask[index, : len(ids)] = ids, row_labels, 1
        pixels = pixel_values([example["images"][0] for example in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([pixels, pixels], dim=1),
            "image_sizes": torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * len(examples)),
            "batch_num_images": torch.ones(len(examples), dtype=torch.long),
        }


def answer_correct(logits: torch.Tensor, labels: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """
    `(batch,)` bool: greedy decoding would produce exactly the reference answer, i.e. under teacher forcing every
    supervised token up to and including the first `<|im_end|>` is the argmax of the logits before it.
    """
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    supervised = target != -100
    is_eos = (target == eos_token_id) & supervised
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # positions after the first eos (the trailing newline)
    checked = supervised & ~after_eos
    return ((predicted == target) | ~checked).all(-1)


@torch.no_grad()
def evaluate(model, encoder: BatchEncoder, examples: list[dict], batch_size: int = 100) -> dict:
    """Exact match per kind and, for models with gates, the gates `(num_examples, J, K)`."""
    model.eval()
    correct, gates = [], []
    with_gates = isinstance(model, CLIForConditionalGeneration)
    for start in range(0, len(examples), batch_size):
        batch = encoder(examples[start : start + batch_size])
        output = model(**batch, **({"output_gate_weights": True} if with_gates else {}))
        correct.append(answer_correct(output.logits, batch["labels"], encoder.eos_token_id))
        if with_gates:
            gates.append(output.gate_weights.float().permute(1, 0, 2))
    correct = torch.cat(correct)
    kinds = [example["kind"] for example in examples]
    accuracy = {kind: float(correct[[k == kind for k in kinds]].float().mean()) for kind in KINDS if kind in kinds}
    model.train()
    return {"accuracy": accuracy, "correct": correct, "gates": torch.cat(gates) if gates else None, "kinds": kinds}


def gate_summary(gates: torch.Tensor, kinds: list[str]) -> dict:
    """Mean gate `(J, K)` per kind, the share of saturated gates (|g| > 0.99) and the spread over questions."""
    summary = {}
    for kind in KINDS:
        rows = gates[[k == kind for k in kinds]]
        if len(rows):
            summary[kind] = {
                "mean": rows.mean(0).tolist(),
                "std": rows.std(0).tolist() if len(rows) > 1 else None,
                "saturated": float((rows.abs() > 0.99).float().mean()),
            }
    return summary


def arm_optimizer(model: nn.Module, settings: dict) -> torch.optim.AdamW:
    """AdamW (0.9 / 0.98, no weight decay) over the trainable parameters: AGF's at `settings["agf_lr"]` when set (the
    follow-up run's one change), everything else at `settings["lr"]`."""
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if ".agf." not in n], "lr": settings["lr"]},
        {"params": [p for n, p in trainable if ".agf." in n], "lr": settings.get("agf_lr") or settings["lr"]},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], betas=(0.9, 0.98), weight_decay=0.0)


def run_arm(job: dict) -> dict:
    """Trains one arm with one seed and evaluates it; `job` holds the arm, seed, settings and the tower's path."""
    from safetensors.torch import load_file

    torch.set_num_threads(job.get("threads", 1))
    arm, seed, settings = job["arm"], job["seed"], job["settings"]
    tokenizer, processor = build_tokenizer_and_processor()
    encoder = BatchEncoder(processor)
    model = build_arm(arm, seed, load_file(job["tower_path"]), tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = arm_optimizer(model, settings)
    steps, batch_size = settings["steps"], settings["batch_size"]
    schedule = warmup_cosine(optimizer, steps, warmup=min(settings["warmup"], steps))
    heldout = generate_examples(settings["eval_per_kind"] * len(KINDS), seed=settings["eval_seed"])
    rng = random.Random(settings["data_seed_offset"] + seed)
    curve, running, checkpoints = [], [], []
    model.train()
    start, cpu_start = time.time(), time.process_time()
    for step in range(steps):
        examples = [make_example(rng, KINDS[(step * batch_size + i) % len(KINDS)]) for i in range(batch_size)]
        loss = model(**encoder(examples)).loss
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(float(loss.detach()))
        if (step + 1) % settings["log_every"] == 0 or step + 1 == steps:
            curve.append([step + 1, round(sum(running) / len(running), 4)])
            running = []
            if job.get("progress") and (step + 1) % (4 * settings["log_every"]) == 0:
                print(f"    [{arm} seed {seed}] step {step + 1}/{steps}: loss {curve[-1][1]:.4f} "
                      f"({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
        if step + 1 in settings.get("eval_at", ()) and step + 1 != steps:
            checkpoints.append({"step": step + 1, "accuracy": evaluate(model, encoder, heldout)["accuracy"]})
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    result = evaluate(model, encoder, heldout)
    record = {
        "arm": arm,
        "seed": seed,
        "accuracy": result["accuracy"],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "loss_curve": curve,
        "checkpoints": checkpoints,
    }
    if ARMS[arm]["bridge"] == "agf":
        record["gates"] = gate_summary(result["gates"], result["kinds"])
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Reports: JSON, table, figures
# ----------------------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def gate_maps(runs: list[dict]) -> dict:
    """Per AGF arm: the mean gate `(J, K)` per kind over seeds, and how far apart the kinds' maps are."""
    maps = {}
    for arm in dict.fromkeys(run["arm"] for run in runs if "gates" in run):
        arm_runs = [run for run in runs if run["arm"] == arm]
        per_kind = {
            kind: np.mean([run["gates"][kind]["mean"] for run in arm_runs], axis=0) for kind in KINDS
            if all(kind in run["gates"] for run in arm_runs)
        }
        differences = {}
        names = list(per_kind)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                # per seed: mean |difference| of the two kinds' mean maps, then mean over seeds
                per_seed = [
                    float(np.abs(np.asarray(run["gates"][first]["mean"]) - np.asarray(run["gates"][second]["mean"])).mean())
                    for run in arm_runs
                ]
                differences[f"{first} vs {second}"] = round(float(np.mean(per_seed)), 4)
        within = [float(np.mean(run["gates"][kind]["std"])) for run in arm_runs for kind in per_kind
                  if run["gates"][kind]["std"] is not None]
        maps[arm] = {
            "mean_per_kind": {kind: np.round(value, 4).tolist() for kind, value in per_kind.items()},
            "mean_abs_difference_between_kinds": differences,
            "mean_std_within_kind": round(float(np.mean(within)), 4) if within else None,
            "saturated_share": {kind: round(float(np.mean([run["gates"][kind]["saturated"] for run in arm_runs])), 4)
                                for kind in per_kind},
        }
    return maps


def results_table(report: dict) -> str:
    """A markdown table: accuracy per kind (mean ± std over seeds), trainable parameters, seconds per run."""
    header = "| arm | " + " | ".join(KINDS) + " | detail mean | coarse mean | trainable params | s / run (CPU s) |"
    lines = [header, "|" + " --- |" * (len(KINDS) + 5)]
    for arm, entry in report["arms"].items():
        cells = []
        for kind in KINDS:
            mean, std = mean_std(entry["accuracy"][kind])
            cells.append(f"{mean:.3f} ± {std:.3f}")
        detail = mean_std([np.mean([entry["accuracy"][k][i] for k in DETAIL_KINDS]) for i in range(len(entry["seeds"]))])
        coarse_kinds = [k for k in KINDS if k not in DETAIL_KINDS]
        coarse = mean_std([np.mean([entry["accuracy"][k][i] for k in coarse_kinds]) for i in range(len(entry["seeds"]))])
        seconds, cpu = mean_std(entry["seconds"]), mean_std(entry.get("cpu_seconds", [0.0]))
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {detail[0]:.3f} ± {detail[1]:.3f} | {coarse[0]:.3f} ± {coarse[1]:.3f}"
            f" | {entry['trainable_parameters']:,} | {seconds[0]:.0f} ({cpu[0]:.0f}) |"
        )
    return "\n".join(lines)


def save_figures(report: dict, folder: str) -> list[str]:
    """probes.png (probe accuracy against vision layer) and gates_<arm>.png (mean gate maps per kind, side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    figure, axes = plt.subplots(figsize=(5.2, 3.4))
    for attribute, values in report["probes"].items():
        axes.plot(range(len(values)), values, marker="o", label=attribute)
    axes.set_xlabel("vision hidden state (0 = patch embeddings)")
    axes.set_ylabel("linear probe accuracy (held out)")
    axes.set_ylim(0.4, 1.02)
    axes.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    axes.set_title("What each vision layer still carries (frozen tower)", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = os.path.join(folder, "probes.png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    for arm, maps in report.get("gate_maps", {}).items():
        kinds = list(maps["mean_per_kind"])
        figure, axes = plt.subplots(1, len(kinds), figsize=(2.6 * len(kinds) + 1.2, 2.9), squeeze=False)
        for axis, kind in zip(axes[0], kinds):
            values = np.asarray(maps["mean_per_kind"][kind])
            image = axis.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            axis.set_xticks(range(values.shape[1]), [str(k) for k in ARMS[arm]["extraction"]])
            axis.set_yticks(range(values.shape[0]), [str(j) for j in ARMS[arm]["injection"]])
            axis.set_xlabel("vision layer k")
            axis.set_title(kind + (" (detail)" if kind in DETAIL_KINDS else ""), fontsize=9)
            for row in range(values.shape[0]):
                for column in range(values.shape[1]):
                    axis.text(column, row, f"{values[row, column]:.2f}", ha="center", va="center", fontsize=7)
        axes[0][0].set_ylabel("LLM layer j")
        figure.colorbar(image, ax=axes[0].tolist(), label="mean gate")
        saturated = np.mean(list(maps["saturated_share"].values()))
        figure.suptitle(f"{arm}: mean AGF gate per question kind (mean over seeds; {100 * saturated:.0f}% of the "
                        "gates have |g| > 0.99)", fontsize=9, y=1.04)
        path = os.path.join(folder, f"gates_{arm}.png")
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------

FULL = dict(steps=1000, tower_steps=600, seeds=[0, 1, 2], eval_per_kind=200)
QUICK = dict(steps=150, tower_steps=150, seeds=[0], eval_per_kind=50)


def git_commit() -> str | None:
    """The checkout's commit (`+dirty` with uncommitted changes to tracked files), or None outside git."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small budget: {QUICK}")
    parser.add_argument("--arms", help=f"comma-separated subset of {list(ARMS)} (default: all available)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 1000; --quick: 150)")
    parser.add_argument("--tower-steps", type=int, help="vision-tower pretraining steps (default 600; --quick: 150)")
    parser.add_argument("--eval-per-kind", type=int, help="held-out questions per kind (default 200; --quick: 50)")
    parser.add_argument("--eval-at", default="", help="also evaluate after these steps (comma-separated; pilots)")
    parser.add_argument("--probe-images", default="3000,1000", help="probe train,test images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--agf-lr", type=float, help="AGF's learning rate (default: --lr, as pre-registered)")
    parser.add_argument("--invariance-weight", type=float, default=1000.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--tower", help="load the pretrained tower from this safetensors file instead of pretraining")
    parser.add_argument("--save-tower", help="save the pretrained tower to this safetensors file")
    parser.add_argument("--json", default=os.path.join(HERE, "fusion_results.json"))
    parser.add_argument("--figures", default=os.path.join(HERE, "figures"), help="folder for the PNGs ('' = none)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from safetensors.torch import load_file, save_file

    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    steps = args.steps or budget["steps"]
    tower_steps = args.tower_steps or budget["tower_steps"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else budget["seeds"]
    eval_per_kind = args.eval_per_kind or budget["eval_per_kind"]
    arms = args.arms.split(",") if args.arms else [a for a in ARMS if a != "cli_folded" or folded_agf_available()]
    for arm in arms:
        if arm not in ARMS:
            raise ValueError(f"--arms: unknown arm {arm!r}; choose from {list(ARMS)}.")
        if arm == "cli_folded" and not folded_agf_available():
            raise ValueError("--arms cli_folded: this checkout's CLIConfig has no agf_form='folded'.")
    torch.set_num_threads(1)
    started, cpu_started = time.time(), time.process_time()
    commit = git_commit()  # now: files edited while the benchmark runs are not what it ran
    print(f"arms {arms}, seeds {seeds}, {steps} steps x batch {args.batch_size}, lr {args.lr}, AGF lr {args.agf_lr or args.lr}",
          flush=True)

    work = tempfile.mkdtemp(prefix="bench_fusion_")
    if args.tower:
        tower_state, tower_log, tower_seconds, tower_cpu_seconds = load_file(args.tower), [], 0.0, 0.0
        tower = build_tower(0)
        tower.load_state_dict(tower_state)
        tower.eval().requires_grad_(False)
    else:
        print(f"pretraining the vision tower ({tower_steps} steps) ...", flush=True)
        tower_start, tower_cpu_start = time.time(), time.process_time()
        tower, tower_log = pretrain_tower(tower_steps, invariance_weight=args.invariance_weight)
        tower_seconds, tower_cpu_seconds = time.time() - tower_start, time.process_time() - tower_cpu_start
        tower_state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    tower_path = os.path.join(work, "tower.safetensors")
    save_file(tower_state, tower_path)
    if args.save_tower:
        save_file(tower_state, args.save_tower)
    num_train, num_test = (int(n) for n in args.probe_images.split(","))
    probe_start = time.time()
    probes = probe_tower(tower, num_train, num_test)
    print(f"probes ({time.time() - probe_start:.0f}s):", flush=True)
    for attribute, values in probes.items():
        print(f"  {attribute:>6}: " + " ".join(f"{v:.3f}" for v in values), flush=True)

    settings = dict(
        steps=steps, batch_size=args.batch_size, lr=args.lr, agf_lr=args.agf_lr, warmup=30, eval_per_kind=eval_per_kind, eval_seed=777,
        data_seed_offset=1000, log_every=25, eval_at=[int(s) for s in args.eval_at.split(",") if s],
    )
    jobs = [dict(arm=arm, seed=seed, settings=settings, tower_path=tower_path, progress=args.jobs > 1)
            for seed in seeds for arm in arms]
    runs = []
    if args.jobs <= 1:
        for job in jobs:
            runs.append(run_arm(job))
            print(f"  {runs[-1]['arm']} seed {runs[-1]['seed']}: {runs[-1]['accuracy']} ({runs[-1]['seconds']}s)", flush=True)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_arm, job) for job in jobs]
            for future in as_completed(futures):
                runs.append(future.result())
                print(f"  {runs[-1]['arm']} seed {runs[-1]['seed']}: {runs[-1]['accuracy']} ({runs[-1]['seconds']}s)",
                      flush=True)
    runs.sort(key=lambda run: (arms.index(run["arm"]), run["seed"]))

    report = {
        "detail_kinds": list(DETAIL_KINDS),
        "arms": {},
        "probes": probes,
        "kinds": list(KINDS),
        "dot_blind_ceiling": blind_ceiling(generate_examples(eval_per_kind * len(KINDS), seed=settings["eval_seed"])),
        "settings": {**settings, "seeds": seeds, "tower_steps": tower_steps, "invariance_weight": args.invariance_weight,
                     "extraction_layers": EXTRACTION_LAYERS, "injection_layers": INJECTION_LAYERS,
                     "vision_config": VISION_CONFIG, "text_config": TEXT_CONFIG, "quick": args.quick,
                     "arm_specs": {arm: ARMS[arm] for arm in arms}},
        "tower": {"pretraining_log": tower_log, "seconds": round(tower_seconds, 1),
                  "cpu_seconds": round(tower_cpu_seconds, 1), "loaded_from": args.tower},
        "runs": runs,
        "commit": commit,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "jobs": args.jobs, "threads_per_run": 1},
    }
    for arm in arms:
        arm_runs = [run for run in runs if run["arm"] == arm]
        report["arms"][arm] = {
            "seeds": [run["seed"] for run in arm_runs],
            "accuracy": {kind: [round(run["accuracy"][kind], 4) for run in arm_runs] for kind in KINDS},
            "trainable_parameters": arm_runs[0]["trainable_parameters"],
            "seconds": [run["seconds"] for run in arm_runs],
            "cpu_seconds": [run["cpu_seconds"] for run in arm_runs],
        }
    report["gate_maps"] = gate_maps(runs)
    report["total_seconds"] = round(time.time() - started, 1)
    # the parent's own CPU time (tower, probes) + every run's: what the benchmark costs on an otherwise idle machine
    report["total_cpu_seconds"] = round(time.process_time() - cpu_started + sum(run["cpu_seconds"] for run in runs), 1)
    print("\n" + results_table(report))
    print("a model blind to the dots scores at most: " + ", ".join(f"{k} {v:.3f}" for k, v in report["dot_blind_ceiling"].items()))
    for arm, maps in report["gate_maps"].items():
        print(f"\n{arm} gates (mean over seeds; rows = LLM layers {ARMS[arm]['injection']}, "
              f"columns = vision layers {ARMS[arm]['extraction']}):")
        for kind, values in maps["mean_per_kind"].items():
            print(f"  {kind:>9}: " + "  ".join("[" + " ".join(f"{v:+.3f}" for v in row) + "]" for row in values)
                  + f"   saturated {maps['saturated_share'][kind]:.3f}")
        print(f"  mean |difference| between kinds: {maps['mean_abs_difference_between_kinds']}; "
              f"mean std within a kind: {maps['mean_std_within_kind']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        partial = args.json + ".tmp"
        with open(partial, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(partial, args.json)
        print(f"\nwrote {args.json}")
    if args.figures:
        for path in save_figures(report, args.figures):
            print(f"wrote {path}")
    print(f"total {report['total_seconds']:.0f}s wall, {report['total_cpu_seconds']:.0f}s CPU "
          f"({report['total_cpu_seconds'] / 60 / max(1, args.jobs):.0f} min on {max(1, args.jobs)} idle cores)")
    return report


if __name__ == "__main__":
    main()
