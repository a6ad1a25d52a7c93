"""pipeline("image-text-to-text") end to end, offline, in a fresh process, on a saved tiny checkpoint."""

import base64
import io
import json

import pytest
import torch
from PIL import Image
from processing_cli import CLIImageProcessor, CLIProcessor
from test_remote_code import run_offline
from tiny_cli import build_tiny_tokenizer
from tiny_models import IMAGE_SIZE, PINPOINTS, randomize_cli_modules, tiny_cli_model

QUESTION = "What is in the picture?"


def tiny_processor():
    tokenizer = build_tiny_tokenizer()
    image_processor = CLIImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    return CLIProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    model = tiny_cli_model(
        seed=31,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        text_config=dict(
            model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
        ),
    )
    randomize_cli_modules(model, seed=32)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-cli"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = Image.new("RGB", (70, 40), (200, 30, 30))
    image.paste((20, 20, 220), (10, 10, 30, 30))
    image_path = folder.parent / "image.png"
    image.save(image_path)
    return folder, image_path, model, processor


def expected_answer(model, processor, image_path, max_new_tokens=6):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_pipeline_answers_offline_in_a_fresh_process(checkpoint, tmp_path):
    folder, image_path, model, processor = checkpoint
    data_url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    output = run_offline(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
        answers = {{}}
        for name, image in [("path", {str(image_path)!r}), ("pil", Image.open({str(image_path)!r})), ("base64", {data_url!r})]:
            messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": {QUESTION!r}}}]}}]
            result = pipe(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)
            answers[name] = result[0]["generated_text"]
        prompt = pipe.processor.apply_chat_template(
            [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTION!r}}}]}}], add_generation_prompt=True
        )
        result = pipe(images=Image.open({str(image_path)!r}), text=prompt, max_new_tokens=6, do_sample=False, return_full_text=False)
        answers["plain"] = result[0]["generated_text"]
        print("ANSWERS" + json.dumps(answers))
        """,
        tmp_path,
    )
    answers = json.loads(output.split("ANSWERS", 1)[1])
    expected = expected_answer(model, processor, image_path)
    assert expected.strip()
    assert answers == {"path": expected, "pil": expected, "base64": expected, "plain": expected}


def test_post_process_returns_the_answer_text(checkpoint):
    _, image_path, model, processor = checkpoint
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    texts = processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1] :])
    assert texts == [expected_answer(model, processor, image_path)]
    assert "<|im_end|>" not in texts[0] and "<image>" not in texts[0]


def test_generate_accepts_every_key_the_processor_emits(checkpoint):
    _, image_path, model, processor = checkpoint
    images = [Image.open(image_path), Image.new("RGB", (30, 90), (0, 128, 0))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[images], text=[prompt], return_tensors="pt")
    assert {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"} <= set(inputs)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_gate_weights=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3 or processor.tokenizer.eos_token_id in output[0]
    config = json.loads((checkpoint[0] / "processor_config.json").read_text())
    assert "CLIProcessor" in json.dumps(config)
