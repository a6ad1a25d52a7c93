# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
CLI served by transformers' own OpenAI-compatible server (examples/serve.py) against transformers' own
`LlavaOnevisionForConditionalGeneration` holding the same base weights, served by the same server (`transformers
serve`): requests/s, generated tokens/s and p50/p95 latency at several concurrencies, and the CLI / native ratios.

    python benchmarks/bench_serve.py                          # shapes + bench models, concurrency 1,4,8, a few minutes
    python benchmarks/bench_serve.py --models shapes --requests 8 --repeats 1     # the bundled model only, quick
    python benchmarks/bench_serve.py --json serve_results.json --device cuda --dtype bfloat16

Models: `shapes` is the bundled examples/shapes/model (1.1 M parameters, 48 x 48 images, 4 + 1 image tokens: the
server's own overhead dominates); `bench` is bench_overhead.py's `BENCH` model (CLI-7B's proportions, widths / 8,
126 M parameters, AMP's LoRA `B` and AGF's gates random and non-zero; 384 x 384 images: 2 crops, 300 image tokens).
The native twin of each is written next to it with the same base weights (`.amp.` / `.agf.` weights dropped) and
CLI's own processor (the same prompt, image tokens and pixels; transformers' LLaVA-OneVision processor needs
torchvision for its video processor), so the two servers differ in the model class alone.

Both servers run at once (one process each, `OMP_NUM_THREADS=--threads`); every request asks a shapes question about
its own image and generates exactly `--new-tokens` tokens (`min_new_tokens` through the request's `generation_config`,
greedy). For each concurrency `c`, `--requests` requests go out from `c` client threads (the `openai` client); the
(variant, concurrency) runs are interleaved, their order rotating every repeat, after one warm-up request per server;
figures are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks", ROOT / "examples" / "shapes"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHAPES_MODEL = ROOT / "examples" / "shapes" / "model"
CONCURRENCY = (1, 4, 8)


# --------------------------------------------------------------------------------------------------------------------
# model folders


def build_bench_cli(folder: Path) -> Path:
    """bench_overhead's BENCH model (random, CLI modules non-zero) with the shapes tokenizer and a 384-pixel processor."""
    import torch
    from bench_overhead import BENCH, build_config, randomize_cli_modules
    from processing_cli import CLIImageProcessor, CLIProcessor
    from training_cli import save_cli_folder
    from transformers import AutoTokenizer

    from modeling_cli import CLIForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(SHAPES_MODEL, trust_remote_code=True)  # the bundled folder
    config = build_config(BENCH)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    torch.manual_seed(0)
    model = CLIForConditionalGeneration(config).eval()
    randomize_cli_modules(model)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tile = BENCH["image_size"]
    processor = CLIProcessor(
        image_processor=CLIImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer,
        num_image_tokens=(tile // BENCH["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return Path(save_cli_folder(model, processor, folder))


def write_native_twin(cli_folder: Path, folder: Path) -> Path:
    """transformers' `LlavaOnevisionForConditionalGeneration` with the CLI folder's base weights, and its processor."""
    import shutil

    from bench_overhead import native_twin
    from processing_cli import CLIProcessor

    from modeling_cli import CLIForConditionalGeneration

    cli = CLIForConditionalGeneration.from_pretrained(cli_folder).eval()
    native = native_twin(cli)
    native.generation_config = cli.generation_config
    native.save_pretrained(folder)
    CLIProcessor.from_pretrained(cli_folder, trust_remote_code=True).save_pretrained(folder)
    shutil.copyfile(ROOT / "processing_cli.py", folder / "processing_cli.py")
    for name in ("processor_config.json", "tokenizer_config.json"):  # the processor is CLI's, from this folder's copy
        config = json.loads((folder / name).read_text())
        config["auto_map"] = {"AutoProcessor": "processing_cli.CLIProcessor"}
        if name == "processor_config.json":
            config["image_processor"]["auto_map"] = {"AutoImageProcessor": "processing_cli.CLIImageProcessor"}
        (folder / name).write_text(json.dumps(config, indent=2))
    assert "auto_map" not in json.loads((folder / "config.json").read_text())  # the model class is transformers' own
    return folder


def request_images(model: str, count: int) -> list[tuple[str, str]]:
    """`(data URL, question)` pairs: shapes scenes, at 384 x 384 for the bench model."""
    from PIL import Image
    from shapes_data import generate_examples

    pairs = []
    for example in generate_examples(count, seed=1):
        image = example["images"][0]
        if model == "bench":
            image = image.resize((384, 384), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pairs.append(("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), example["question"]))
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# servers and load


class Server:
    """One server subprocess on 127.0.0.1: examples/serve.py for CLI, `transformers serve` for the native model."""

    def __init__(self, variant: str, folder: Path, port: int, args, log_dir: Path):
        if variant == "cli":
            command = [sys.executable, str(ROOT / "examples" / "serve.py"), str(folder)]
        else:
            command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--trust-remote-code"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--device", args.device, "--dtype", args.dtype]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
        self.model, self.base_url = str(folder), f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{variant}-{port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                    if json.load(response).get("status") == "ok":
                        return
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(base_url: str, model: str, prompts: list[tuple[str, str]], concurrency: int, new_tokens: int) -> dict:
    """
    Sends every prompt (one image + question) from `concurrency` client threads and returns requests/s, generated
    tokens/s (the servers' `usage.completion_tokens`), latency p50/p95 (seconds) and the answers.
    """
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=600, max_retries=0)
    generation_config = json.dumps({"min_new_tokens": new_tokens, "do_sample": False})

    def one(prompt):
        url, question = prompt
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question}]}],
            max_tokens=new_tokens,
            extra_body={"generation_config": generation_config},
        )
        return time.perf_counter() - start, response.usage.completion_tokens, response.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    latencies = sorted(latency for latency, _, _ in results)
    tokens = sum(count for _, count, _ in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "generated_tokens": tokens,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "answers": [answer for _, _, answer in results],
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


METRICS = ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s")


def run_model(model: str, folders: dict, args, log_dir: Path) -> list[dict]:
    import socket

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    servers = {variant: Server(variant, folder, free_port(), args, log_dir) for variant, folder in folders.items()}
    try:
        for server in servers.values():
            server.wait_ready()
        prompts = request_images(model, args.requests)
        for server in servers.values():  # warm-up
            measure(server.base_url, server.model, prompts[:1], 1, args.new_tokens)
        runs = [(variant, c) for c in args.concurrency for variant in servers]
        samples = {run: [] for run in runs}
        for repeat in range(args.repeats):
            shift = repeat % len(runs)
            for variant, c in runs[shift:] + runs[:shift]:
                server = servers[variant]
                samples[(variant, c)].append(measure(server.base_url, server.model, prompts, c, args.new_tokens))
                assert all(s["generated_tokens"] == args.requests * args.new_tokens for s in samples[(variant, c)])
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for c in args.concurrency:
        row = {"model": model, "concurrency": c}
        for variant in servers:
            row[variant] = {metric: statistics.median(s[metric] for s in samples[(variant, c)]) for metric in METRICS}
        row["cli_over_native"] = {metric: row["cli"][metric] / row["native"][metric] for metric in METRICS}
        # the same ratio within each repeat (the two runs were adjacent in time): how much the machine moved
        per_repeat = [{metric: cli[metric] / native[metric] for metric in METRICS}
                      for cli, native in zip(samples[("cli", c)], samples[("native", c)])]
        row["ratio_range"] = {metric: [min(r[metric] for r in per_repeat), max(r[metric] for r in per_repeat)]
                              for metric in METRICS}
        row["samples"] = {variant: [{k: v for k, v in s.items() if k != "answers"} for s in samples[(variant, c)]]
                          for variant in servers}
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | c | req/s CLI / native | tok/s CLI / native | p50 s CLI / native | p95 s CLI / native "
          "| CLI / native req/s (= tok/s) [per-repeat range] | p50 ratio [range] | p95 ratio [range] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def ratio(row, metric):
        low, high = row["ratio_range"][metric]
        return f"{row['cli_over_native'][metric]:.2f} [{low:.2f}-{high:.2f}]"

    for row in rows:
        cli, native = row["cli"], row["native"]
        print(
            f"| {row['model']} | {row['concurrency']} | {cli['requests_per_s']:.2f} / {native['requests_per_s']:.2f} "
            f"| {cli['tokens_per_s']:.1f} / {native['tokens_per_s']:.1f} "
            f"| {cli['latency_p50_s']:.3f} / {native['latency_p50_s']:.3f} "
            f"| {cli['latency_p95_s']:.3f} / {native['latency_p95_s']:.3f} "
            f"| {ratio(row, 'requests_per_s')} | {ratio(row, 'latency_p50_s')} | {ratio(row, 'latency_p95_s')} |"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes,bench", help="comma-separated: shapes, bench")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--requests", type=int, default=8, help="requests per (variant, concurrency) run")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens every request generates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    unknown = set(args.models) - {"shapes", "bench"}
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; choose from shapes, bench")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmp = Path(tmp)
        for model in args.models:
            cli_folder = SHAPES_MODEL if model == "shapes" else build_bench_cli(tmp / "bench-cli")
            native_folder = write_native_twin(cli_folder, tmp / f"{model}-native")
            rows += run_model(model, {"cli": cli_folder, "native": native_folder}, args, tmp)
    print_table(rows)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_end": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
