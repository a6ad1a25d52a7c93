"""
convert_checkpoint.py on synthetic checkpoints built from tiny random models: the LLaVA-NeXT fork layout (tied and
untied, single file and sharded, string and list pinpoints, fp32 and bf16), CLI weights under an invented fork naming
placed with --key-map, the llava-hf layouts (4.x and 5.x keys), and the error cases (nothing written, temp dir gone).
The reference is transformers' own LlavaOnevisionForConditionalGeneration with the source's weights.
"""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers_convert import (
    env_with_repo,
    fork_config,
    make_fork_checkpoint,
    make_llava_hf_checkpoint,
    tiny_source_model,
    vision_config_arg,
)
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_cli import build_tiny_tokenizer
from tiny_models import native_twin, randomize_cli_modules
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TOKENIZER = build_tiny_tokenizer(add_multimodal_tokens=False)  # what the synthetic sources carry
IMAGE_ID = len(SOURCE_TOKENIZER)  # the converter appends <image> (then <video>) to it, as LLaVA-NeXT does
VOCAB = IMAGE_ID + 14  # embedding rows beyond the tokenizer, as Qwen2's 152064 > 151646
# (height, width) sizes where LLaVA-NeXT's truncating unpad and transformers' rounding agree (see test_modeling.py)
SIZES = [(28, 28), (50, 90), (168, 168)]


def run(*args) -> int:
    return convert_checkpoint.main([str(a) for a in args] + ["--no-progress"])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def image_inputs(model, size, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    crops = image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    pixel_values = torch.randn(1, crops, 3, 28, 28, generator=generator).to(dtype)
    image_sizes = torch.tensor([size])
    num = model.model.get_image_features(pixel_values, image_sizes).pooler_output[0].shape[0]
    input_ids = torch.tensor([[1, 2, 3] + [IMAGE_ID] * num + [4, 5, 6, 7]])
    return {"input_ids": input_ids, "pixel_values": pixel_values, "image_sizes": image_sizes}


def load_converted(folder: Path, dtype=torch.float32):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def untied():
    return tiny_source_model(VOCAB, IMAGE_ID, tied=False, seed=0)


@pytest.fixture(scope="module")
def fork_fp32(tmp_path_factory, untied):
    return make_fork_checkpoint(tmp_path_factory.mktemp("fork_fp32") / "src", untied, num_shards=1)


# ----------------------------------------------------------------------------------------------------------------------
# the fork layout: logits equal transformers' LLaVA-OneVision


def test_fork_fp32_single_file_matches_native(fork_fp32, untied, tmp_path):
    out = tmp_path / "cli"
    assert run("--input", fork_fp32, "--output", out, "--init-cli", "--vision-config", vision_config_arg()) == 0
    assert not leftovers(tmp_path)

    names = {p.name for p in out.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "README.md", "processor_config.json",
                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     *convert_checkpoint.REMOTE_CODE_FILES):
        assert required in names, (required, names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "cli"
    assert config["auto_map"]["AutoModel"] == "modeling_cli.CLIForConditionalGeneration"
    # the layer lists come from the source's vision_exp_layers / vlm_exp_layers
    assert config["vision_extraction_layers"] == [1, 3, 5] and config["llm_injection_layers"] == [1, 3]
    assert config["image_token_index"] == IMAGE_ID and config["video_token_index"] == IMAGE_ID + 1
    assert config["dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == SOURCE_TOKENIZER.convert_tokens_to_ids("<|im_end|>")
    assert generation["pad_token_id"] == SOURCE_TOKENIZER.convert_tokens_to_ids("<|endoftext|>")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert "- custom_code" in card and "trust_remote_code=True" in card and "[1, 3, 5]" in card

    # identity initialisation: gates and LoRA B exactly zero
    weights = read_weights(out)
    assert all(weights[k].dtype == torch.float32 for k in weights)
    for name, tensor in weights.items():
        if name.endswith(("readout_vector", "gate_bias", "amp.lora_B")):
            assert torch.count_nonzero(tensor) == 0, name

    converted, native = load_converted(out), native_twin(untied)
    for size in SIZES:
        inputs = image_inputs(native, size)
        with torch.no_grad():
            expected = native(**inputs).logits
            got = converted(**inputs).logits
        assert (expected - got).abs().max() <= 1e-5, size

    # deterministic: a second conversion (other sharding) gives bitwise identical tensors
    out2 = tmp_path / "cli2"
    assert run("--input", fork_fp32, "--output", out2, "--init-cli", "--vision-config", vision_config_arg(),
               "--max-shard-size", "200KB") == 0
    assert (out2 / "model.safetensors.index.json").is_file()
    weights2 = read_weights(out2)
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_fork_bf16_tied_sharded_fresh_process(tmp_path):
    """bf16, tied embeddings, 3 source shards + index, list pinpoints; loaded with AutoModel/AutoProcessor offline."""
    model = tiny_source_model(VOCAB, IMAGE_ID, tied=True, seed=1)
    src = make_fork_checkpoint(tmp_path / "src", model, num_shards=3, dtype=torch.bfloat16, pinpoints="list")
    out = tmp_path / "out" / "cli"  # parent folder created on the way
    assert run("--input", src, "--output", out, "--init-cli", "--vision-config", vision_config_arg(),
               "--max-shard-size", "300KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    for file in set(index["weight_map"].values()):
        with safe_open(out / file, framework="pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}

    script = r"""
import sys, torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor
folder = sys.argv[1]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
assert type(model).__name__ == "CLIForConditionalGeneration" and model.dtype == torch.bfloat16, model.dtype
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.new("RGB", (90, 50), (200, 30, 60))
inputs = processor(images=image, text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
save_file({"logits": logits.float(), "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
           "image_sizes": inputs["image_sizes"]}, sys.argv[2])
"""
    result = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "result.safetensors")],
                            env=env_with_repo(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = load_file(tmp_path / "result.safetensors")
    assert (fresh["input_ids"] == IMAGE_ID).sum() > 16

    native = native_twin(model)
    with torch.no_grad():
        for param in native.parameters():  # the source's bf16 weights; buffers stay fp32 as from_pretrained keeps them
            param.data = param.data.to(torch.bfloat16)
        expected = native(
            input_ids=fresh["input_ids"], pixel_values=fresh["pixel_values"].to(torch.bfloat16),
            image_sizes=fresh["image_sizes"],
        ).logits.float()
    assert (expected - fresh["logits"]).abs().max() == 0  # same dtype, same ops


def test_dtype_option_casts(fork_fp32, tmp_path):
    out = tmp_path / "cli"
    assert run("--input", fork_fp32, "--output", out, "--init-cli", "--vision-config", vision_config_arg(),
               "--dtype", "bfloat16") == 0
    weights = read_weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    source = load_file(fork_fp32 / "model.safetensors")
    assert torch.equal(weights["model.language_model.norm.weight"], source["model.norm.weight"].to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------------------
# CLI weights under a fork naming, placed with --key-map

KEY_MAP = [
    [r"model\.cli\.amp\.(\d+)\.lora_A\.weight", r"model.amp.lora_A[@\1]"],
    [r"model\.cli\.amp\.(\d+)\.lora_B\.weight", r"model.amp.lora_B[@\1]"],
    [r"model\.cli\.agf\.(\d+)\.query_v", r"model.language_model.agf.{inj:\1}.vision_attention.query_vector"],
    [r"model\.cli\.agf\.(\d+)\.query_h", r"model.language_model.agf.{inj:\1}.context_attention.query_vector"],
    [r"model\.cli\.agf\.(\d+)\.mha_v\.in_proj_(weight|bias)",
     [r"model.language_model.agf.{inj:\1}.vision_attention.query_\2",
      r"model.language_model.agf.{inj:\1}.vision_attention.key_\2",
      r"model.language_model.agf.{inj:\1}.vision_attention.value_\2"]],
    [r"model\.cli\.agf\.(\d+)\.mha_v\.out_proj\.(weight|bias)",
     r"model.language_model.agf.{inj:\1}.vision_attention.output_\2"],
    [r"model\.cli\.agf\.(\d+)\.mha_h\.in_proj_(weight|bias)",
     [r"model.language_model.agf.{inj:\1}.context_attention.query_\2",
      r"model.language_model.agf.{inj:\1}.context_attention.key_\2",
      r"model.language_model.agf.{inj:\1}.context_attention.value_\2"]],
    [r"model\.cli\.agf\.(\d+)\.mha_h\.out_proj\.(weight|bias)",
     r"model.language_model.agf.{inj:\1}.context_attention.output_\2"],
    [r"model\.cli\.agf\.(\d+)\.gate_weight",
     [r"model.language_model.agf.{inj:\1}.vision_attention.readout_vector",
      r"model.language_model.agf.{inj:\1}.context_attention.readout_vector"]],
    [r"model\.cli\.agf\.(\d+)\.gate_bias", r"model.language_model.agf.{inj:\1}.gate_bias"],
    [r"model\.cli\.agf\.(\d+)\.num_updates", None],
]


def fork_cli_tensors(model) -> dict[str, torch.Tensor]:
    """The trained CLI modules of `model` under an invented fork naming: per-layer LoRA, fused MHA in_proj."""
    state, config = model.state_dict(), model.config
    tensors = {}
    for slot, layer in enumerate(config.vision_extraction_layers):  # numbered by vision layer
        tensors[f"model.cli.amp.{layer}.lora_A.weight"] = state["model.amp.lora_A"][slot].clone()
        tensors[f"model.cli.amp.{layer}.lora_B.weight"] = state["model.amp.lora_B"][slot].clone()
    for position, layer in enumerate(config.llm_injection_layers):  # numbered 0..J-1
        prefix = f"model.language_model.agf.{layer}."
        tensors[f"model.cli.agf.{position}.query_v"] = state[prefix + "vision_attention.query_vector"]
        tensors[f"model.cli.agf.{position}.query_h"] = state[prefix + "context_attention.query_vector"]
        for short, name in (("v", "vision_attention"), ("h", "context_attention")):
            for kind in ("weight", "bias"):
                fused = torch.cat([state[f"{prefix}{name}.{p}_{kind}"] for p in ("query", "key", "value")])
                tensors[f"model.cli.agf.{position}.mha_{short}.in_proj_{kind}"] = fused
                output = state[f"{prefix}{name}.output_{kind}"]
                tensors[f"model.cli.agf.{position}.mha_{short}.out_proj.{kind}"] = output
        readouts = [state[f"{prefix}{name}.readout_vector"] for name in ("vision_attention", "context_attention")]
        tensors[f"model.cli.agf.{position}.gate_weight"] = torch.cat(readouts)  # one Linear(2d, 1)-like vector
        tensors[f"model.cli.agf.{position}.gate_bias"] = state[prefix + "gate_bias"]
        tensors[f"model.cli.agf.{position}.num_updates"] = torch.tensor(1000)
    return {k: v.contiguous() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_source_model(VOCAB, IMAGE_ID, tied=False, seed=2)
    randomize_cli_modules(model)
    src = make_fork_checkpoint(tmp_path_factory.mktemp("trained") / "src", model, num_shards=2,
                               extra=fork_cli_tensors(model))
    key_map = src.parent / "key_map.json"
    key_map.write_text(json.dumps(KEY_MAP))
    return model, src, key_map


def test_key_map_places_trained_cli_weights(trained, tmp_path, capsys):
    model, src, key_map = trained
    out = tmp_path / "cli"
    assert run("--input", src, "--output", out, "--key-map", key_map, "--amp-lora-rank", 4,
               "--vision-config", vision_config_arg()) == 0
    log = capsys.readouterr().out
    assert "[--key-map #5]" in log and "Dropped source keys" in log and "Identity-initialised" not in log
    weights = read_weights(out)
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in weights)

    converted = load_converted(out)
    for size in SIZES[1:]:
        inputs = image_inputs(model, size)
        with torch.no_grad():
            expected = model(**inputs, output_gate_weights=True)
            got = converted(**inputs, output_gate_weights=True)
        assert expected.gate_weights.abs().min() > 0  # the injection really runs
        assert (expected.logits - got.logits).abs().max() <= 1e-5


def test_cli_keys_without_key_map_fail_grouped(trained, tmp_path, capsys):
    _, src, _ = trained
    out = tmp_path / "cli"
    assert run("--input", src, "--output", out, "--init-cli", "--vision-config", vision_config_arg()) == 1
    err = capsys.readouterr().err
    assert "unknown source keys" in err and "nothing was written" in err
    assert re.search(r"model\.cli\.agf\.N\.mha_v\.in_proj_weight\s+N=0-1 \(2\)\s+\(192, 64\) F32", err), err
    assert re.search(r"model\.cli\.amp\.N\.lora_A\.weight\s+N=1,3,5 \(3\)\s+\(4, 48\) F32", err), err
    assert not out.exists() and not leftovers(tmp_path)


def test_key_map_shape_mismatch_and_missing_slots(trained, tmp_path, capsys):
    _, src, key_map = trained
    out = tmp_path / "cli"
    # wrong rank: every LoRA slot mismatches
    assert run("--input", src, "--output", out, "--key-map", key_map, "--vision-config", vision_config_arg()) == 1
    err = capsys.readouterr().err
    assert "shape mismatches" in err
    assert re.search(r"model\.cli\.amp\.N\.lora_A\.weight -> model\.amp\.lora_A\[N\]\s+N=1,3,5 \(3\)\s+"
                     r"got \(4, 48\), expected \(16, 48\)", err), err
    # a key map that fills only some slots (vision layer 5 is dropped): the missing slots are named
    partial = [[r"model\.cli\.amp\.5\..*", None]] + KEY_MAP
    assert run("--input", src, "--output", out, "--key-map", json.dumps(partial), "--amp-lora-rank", 4,
               "--vision-config", vision_config_arg()) == 1
    err = capsys.readouterr().err
    assert "missing CLI weights" in err and "model.amp.lora_A[slots 2]" in err
    assert not out.exists() and not leftovers(tmp_path)


def test_inspect_prints_plan_and_writes_nothing(trained, tmp_path, capsys):
    _, src, key_map = trained
    out = tmp_path / "cli"
    assert run("--input", src, "--output", out, "--inspect", "--key-map", key_map, "--amp-lora-rank", 4,
               "--vision-config", vision_config_arg()) == 0
    log = capsys.readouterr().out
    assert "Source keys (layer numbers collapsed to N):" in log and "Planned mapping" in log
    assert re.search(r"model\.layers\.N\.mlp\.up_proj\.weight\s+N=0-5 \(6\)\s+\(128, 64\) F32", log), log
    assert "[fork language model]" in log and "Problems: none" in log
    assert not out.exists() and not list(tmp_path.iterdir())
    # a plan with problems: exit code 1, still nothing written
    assert run("--input", src, "--inspect", "--vision-config", vision_config_arg()) == 1
    assert "unknown source keys" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# llava-hf layouts


@pytest.mark.parametrize("legacy", [True, False], ids=["keys-4.x", "keys-5.x"])
def test_llava_hf_checkpoint_upgrades_to_cli(untied, tmp_path, capsys, legacy):
    src = make_llava_hf_checkpoint(tmp_path / "src", untied, legacy=legacy)
    out = tmp_path / "cli"
    # no --init-cli: a llava-hf checkpoint cannot hold CLI weights, so it is implied
    layers = ["--vision-extraction-layers", "1,2", "--vlm_exp_layers", "RANGE-0-6-2"]
    assert run("--input", src, "--output", out, *layers) == 0
    assert "identity-initialised" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["vision_extraction_layers"] == [1, 2] and config["llm_injection_layers"] == [0, 2, 4]
    assert config["image_token_index"] == IMAGE_ID
    weights = read_weights(out)
    native = native_twin(untied).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in native.items())
    assert weights["model.amp.lora_A"].shape == (2, 16, 48)
    assert {k.split(".agf.")[1].split(".")[0] for k in weights if ".agf." in k} == {"0", "2", "4"}


# ----------------------------------------------------------------------------------------------------------------------
# options and parsing


def test_layer_options_and_defaults(untied, tmp_path, capsys):
    src = make_fork_checkpoint(tmp_path / "src", untied, layers=None)  # no vision_exp_layers / vlm_exp_layers
    common = ["--input", src, "--inspect", "--init-cli", "--vision-config", vision_config_arg()]
    assert run(*common) == 0
    # CLIConfig's defaults
    assert "vision_extraction_layers=[1, 5] llm_injection_layers=[1, 5]" in capsys.readouterr().out
    assert run(*common, "--vision_exp_layers", "RANGE-1-6-4", "--llm-injection-layers", "0,5") == 0
    assert "vision_extraction_layers=[1, 5] llm_injection_layers=[0, 5]" in capsys.readouterr().out
    assert run(*common, "--llm-injection-layers", "9") == 1
    assert "llm_injection_layers" in capsys.readouterr().err


def test_grid_pinpoints_parsing():
    parse = convert_checkpoint.parse_grid_pinpoints
    grid = parse("(1x1),...,(6x6)", 384)
    assert len(grid) == 36 and grid[0] == [384, 384] and grid[1] == [768, 384] and grid[-1] == [2304, 2304]
    assert parse("(1x2),...,(2x3)", 10) == [[20, 10], [30, 10], [20, 20], [30, 20]]
    assert parse([[384, 768], [768, 384]], 384) == [[768, 384], [384, 768]]  # (w, h) -> (h, w)
    assert parse("[(336, 672), (672, 336)]", 336) == [[672, 336], [336, 672]]
    with pytest.raises(convert_checkpoint.ConversionError):
        parse("nonsense", 384)


# ----------------------------------------------------------------------------------------------------------------------
# errors: clear message, exit code 1, nothing in DST, no temp dir


def test_truncated_safetensors(untied, tmp_path, capsys):
    src = make_fork_checkpoint(tmp_path / "src", untied, num_shards=2)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert run("--input", src, "--output", tmp_path / "out", "--init-cli", "--vision-config", vision_config_arg()) == 1
    err = capsys.readouterr().err
    assert "model-00002-of-00002.safetensors is not a readable safetensors file (truncated" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_shard(untied, tmp_path, capsys):
    src = make_fork_checkpoint(tmp_path / "src", untied, num_shards=2)
    (src / "model-00001-of-00002.safetensors").unlink()
    assert run("--input", src, "--output", tmp_path / "out", "--init-cli", "--vision-config", vision_config_arg()) == 1
    assert "names shard(s) that are not in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_without_mm_fields(untied, tmp_path, capsys):
    src = make_fork_checkpoint(tmp_path / "src", untied)
    config = {k: v for k, v in fork_config(untied).items() if not k.startswith("mm_")}
    (src / "config.json").write_text(json.dumps(config))
    assert run("--input", src, "--output", tmp_path / "out", "--init-cli") == 1
    assert "has no mm_* fields" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pickle_weights_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llava", "mm_vision_tower": "siglip"}))
    (src / "pytorch_model.bin").write_bytes(b"not even read")
    assert run("--input", src, "--inspect") == 1
    assert "pickle" in capsys.readouterr().err


def test_existing_output_needs_force(fork_fp32, tmp_path, capsys):
    out = tmp_path / "cli"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert run("--input", fork_fp32, "--output", out, "--init-cli", "--vision-config", vision_config_arg()) == 1
    assert "exists; pass --force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run("--input", fork_fp32, "--output", out, "--init-cli", "--vision-config", vision_config_arg(),
               "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists() and not leftovers(tmp_path)
    assert run("--input", fork_fp32, "--output", fork_fp32, "--force", "--init-cli") == 1
    assert "would replace the source" in capsys.readouterr().err


def test_disk_full_mid_write(fork_fp32, tmp_path, monkeypatch, capsys):
    original = convert_checkpoint.write_safetensors_file
    calls = []

    def failing_writer(path, entries, tensors):
        calls.append(path)
        if len(calls) == 2:  # the second shard: some bytes written, then the disk is full
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, entries, tensors)

    monkeypatch.setattr(convert_checkpoint, "write_safetensors_file", failing_writer)
    out = tmp_path / "cli"
    assert run("--input", fork_fp32, "--output", out, "--init-cli", "--vision-config", vision_config_arg(),
               "--max-shard-size", "300KB") == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "temporary folder was removed" in err
    assert len(calls) == 2 and not out.exists() and not leftovers(tmp_path) and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# benchmark smoke test


def test_benchmark_script_runs_tiny(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_convert.py"), "--size-gb", "0.02", "--json",
         "--workdir", str(tmp_path)],
        env=env_with_repo(), capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert {run["method"] for run in report["runs"]} == {"streaming", "naive"}
    assert all(run["peak_rss_mb"] > 0 and run["mb_per_s"] > 0 for run in report["runs"])
    assert report["outputs_identical"] is True
    assert not list(tmp_path.iterdir())  # the synthetic checkpoint is deleted at the end


def test_hub_input_and_push_to_hub_calls(fork_fp32, tmp_path, monkeypatch):
    """A Hub repo id goes through snapshot_download (no pickles requested); --push-to-hub is create_repo + upload."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append(("download", repo_id, allow_patterns))
        return str(fork_fp32)

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create_repo", repo_id, exist_ok, private))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, Path(folder_path).name))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "cli"
    assert run("--input", "someone/cli-tiny-fork", "--output", out, "--init-cli", "--vision-config",
               vision_config_arg(), "--push-to-hub", "me/cli-tiny", "--private") == 0
    assert calls[0][:2] == ("download", "someone/cli-tiny-fork")
    assert not any(pattern.endswith((".bin", ".pt", ".pth")) for pattern in calls[0][2])
    assert calls[1:] == [("create_repo", "me/cli-tiny", True, True), ("upload_folder", "me/cli-tiny", "cli")]
    assert "base_model: someone/cli-tiny-fork" in (out / "README.md").read_text()
