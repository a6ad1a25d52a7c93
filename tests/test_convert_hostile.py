"""
convert_checkpoint.py against hostile and broken sources (issue 11) and the converter items of issue 12: code
references never reach DST and a fresh-process load imports only our three files; quantized sources are refused;
interrupted runs (SIGTERM in a real subprocess, SIGHUP) leave nothing, partials of dead runs are removed, symlinked or
unwritable outputs are refused; NaN/inf, integer and unknown-dtype weights, malformed indexes and absurd sizes fail
fast with a short `error: ...; nothing was written`; SigLIP's own 27-layer config is accepted on a 26-layer
checkpoint; the model card is a validated huggingface_hub ModelCard.
"""

import copy
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _helpers_convert import (
    env_with_repo,
    fork_config,
    fork_key,
    make_fork_checkpoint,
    make_llava_hf_checkpoint,
    tiny_source_model,
    variant,
    vision_config_arg,
    write_header_only_safetensors,
)
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from test_convert import IMAGE_ID, SIZES, VOCAB, image_inputs, load_converted
from tiny_models import native_twin

import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OUR_MODULES = {"configuration_cli", "modeling_cli", "processing_cli"}
OUR_CODE = re.compile(r"(configuration_cli|modeling_cli|processing_cli)\.CLI\w+")
VISION = ["--vision-config", vision_config_arg()]


def run(*args) -> int:
    return convert_checkpoint.main([str(a) for a in args] + ["--no-progress"])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def assert_clean_error(err: str, *expected: str) -> None:
    """One short `error: ...; nothing was written.` message (no traceback) naming what is wrong."""
    assert err.startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert err.rstrip().endswith("nothing was written."), err[-500:]
    assert len(err) < 1500, f"{len(err)} characters: {err[:500]}"
    for text in expected:
        assert text in err, (text, err)


@pytest.fixture(scope="module")
def model():
    return tiny_source_model(VOCAB, IMAGE_ID, tied=False, seed=0)


@pytest.fixture(scope="module")
def fork_src(tmp_path_factory, model):
    return make_fork_checkpoint(tmp_path_factory.mktemp("fork") / "src", model)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory, model):
    return make_llava_hf_checkpoint(tmp_path_factory.mktemp("hf") / "src", model, legacy=False)


# ----------------------------------------------------------------------------------------------------------------------
# 1. security: nothing foreign reaches DST, a fresh-process load runs only our three files

EVIL_MODULE = '''
import os, pathlib
pathlib.Path(os.environ.get("EVIL_MARKER", "/tmp/evil-imported")).write_text("imported")
class EvilConfig: pass
class EvilTokenizer: pass
class EvilProcessor: pass
class EvilPipeline: pass
'''
EVIL_AUTO_MAP = {"AutoConfig": "evil_org/evil_repo--evil_module.EvilConfig", "AutoModel": "evil_module.EvilConfig"}
EVIL_PIPELINES = {"image-text-to-text": {"impl": "evil_module.EvilPipeline", "pt": ["AutoModel"]}}


def seed_hostile(src: Path, folder: Path, layout: str) -> Path:
    """`src` with code references in every config it has: auto_map, custom_pipelines (also nested), unknown keys,
    loader state in tokenizer_config.json, a foreign module, a custom_generate folder and foreign chat templates."""
    config = json.loads((src / "config.json").read_text())
    config.update(auto_map=EVIL_AUTO_MAP, custom_pipelines=EVIL_PIPELINES, evil_top_level_key="evil_value")
    if layout == "llava-hf":
        for part in ("text_config", "vision_config"):
            config[part].update(auto_map=EVIL_AUTO_MAP, custom_pipelines=EVIL_PIPELINES, evil_nested_key=1)
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config.update(
        auto_map={"AutoTokenizer": ["evil_org/evil_repo--evil_module.EvilTokenizer", None],
                  "AutoProcessor": "evil_module.EvilProcessor"},
        custom_pipelines=EVIL_PIPELINES, evil_tokenizer_key="evil_value", is_local=True, local_files_only=True,
    )
    generation = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").is_file() \
        else {}
    generation.update(evil_generation_key="evil_value")
    foreign = {"auto_map": {"AutoProcessor": "evil_module.EvilProcessor"}, "processor_class": "EvilProcessor"}
    return variant(src, folder, config, {
        "tokenizer_config.json": tokenizer_config, "generation_config.json": generation,
        "evil_module.py": EVIL_MODULE, "processor_config.json": foreign, "preprocessor_config.json": foreign,
        "custom_generate/generate.py": EVIL_MODULE,
        "chat_template.jinja": "{{ 'evil template' }}", "additional_chat_templates/tool_use.jinja": "{{ 'evil' }}",
    })


@pytest.fixture(scope="module")
def hostile_dsts(tmp_path_factory, fork_src, hf_src):
    """Both layouts seeded with code references, converted; returns {layout: (DST, stdout)}."""
    root = tmp_path_factory.mktemp("hostile")
    results = {}
    for layout, src, extra in (("fork", fork_src, VISION), ("llava-hf", hf_src, [])):
        hostile = seed_hostile(src, root / layout / "src", layout)
        out = root / layout / "cli"
        lines = []

        class Out:
            write = lines.append

        args = convert_checkpoint.build_parser().parse_args(
            ["--input", str(hostile), "--output", str(out), "--init-cli", "--no-progress", *extra])
        convert_checkpoint.convert(args, out=Out)
        results[layout] = (out, "".join(lines))
    return results


@pytest.mark.parametrize("layout", ["fork", "llava-hf"])
def test_code_references_never_reach_dst(hostile_dsts, layout):
    out, log = hostile_dsts[layout]
    assert "code references are not carried" in log and "tokenizer_config.json auto_map" in log, log[-2000:]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files if p.suffix == ".py"} == {f"{m}.py" for m in OUR_MODULES}
    assert not (out / "custom_generate").exists()
    for path in files:
        data = path.read_bytes()
        assert b"evil" not in data, path.name  # no trace of any seeded value, in any file

    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                assert key not in ("custom_pipelines", "quantization_config", "is_local", "local_files_only"), where
                if key == "auto_map":
                    for entry in item.values():
                        for ref in entry if isinstance(entry, list) else [entry]:
                            assert ref is None or OUR_CODE.fullmatch(ref), (where, ref)
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for item in value:
                walk(item, where)

    for path in files:
        if path.suffix == ".json":
            walk(json.loads(path.read_text()), path.name)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_cli.CLIForConditionalGeneration"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == {"AutoProcessor": "processing_cli.CLIProcessor"}


def test_dst_loads_only_our_code_in_a_fresh_process(hostile_dsts, tmp_path):
    script = r"""
import json, os, sys
from pathlib import Path
import transformers
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, pipeline
for folder in sys.argv[1:]:
    AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    pipe = pipeline("image-text-to-text", model=model, processor=processor, trust_remote_code=True)
    assert type(pipe).__name__ == "ImageTextToTextPipeline", type(pipe)
modules = sorted(Path(module.__file__).name for name, module in list(sys.modules.items())
                 if name.startswith("transformers_modules") and getattr(module, "__file__", None))
cached = sorted(p.relative_to(os.environ["HF_MODULES_CACHE"]).as_posix()
                for p in Path(os.environ["HF_MODULES_CACHE"]).rglob("*.py"))
print(json.dumps({"modules": modules, "cached": cached, "evil": "evil_module" in sys.modules}))
"""
    env = env_with_repo()
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), EVIL_MARKER=str(tmp_path / "evil-imported"))
    folders = [str(hostile_dsts[layout][0]) for layout in ("fork", "llava-hf")]
    result = subprocess.run([sys.executable, "-c", script, *folders], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["evil"] and not (tmp_path / "evil-imported").exists()
    ours = {f"{module}.py" for module in OUR_MODULES}
    # the dynamic modules imported (files, not the packages' __init__) and the files copied into the modules cache
    assert set(report["modules"]) - {"__init__.py"} == ours, report["modules"]
    assert {Path(p).name for p in report["cached"]} - {"__init__.py"} == ours, report["cached"]


@pytest.mark.parametrize("layout", ["fork", "llava-hf"])
def test_quantization_config_refused(fork_src, hf_src, tmp_path, capsys, layout):
    src = fork_src if layout == "fork" else hf_src
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    hostile = variant(src, tmp_path / "src", config)
    assert run("--input", hostile, "--output", tmp_path / "cli", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, "quantization_config (quant_method 'bitsandbytes')",
                       "unquantized", "quantize when you load")
    assert not (tmp_path / "cli").exists() and not leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# 2. faults: interrupted or misdirected conversions lose nothing


def test_sigterm_mid_write_removes_the_temporary_folder(fork_src, tmp_path):
    pause = tmp_path / "paused"
    out = tmp_path / "cli"
    env = {**env_with_repo(), convert_checkpoint.PAUSE_HOOK_ENV: str(pause)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "convert_checkpoint.py"), "--input", str(fork_src), "--output", str(out),
         "--init-cli", "--no-progress", *VISION],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 240
        while not pause.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pause.exists(), process.communicate(timeout=60)
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(f".cli.partial-{process.pid}-")]
        assert len(partial) == 1 and (partial[0] / "model.safetensors").stat().st_size > 0  # killed mid-write
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, stderr[-2000:])
    assert "error: interrupted by SIGTERM; nothing was written (the temporary folder was removed)." in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_sighup_mid_write_removes_the_temporary_folder(fork_src, tmp_path, monkeypatch, capsys):
    pause = tmp_path / "paused"
    monkeypatch.setenv(convert_checkpoint.PAUSE_HOOK_ENV, str(pause))
    unhandled = []
    previous = signal.signal(signal.SIGHUP, lambda *args: unhandled.append(args))  # the converter must replace it

    def hang_up():
        deadline = time.monotonic() + 60
        while not pause.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p for p in tmp_path.iterdir() if ".cli.partial-" in p.name]
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.5)
        pause.unlink(missing_ok=True)  # unhandled: let the conversion finish (and the test fail on its exit code)

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        code = run("--input", fork_src, "--output", tmp_path / "cli", "--init-cli", *VISION)
    finally:
        thread.join()
        signal.signal(signal.SIGHUP, previous)
    assert not unhandled and code == 128 + signal.SIGHUP
    assert "interrupted by SIGHUP; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists() and leftovers(tmp_path) == []


def test_partials_of_dead_runs_are_removed_live_ones_kept(fork_src, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid whose process has exited
    folders = {
        "dead": f".cli.partial-{dead}-0123abcd",
        "live": f".cli.partial-{os.getppid()}-0123abce",  # pytest's parent is alive
        "locked": f".cli.partial-{dead}-0123abcf",  # pid gone, but a live process holds its lock
        "legacy": ".cli.partial-89abcdef",  # an older converter's name: no owner recorded
        "other": f".other.partial-{dead}-0123abd0",  # another destination's
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 100)
    lock = os.open(tmp_path / folders["locked"], os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert run("--input", fork_src, "--output", tmp_path / "cli", "--init-cli", *VISION) == 0
    finally:
        os.close(lock)
    err = capsys.readouterr().err
    assert f"Removed {tmp_path / folders['dead']}: left by an interrupted conversion (process {dead} is gone)." in err
    assert f"{folders['legacy']} looks like the partial folder of an older converter version" in err
    remaining = {p.name for p in tmp_path.iterdir()}
    assert folders["dead"] not in remaining
    assert {folders[k] for k in ("live", "locked", "legacy", "other")} <= remaining
    assert (tmp_path / "cli" / "model.safetensors").is_file()


@pytest.mark.parametrize("dangling", [False, True], ids=["link-to-folder", "dangling-link"])
def test_symlinked_output_is_refused(fork_src, tmp_path, capsys, dangling):
    target = tmp_path / "someone-elses-folder"
    if not dangling:
        target.mkdir()
        (target / "keep.txt").write_text("precious")
    link = tmp_path / "cli"
    link.symlink_to(target)
    assert run("--input", fork_src, "--output", link, "--init-cli", "--force", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, "is a symbolic link", "never writes through or replaces a link")
    assert link.is_symlink() and os.readlink(link) == str(target)
    if dangling:
        assert not target.exists()
    else:
        assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_unwritable_output_parent(fork_src, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: make mkdir fail the way it fails for a user
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == parent:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        parent.chmod(0o555)
    try:
        assert run("--input", fork_src, "--output", parent / "cli", "--init-cli", *VISION) == 1
    finally:
        parent.chmod(0o755)
    assert_clean_error(capsys.readouterr().err, "ermission denied")
    assert list(parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# 3. bad weights and bad values: a named error, fast


def weights_variant(src: Path, folder: Path, change) -> Path:
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    folder = variant(src, folder, replace={"model.safetensors": b""})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nonfinite_weights_are_refused_naming_them(fork_src, tmp_path, capsys):
    def poison(tensors):
        tensors["model.layers.2.mlp.up_proj.weight"][0, :3] = float("nan")
        tensors["model.norm.weight"][5] = float("inf")

    src = weights_variant(fork_src, tmp_path / "src", poison)
    assert run("--input", src, "--output", tmp_path / "cli", "--init-cli", *VISION) == 1
    err = capsys.readouterr().err
    assert_clean_error(err, "2 tensor(s) hold NaN or inf values", "--allow-nonfinite",
                       "model.layers.2.mlp.up_proj.weight (3 NaN, 0 inf of 8192 values)",
                       "model.norm.weight (0 NaN, 1 inf of 64 values)")
    assert not (tmp_path / "cli").exists() and leftovers(tmp_path) == []

    # kept on request, bit for bit, and said so
    assert run("--input", src, "--output", tmp_path / "cli", "--init-cli", "--allow-nonfinite", *VISION) == 0
    assert "kept 2 tensor(s) with NaN/inf values (--allow-nonfinite)" in capsys.readouterr().out
    written, source = load_file(tmp_path / "cli" / "model.safetensors"), load_file(src / "model.safetensors")
    for name, target in (("model.layers.2.mlp.up_proj.weight", "model.language_model.layers.2.mlp.up_proj.weight"),
                         ("model.norm.weight", "model.language_model.norm.weight")):
        assert torch.equal(written[target].nan_to_num(7.0), source[name].nan_to_num(7.0))
        assert torch.equal(written[target].isnan(), source[name].isnan())


def test_cast_overflow_is_refused(fork_src, tmp_path, capsys):
    src = weights_variant(fork_src, tmp_path / "src",
                          lambda tensors: tensors["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), 1e6))
    assert run("--input", src, "--output", tmp_path / "cli", "--init-cli", "--dtype", "float16", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, "model.layers.0.mlp.down_proj.weight (finite in the source; 1 of 8192 "
                       "values overflow to inf in float16)", "--dtype auto")


@pytest.mark.parametrize("dtype,problem", [
    (torch.int32, "integer tensors where the model holds floating-point weights"),
    (torch.uint16, "a dtype this converter does not read"),
])
def test_integer_and_unknown_dtypes_are_refused(fork_src, tmp_path, capsys, dtype, problem):
    def cast(tensors):
        tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"].to(dtype)

    src = weights_variant(fork_src, tmp_path / "src", cast)
    assert run("--input", src, "--output", tmp_path / "cli", "--init-cli", *VISION) == 1
    err = capsys.readouterr().err
    assert problem in err and "nothing was written" in err and "Traceback" not in err
    assert re.search(r"model\.layers\.N\.self_attn\.q_proj\.weight -> model\.language_model\.layers\.N\.self_attn\."
                     r"q_proj\.weight\s+N=1 \(1\)\s+\(64, 64\) " + ("I32" if dtype == torch.int32 else "U16"), err), err
    assert not (tmp_path / "cli").exists()


def _fork(change):
    def build(model):
        config = fork_config(model)
        change(config)
        return config
    return build


def _hf(change):
    def build(model):
        config = model.config.to_dict()
        for key in ("vision_extraction_layers", "llm_injection_layers", "amp_lora_rank", "amp_lora_alpha",
                    "agf_num_heads", "auto_map", "architectures"):
            config.pop(key, None)
        config["model_type"] = "llava_onevision"
        change(config)
        return config
    return build


BAD_VALUES = {
    # name: (layout, config builder, extra options, expected in the message)
    "rope_scaling-yes": ("fork", _fork(lambda c: c.update(rope_scaling="yes")), [],
                         ["config.json rope_scaling must be an object", "'yes'"]),
    "vocab-1e30": ("fork", _fork(lambda c: c.update(vocab_size=10**30)), [],
                   ["vocab_size = ~1e30", "1..16777216"]),
    "vocab-wrong": ("fork", _fork(lambda c: c.update(vocab_size=1000)), [],
                    [f"vocab_size = 1000 but the checkpoint's model.embed_tokens.weight is ({VOCAB}, 64) "
                     f"(vocab_size {VOCAB})"]),
    "layers-1e7": ("fork", _fork(lambda c: c.update(num_hidden_layers=10**7)), [],
                   ["config.json: num_hidden_layers = 10000000; it must be an integer in 1..1024"]),
    "layers-wrong": ("fork", _fork(lambda c: c.update(num_hidden_layers=7)), [],
                     ["config.json has 7 decoder layers but the checkpoint holds 6 (layers 0-5)"]),
    "hidden-1e30": ("fork", _fork(lambda c: c.update(hidden_size=10**30)), [],
                    ["config.json: hidden_size = ~1e30; it must be an integer in 1..65536"]),
    "hidden-string": ("fork", _fork(lambda c: c.update(hidden_size="64")), [], ["hidden_size = '64'"]),
    "pinpoints-20000": ("fork", _fork(lambda c: c.update(image_grid_pinpoints="(1x1),...,(20000x20000)")), [],
                        ["image_grid_pinpoints '(1x1),...,(20000x20000)': grids from 1x1 to 20000x20000 crops; "
                         "allowed are at most 1024 resolutions of at most 64 crops each"]),
    "pinpoints-list-huge": ("fork", _fork(lambda c: c.update(image_grid_pinpoints=[[20000 * 28, 28]])), [],
                            ["`image_grid_pinpoints` has invalid entries [[28, 560000]]", "at most 64 crops"]),
    "range-3e8-config": ("fork", _fork(lambda c: c.update(vision_exp_layers="RANGE-0-300000000-1")), [],
                         ["`vision_extraction_layers`: 'RANGE-0-300000000-1' selects 300000000 layers; at most "
                          "1024 are allowed"]),
    "range-3e8-option": ("fork", _fork(lambda c: None), ["--vision-extraction-layers", "RANGE-0-300000000-1"],
                         ["`vision_extraction_layers`: 'RANGE-0-300000000-1' selects 300000000 layers"]),
    "rank-1e9": ("fork", _fork(lambda c: None), ["--amp-lora-rank", str(10**9)],
                 ["`amp_lora_rank` must be an integer >= 1 and at most the smaller width 48, got 1000000000"]),
    "vision-hidden-1e30": ("fork", _fork(lambda c: None),
                           ["--vision-config", json.dumps({**json.loads(vision_config_arg()), "hidden_size": 10**30})],
                           ["--vision-config: hidden_size = ~1e30"]),
    "hf-vocab-1e30": ("llava-hf", _hf(lambda c: c["text_config"].update(vocab_size=10**30)), [],
                      ["config.json text_config: vocab_size = ~1e30"]),
    "hf-vision-layers-1e7": ("llava-hf", _hf(lambda c: c["vision_config"].update(num_hidden_layers=10**7)), [],
                             ["config.json vision_config: num_hidden_layers = 10000000; it must be an integer in "
                              "1..1024"]),
    "hf-no-text-config": ("llava-hf", _hf(lambda c: c.pop("text_config")), [],
                          ["config.json has no text_config object"]),
    "hf-rope-scaling-yes": ("llava-hf", _hf(lambda c: c["text_config"].update(rope_scaling="yes")), [],
                            ["config.json text_config.rope_scaling must be an object"]),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_config_values_fail_fast(model, fork_src, hf_src, tmp_path, capsys, case):
    layout, build, options, expected = BAD_VALUES[case]
    src = variant(fork_src if layout == "fork" else hf_src, tmp_path / "src", build(model))
    assert run("--input", src, "--output", tmp_path / "cli", "--init-cli", *(VISION if layout == "fork" else []),
               *options) == 1
    assert_clean_error(capsys.readouterr().err, *expected)
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize("weight_map,expected", [
    (["model.norm.weight"], '"weight_map" must be an object {tensor name: shard file}, got list'),
    ({"model.norm.weight": "../../elsewhere.safetensors"}, "1 weight_map entry names no shard file of this folder"),
])
def test_malformed_weight_map(model, tmp_path, capsys, weight_map, expected):
    src = make_fork_checkpoint(tmp_path / "src", model, num_shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = weight_map
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run("--input", src, "--output", tmp_path / "cli", "--init-cli", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, expected)


def test_push_to_hub_checked_before_converting(fork_src, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    out = tmp_path / "cli"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run("--input", fork_src, "--output", out, "--init-cli", "--push-to-hub", "me/cli", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, "--push-to-hub needs the Hub, but offline mode is on")
    assert not out.exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert run("--input", fork_src, "--output", out, "--init-cli", "--push-to-hub", "me/cli", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, "--push-to-hub needs a Hub login")

    class FailingApi:
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("the network is unreachable")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    assert run("--input", fork_src, "--output", out, "--init-cli", "--push-to-hub", "me/cli", *VISION) == 1
    err = capsys.readouterr().err
    assert "is saved, but the upload to me/cli failed: the network is unreachable" in err and "Traceback" not in err
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# issue 12 §5: SigLIP's own config (one layer more than LLaVA-NeXT's checkpoint holds)

# google/siglip-so400m-patch14-384's config.json (the full SigLIP config; its towers have 27 layers)
SIGLIP_SO400M_CONFIG = {
    "architectures": ["SiglipModel"],
    "initializer_factor": 1.0,
    "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
                    "num_attention_heads": 16, "num_hidden_layers": 27},
    "torch_dtype": "float32",
    "transformers_version": "4.37.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
}


def so400m_header_checkpoint(folder: Path, model, vision_layers: int) -> Path:
    """A fork checkpoint with SigLIP-so400m's real tower shapes (`vision_layers` layers) and the tiny LLM, headers
    only (the data region is sparse): enough for --inspect, which reads no tensor data."""
    from configuration_cli import CLIConfig
    from modeling_cli import CLIForConditionalGeneration

    config = copy.deepcopy(model.config.to_dict())
    config["vision_config"] = {**SIGLIP_SO400M_CONFIG["vision_config"], "num_hidden_layers": vision_layers,
                               "vision_use_head": False}  # LLaVA-NeXT drops the pooling head
    config["vision_extraction_layers"] = [1, 5]
    config["image_grid_pinpoints"] = [[384 * h, 384 * w] for w in (1, 2) for h in (1, 2)]
    for key in ("auto_map", "architectures", "model_type", "transformers_version"):
        config.pop(key, None)
    with torch.device("meta"):
        shapes_model = CLIForConditionalGeneration(CLIConfig(**config))
    shapes = {fork_key(name): tuple(t.shape) for name, t in shapes_model.state_dict().items() if fork_key(name)}
    folder.mkdir(parents=True)
    write_header_only_safetensors(folder / "model.safetensors", shapes)
    source = make_fork_checkpoint(folder.parent / "tiny-source", model)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    fork = json.loads((folder / "config.json").read_text())
    fork.update(mm_hidden_size=1152, vision_exp_layers="RANGE-1-27-4", image_grid_pinpoints="(1x1),...,(2x2)")
    (folder / "config.json").write_text(json.dumps(fork))
    return folder


def test_siglip_so400m_config_on_a_26_layer_checkpoint(model, tmp_path, capsys):
    siglip = tmp_path / "siglip-so400m-config.json"
    siglip.write_text(json.dumps(SIGLIP_SO400M_CONFIG))
    src = so400m_header_checkpoint(tmp_path / "so400m26", model, vision_layers=26)
    assert run("--input", src, "--inspect", "--init-cli", "--vision-config", siglip) == 0
    log = capsys.readouterr().out
    assert ("Note: --vision-config has 27 encoder layers and the checkpoint holds 26 (layers 0-25): LLaVA-NeXT deletes "
            "SigLIP's last layer, so the converted config has 26.") in log
    assert "vision: 26 layers, hidden 1152, heads 16, image 384/patch 14" in log and "Problems: none" in log

    other = so400m_header_checkpoint(tmp_path / "so400m25", model, vision_layers=25)
    assert run("--input", other, "--output", tmp_path / "cli", "--init-cli", "--vision-config", siglip) == 1
    assert_clean_error(capsys.readouterr().err, "--vision-config has 27 vision encoder layers but the checkpoint holds "
                       "25 (layers 0-24) (one more is accepted: SigLIP's last layer, which LLaVA-NeXT deletes)")


def test_siglip_style_config_with_the_deleted_layer_converts(model, fork_src, tmp_path, capsys):
    """A full SigLIP config (tiny sizes) whose tower has one layer more than the 5-layer checkpoint: converted, the
    converted config says 5 layers, and the model matches transformers' LLaVA-OneVision."""
    tiny = json.loads(vision_config_arg())
    siglip = {**SIGLIP_SO400M_CONFIG, "vision_config": {**tiny, "model_type": "siglip_vision_model",
                                                        "num_hidden_layers": 6}}
    out = tmp_path / "cli"
    assert run("--input", fork_src, "--output", out, "--init-cli", "--vision-config", json.dumps(siglip)) == 0
    assert "has 6 encoder layers and the checkpoint holds 5 (layers 0-4)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 5
    converted, native = load_converted(out), native_twin(model)
    inputs = image_inputs(native, SIZES[1])
    with torch.no_grad():
        assert (native(**inputs).logits - converted(**inputs).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("layers,accepted", [(6, True), (8, False)])
def test_llava_hf_nested_vision_config_layer_count(hf_src, tmp_path, capsys, layers, accepted):
    config = json.loads((hf_src / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = layers
    src = variant(hf_src, tmp_path / "src", config)
    code = run("--input", src, "--output", tmp_path / "cli")
    if accepted:
        assert code == 0 and "config.json vision_config has 6 encoder layers and the checkpoint holds 5" in \
            capsys.readouterr().out
        assert json.loads((tmp_path / "cli" / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 5
    else:
        assert code == 1
        assert_clean_error(capsys.readouterr().err, "config.json vision_config has 8 vision encoder layers but the "
                           "checkpoint holds 5 (layers 0-4)")


# ----------------------------------------------------------------------------------------------------------------------
# issue 12 §6: the model card


def test_model_card_metadata(model, fork_src, tmp_path, capsys):
    config = fork_config(model)
    config["_name_or_path"] = "lmms-lab/llava-onevision-qwen2-0.5b-ov"
    readme = "---\nlicense: apache-2.0\nlanguage: en\ntags:\n- llava\n---\n# The source model\n"
    src = variant(fork_src, tmp_path / "src", config, {"README.md": readme})
    out = tmp_path / "cli"
    assert run("--input", src, "--output", out, "--init-cli", *VISION) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["base_model"] == "lmms-lab/llava-onevision-qwen2-0.5b-ov"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert {"custom_code", "conversational", "cli", "llava-onevision"} <= set(data["tags"])
    assert "widget" not in data
    text = " ".join(card.text.split())
    assert "Hosted inference" in text and "never runs custom code" in text
    assert "serving engines' generic transformers backends do not run CLI's injection" in text
    assert "trust_remote_code=True" in card.text

    # --license wins (and says so); no license anywhere: none written, and a note
    assert run("--input", src, "--output", out, "--force", "--init-cli", "--license", "mit", *VISION) == 0
    assert "the card says license mit (--license); the source's README.md says apache-2.0" in capsys.readouterr().out
    assert ModelCard.load(out / "README.md").data.license == "mit"
    assert run("--input", fork_src, "--output", out, "--force", "--init-cli", *VISION) == 0
    assert "no license is known" in capsys.readouterr().out
    assert ModelCard.load(out / "README.md").data.license is None
    assert run("--input", fork_src, "--output", tmp_path / "cli2", "--init-cli", "--license", "Apache 2.0", *VISION) == 1
    assert_clean_error(capsys.readouterr().err, "--license 'Apache 2.0' is not a Hub license id")


def test_widget_records_the_converted_models_answer(fork_src, tmp_path, capsys):
    image = ROOT / "examples" / "shapes_example.png"
    question = "What color is the circle?"
    out = tmp_path / "cli"
    assert run("--input", fork_src, "--output", out, "--init-cli", "--widget", image, question, *VISION) == 0
    widget = ModelCard.load(out / "README.md").data.to_dict()["widget"]
    assert len(widget) == 1 and widget[0]["src"] == "widget/shapes_example.png" and widget[0]["text"] == question

    # the recorded output is what the converted model answers (loaded as users load it), greedy
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    bundled = Image.open(out / "widget" / "shapes_example.png")
    assert bundled.format == "PNG" and bundled.size == Image.open(image).size
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    converted = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=Image.open(image).convert("RGB"), return_tensors="pt",
                       text=processor.apply_chat_template(messages, add_generation_prompt=True))
    with torch.no_grad():
        ids = converted.generate(**inputs, max_new_tokens=convert_checkpoint.WIDGET_MAX_NEW_TOKENS, do_sample=False)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert widget[0]["output"] == {"text": expected} and expected
    assert f"Widget: {question!r} -> {expected!r}" in capsys.readouterr().out


def test_last_safety_check_rejects_foreign_code(tmp_path):
    """verify_no_foreign_code, run on DST before it is renamed into place, stops whatever an allowlist would miss."""
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_cli.CLIForConditionalGeneration"}}))
    (tmp_path / "modeling_cli.py").write_text("")
    convert_checkpoint.verify_no_foreign_code(tmp_path, ["modeling_cli.py"])  # ours only: passes
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.json").write_text(json.dumps({"a": [{"auto_map": {"AutoTokenizer": ["o/r--m.T", None]}}],
                                                         "custom_pipelines": {}}))
    (tmp_path / "helper.py").write_text("")
    with pytest.raises(convert_checkpoint.ConversionError) as error:
        convert_checkpoint.verify_no_foreign_code(tmp_path, ["modeling_cli.py"])
    message = str(error.value)
    assert "helper.py is code that is not ours" in message and "o/r--m.T" in message
    assert "sub/x.json: custom_pipelines" in message
