"""
tiny_cli: the tiny tokenizer (trained by the `tokenizers` library, wrapped as transformers' Qwen2Tokenizer), the tiny
CLI model builders and CLI-7B's parameter table.

References: transformers' own Qwen2 pre-tokenizer pattern, a plain BPE merge loop written below (the merges applied by
rank to one pre-token), and parameter counts written out from CLI-7B's dimensions.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import tiny_cli
from tiny_cli import build_tiny_tokenizer, tiny_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat color is the "
    "triangle? How many squares are there?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n"
)


def plain_bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """BPE on one pre-token: repeatedly merge the adjacent pair of lowest rank (the reference for the wrapper)."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    symbols = list(word)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), index) for index, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
    return symbols


def test_import_is_light_and_the_bpe_is_the_same_in_every_process():
    code = textwrap.dedent(
        """
        import hashlib, json, sys
        import tiny_cli
        tokenizer = tiny_cli.tiny_bpe_tokenizer()
        heavy = [name for name in ("torch", "transformers", "configuration_cli", "processing_cli") if name in sys.modules]
        print(json.dumps({"heavy": heavy, "sha": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported["heavy"] == []  # benchmarks build checkpoints with it without importing torch or transformers
    assert reported["sha"] == hashlib.sha256(tiny_bpe_tokenizer().to_str().encode()).hexdigest()


def test_tiny_tokenizer_is_a_deterministic_qwen2_tokenizer(tmp_path):
    first, second = build_tiny_tokenizer(tmp_path), build_tiny_tokenizer()
    assert type(first).__name__ == "Qwen2Tokenizer"
    assert first.get_vocab() == second.get_vocab()
    bpe = tiny_bpe_tokenizer()
    # Qwen2's layout: the BPE vocabulary, then <|endoftext|>, <|im_start|>, <|im_end|>, then <image>, <video>
    ids = first.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    assert ids == list(range(bpe.get_vocab_size() - 3, bpe.get_vocab_size() + 2))
    assert ids[3] == len(first) - 2 and len(first) == bpe.get_vocab_size() + 2
    assert first.eos_token == "<|im_end|>" and first.pad_token == "<|endoftext|>" and first.bos_token is None
    assert first.eos_token_id == ids[2] and first.pad_token_id == ids[0]
    for token_id in ids:
        added = first.added_tokens_decoder[token_id]
        assert added.special and not added.normalized and not added.lstrip and not added.rstrip
    assert first.decode(first(CHAT).input_ids) == CHAT
    assert first.tokenize("<image><image>\n") == ["<image>", "<image>", "Ċ"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "Qwen2Tokenizer" and reloaded(CHAT).input_ids == first(CHAT).input_ids
    # the tokenizers-only tokenizer (what benchmarks save) encodes like the transformers one
    without_image = CHAT.replace("<image>\n", "")
    assert bpe.encode(without_image).ids == first(without_image).input_ids


def test_the_bpe_is_qwen2_pre_tokenization_plus_merges_run_to_completion():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert tiny_cli.QWEN2_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    tokenizer = build_tiny_tokenizer()
    trained = json.loads(tiny_bpe_tokenizer().to_str())
    merges = [tuple(merge) for merge in trained["model"]["merges"]]
    assert len(trained["model"]["vocab"]) == 256 + len(merges)  # the byte alphabet, then one token per merge
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    corpus = tiny_cli.TINY_CORPUS + tiny_cli.SHAPES_CORPUS
    for token in tiny_cli.SPECIAL_TOKENS + tiny_cli.MULTIMODAL_TOKENS:  # never part of BPE training
        corpus = corpus.replace(token, "\0")
    corpus_words = {piece for text in corpus.split("\0") for piece, _ in pre_tokenizer.pre_tokenize_str(text)}
    assert {"Ġcircle", "Ġtriangles", "Ġcolor", "blue", "yellow", "Ġleft"} <= corpus_words
    for word in sorted(corpus_words):
        assert plain_bpe(word, merges) == [word], word  # run to completion: every corpus word is a single token
    for text in (*corpus.split("\0"), "What colour is the purple hexagon?", "Thirty-two zebras, 1998 ünïcödé"):
        expected = [token for piece, _ in pre_tokenizer.pre_tokenize_str(text) for token in plain_bpe(piece, merges)]
        assert tokenizer.tokenize(text) == expected


def test_tiny_cli_model_matches_its_tokenizer_and_processor():
    model, processor = tiny_cli.build_tiny_cli(seed=0)
    tokenizer = processor.tokenizer
    config = model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<video>")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert processor.num_image_tokens == (tiny_cli.TINY_IMAGE_SIZE // tiny_cli.TINY_PATCH_SIZE) ** 2


def test_cli_7b_trainable_summary_from_the_config_alone():
    pytest.importorskip("peft")
    summary = tiny_cli.summary_7b("cli")
    d, dv, r, k, j = 3584, 1152, 16, 7, 7
    assert summary["amp"] == (k * r * (dv + d),) * 2
    agf_layer = 2 * d + 2 * 4 * (d * d + d) + 2 * d + k
    assert summary["agf"] == (j * agf_layer,) * 2
    assert summary["llm"][0] == summary["vision_tower"][0] == summary["projector"][0] == 0
    assert summary["llm"][1] == 7_615_616_512  # Qwen2-7B
    assert summary["projector"][1] == dv * d + d + d * d + d + d  # mlp2x_gelu + image_newline
    table = tiny_cli.format_summary_table({"cli": summary, "all": tiny_cli.summary_7b("all")})
    assert "agf" in table and "% trainable" in table
    print(table)
