# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
A tiny, real Qwen2 byte-level BPE tokenizer, built locally and deterministically (no download).

It has the Qwen2 layout scaled down: the 256 byte symbols, a few hundred BPE merges learnt from a fixed corpus, then
`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as special added tokens (like Qwen2's 151643..151645), then `<image>`
and `<video>` added the way LLaVA-NeXT adds them (special, not normalised, not stripped; `<image>` id = the tokenizer's
length when added, as 151646 is for Qwen2). It does not depend on `processing_cli`, so tests can check the processor
against it.

    from tiny_tokenizer import build_tiny_qwen2_tokenizer  # in tests (pytest puts tests/ on sys.path)
    tokenizer = build_tiny_qwen2_tokenizer()             # a `transformers.Qwen2Tokenizer`
    tokenizer = build_tiny_qwen2_tokenizer("some/dir")   # also saved there (AutoTokenizer.from_pretrained works)
"""

from __future__ import annotations

import collections
import os

from tokenizers import AddedToken, Regex, pre_tokenizers

CORPUS = """
You are a helpful assistant. Describe this image in detail. What is in the picture? The image shows a cat sitting on
a red chair next to a window, and a dog is sleeping on the floor. There are two people walking in the street.
What is the difference between the two images? The first image is brighter than the second one.
How many objects are there? There are 3 apples, 12 oranges and 2024 bananas. Answer the question using a single
word or phrase. Please answer yes or no. Yes. No. The answer is A. Options: A, B, C, D.
user assistant system image video question answer layer vision language model cross injection
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
<image>
What is shown here?<|im_end|>
<|im_start|>assistant
A small house with a garden.<|im_end|>
"""

NUM_MERGES = 320
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MULTIMODAL_TOKENS = ("<image>", "<video>")
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def _learn_merges(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Plain BPE training with a deterministic tie-break (most frequent pair, then the smallest pair)."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = collections.Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[byte]: byte for byte in range(256)}
    splits = {word: list(word) for word in words}
    merges = []
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in vocab:
            vocab[merged] = len(vocab)
        for word, symbols in splits.items():
            index, out = 0, []
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    out.append(merged)
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            splits[word] = out
    return vocab, merges


def build_tiny_qwen2_tokenizer(save_dir: str | os.PathLike | None = None, add_multimodal_tokens: bool = True):
    """
    Builds the tiny Qwen2 tokenizer (a `transformers.Qwen2Tokenizer`), identical on every call.

    Args:
        save_dir: if given, the tokenizer is also saved there with `save_pretrained` (tokenizer.json,
            tokenizer_config.json), so `AutoTokenizer.from_pretrained(save_dir)` loads it back.
        add_multimodal_tokens: add `<image>` and `<video>` (special added tokens, `normalized=False`, no strip).

    Layout: ids 0..255 are bytes, then the learnt merges, then `<|endoftext|>` (also pad), `<|im_start|>`, `<|im_end|>`
    (also eos), then `<image>` = `len(tokenizer)` before it was added, then `<video>`. No bos token, as in Qwen2.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _learn_merges(CORPUS, NUM_MERGES)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False) for token in SPECIAL_TOKENS],
        special_tokens=True,
    )
    if add_multimodal_tokens:
        for token in MULTIMODAL_TOKENS:
            tokenizer.add_tokens(
                [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)], special_tokens=True
            )
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer
