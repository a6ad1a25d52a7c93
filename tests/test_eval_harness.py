"""
The call lmms-eval's generic transformers adapter makes (`--model huggingface`, lmms_eval/models/chat/huggingface.py):
the chat template per prompt (tokenize=False), then ONE processor call with every image of the batch in a flat list,
`videos=[]`, `audios=[]`, `padding=True`, `padding_side="left"` (batch > 1) or `"right"` (batch 1), then `generate`.

Reference: the same questions answered one at a time (no padding) by the same model.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES_MODEL = ROOT / "examples" / "shapes" / "model"


@pytest.fixture(scope="module")
def shapes():
    import sys

    sys.path.insert(0, str(ROOT / "examples" / "shapes"))
    import shapes_data
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    model = AutoModel.from_pretrained(SHAPES_MODEL, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(SHAPES_MODEL, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(SHAPES_MODEL, trust_remote_code=True)  # lmms-eval loads it apart
    return model, processor, tokenizer, shapes_data


def hf_messages(question, images):
    """What lmms-eval's `ChatMessages.to_hf_messages()` gives for one image question."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def generate_kwargs(tokenizer, max_new_tokens=4):
    return dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        temperature=None,
        top_p=None,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        use_cache=True,
    )


def lmms_eval_batch(model, processor, tokenizer, batch, padding_side):
    """lmms-eval's generate_until for one chunk of `(question, [images])`."""
    texts = [
        processor.apply_chat_template(hf_messages(question, images), tokenize=False, add_generation_prompt=True)
        for question, images in batch
    ]
    images = [image for _, group in batch for image in group]  # flattened across the batch, as lmms-eval does
    inputs = processor(
        text=texts, padding=True, padding_side=padding_side, return_tensors="pt", images=images, videos=[], audios=[]
    )
    with torch.no_grad():
        output = model.generate(**inputs, **generate_kwargs(tokenizer))
    trimmed = [out[len(ids) :] for ids, out in zip(inputs.input_ids, output)]
    return inputs, processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def one_by_one(model, processor, tokenizer, batch):
    answers = []
    for question, images in batch:
        inputs = processor.apply_chat_template(
            hf_messages(question, images), add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            output = model.generate(**inputs, **generate_kwargs(tokenizer))
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def test_lmms_eval_call_left_padded_batch_equals_one_prompt_at_a_time(shapes):
    model, processor, tokenizer, shapes_data = shapes
    examples = shapes_data.generate_examples(6, seed=77)
    batch = [(example["question"], example["images"]) for example in examples]
    batch.append(("How many squares are there?", []))  # a text-only prompt in the same batch: no image for it
    inputs, answers = lmms_eval_batch(model, processor, tokenizer, batch, padding_side="left")
    mask = inputs["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # prompts of different lengths, really padded
    assert (mask[:, -1] == 1).all() and (mask[lengths < mask.shape[1], 0] == 0).all()  # on the left
    assert inputs["batch_num_images"].tolist() == [1] * 6
    assert answers == one_by_one(model, processor, tokenizer, batch)
    right = sum(answer.strip() == example["answer"] for answer, example in zip(answers, examples))
    assert right >= 5, (answers, [example["answer"] for example in examples])  # and the shapes model is right


def test_lmms_eval_call_batch_of_one_pads_right_and_answers(shapes):
    model, processor, tokenizer, shapes_data = shapes
    (example,) = shapes_data.generate_examples(1, seed=5)
    batch = [(example["question"], example["images"]), ("What color is the circle?", [])]
    inputs, _ = lmms_eval_batch(model, processor, tokenizer, batch, padding_side="right")
    lengths = inputs["attention_mask"].sum(1)
    assert (inputs["attention_mask"][:, 0] == 1).all() and lengths.min() < inputs["attention_mask"].shape[1]
    _, answers = lmms_eval_batch(model, processor, tokenizer, batch[:1], padding_side="right")  # what batch_size=1 runs
    assert answers == one_by_one(model, processor, tokenizer, batch[:1])


def test_empty_videos_and_audios_are_accepted_non_empty_ones_refused(shapes):
    _, processor, _, shapes_data = shapes
    (example,) = shapes_data.generate_examples(1, seed=6)
    text = processor.apply_chat_template(hf_messages("Colour?", example["images"]), add_generation_prompt=True)
    plain = processor(text=[text], images=example["images"], return_tensors="pt")
    for empty in (dict(videos=[], audios=[]), dict(videos=[[]], audio=[]), dict(videos=None, audios=None)):
        out = processor(text=[text], images=example["images"], return_tensors="pt", **empty)
        assert all(torch.equal(out[key], plain[key]) for key in plain), empty
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    for name, value in (("videos", [frames]), ("audios", [np.zeros(16000)]), ("audio", [np.zeros(16000)])):
        with pytest.raises(ValueError, match=rf"CLIProcessor handles images only; `{name}` must be None or empty"):
            processor(text=[text], images=example["images"], **{name: value})
