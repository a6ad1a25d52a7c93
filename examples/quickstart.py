"""
CLI in one command, offline: load a CLI checkpoint through `AutoModel(..., trust_remote_code=True)`, answer a question
about a bundled image with `pipeline("image-text-to-text")`, and save the heat maps of the gate weights (LLM injection
layer x vision extraction layer) for that question and one of another kind, side by side in one PNG.

    python examples/quickstart.py                                   # examples/shapes/model if shipped, else tiny random
    python examples/quickstart.py --tiny-random                     # a tiny random model, built once into examples/_cache
    python examples/quickstart.py --model PATH_OR_REPO --image photo.jpg --question "What is shown?"

With no `--model`, it uses `examples/shapes/model` (a tiny CLI model trained from scratch by
`examples/finetune.py --recipe shapes` to answer questions about coloured shapes), or builds a tiny random checkpoint
(a real Qwen2-style tokenizer and the qwen_1_5 chat template, random weights: its answers are noise) when that folder is
missing or `--tiny-random` is given.
"""

import argparse
import os
import sys

import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
SHAPES_MODEL = os.path.join(EXAMPLES, "shapes", "model")
SHAPES_IMAGE = os.path.join(EXAMPLES, "shapes_example.png")
SHAPES_QUESTION = "What color is the circle?"
SHAPES_SECOND_QUESTION = "How many squares are there?"  # another kind of question, for the side-by-side gate maps
TINY_RANDOM_MODEL = os.path.join(EXAMPLES, "_cache", "tiny-random-cli")


def default_model(tiny_random: bool) -> str:
    if not tiny_random and os.path.exists(os.path.join(SHAPES_MODEL, "config.json")):
        return SHAPES_MODEL
    if not os.path.exists(os.path.join(TINY_RANDOM_MODEL, "config.json")):
        sys.path.insert(0, os.path.dirname(EXAMPLES))
        from tiny_cli import build_tiny_cli_checkpoint

        print(f"Building a tiny random CLI checkpoint in {TINY_RANDOM_MODEL} (once) ...", flush=True)
        build_tiny_cli_checkpoint(TINY_RANDOM_MODEL)
    return TINY_RANDOM_MODEL


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a CLI checkpoint folder or Hub repo id (default: the bundled tiny model)")
    parser.add_argument("--tiny-random", action="store_true", help="use a tiny random model instead of the shapes one")
    parser.add_argument("--image", default=SHAPES_IMAGE, help="image file (default: the bundled shapes image)")
    parser.add_argument("--question", default=SHAPES_QUESTION)
    parser.add_argument(
        "--second-question", default=SHAPES_SECOND_QUESTION,
        help="a question of another kind whose gates are drawn beside the first's ('' = only the first)",
    )
    parser.add_argument("--output", default="cli_gates.png", help="where to write the gate heat maps")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model_path = args.model or default_model(args.tiny_random)
    print(f"Loading {model_path} with trust_remote_code=True", flush=True)
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    config = model.config
    print(
        f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; vision layers "
        f"{config.vision_extraction_layers} -> LLM layers {config.llm_injection_layers}"
    )

    image = Image.open(args.image).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]
    # the pipeline checks its model class against the auto mapping; a remote-code class loaded through AutoModel
    # is registered for image-text-to-text here (loading with AutoModelForImageTextToText does it by itself)
    AutoModelForImageTextToText.register(type(config), type(model), exist_ok=True)
    chat = pipeline("image-text-to-text", model=model, processor=processor)
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    answer = chat(text=messages, generate_kwargs=generate_kwargs, return_full_text=False)
    print(f"Q: {args.question}\nA: {answer[0]['generated_text'].strip()}")

    sys.path.insert(0, EXAMPLES)
    from plot_gates import gate_weights_for, save_gate_heatmaps

    questions = [args.question] + ([args.second_question] if args.second_question else [])
    panels = []
    for question in questions:
        gates = gate_weights_for(model, processor, image, question)
        print(f"gate weights for {question!r} (injection layer x vision layer):\n{torch.round(gates, decimals=3)}")
        panels.append((question, gates))
    print(f"wrote {save_gate_heatmaps(panels, config, args.output, title='CLI gates for the same image')}")


if __name__ == "__main__":
    main()
