"""
Chat with a CLI model about one or more images, streaming the answer as it is generated.

    python examples/chat.py --model PATH_OR_REPO --image a.jpg --image b.png               # interactive, multi-turn
    python examples/chat.py --model PATH_OR_REPO --image a.jpg --prompt "What is shown?"   # one shot

In the interactive loop, `/image PATH` attaches another image to your next message, `/reset` starts over, and an
empty line or `/quit` ends. The images given with `--image` go with the first message.
"""

import argparse
import threading

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, TextIteratorStreamer


def user_message(text: str, images: list) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}


def stream_reply(model, processor, messages: list, images: list, max_new_tokens: int, do_sample: bool) -> str:
    """Generates the assistant's reply to `messages` (whose image items match `images`), printing it as it streams."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generation = dict(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=do_sample)
    worker = threading.Thread(target=model.generate, kwargs=generation)
    worker.start()
    pieces = []
    for piece in streamer:
        print(piece, end="", flush=True)
        pieces.append(piece)
    worker.join()
    print()
    return "".join(pieces).strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a CLI checkpoint folder or Hub repo id")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--prompt", help="ask once and exit instead of chatting")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--dtype", default="auto", help="e.g. bfloat16 on a GPU")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=args.dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

    images, pending = [], [Image.open(path) for path in args.image]
    messages = []
    if args.prompt is not None:
        messages.append(user_message(args.prompt, pending))
        stream_reply(model, processor, messages, pending, args.max_new_tokens, args.sample)
        return

    print("Chatting with", args.model, "- /image PATH attaches an image, /reset starts over, empty line quits.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text or text == "/quit":
            break
        if text == "/reset":
            images, pending, messages = [], [], []
            continue
        if text.startswith("/image "):
            pending.append(Image.open(text.removeprefix("/image ").strip()))
            continue
        messages.append(user_message(text, pending))
        images, pending = images + pending, []
        print("cli> ", end="", flush=True)
        reply = stream_reply(model, processor, messages, images, args.max_new_tokens, args.sample)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})


if __name__ == "__main__":
    main()
