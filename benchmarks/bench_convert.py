# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Benchmark of convert_checkpoint.py: streaming conversion vs a naive load-everything conversion.

Builds a synthetic checkpoint in the LLaVA-NeXT fork layout (random bf16 weights, `mm_*` config, tiny Qwen2 tokenizer)
of about `--size-gb` GB in a temporary folder, then converts it twice, each in a fresh subprocess:

- streaming: `python convert_checkpoint.py --input SRC --output DST --init-cli ...` (tensor by tensor);
- naive: load every source tensor into memory (`safetensors.torch.load_file`), rename the keys, build
  `CLIForConditionalGeneration` in bf16, `load_state_dict`, `save_pretrained` — the usual quick conversion script.

Reports per method the wall time of the process, the time of the conversion itself (imports excluded), the output
throughput in MB/s (output bytes / conversion time) and the peak RSS of the child (`ru_maxrss` from `os.wait4`), plus
the output shard size; checks that both outputs hold the same base weights. Everything is deleted at the end.

    python benchmarks/bench_convert.py                     # ~2.5 GB, table
    python benchmarks/bench_convert.py --size-gb 6 --json  # JSON on stdout

Notes: the source was just written, so it is read from the page cache in both runs (the same for both methods). The
parent process imports nothing heavy (the checkpoint is built and compared in children too): Linux keeps a process's
`ru_maxrss` across `exec`, so a child forked from a big parent would report the parent's RSS as its peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def architecture(size_bytes: float) -> tuple[dict, dict]:
    """Vision (SigLIP) and text (Qwen2) sizes: so400m + a 2048-wide Qwen2 for GB sizes, tiny ones below 0.5 GB."""
    if size_bytes >= 5e8:
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      image_size=384, patch_size=14)
        text = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=2,
                    vocab_size=32768)
    else:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=28,
                      patch_size=7)
        text = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=1024)
    fixed = sum(math.prod(s) for s in fork_shapes(vision, dict(text, num_hidden_layers=0)).values()) * 2
    per_layer = sum(math.prod(s) for s in text_layer_shapes(text, 0).values()) * 2
    text["num_hidden_layers"] = max(2, round((size_bytes - fixed) / per_layer))
    return vision, text


def text_layer_shapes(text: dict, i: int) -> dict[str, tuple]:
    d, f = text["hidden_size"], text["intermediate_size"]
    kv = d // text["num_attention_heads"] * text["num_key_value_heads"]
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
        p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (d, d),
        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
    }


def fork_shapes(vision: dict, text: dict) -> dict[str, tuple]:
    """Every tensor of an untied LLaVA-OneVision checkpoint in the fork's key layout."""
    dv, fv, d = vision["hidden_size"], vision["intermediate_size"], text["hidden_size"]
    v = "model.vision_tower.vision_tower.vision_model."
    shapes = {
        v + "embeddings.patch_embedding.weight": (dv, 3, vision["patch_size"], vision["patch_size"]),
        v + "embeddings.patch_embedding.bias": (dv,),
        v + "embeddings.position_embedding.weight": ((vision["image_size"] // vision["patch_size"]) ** 2, dv),
    }
    for i in range(vision["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{name}.weight"], shapes[f"{p}self_attn.{name}.bias"] = (dv, dv), (dv,)
        shapes.update({p + "mlp.fc1.weight": (fv, dv), p + "mlp.fc1.bias": (fv,), p + "mlp.fc2.weight": (dv, fv),
                       p + "mlp.fc2.bias": (dv,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"], shapes[f"{p}{norm}.bias"] = (dv,), (dv,)
    shapes[v + "post_layernorm.weight"], shapes[v + "post_layernorm.bias"] = (dv,), (dv,)
    shapes.update({"model.mm_projector.0.weight": (d, dv), "model.mm_projector.0.bias": (d,),
                   "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,),
                   "model.image_newline": (d,), "model.embed_tokens.weight": (text["vocab_size"], d)})
    for i in range(text["num_hidden_layers"]):
        shapes.update(text_layer_shapes(text, i))
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (text["vocab_size"], d)
    return shapes


def build_source(folder: Path, size_gb: float, shard_gb: float) -> dict:
    """Writes the synthetic fork checkpoint shard by shard (one source shard in memory at a time)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    vision, text = architecture(size_gb * 1e9)
    shapes = fork_shapes(vision, text)
    generator = torch.Generator().manual_seed(0)
    shards, current, current_bytes = [], {}, 0  # shards: the tensor names of each written shard
    for i, (name, shape) in enumerate(shapes.items()):
        current[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current_bytes += current[name].numel() * 2
        if current_bytes >= shard_gb * 1e9 or i == len(shapes) - 1:
            save_file(current, folder / f"shard-{len(shards) + 1}.safetensors", metadata={"format": "pt"})
            shards.append(list(current))
            current, current_bytes = {}, 0
    count = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        new_name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(folder / f"shard-{i + 1}.safetensors", folder / new_name)
        weight_map.update({name: new_name for name in names})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "torch_dtype": "bfloat16",
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size")},
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": False, "use_sliding_window": False,
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_layer": -2,
        "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": "(1x1),...,(6x6)",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_qwen2_tokenizer(folder)
    return {"bytes": total, "tensors": len(shapes), "source_shards": count, "vision": vision, "text": text}


def write_qwen2_tokenizer(folder: Path) -> None:
    """
    The tiny Qwen2-layout tokenizer of `tiny_cli` (byte-level BPE trained by `tokenizers`, then <|endoftext|>,
    <|im_start|>, <|im_end|>; no <image>, as LLaVA-NeXT saves it), written with the `tokenizers` library alone
    (importing transformers would add seconds to the build step).
    """
    from tiny_cli import tiny_bpe_tokenizer

    tiny_bpe_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def run_child(command: list[str]) -> dict:
    """Runs a child process; returns its wall time, peak RSS (MB, from wait4) and output."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


def output_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def same_base_weights(a: Path, b: Path) -> bool:
    """Both outputs hold the same tensor names, and equal tensors outside the (randomly initialised) CLI modules."""
    import torch
    from safetensors import safe_open

    def index(folder):
        mapping = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, framework="pt") as handle:
                mapping.update({k: file for k in handle.keys()})
        return mapping

    left, right = index(a), index(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        if name.startswith("model.amp.") or ".agf." in name:
            continue
        with safe_open(left[name], framework="pt") as x, safe_open(right[name], framework="pt") as y:
            if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                return False
    return True


def naive_child(src: str, dst: str, vision_json: str, max_shard_size: str) -> None:
    """The load-everything conversion (run in a child process by the benchmark)."""
    import convert_checkpoint as cc
    import torch
    from safetensors.torch import load_file

    from modeling_cli import CLIForConditionalGeneration

    start = time.perf_counter()
    source = Path(src)
    args = cc.build_parser().parse_args(["--input", src, "--output", dst, "--init-cli", "--vision-config", vision_json])
    config = cc.build_fork_config(cc.read_source_config(source), args, json.loads(vision_json))
    tokenizer = cc.load_tokenizer(source)
    config.image_token_id, config.video_token_id = cc.tokenizer_ids(tokenizer, config)
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))  # the whole checkpoint in memory
    rules = [(re.compile(regex), repl) for _, regex, repl in cc.FORK_RULES if repl is not None]
    renamed = {}
    for name, tensor in state.items():
        pattern, repl = next((p, r) for p, r in rules if p.fullmatch(name))
        renamed[pattern.sub(repl, name)] = tensor
    del state
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    model = CLIForConditionalGeneration(config)
    torch.set_default_dtype(default)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all(k.startswith("model.amp.") or ".agf." in k for k in missing), (missing, unexpected)
    del renamed
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    print(json.dumps({"core_s": time.perf_counter() - start}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.5, help="source checkpoint size in GB (default 2.5)")
    parser.add_argument("--source-shard-gb", type=float, default=1.0, help="source shard size in GB")
    parser.add_argument("--max-shard-size", default="1GB", help="output shard size of both conversions")
    parser.add_argument("--workdir", help="where the temporary folder goes (default: the system temp dir)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # build | naive | compare, run by the parent
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            info = build_source(Path(rest[0]), float(rest[1]), float(rest[2]))
            print(json.dumps(info))
        elif kind == "naive":
            naive_child(*rest)
        elif kind == "compare":
            print(json.dumps(same_base_weights(Path(rest[0]), Path(rest[1]))))
        return 0

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    this = str(Path(__file__).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        start = time.perf_counter()
        built = run_child([sys.executable, this, "--child", "build", str(work / "src"), str(args.size_gb),
                           str(min(args.source_shard_gb, args.size_gb / 2))])
        source = json.loads(built["stdout"].strip().splitlines()[-1])
        log(f"built a {source['bytes'] / 1e9:.2f} GB fork-layout checkpoint ({source['tensors']} tensors, "
            f"{source['source_shards']} shards, {source['text']['num_hidden_layers']} LLM layers) in "
            f"{time.perf_counter() - start:.1f} s")
        vision_json = json.dumps(source["vision"])
        runs = []

        streaming = run_child([
            sys.executable, str(ROOT / "convert_checkpoint.py"), "--input", str(work / "src"), "--output",
            str(work / "streaming"), "--init-cli", "--vision-config", vision_json, "--max-shard-size",
            args.max_shard_size, "--no-progress",
        ])
        match = re.search(r"Saved .* \(([\d.]+) s in all\)", streaming["stdout"])
        streaming["core_s"] = float(match.group(1)) if match else streaming["wall_s"]
        runs.append(("streaming", streaming, work / "streaming"))
        log(f"streaming: {streaming['wall_s']:.1f} s, peak RSS {streaming['peak_rss_mb']:.0f} MB")

        naive = run_child([sys.executable, this, "--child", "naive", str(work / "src"), str(work / "naive"),
                           vision_json, args.max_shard_size])
        naive["core_s"] = json.loads(naive["stdout"].strip().splitlines()[-1])["core_s"]
        runs.append(("naive", naive, work / "naive"))
        log(f"naive: {naive['wall_s']:.1f} s, peak RSS {naive['peak_rss_mb']:.0f} MB")

        report = {
            "source_gb": round(source["bytes"] / 1e9, 3),
            "source_tensors": source["tensors"],
            "output_shard_size": args.max_shard_size,
            "cpu_count": os.cpu_count(),
            "runs": [],
            "outputs_identical": json.loads(run_child(
                [sys.executable, this, "--child", "compare", str(work / "streaming"), str(work / "naive")]
            )["stdout"].strip().splitlines()[-1]),
        }
        for method, result, folder in runs:
            size = output_bytes(folder)
            report["runs"].append({
                "method": method,
                "output_gb": round(size / 1e9, 3),
                "output_shards": len(list(folder.glob("*.safetensors"))),
                "wall_s": round(result["wall_s"], 2),
                "core_s": round(result["core_s"], 2),
                "mb_per_s": round(size / 1e6 / max(result["core_s"], 1e-9), 1),
                "peak_rss_mb": round(result["peak_rss_mb"], 1),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"\nsource {report['source_gb']} GB ({report['source_tensors']} tensors), output shards <= "
              f"{report['output_shard_size']}, {report['cpu_count']} CPUs; base weights identical: "
              f"{report['outputs_identical']}")
        header = f"{'method':<10}{'output GB':>10}{'shards':>8}{'wall s':>9}{'convert s':>11}{'MB/s':>9}"
        print(header + f"{'peak RSS MB':>13}")
        for r in report["runs"]:
            print(f"{r['method']:<10}{r['output_gb']:>10}{r['output_shards']:>8}{r['wall_s']:>9}{r['core_s']:>11}"
                  f"{r['mb_per_s']:>9}{r['peak_rss_mb']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
