"""
CLI under torch.distributed: what FSDP wrap policies read (`_no_split_modules`), DDP through the Trainer
(`examples/finetune.py` under torchrun) and FSDP2 (`examples/train_fsdp.py`) on two gloo processes against one process,
and where every parameter is read (DeepSpeed ZeRO-3 gathers parameters per module, for that module's forward).

The multi-process tests start their own processes on the loopback (a free port on 127.0.0.1), one thread each, with a
deadline, and leave nothing running.
"""

import os
import sys

import pytest
import torch
from tiny_cli import build_tiny_cli

AGF_FORMS = ["attention", "folded"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
sys.path.insert(0, os.path.join(EXAMPLES, "shapes"))


# ----------------------------------------------------------------------------------------------------------------------
# _no_split_modules: what FSDP wrap policies wrap
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agf_form", AGF_FORMS)
def test_no_split_modules_name_only_classes_the_model_holds(agf_form):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model, _ = build_tiny_cli(agf_form=agf_form)
    for candidate in (model, build_tiny_cli()[0].fold_agf()) if agf_form == "folded" else (model,):
        classes = {type(module).__name__ for module in candidate.modules()}
        names = set(candidate._no_split_modules)
        assert names <= classes, f"named but absent: {sorted(names - classes)}"
        assert {"Qwen2DecoderLayer", "SiglipEncoderLayer", "CLIAdaptiveGatingFusion"} <= names
        # accelerate's FSDP2 transformer-based wrap policy, which stops at a name no module has
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        policy = fsdp2_prepare_auto_wrap_policy(plugin, candidate)
        wrapped = [name for name, module in candidate.named_modules() if policy(module)]
        agf = [f"model.language_model.agf.{layer}" for layer in candidate.config.llm_injection_layers]
        decoder = [f"model.language_model.layers.{i}" for i in range(candidate.config.text_config.num_hidden_layers)]
        assert set(agf + decoder) <= set(wrapped)


def test_no_split_modules_of_the_remote_code_class(tmp_path):
    from accelerate.utils.dataclasses import get_module_class_from_name
    from tiny_cli import build_tiny_cli_checkpoint
    from transformers import AutoModelForImageTextToText

    folder = build_tiny_cli_checkpoint(tmp_path / "cli-dist-no-split", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")
    for name in model._no_split_modules:
        assert get_module_class_from_name(model, name) is not None, name


# ----------------------------------------------------------------------------------------------------------------------
# Where parameters are read (DeepSpeed ZeRO-3 gathers a module's own parameters for that module's forward)
# ----------------------------------------------------------------------------------------------------------------------

# Tensor attributes that a partitioned parameter keeps (ZeRO-3 leaves an empty tensor of the same dtype and device; an
# FSDP2 DTensor has both): reading them is not reading the parameter. `shape` is not among them (it is 0 under ZeRO-3).
METADATA_READS = {"dtype", "device"}


class ParameterReads:
    """
    Records every torch call that takes a parameter (a `TorchFunctionMode`) and whether one of the modules owning that
    parameter directly (`module._parameters`; two owners for tied weights) is inside its forward at that moment.

    `outside`: `{parameter name: {call names}}` of the reads made while no owner was running its forward;
    `read`: the names of all parameters read at all.
    """

    def __init__(self, model):
        from collections import Counter, defaultdict

        from torch.overrides import TorchFunctionMode
        from torch.utils._pytree import tree_flatten

        owners, names = defaultdict(set), {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for param_name, param in module._parameters.items():
                if param is not None:
                    owners[id(param)].add(id(module))
                    names.setdefault(id(param), f"{module_name}.{param_name}".lstrip("."))
        running = Counter()
        self.outside, self.read = defaultdict(set), set()
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, args: running.update([id(m)])))
            self.handles.append(
                module.register_forward_hook(lambda m, args, out: running.subtract([id(m)]), always_call=True)
            )
        reads = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                for leaf in tree_flatten((args, kwargs))[0]:
                    if isinstance(leaf, torch.nn.Parameter) and id(leaf) in owners:
                        name = names[id(leaf)]
                        reads.read.add(name)
                        call = getattr(getattr(func, "__self__", None), "__name__", None) or func.__name__
                        if call not in METADATA_READS and not any(running[o] > 0 for o in owners[id(leaf)]):
                            reads.outside[name].add(call)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for handle in self.handles:
            handle.remove()


def shapes_batch(processor, num=3, seed=0):
    from shapes_data import generate_examples
    from training_cli import CLIDataCollator

    examples = generate_examples(num, seed=seed)
    batch = CLIDataCollator(processor)([{"messages": e["messages"], "images": e["images"]} for e in examples])
    return batch, examples


@pytest.mark.parametrize("agf_form", AGF_FORMS)
def test_every_parameter_is_read_only_inside_its_owning_modules_forward(agf_form):
    """
    What ZeRO-3 needs: in a training step every parameter is read only while a module owning it runs its forward.
    generate() encodes the images before its first forward (transformers' `get_image_features` pre-encoding), so
    there the one parameter CLIModel holds itself, `image_newline`, is read outside `CLIModel.forward` (transformers'
    LLaVA-OneVision reads it the same way).
    """
    model, processor = build_tiny_cli(agf_form=agf_form)
    batch, examples = shapes_batch(processor)
    model.train()
    with ParameterReads(model) as reads:
        model(**batch).loss.backward()
    assert dict(reads.outside) == {}
    assert reads.read == {name for name, _ in model.named_parameters()}  # the check saw every parameter

    from shapes_data import question_messages

    inputs = processor.apply_chat_template(
        question_messages(examples[0]), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", processor_kwargs={"images": examples[0]["images"]},
    )
    with ParameterReads(model.eval()) as reads, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert set(reads.outside) == {"model.image_newline"}, dict(reads.outside)


# ----------------------------------------------------------------------------------------------------------------------
# Multi-process runs: two gloo processes on the loopback against one process
# ----------------------------------------------------------------------------------------------------------------------

LAUNCH_TIMEOUT = 300  # a deadline against a hung process group, far above a run's ~20 s


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script, *args, nproc=1, env=None):
    """
    Runs `examples/<script>` in one process, or under torchrun with `nproc` processes on 127.0.0.1 (a free port), one
    thread each; kills the whole process group at the deadline. Returns stdout; a failure shows stderr.
    """
    launcher = []
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
    return run_python(*launcher, os.path.join(EXAMPLES, script), *args, env=env)


def run_python(*args, env=None):
    """`python ARGS` in its own session, one thread a process, offline; the session is killed at the deadline."""
    import signal
    import subprocess

    command = [sys.executable, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {LAUNCH_TIMEOUT} s\n{stderr[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, f"{' '.join(command)}\n{stderr[-6000:]}"
    return stdout


@pytest.fixture(scope="module")
def shapes_jsonl(tmp_path_factory):
    """
    32 shapes questions whose replies repeat the answer 1 to 4 times ("red red red"): the processes' shares of a
    global batch then hold different numbers of supervised tokens, so a loss averaged per process (instead of over
    the global batch's tokens) would differ from one process's.
    """
    import json

    from shapes_data import generate_examples

    folder = tmp_path_factory.mktemp("dist-data")
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for index, example in enumerate(generate_examples(32, seed=0)):
            example["images"][0].save(folder / f"{index:02d}.png")
            reply = " ".join([example["answer"]] * (1 + index * 7 % 4))
            messages = [example["messages"][0], {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages, "images": [f"{index:02d}.png"]}) + "\n")
    return str(path)


def read_curve(path):
    import json

    with open(path) as f:
        return json.load(f)


def read_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def assert_curves_match(curve, reference, rel=1e-5):
    assert [entry["step"] for entry in curve] == [entry["step"] for entry in reference]
    for entry, expected in zip(curve, reference):
        for key in ("loss", "grad_norm"):
            assert entry[key] == pytest.approx(expected[key], rel=rel), (key, entry, expected)


def build_tiny_cli_checkpoint_in(folder, **overrides):
    from tiny_cli import build_tiny_cli_checkpoint

    return build_tiny_cli_checkpoint(folder, seed=0, **overrides)


def test_finetune_under_torchrun_matches_one_process(tmp_path, shapes_jsonl):
    """
    examples/finetune.py (the Trainer) on 2 gloo processes (DDP), 2 samples per process and micro-step, 2 accumulation
    steps, against one process with batches of 8: the same global batches, so the same loss and gradient norm at every
    step (8 steps, 2 epochs, the default lr 1e-4) and the same saved weights.
    """
    base = build_tiny_cli_checkpoint_in(tmp_path / "cli-dist-ddp-base")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    common = ["--model", base, "--data", shapes_jsonl, "--epochs", 2]
    one = launch("finetune.py", *common, "--batch-size", 8, "--output", tmp_path / "one", "--loss-log",
                 tmp_path / "one.json", env=env)
    two = launch("finetune.py", *common, "--batch-size", 2, "--grad-accum", 2, "--output", tmp_path / "two",
                 "--loss-log", tmp_path / "two.json", nproc=2, env=env)
    assert "global batch 8 = 8 per device x 1 accumulation steps x 1 process(es)" in one
    assert "global batch 8 = 2 per device x 2 accumulation steps x 2 process(es)" in two
    assert two.count("saved the fine-tuned model") == 1  # process 0 alone saves
    curve, reference = read_curve(tmp_path / "two.json"), read_curve(tmp_path / "one.json")
    assert len(reference) == 8
    assert_curves_match(curve, reference)
    weights, expected, start = read_weights(tmp_path / "two"), read_weights(tmp_path / "one"), read_weights(base)
    assert weights.keys() == expected.keys()
    for key in expected:
        assert (weights[key] - expected[key]).abs().max() <= 1e-6, key
        if ".amp." not in key and ".agf." not in key:  # the frozen base stays bit for bit
            assert torch.equal(weights[key], start[key]), key
    assert max((expected[key] - start[key]).abs().max() for key in expected) > 1e-4  # training moved the CLI weights


def reference_steps(base, data, steps, global_batch, lr, seed=0, max_grad_norm=1.0):
    """
    The independent reference for train_fsdp.py: one process, no FSDP, the repository's classes. Step t trains on
    samples `randperm(seed)[t * global_batch : (t + 1) * global_batch]` with the model's token-mean loss, gradient
    clipping and AdamW (no weight decay). Returns the model and `[{step, loss, grad_norm}]`.
    """
    from modeling_cli import CLIForConditionalGeneration
    from training_cli import CLIDataCollator, load_chat_jsonl, load_processor

    model = CLIForConditionalGeneration.from_pretrained(base)
    model.set_trainable("cli", verbose=False)
    model.train()
    collator = CLIDataCollator(load_processor(base))
    dataset = load_chat_jsonl(data)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    curve = []
    for step in range(steps):
        batch = collator([dataset[i] for i in order[step * global_batch : (step + 1) * global_batch]])
        loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        curve.append({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item()})
    return model.eval(), curve


RELOAD_SCRIPT = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

folder, inputs_path, prompt_path, out_path = sys.argv[1:5]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
inputs, prompt = load_file(inputs_path), load_file(prompt_path)
with torch.no_grad():
    logits = model(**inputs).logits
    tokens = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, out_path)
"""


@pytest.mark.parametrize("agf_form", AGF_FORMS)
def test_fsdp2_on_two_processes_matches_one_process_and_saves_a_reloadable_folder(tmp_path, shapes_jsonl, agf_form):
    """
    examples/train_fsdp.py on 2 gloo processes (FSDP2; 2 samples per process and micro-step, 2 micro-steps: global
    batch 8; 2 steps, lr 1e-4) against [`reference_steps`]: the same losses and gradient norms, every parameter of the
    saved folder within 1e-6 of the reference's. The folder (same layout as the base, which save_cli_folder wrote)
    reloads in a fresh process with trust_remote_code=True, offline, and gives the reference's logits; its greedy
    answer is the one the FSDP2 model generated (generate() as an FSDP forward method).
    """
    import subprocess

    from safetensors.torch import load_file, save_file
    from shapes_data import question_messages

    base = build_tiny_cli_checkpoint_in(tmp_path / f"cli-dist-fsdp-{agf_form}", agf_form=agf_form)
    output = tmp_path / "trained"
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    stdout = launch(
        "train_fsdp.py", "--model", base, "--data", shapes_jsonl, "--output", output, "--batch-size", 2,
        "--grad-accum", 2, "--max-steps", 2, "--loss-log", tmp_path / "curve.json", "--sample", nproc=2, env=env,
    )
    assert "FSDP2 on 2 process(es) (cpu, gloo), 11 groups: 2 x CLIAdaptiveGatingFusion" in stdout, stdout
    assert "global batch 8 = 2 per process x 2 micro-steps x 2 processes" in stdout
    reference, expected_curve = reference_steps(base, shapes_jsonl, steps=2, global_batch=8, lr=1e-4)
    assert_curves_match(read_curve(tmp_path / "curve.json"), expected_curve)

    weights, start = read_weights(output), read_weights(base)
    expected = reference.state_dict()
    assert weights.keys() == start.keys()
    for key, value in weights.items():
        assert (value - expected[key]).abs().max() <= 1e-6, key
    assert max((expected[key] - start[key]).abs().max() for key in start) > 1e-5  # the step moved the CLI weights
    assert sorted(os.listdir(output)) == sorted(os.listdir(base))

    from training_cli import CLIDataCollator, load_chat_jsonl, load_processor

    processor = load_processor(base)
    batch, _ = shapes_batch(processor, num=2, seed=5)
    first = load_chat_jsonl(shapes_jsonl)[0]  # what --sample answers
    prompt = processor.apply_chat_template(
        question_messages(first), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"images": CLIDataCollator(processor).load_images(first["images"], "first sample")},
    )
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    save_file({key: value.contiguous() for key, value in inputs.items()}, tmp_path / "inputs.safetensors")
    save_file({key: value.contiguous() for key, value in prompt.items()}, tmp_path / "prompt.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, output, tmp_path / "inputs.safetensors", tmp_path / "prompt.safetensors",
         tmp_path / "reloaded.safetensors"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reloaded = load_file(tmp_path / "reloaded.safetensors")
    with torch.no_grad():
        expected_logits = reference(**inputs).logits
    torch.testing.assert_close(reloaded["logits"], expected_logits, rtol=0, atol=1e-5)
    assert f"tokens {reloaded['tokens'].tolist()}" in stdout, stdout


ACCELERATE_PROBE = r"""
import json, os, sys
import training_cli
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer

base, data, run = sys.argv[1:4]
args = training_cli.training_arguments(run, per_device_train_batch_size=2, max_steps=1)
with args.main_process_first(local=False):  # process 0 caches the remote code before the other reads it
    model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
model.set_trainable("cli", verbose=False)
trainer = Trainer(
    model=model, args=args, train_dataset=training_cli.load_chat_jsonl(data),
    data_collator=training_cli.CLIDataCollator(processor),
)
trainer.train()
state = trainer.accelerator.state
report = {
    "use_fsdp": os.environ.get("ACCELERATE_USE_FSDP"), "fsdp_version": os.environ.get("FSDP_VERSION"),
    "distributed_type": str(state.distributed_type), "fsdp_enabled": trainer.is_fsdp_enabled,
    "wrapped": type(trainer.model_wrapped).__name__, "backend": state.backend, "world_size": trainer.args.world_size,
}
# one file per process: the two processes' stdout lines can interleave
with open(os.path.join(run, f"probe-{trainer.args.process_index}.json"), "w") as handle:
    json.dump(report, handle)
"""


def test_accelerate_fsdp2_config_on_cpu_processes_trains_with_ddp(tmp_path, shapes_jsonl):
    """
    examples/accelerate_fsdp2.yaml under `accelerate launch` on 2 CPU processes: accelerate reads it as FSDP2
    (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2), but its AcceleratorState turns on FSDP only for accelerator
    (multi-GPU/NPU/XPU/...) runs, so on CPU processes it stays MULTI_CPU and the Trainer wraps the model in DDP (gloo).
    """
    import json

    base = build_tiny_cli_checkpoint_in(tmp_path / "cli-dist-accelerate-base")
    probe = tmp_path / "probe.py"
    probe.write_text(ACCELERATE_PROBE)
    stdout = run_python(
        "-m", "accelerate.commands.launch", "--config_file", os.path.join(EXAMPLES, "accelerate_fsdp2.yaml"),
        "--num_processes", 2, "--main_process_ip", "127.0.0.1", "--main_process_port", free_port(), probe, base,
        shapes_jsonl, tmp_path / "run", env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    reports = [json.loads((tmp_path / "run" / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(reports) == 2, stdout
    for report in reports:
        assert report == {
            "use_fsdp": "true", "fsdp_version": "2", "distributed_type": "DistributedType.MULTI_CPU",
            "fsdp_enabled": False, "wrapped": "DistributedDataParallel", "backend": "gloo", "world_size": 2,
        }


# ----------------------------------------------------------------------------------------------------------------------
# Saving an FSDP2-sharded model
# ----------------------------------------------------------------------------------------------------------------------


def test_save_cli_folder_refuses_an_fsdp2_model_and_saves_its_unsharded_twin(tmp_path):
    """
    `fully_shard` turns the model's class into torch's `FSDPCLIForConditionalGeneration`, which `save_pretrained` would
    record as remote code (torch's `_fsdp_*.py` files in the folder, `auto_map` naming them). save_cli_folder refuses
    such a model and writes nothing; `unsharded_model` of the gathered state dict saves the usual folder, weights bit
    for bit. (A world of one gloo process, in this process.)
    """
    import json

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from training_cli import save_cli_folder, unsharded_model

    sys.path.insert(0, EXAMPLES)
    from train_fsdp import shard_model

    model, processor = build_tiny_cli(agf_form="folded")
    plain_folder = save_cli_folder(model, processor, tmp_path / "plain")
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        shard_model(model, init_device_mesh("cpu", (1,)))
        assert type(model).__name__ == "FSDPCLIForConditionalGeneration"
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with pytest.raises(ValueError, match="sharded by FSDP2"):  # even with the gathered weights
            save_cli_folder(model, processor, tmp_path / "sharded", state_dict=state_dict)
        assert not (tmp_path / "sharded").exists()
        folder = save_cli_folder(unsharded_model(model, state_dict), processor, tmp_path / "unsharded")
    finally:
        dist.destroy_process_group()
    assert sorted(os.listdir(folder)) == sorted(os.listdir(plain_folder))
    with open(os.path.join(folder, "config.json")) as f:
        assert set(json.load(f)["auto_map"].values()) == {
            "configuration_cli.CLIConfig", "modeling_cli.CLIForConditionalGeneration"
        }
    weights = read_weights(folder)
    assert weights.keys() == read_weights(plain_folder).keys()
    for key, value in weights.items():
        assert torch.equal(value, expected[key]), key
