# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
The pieces of the shapes recipe (`python examples/finetune.py --recipe shapes`, which trains examples/shapes/model):

0. `pretrain_color_blind_tower`: the vision tower is pretrained alone to tell the shapes of the four grid cells apart
   while its last layer is made blind to colour (each scene is rendered twice with the colours drawn anew and the two
   renders' last-layer features are pulled together); its patch embedding stays at its random initialisation, so the
   colours reach the first layer whatever the pretraining does. `vision_probes` measures what each layer keeps. The
   tower is frozen from then on: the colours are in its early layers only, so only the injection can bring them in.
1. `train_stage`: projector, LLM, AMP and AGF together on the frozen tower, AGF at a 33x lower learning rate.
2. `train_stage` with a gate cost: AGF alone, with `gate_cost x mean |gate|` added to the loss: injecting costs a
   little, so a gate stays open only where the injected layers pay for it (the colour questions). The LLM is frozen
   here: when it trains too, it learns to read the colours from ever smaller injections and the cost closes the
   colour questions' gates as well (measured: the kinds' gates then differ by <= 0.08 instead of ~0.1).

What the stages answer (measured; benchmarks/README.md, "The bundled shapes model's gates"): a gate is
`tanh(w . s + c)` and Adam moves every coordinate of `w` by ~lr per step whatever the gradient's size, so with large
readouts `s` the gates pass |w . s| >> 1 within ~100 steps at lr 1e-3, after which `tanh'` ~ 0 (the model shipped
before issue 15, all weights from scratch at 1e-3: every gate -1.00). The readouts are large here because the LLM's
hidden states at the image tokens of empty grid cells grow to norms of ~1,000 (massive activations; ~60 elsewhere).
CLI trained after a frozen LLaVA-OneVision base never learned the colours (0.26-0.34 on the colour questions), while
trained with the base from the start it did (1.00); without the gate cost its gates were the same for every question.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

import shapes_data
import tiny_cli
import training_cli
from shapes_data import CELL, ShapesDataset, accuracy, generate_examples


def pixel_values(images) -> torch.Tensor:
    """`(N, 3, 48, 48)`: 48 x 48 RGB images normalised as the processor's base view (mean = std = 0.5)."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def recolored(scene, rng: random.Random):
    """The same shapes in the same cells, each with a colour drawn anew."""
    return [shapes_data.ShapeObject(o.shape, rng.choice(tuple(shapes_data.COLORS)), o.row, o.col) for o in scene]


def cell_targets(scene) -> dict[str, list[int]]:
    """Per grid cell (row-major): shape (0 = empty, 1 + index) and colour (0 = none, 1 + index)."""
    cells = shapes_data.GRID * shapes_data.GRID
    targets = {"shape": [0] * cells, "color": [0] * cells}
    for obj in scene:
        cell = obj.row * shapes_data.GRID + obj.col
        targets["shape"][cell] = 1 + shapes_data.SHAPES.index(obj.shape)
        targets["color"][cell] = 1 + tuple(shapes_data.COLORS).index(obj.color)
    return targets


def cell_features(hidden: torch.Tensor) -> torch.Tensor:
    """`(N, patches, width)` features of a view (one patch per cell here) -> `(N, cells, width)`."""
    cells = shapes_data.GRID * shapes_data.GRID
    if hidden.shape[1] != cells:
        raise ValueError(f"expected one patch per grid cell ({cells} patches), got {hidden.shape[1]}")
    return hidden


def warmup_cosine(optimizer, steps: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps` (transformers' cosine schedule)."""

    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def twin_invariance(features: torch.Tensor) -> torch.Tensor:
    """
    `features` `(2N, ...)`: N renders followed by their N twins. The mean squared distance between each render's and its
    twin's features, relative to the features' variance over the batch (so shrinking the features does not pay).
    """
    first, second = features.chunk(2)
    return (first - second).pow(2).sum(-1).mean() / features.flatten(0, 1).var(0).sum()


def pretrain_color_blind_tower(
    tower: nn.Module, steps: int, batch_size: int = 64, invariance_weight: float = 1000.0, lr: float = 1e-3,
    seed: int = 0, color_layer: int | None = None, log=print,
) -> list[dict]:
    """
    Pretrains `tower` (a SigLIP vision model with one patch per grid cell) in place and freezes it: per-cell shape
    classification from the last layer + `invariance_weight` x the squared difference of the last layer between two
    renders with the colours drawn anew, relative to that layer's variance over the batch; with `color_layer`, also
    per-cell colour classification from that hidden state (so the colours stay up to there). Returns the loss log.
    """
    torch.manual_seed(seed)
    width = tower.config.hidden_size
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1 + len(shapes_data.SHAPES)))
    color_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1 + len(shapes_data.COLORS)))
    tower.embeddings.patch_embedding.requires_grad_(False)
    heads = list(head.parameters()) + (list(color_head.parameters()) if color_layer is not None else [])
    params = [p for p in list(tower.parameters()) + heads if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=min(30, steps))
    rng = random.Random(seed)
    history = []
    tower.train()
    for step in range(steps):
        scenes = [shapes_data.random_scene(rng) for _ in range(batch_size)]
        twins = [recolored(scene, rng) for scene in scenes]
        pixels = pixel_values([shapes_data.render_scene(s) for s in scenes + twins])
        target = torch.tensor([cell_targets(s)["shape"] for s in scenes]).repeat(2, 1)
        hidden_states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        last = cell_features(hidden_states[-1])
        shape_loss = nn.functional.cross_entropy(head(last).flatten(0, 1), target.flatten())
        if color_layer is not None:
            colors = torch.tensor([cell_targets(s)["color"] for s in scenes + twins])
            color_logits = color_head(cell_features(hidden_states[color_layer]))
            shape_loss = shape_loss + nn.functional.cross_entropy(color_logits.flatten(0, 1), colors.flatten())
        invariance = twin_invariance(last)
        loss = shape_loss + invariance_weight * invariance
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "shape": round(float(shape_loss.detach()), 4),
                            "invariance": round(float(invariance.detach()), 6)})
            log(f"  tower step {step:>4}: shape loss {history[-1]['shape']:.4f}, invariance {history[-1]['invariance']:.6f}")
    tower.eval().requires_grad_(False)
    return history


def fit_linear_probe(train_x, train_y, test_x, test_y, num_classes: int, l2: float = 1e-3, iterations: int = 100) -> float:
    """Multinomial logistic regression (LBFGS, standardised features, L2); the test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(train_x), train_y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((probe(test_x).argmax(-1) == test_y).float().mean())


@torch.no_grad()
def vision_probes(tower: nn.Module, num_train: int = 2000, num_test: int = 1000, seed: int = 4242) -> dict[str, list]:
    """Held-out accuracy of a linear probe of each cell's shape and colour (occupied cells) on every hidden state."""
    rng = random.Random(seed)
    scenes = [shapes_data.random_scene(rng) for _ in range(num_train + num_test)]
    hidden = tower(pixel_values=pixel_values([shapes_data.render_scene(s) for s in scenes]), output_hidden_states=True)
    targets = [cell_targets(s) for s in scenes]
    probes = {}
    for attribute, classes in (("shape", 1 + len(shapes_data.SHAPES)), ("color", 1 + len(shapes_data.COLORS))):
        labels = torch.tensor([t[attribute] for t in targets]).flatten()
        occupied = torch.tensor([t["shape"] for t in targets]).flatten() > 0
        train = occupied.clone()
        train[num_train * 4 :] = False
        test = occupied & ~train
        test[: num_train * 4] = False
        probes[attribute] = []
        for layer_hidden in hidden.hidden_states:
            features = cell_features(layer_hidden).flatten(0, 1)
            with torch.enable_grad():
                accuracy = fit_linear_probe(features[train], labels[train], features[test], labels[test], classes)
            probes[attribute].append(round(accuracy, 3))
    return probes


class GateCostTrainer:
    """Mixin for `Trainer`: adds `gate_cost` x the mean |gate| of the batch to the loss (injecting costs a little)."""

    gate_cost = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        outputs = model(**inputs, output_gate_weights=True)
        loss = outputs.loss + self.gate_cost * outputs.gate_weights.float().abs().mean()
        return (loss, outputs) if return_outputs else loss


def train_stage(model, processor, dataset, learning_rates: dict[str, float], steps: int, warmup: int, batch_size: int,
                seed: int, run_dir: str, logging_steps: int = 25, gate_cost: float = 0.0):
    """
    Trains the groups in `learning_rates` (`{group: lr}`, a group of `CLIForConditionalGeneration.parameter_group`, or
    `{"group/part": lr}` for that group's parameters whose name contains `part`; everything else frozen) with the
    Trainer: AdamW (0.9 / 0.98, no weight decay), linear warm-up then cosine decay, gradient clipping at 1.0. With
    `gate_cost`, the loss also counts `gate_cost` x the mean |gate| ([`GateCostTrainer`]).
    Returns the trainer.
    """
    from transformers import Trainer, get_cosine_schedule_with_warmup

    def rate_key(name):
        # "group/part" (e.g. "agf/gate_bias") applies to that group's parameters whose name holds `part`; else "group"
        group = model.parameter_group(name)
        specific = [key for key in learning_rates if key.startswith(group + "/") and key.split("/", 1)[1] in name]
        return specific[0] if specific else group if group in learning_rates else None

    keys = {name: rate_key(name) for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(keys[name] is not None)
    groups = [
        {"params": [p for n, p in model.named_parameters() if keys[n] == key], "lr": lr}
        for key, lr in learning_rates.items()
    ]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    trainer_class = Trainer
    if gate_cost:
        trainer_class = type("GateCostTrainer", (GateCostTrainer, Trainer), {"gate_cost": gate_cost})
    trainer = trainer_class(
        model=model.train(),
        args=training_cli.training_arguments(
            run_dir, per_device_train_batch_size=batch_size, max_steps=steps, logging_steps=logging_steps, seed=seed,
            use_cpu=True,
        ),
        train_dataset=dataset,
        data_collator=training_cli.CLIDataCollator(processor),
        optimizers=(optimizer, get_cosine_schedule_with_warmup(optimizer, min(warmup, steps), steps)),
    )
    trainer.train()
    return trainer


@torch.no_grad()
def gate_summary(model, processor, examples) -> dict:
    """Mean gate `(J, K)` per question kind and the share of inputs with a saturated gate (|g| > 0.99)."""
    gates = model(**shapes_data.question_inputs(processor, examples), output_gate_weights=True).gate_weights.permute(1, 0, 2).float()  # (N, J, K)
    kinds = [e["kind"] for e in examples]
    return {
        "mean": {k: gates[[x == k for x in kinds]].mean(0).tolist() for k in shapes_data.QUESTION_KINDS if k in kinds},
        "saturated_inputs": float((gates.abs() > 0.99).flatten(1).any(-1).float().mean()),
    }


def build_shapes_model(recipe: dict):
    """The tiny CLI model of the recipe at its initialisation (one vision patch per grid cell) and its processor."""
    return tiny_cli.build_tiny_cli(
        seed=recipe["model_seed"], patch_size=CELL, text_config={"initializer_range": recipe["text_initializer_range"]},
        vision_config={"num_hidden_layers": recipe["vision_layers"]},
        vision_extraction_layers=recipe["vision_extraction_layers"],
    )


def train_shapes_model(recipe: dict, output: str | None, shipped_dir: str, cache_dir: str) -> float:
    """
    Runs stages 0-2 with the settings of `recipe` (finetune.SHAPES_RECIPE) and saves the model to `output`, or, when
    `output` is None, to `shipped_dir` if its held-out exact match reaches `recipe["target_accuracy"]` (else to
    `cache_dir/shapes_model_below_target`: the shipped model is never replaced by a weaker one). Returns the score.
    """
    from transformers import set_seed

    explicit_output = output is not None
    output = output or shipped_dir
    torch.set_num_threads(recipe["num_threads"])
    set_seed(recipe["seed"])
    heldout = generate_examples(recipe["heldout_size"], seed=recipe["heldout_seed"])
    run_dir = os.path.join(cache_dir, "shapes_run")
    start = time.time()
    model, processor = build_shapes_model(recipe)
    print(training_cli.format_parameter_summary(training_cli.trainable_summary(model)) + "\n")

    print(f"stage 0: the vision tower, colour-blind in its last layer ({recipe['tower_steps']} steps)")
    pretrain_color_blind_tower(
        model.model.vision_tower, recipe["tower_steps"], invariance_weight=recipe["tower_invariance_weight"],
        seed=recipe["seed"], color_layer=recipe["tower_color_layer"],
    )
    probes = vision_probes(model.model.vision_tower)
    print(f"linear probes per vision hidden state 0..{recipe['vision_layers']}: {probes}")

    print(f"stage 1: projector, LLM, AMP and AGF at {recipe['learning_rates']} ({recipe['max_steps']} steps)")
    stage = train_stage(
        model, processor, ShapesDataset(recipe["max_steps"] * recipe["batch_size"], seed=recipe["data_seed"]),
        recipe["learning_rates"], recipe["max_steps"], recipe["warmup_steps"], recipe["batch_size"], recipe["seed"],
        run_dir,
    )
    print(training_cli.format_loss_curve(training_cli.loss_curve(stage)))
    model.eval()
    print(f"after stage 1: held-out exact match {accuracy(model, processor, heldout)}")
    print(f"after stage 1: gates {gate_summary(model, processor, heldout)}")
    # stage 2 starts from the saved stage-1 folder, as an experiment on stage 2 alone would (the same weights; the
    # measured stage-2 runs started from such a folder, and that stage is sensitive to the last bits of its start)
    stage1_dir = os.path.join(cache_dir, "shapes_stage1")
    training_cli.save_cli_folder(model, processor, stage1_dir)
    model = training_cli.CLIForConditionalGeneration.from_pretrained(stage1_dir)
    processor = training_cli.load_processor(stage1_dir)

    print(f"stage 2: gate cost {recipe['gate_cost']}, {recipe['gate_cost_learning_rates']} "
          f"({recipe['gate_cost_steps']} steps)")
    stage = train_stage(
        model, processor,
        ShapesDataset(recipe["gate_cost_steps"] * recipe["batch_size"], seed=recipe["gate_cost_data_seed"]),
        recipe["gate_cost_learning_rates"], recipe["gate_cost_steps"], recipe["warmup_steps"], recipe["batch_size"],
        recipe["seed"], run_dir, gate_cost=recipe["gate_cost"],
    )
    print(training_cli.format_loss_curve(training_cli.loss_curve(stage)))
    elapsed = time.time() - start
    model.eval()
    score, per_kind = accuracy(model, processor, heldout)
    gates = gate_summary(model, processor, heldout)
    print(f"\ntrained in {elapsed:.0f}s; held-out exact match {score:.3f} {per_kind}")
    print(f"gates on the held-out questions: {gates}")
    if score < recipe["target_accuracy"] and not explicit_output:
        # examples/shapes/model is the quickstart's default and is tested for the target: never ship a weaker model
        output = os.path.join(cache_dir, "shapes_model_below_target")
        print(f"held-out exact match {score:.3f} < {recipe['target_accuracy']}: not replacing {shipped_dir}")
    training_cli.save_cli_folder(model, processor, output)
    size = sum(os.path.getsize(os.path.join(output, name)) for name in os.listdir(output))
    print(f"saved to {output} ({size / 1e6:.1f} MB)")
    return score
