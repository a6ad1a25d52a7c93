"""
Chat with a CLI model about one or more images, streaming the answer as it is generated.

    python examples/chat.py --model PATH_OR_REPO --image a.jpg --image b.png               # interactive, multi-turn
    python examples/chat.py --model PATH_OR_REPO --image a.jpg --prompt "What is shown?"   # one shot

The images given with `--image` go with the first message. In the interactive loop, `/image PATH` attaches another
image to your next message, `/reset` starts a new conversation about the `--image` images (they go with your next
message again; images added with `/image` are dropped), and an empty line or `/quit` ends. An image that cannot be
read (a wrong path, a broken file) is reported and the chat goes on; at start, it stops with exit code 2.
"""

import argparse
import sys
import threading

import torch
from transformers import AutoModel, AutoProcessor, TextIteratorStreamer


def user_message(text: str, images: list) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}


def load_image(processor, source):
    """The image at `source` (path, URL or base64) through the model's own loader; a `ValueError` names the problem."""
    try:
        return processor.image_processor.fetch_images(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot open image {source!r}: {error}") from None


def stream_reply(model, processor, messages: list, images: list, max_new_tokens: int, do_sample: bool) -> str:
    """Generates the assistant's reply to `messages` (whose image items match `images`), printing it as it streams."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure = []

    def generate():
        try:
            model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=do_sample)
        except Exception as error:  # noqa: BLE001 - handed to the main thread; the streamer must still end
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=generate)
    worker.start()
    pieces = []
    for piece in streamer:
        print(piece, end="", flush=True)
        pieces.append(piece)
    worker.join()
    print()
    if failure:
        raise failure[0]
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
    try:
        start_images = [load_image(processor, path) for path in args.image]
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")

    if args.prompt is not None:
        messages = [user_message(args.prompt, start_images)]
        stream_reply(model, processor, messages, start_images, args.max_new_tokens, args.sample)
        return

    print("Chatting with", args.model, "- /image PATH attaches an image, /reset starts over, empty line quits.")
    images, pending, messages = [], list(start_images), []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text or text == "/quit":
            break
        if text == "/reset":
            images, pending, messages = [], list(start_images), []
            print(f"(new conversation; the {len(start_images)} --image image(s) go with your next message)")
            continue
        if text == "/image" or text.startswith("/image "):
            source = text.removeprefix("/image").strip()
            try:
                pending.append(load_image(processor, source))
            except ValueError as error:
                print(f"({error}; nothing attached)")
                continue
            print(f"({len(pending)} image(s) will go with your next message)")
            continue
        turn = user_message(text, pending)
        print("cli> ", end="", flush=True)
        try:
            reply = stream_reply(model, processor, messages + [turn], images + pending, args.max_new_tokens, args.sample)
        except ValueError as error:
            print(f"(cannot answer: {error}; the message was dropped)", file=sys.stderr)
            continue
        messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        images, pending = images + pending, []


if __name__ == "__main__":
    main()
