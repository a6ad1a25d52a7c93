"""
Training CLI: the chat data collator (template, label masking, bad inputs), Trainer steps that move only AMP/AGF,
AGF never reading supervised positions, activation checkpointing, save -> offline remote-code reload, PEFT LoRA + CLI
modules (save, reload, merge), and the shipped shapes model.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DIR = ROOT / "examples" / "shapes"
SHAPES_MODEL = SHAPES_DIR / "model"
for path in (str(ROOT), str(SHAPES_DIR), str(ROOT / "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

import shapes_data  # noqa: E402
import tiny_cli  # noqa: E402
import training_cli  # noqa: E402
from tiny_models import randomize_cli_modules  # noqa: E402
from training_cli import IGNORE_INDEX, CLIDataCollator, SampleError  # noqa: E402

BLOCK_PROJECT_IMPORTS = (
    "import sys\nfor name in ('configuration_cli', 'modeling_cli', 'processing_cli', 'training_cli'):\n"
    "    sys.modules[name] = None\n"
)


def is_cli_parameter(name):
    return name.startswith(("model.amp.", "model.language_model.agf."))


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_cli.build_tiny_cli(seed=0)
    randomize_cli_modules(model)
    return model, processor


@pytest.fixture(scope="module")
def examples():
    return shapes_data.generate_examples(6, seed=3)


def user(*items):
    return {"role": "user", "content": list(items)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def text(value):
    return {"type": "text", "text": value}


# ----------------------------------------------------------------------------------------------------------------------
# The collator
# ----------------------------------------------------------------------------------------------------------------------


def test_collator_output_is_what_the_model_takes(tiny, examples):
    model, processor = tiny
    batch = CLIDataCollator(processor)(examples[:3])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "batch_num_images"}
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    # the same processor call as inference gives the same input ids and pixels
    prompt = processor.apply_chat_template(examples[0]["messages"])
    alone = processor(images=examples[0]["images"], text=prompt, return_tensors="pt")
    length = int(batch["attention_mask"][0].sum())
    assert torch.equal(batch["input_ids"][0, :length], alone["input_ids"][0])
    assert torch.equal(batch["pixel_values"][0], alone["pixel_values"][0])
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.loss)


def test_labels_supervise_exactly_the_assistant_replies_token_by_token(tiny):
    model, processor = tiny
    tokenizer = processor.tokenizer
    image_a = shapes_data.generate_examples(1, seed=5)[0]["images"][0]
    image_b = shapes_data.generate_examples(2, seed=6)[1]["images"][0]
    conversation = [
        {"role": "system", "content": "Answer with one word."},
        user(IMAGE, text("What color is the circle?")),
        assistant("red"),
        user(text("And "), IMAGE, text("how many squares are there?")),
        assistant("2 squares"),
    ]
    short = [user(IMAGE, text("Is the circle left of the square?")), assistant("yes")]
    batch = CLIDataCollator(processor)(
        [{"messages": conversation, "images": [image_a, image_b]}, {"messages": short, "images": [image_a]}]
    )
    # The expected tokens, segment by segment, from the rendered template; True = supervised.
    image_tokens = batch["input_ids"][0].tolist().count(processor.image_token_id)
    per_image = processor.num_image_tokens + 1  # two images in a prompt: base view + one newline each
    assert image_tokens == 2 * per_image
    segments = [
        ("<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\n", False),
        ("IMAGE", False),
        ("\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\n", False),
        ("red<|im_end|>\n", True),
        ("<|im_start|>user\nAnd ", False),
        ("IMAGE", False),
        ("\nhow many squares are there?<|im_end|>\n<|im_start|>assistant\n", False),
        ("2 squares<|im_end|>\n", True),
    ]
    rendered = processor.apply_chat_template(conversation)
    assert rendered == "".join(s if s != "IMAGE" else "<image>" for s, _ in segments)
    expected_ids, expected_labels = [], []
    for segment, supervised in segments:
        ids = [processor.image_token_id] * per_image if segment == "IMAGE" else tokenizer.encode(segment)
        expected_ids += ids
        expected_labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised_ids = [t for t, label in zip(expected_ids, expected_labels) if label != IGNORE_INDEX]
    assert supervised_ids.count(im_end) == 2  # each reply's end token is supervised
    # the shorter sample: right padding, padding never supervised, default system prompt not supervised
    length = int(batch["attention_mask"][1].sum())
    assert batch["attention_mask"][1, :length].all() and not batch["attention_mask"][1, length:].any()
    assert (batch["input_ids"][1, length:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][1, length:] == IGNORE_INDEX).all()
    reply = tokenizer.encode("yes<|im_end|>\n")
    assert batch["labels"][1, length - len(reply) : length].tolist() == reply
    assert (batch["labels"][1, : length - len(reply)] == IGNORE_INDEX).all()
    # image tokens are never supervised
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_loading_and_bad_inputs_name_the_line(tmp_path, tiny):
    _, processor = tiny
    data = Path(shapes_data.write_jsonl(tmp_path, 3, seed=7))
    samples = training_cli.load_chat_jsonl(data)
    assert [s["source"] for s in samples] == [f"{data} line {n}" for n in (1, 2, 3)]
    assert all(os.path.isabs(s["images"][0]) for s in samples)
    CLIDataCollator(processor)(samples)

    good = json.loads(data.read_text().splitlines()[0])
    cases = {
        "missing image": ({**good, "images": ["images/nope.png"]}, r"line 2: image file 'images/nope.png' not found"),
        "more markers than images": (
            {**good, "messages": [user(IMAGE, IMAGE, text("Hi")), assistant("red")]},
            r"line 2: 2 image marker\(s\).* but 1 image\(s\)",
        ),
        "literal marker": (
            {"messages": [{"role": "user", "content": "<image>\n<image>\nHi"}, assistant("red")], "images": good["images"]},
            r"line 2: 2 image marker",
        ),
        "empty conversation": ({"messages": [], "images": []}, r"line 2: empty conversation"),
        "no reply": ({"messages": [user(text("Hi"))], "images": []}, r"line 2: no assistant turn"),
        "bad role": ({"messages": [{"role": "robot", "content": "x"}], "images": []}, r"line 2, message 0 has role 'robot'; roles must be one of"),
        "not json": ("{not json", r"line 2: not valid JSON"),
    }
    for name, (record, message) in cases.items():
        bad = tmp_path / f"bad_{name.replace(' ', '_')}.jsonl"
        bad.write_text(data.read_text().splitlines()[0] + "\n" + (record if isinstance(record, str) else json.dumps(record)) + "\n")
        with pytest.raises(SampleError, match=message):
            training_cli.load_chat_jsonl(bad)

    # the collator checks too (samples that did not come through load_chat_jsonl)
    collator = CLIDataCollator(processor)
    with pytest.raises(SampleError, match=r"sample 1 of the batch: 1 image marker\(s\).* but 0 image"):
        collator([samples[0], {"messages": samples[0]["messages"], "images": []}])
    with pytest.raises(SampleError, match=r"sample 0 of the batch: empty conversation"):
        collator([{"messages": [], "images": []}])
    with pytest.raises(SampleError, match=r"image file '/no/such.png' not found"):
        collator([{"messages": samples[0]["messages"], "images": ["/no/such.png"]}])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(SampleError, match=r"sample 0 of the batch: cannot load image"):
        collator([{"messages": samples[0]["messages"], "images": [str(corrupt)]}])


def test_max_length_errors_or_truncates_text_never_image_tokens(tiny, examples):
    _, processor = tiny
    batch = CLIDataCollator(processor)(examples[:1])
    length = batch["input_ids"].shape[1]
    last_image = int((batch["input_ids"][0] == processor.image_token_id).nonzero().max()) + 1
    sample = {**examples[0], "source": "shapes.jsonl line 9"}
    with pytest.raises(SampleError, match=rf"shapes.jsonl line 9: {length} tokens \(21 of them image tokens\) exceed"):
        CLIDataCollator(processor, max_length=length - 1)([sample])
    truncated = CLIDataCollator(processor, max_length=length - 1, truncation=True)([sample])
    assert torch.equal(truncated["input_ids"][0], batch["input_ids"][0, : length - 1])
    assert torch.equal(truncated["labels"][0], batch["labels"][0, : length - 1])
    with pytest.raises(SampleError, match=r"truncating would cut through its image tokens"):
        CLIDataCollator(processor, max_length=last_image - 1, truncation=True)([sample])
    first_label = int((batch["labels"][0] != IGNORE_INDEX).nonzero().min())
    with pytest.raises(SampleError, match=r"truncating would leave no supervised token"):
        CLIDataCollator(processor, max_length=first_label, truncation=True)([sample])


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def test_trainer_lowers_the_loss_and_moves_only_amp_and_agf(tmp_path, examples):
    from transformers import Trainer

    model, processor = tiny_cli.build_tiny_cli(seed=1)
    summary = model.set_trainable("cli", verbose=False)
    assert summary["llm"][0] == summary["vision_tower"][0] == summary["projector"][0] == 0
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    collator = CLIDataCollator(processor)
    batch = collator(examples[:4])
    with torch.no_grad():
        loss_before = model(**batch).loss.item()
    trainer = Trainer(
        model=model.train(),
        args=training_cli.training_arguments(tmp_path, per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2),
        train_dataset=examples[:4],  # the same batch every step
        data_collator=collator,
    )
    trainer.train()
    curve = training_cli.loss_curve(trainer)
    assert [step for step, _ in curve] == list(range(1, 7))
    model.eval()
    with torch.no_grad():
        loss_after = model(**batch).loss.item()
    assert loss_after < loss_before - 0.2, (loss_before, loss_after, curve)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(is_cli_parameter(name) for name in changed), sorted(changed)[:5]
    assert any(name.startswith("model.amp.") for name in changed) and any(".agf." in name for name in changed)
    for name in before:
        if not is_cli_parameter(name):
            assert torch.equal(before[name], after[name]), name  # the base model is bit-identical


def test_agf_never_reads_supervised_positions(tiny):
    model, processor = tiny
    image = shapes_data.generate_examples(1, seed=8)[0]["images"][0]
    question = user(IMAGE, text("What color is the circle?"))
    collator = CLIDataCollator(processor)
    batch_red = collator([{"messages": [question, assistant("red")], "images": [image]}])
    batch_blue = collator([{"messages": [question, assistant("blue")], "images": [image]}])
    assert not torch.equal(batch_red["input_ids"], batch_blue["input_ids"])
    assert torch.equal(batch_red["labels"] == IGNORE_INDEX, batch_blue["labels"] == IGNORE_INDEX)
    with torch.no_grad():
        gates_red = model(**batch_red, output_gate_weights=True).gate_weights
        gates_blue = model(**batch_blue, output_gate_weights=True).gate_weights
        without_labels = {k: v for k, v in batch_blue.items() if k != "labels"}
        gates_blue_unmasked = model(**without_labels, output_gate_weights=True).gate_weights
    assert gates_red.abs().min() > 0
    assert torch.equal(gates_red, gates_blue)  # the answer never reaches the gates
    assert not torch.allclose(gates_blue, gates_blue_unmasked)  # ...which would read it without the labels


@pytest.mark.parametrize("trainable", ["cli", "all"])
def test_activation_checkpointing_gives_the_same_gradients(tiny, examples, trainable):
    model, processor = tiny
    batch = CLIDataCollator(processor)(examples[:2])
    model.set_trainable(trainable, verbose=False)

    def gradients():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        loss, reference = gradients()
        model.activation_checkpointing_enable()
        assert model.model.language_model.gradient_checkpointing
        loss_checkpointed, checkpointed = gradients()
    finally:
        model.activation_checkpointing_disable()
        model.eval()
        model.zero_grad(set_to_none=True)
        model.set_trainable("all", verbose=False)
    assert sorted(reference) == sorted(checkpointed)
    assert any(is_cli_parameter(name) for name in reference)
    assert abs(loss - loss_checkpointed) <= 1e-6
    for name in reference:
        assert (reference[name] - checkpointed[name]).abs().max().item() <= 1e-5, name


def run_offline(code, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PROJECT_IMPORTS + textwrap.dedent(code)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_fine_tuned_folder_reloads_offline_as_remote_code_with_the_same_logits(tmp_path, examples):
    from transformers import Trainer

    model, processor = tiny_cli.build_tiny_cli(seed=2)
    model.set_trainable("cli", verbose=False)
    collator = CLIDataCollator(processor)
    Trainer(
        model=model.train(),
        args=training_cli.training_arguments(tmp_path / "run", per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2),
        train_dataset=examples[:2],
        data_collator=collator,
    ).train()
    model.eval()
    folder = training_cli.save_cli_folder(model, processor, tmp_path / "finetuned")
    assert {"configuration_cli.py", "modeling_cli.py", "processing_cli.py", "model.safetensors"} <= set(os.listdir(folder))
    batch = collator(examples[2:4])
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    output = run_offline(
        f"""
        import torch
        from transformers import AutoModel, AutoProcessor
        folder = {str(folder)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__name__ == "CLIProcessor", type(processor)
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            logits = model(**batch).logits
        print("MAXDIFF", (logits - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
        prompt = processor.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Hi"}}]}}], add_generation_prompt=True)
        print("PROMPT_OK", prompt.endswith("<|im_start|>assistant\\n"))
        """,
        tmp_path,
    )
    assert float(output.split("MAXDIFF")[1].split()[0]) <= 1e-5
    assert "PROMPT_OK True" in output


# ----------------------------------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------------------------------


def test_peft_lora_on_the_llm_with_cli_modules_trains_saves_reloads_and_merges(tmp_path, examples):
    from peft import PeftModel, get_peft_model

    model, processor = tiny_cli.build_tiny_cli(seed=4)
    randomize_cli_modules(model, seed=5)
    config = training_cli.cli_peft_config(model, r=4, lora_alpha=8)
    assert sorted(config.modules_to_save) == ["model.amp", "model.language_model.agf.1", "model.language_model.agf.2"]
    model.set_trainable("cli", verbose=False)
    peft_model = get_peft_model(model, config)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if ".lora_" in name and ".amp." not in name]
    assert lora and all(".language_model.layers." in name for name in lora)
    assert not any("vision_tower" in name or "multi_modal_projector" in name for name in trainable)
    assert {name.split(".modules_to_save.")[0] for name in trainable if ".modules_to_save." in name} == {
        "base_model.model.model.amp", "base_model.model.model.language_model.agf.1", "base_model.model.model.language_model.agf.2"
    }
    assert set(trainable) == set(lora) | {name for name in trainable if ".modules_to_save." in name}
    summary = training_cli.trainable_summary(peft_model)
    assert summary["vision_tower"][0] == summary["projector"][0] == summary["llm"][0] == 0
    assert summary["amp"][0] == summary["amp"][1] > 0 and summary["agf"][0] == summary["agf"][1] > 0
    assert summary["llm_lora"][0] == summary["llm_lora"][1] > 0

    batch = CLIDataCollator(processor)(examples[:3])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch, output_gate_weights=True)
    peft_model.save_pretrained(tmp_path / "adapter")

    base, _ = tiny_cli.build_tiny_cli(seed=4)
    randomize_cli_modules(base, seed=5)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        reloaded_logits = reloaded(**batch).logits
    assert (reloaded_logits - expected.logits).abs().max().item() <= 1e-5

    merged = reloaded.merge_and_unload().eval()
    assert type(merged).__name__ == "CLIForConditionalGeneration"
    assert not any("lora_" in name and ".amp." not in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_output = merged(**batch, output_gate_weights=True)
    assert (merged_output.logits - expected.logits).abs().max().item() <= 1e-5
    assert (merged_output.gate_weights - expected.gate_weights).abs().max().item() <= 1e-6
    assert (merged_output.logits - base_logits(examples, batch)).abs().max().item() > 1e-3  # training did something
    folder = training_cli.save_cli_folder(merged, processor, tmp_path / "merged")
    from transformers import AutoModel

    again = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        assert (again(**batch).logits - expected.logits).abs().max().item() <= 1e-5


def base_logits(examples, batch):
    base, _ = tiny_cli.build_tiny_cli(seed=4)
    randomize_cli_modules(base, seed=5)
    with torch.no_grad():
        return base.eval()(**batch).logits


# ----------------------------------------------------------------------------------------------------------------------
# Parameter summaries
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_module_names_and_lora_targets():
    model, _ = tiny_cli.build_tiny_cli(seed=0)
    assert training_cli.cli_module_names(model) == ["model.amp", "model.language_model.agf.1", "model.language_model.agf.2"]
    import re

    targets = [name for name, _ in model.named_modules() if re.fullmatch(training_cli.LLM_LORA_TARGET_MODULES, name)]
    assert len(targets) == 4 * 7 and all(name.startswith("model.language_model.layers.") for name in targets)


# ----------------------------------------------------------------------------------------------------------------------
# The shipped shapes model
# ----------------------------------------------------------------------------------------------------------------------


def test_shipped_shapes_model_code_is_the_repository_code():
    for name in training_cli.REMOTE_CODE_FILES:
        assert (SHAPES_MODEL / name).read_bytes() == (ROOT / name).read_bytes(), (
            f"examples/shapes/model/{name} is stale: run `python examples/shapes/refresh_model.py`"
        )


def test_shipped_shapes_model_answers_fresh_questions():
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(SHAPES_MODEL, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(SHAPES_MODEL, trust_remote_code=True)
    held_out = shapes_data.generate_examples(51, seed=20260101)
    score, per_kind = shapes_data.accuracy(model, processor, held_out)
    assert score >= 0.9, (score, per_kind)
    size = sum(f.stat().st_size for f in SHAPES_MODEL.iterdir() if f.is_file())
    assert size < 8e6, size


def test_refresh_saved_folder_uses_the_repository_classes_without_prompting(tmp_path):
    import shutil

    folder = tmp_path / "shapes"
    shutil.copytree(SHAPES_MODEL, folder)
    for name in training_cli.REMOTE_CODE_FILES:  # stale copies: what refreshing is for
        (folder / name).write_text("raise RuntimeError('the folder copy must not run')\n")
    training_cli.refresh_saved_folder(folder)  # used to ask for trust_remote_code (EOFError without a terminal)
    for name in ("model.safetensors", "chat_template.jinja", "processor_config.json"):
        assert (folder / name).read_bytes() == (SHAPES_MODEL / name).read_bytes(), name
    for name in training_cli.REMOTE_CODE_FILES:
        assert (folder / name).read_bytes() == (ROOT / name).read_bytes(), name
    shipped, refreshed = (json.loads((f / "tokenizer.json").read_text()) for f in (SHAPES_MODEL, folder))
    assert refreshed["model"] == shipped["model"] and refreshed["added_tokens"] == shipped["added_tokens"]
    assert refreshed["padding"] is None  # the padding state of the shipped file's last call is not kept


def test_shapes_recipe_below_target_never_replaces_the_shipped_model(tmp_path, monkeypatch):
    import shutil

    import finetune

    shipped = tmp_path / "shipped"  # a copy stands in for examples/shapes/model, so a broken guard harms nothing
    shutil.copytree(SHAPES_MODEL, shipped)
    before = {f.name: f.read_bytes() for f in shipped.iterdir()}
    monkeypatch.setattr(finetune, "SHAPES_MODEL_DIR", str(shipped))
    monkeypatch.setattr(finetune, "HERE", str(tmp_path))  # the Trainer's run folder and the fallback land here
    for stage_steps in ("tower_steps", "max_steps", "gate_cost_steps"):  # the recipe's three training stages (issue 15)
        monkeypatch.setitem(finetune.SHAPES_RECIPE, stage_steps, 2)
    monkeypatch.setitem(finetune.SHAPES_RECIPE, "heldout_size", 6)
    threads = torch.get_num_threads()
    try:
        score = finetune.train_shapes(finetune.parse_args(["--recipe", "shapes"]))
    finally:
        torch.set_num_threads(threads)
    assert score < finetune.SHAPES_RECIPE["target_accuracy"]
    assert {f.name: f.read_bytes() for f in shipped.iterdir()} == before
    # the fallback is a complete model whose geometry matches its processor: 24-pixel patches, 4 tokens a view
    fallback = tmp_path / "_cache" / "shapes_model_below_target"
    model = training_cli.CLIForConditionalGeneration.from_pretrained(fallback)
    assert model.config.vision_config.patch_size == shapes_data.CELL == 24
    assert json.loads((fallback / "processor_config.json").read_text())["num_image_tokens"] == 4
