# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Train a CLI model with FSDP2 (`torch.distributed.fsdp.fully_shard`): the base frozen, the CLI modules trained, the model
sharded the way accelerate's FSDP2 plugin shards a transformers model, and at the end the full state dict gathered and
saved as a self-contained remote-code folder (the layout `examples/finetune.py` writes).

    torchrun --nproc_per_node 2 examples/train_fsdp.py            # offline demo: tiny random CLI model, shapes data,
                                                                  # two CPU processes (gloo)
    torchrun --nproc_per_node 8 examples/train_fsdp.py --model PATH --data train.jsonl --output DIR --bf16
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 examples/train_fsdp.py ...
    python examples/train_fsdp.py ...                             # one process (a world of one)

Device: CUDA + NCCL when CUDA is available (process `LOCAL_RANK` on `cuda:LOCAL_RANK`), else CPU + gloo, so the same
script runs on CPU processes and on GPUs.

Sharding ([`shard_model`]): one FSDP group per module of a class named in `model._no_split_modules` (Qwen2 decoder
layers, SigLIP embeddings and encoder layers, AGF modules), the input/output embeddings as accelerate groups them, then
the root (SigLIP's last layer norm, projector, AMP, `image_newline`, the text model's final norm). `--bf16` computes in
bfloat16 (FSDP2 `MixedPrecisionPolicy`: bf16 parameters in forward/backward, gradients reduced in float32, float32
master weights). Every process loads the whole model on the CPU before sharding it.

Batches: `--batch-size` samples per process and micro-step, `--grad-accum` micro-steps per optimizer step; the global
batch is batch-size x grad-accum x processes. Data order: one permutation per epoch (`torch.randperm` seeded with
`seed + epoch`, as `DistributedSampler` draws it); step t trains on the t-th run of global-batch samples of it, each
process taking every world-size-th one. The loss of a step is the mean over every supervised token of its global batch
(the tokens of all processes and micro-steps are counted first), so a step on N processes is the step one process
takes on the same global batch.

Data: the JSONL layout of `examples/finetune.py` (`{"messages": [...], "images": [...]}` per line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(HERE, "shapes"), ROOT):  # the shapes helpers; the repo's modules when not installed
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tiny_cli  # noqa: E402
import training_cli  # noqa: E402

# FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip its backward hook). The view CLI
# returns is `image_hidden_states`, the baseline slot of its packed image-feature buffer, which nothing modifies.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", help="JSONL of {'messages', 'images'} samples (default: generated shapes examples)")
    parser.add_argument("--model", help="CLI model folder (default: a tiny random CLI model built offline)")
    parser.add_argument("--output", help="where to save the trained model (default: examples/_cache/trained_fsdp)")
    parser.add_argument("--trainable", default="cli", choices=["cli", "cli+projector", "cli+llm", "all"])
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4; 1e-2 for the demo)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="samples per process and micro-step")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--max-length", type=int, help="longest sample in tokens (image tokens included)")
    parser.add_argument("--truncation", action="store_true", help="cut longer samples' trailing text, not error")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute (FSDP2 mixed precision)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-examples", type=int, default=32, help="generated examples for the offline demo")
    parser.add_argument("--loss-log", help="write the loss curve here as JSON ([{step, loss, grad_norm}, ...])")
    parser.add_argument("--sample", action="store_true", help="after training, answer the first sample with generate()")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """
    Starts the process group and returns `(rank, world_size, device)`: CUDA + NCCL when CUDA is available, else CPU +
    gloo. Started without torchrun (no `RANK` in the environment), the script is a world of one on the loopback.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------------------------------


def no_split_classes(model) -> dict[str, type]:
    """
    `{name: class}` for every class named in `model._no_split_modules`, looked up among the model's modules. A name no
    module has raises `ValueError` (accelerate's FSDP plugin stops the same way: "Could not find the transformer layer
    class").
    """
    present = {type(module).__name__: type(module) for module in model.modules()}
    names = list(getattr(model, "_no_split_modules", None) or [])
    missing = [name for name in names if name not in present]
    if missing:
        raise ValueError(
            f"{type(model).__name__}._no_split_modules names {missing}, which no module of the model is; the model's "
            f"classes are {sorted(present)}."
        )
    return {name: present[name] for name in names}


def final_norm(model):
    """The last `*Norm*` among the direct children of `model.<base_model_prefix>` (accelerate's lookup), or None."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    found = None
    for _, child in base.named_children() if isinstance(base, torch.nn.Module) else ():
        if "Norm" in type(child).__name__:
            found = child
    return found


def shard_model(model, mesh, mp_policy=None, reshard_after_forward: bool = True) -> list[str]:
    """
    Applies `fully_shard` in place the way accelerate's FSDP2 plugin does with its transformer-based wrap policy, and
    returns the names of the modules that got their own FSDP group (the root last, as `""`):

    1. bottom-up, every module whose class `model._no_split_modules` names ([`no_split_classes`]);
    2. the input embeddings alone, when they are not tied to the output embeddings;
    3. the final norm ([`final_norm`]) and the output embeddings (with the input embeddings first when the two are
       tied: a shared parameter must live in exactly one group) as one group kept unsharded after forward;
    4. the root, holding every parameter not grouped yet.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    classes = tuple(no_split_classes(model).values())
    names = {module: name for name, module in model.named_modules()}
    grouped = []
    for module in reversed(list(model.modules())[1:]):  # children before their parents
        if isinstance(module, classes) and not isinstance(module, FSDPModule):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
            grouped.append(names[module])
    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    tied = (
        input_embeddings is not None
        and output_embeddings is not None
        and input_embeddings.weight is output_embeddings.weight
    )
    if input_embeddings is not None and not tied and not isinstance(input_embeddings, FSDPModule):
        fully_shard(input_embeddings, reshard_after_forward=reshard_after_forward, **kwargs)
        grouped.append(names[input_embeddings])
    tail = (final_norm(model), input_embeddings, output_embeddings) if tied else (final_norm(model), output_embeddings)
    tail = [module for module in tail if module is not None and not isinstance(module, FSDPModule)]
    if tail:
        fully_shard(tail, reshard_after_forward=False, **kwargs)
        grouped.append("+".join(names[module] for module in tail))
    fully_shard(model, **kwargs)  # the root: torch keeps it unsharded after forward (reshard_after_forward=None)
    grouped.append("")
    return grouped


def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every process calls it; process 0 gets the full (unsharded) state dict on the CPU, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def main_process_first(rank: int):
    """Process 0 runs the block first, the others after it (a barrier on each side)."""
    if rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if rank == 0:
            dist.barrier()


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def supervised_tokens(batch: dict) -> torch.Tensor:
    """The tokens the causal-LM loss averages over: `labels[:, 1:] != -100` (the loss shifts labels by one)."""
    return (batch["labels"][:, 1:] != training_cli.IGNORE_INDEX).sum()


def train(args) -> str | None:
    """Trains and saves to `--output` (process 0); returns the output folder on process 0, None on the others."""
    with tempfile.TemporaryDirectory(prefix="cli-fsdp-") as work:
        demo = args.model is None
        # the demo's inputs are built before the process group starts: once it has, transformers' `save_pretrained`
        # writes nothing on processes other than 0. Every process builds the same (seeded) ones in its own folder.
        if demo:
            args.model = tiny_cli.build_tiny_cli_checkpoint(os.path.join(work, "tiny-cli-base"), seed=args.seed)
        if args.data is None:
            from shapes_data import write_jsonl

            args.data = write_jsonl(os.path.join(work, "data"), args.num_examples, seed=args.seed)
        rank, world_size, device = setup_distributed()
        try:
            if rank == 0 and demo:
                print(f"built a tiny random CLI model (temporary): {args.model}")
            return _train(args, demo, rank, world_size, device)
        finally:
            dist.destroy_process_group()


def _train(args, demo, rank, world_size, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, register_fsdp_forward_method
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoModelForImageTextToText, AutoProcessor

    say = print if rank == 0 else (lambda *_, **__: None)
    output = args.output or os.path.join(HERE, "_cache", "trained_fsdp")
    lr = args.lr if args.lr is not None else (1e-2 if demo else 1e-4)

    torch.manual_seed(args.seed)
    dataset = training_cli.load_chat_jsonl(args.data)
    with main_process_first(rank):  # process 0 caches the remote code (transformers_modules) before the others read it
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    model.set_trainable(args.trainable, verbose=False)
    summary = training_cli.format_parameter_summary(training_cli.trainable_summary(model))
    say(f"--trainable {args.trainable}\n{summary}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    mesh = init_device_mesh(device.type, (world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    groups = shard_model(model, mesh, mp_policy)
    modules = dict(model.named_modules())
    kinds = Counter(
        type(modules[name]).__name__.removeprefix("FSDP") if name in modules and name else name or "root"
        for name in groups
    )
    say(f"FSDP2 on {world_size} process(es) ({device.type}, {dist.get_backend()}), {len(groups)} groups: "
        + ", ".join(f"{count} x {kind}" for kind, count in kinds.items()))

    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=args.weight_decay)
    collator = training_cli.CLIDataCollator(processor, max_length=args.max_length, truncation=args.truncation)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collator, drop_last=True)
    steps_per_epoch = len(loader) // args.grad_accum
    global_batch = args.batch_size * args.grad_accum * world_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples give no full global batch of {global_batch}; lower --batch-size.")
    total_steps = steps_per_epoch * args.epochs if args.max_steps < 0 else args.max_steps
    say(f"global batch {global_batch} = {args.batch_size} per process x {args.grad_accum} micro-steps x {world_size} "
        f"processes; {total_steps} steps, lr {lr}\n{'step':>6}  {'loss':>10}  {'grad norm':>10}")

    curve, step, epoch, start = [], 0, 0, time.time()
    while step < total_steps:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(min(steps_per_epoch, total_steps - step)):
            micro_batches = [next(batches) for _ in range(args.grad_accum)]
            num_tokens = sum(supervised_tokens(batch) for batch in micro_batches).to(device)
            dist.all_reduce(num_tokens)  # the global batch's supervised tokens
            step_loss = torch.zeros((), device=device)
            for index, batch in enumerate(micro_batches):
                model.set_requires_gradient_sync(index == len(micro_batches) - 1)
                loss = model(**to_device(batch, device), num_items_in_batch=num_tokens).loss  # this share's sum / all
                (loss * world_size).backward()  # FSDP averages gradients over processes: undo it to get the sum
                step_loss += loss.detach()
            # the norm before clipping (clipping at infinity clips nothing); a DTensor under FSDP2
            max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(step_loss)
            step += 1
            curve.append({"step": step, "loss": step_loss.item(), "grad_norm": grad_norm.item()})
            say(f"{step:>6}  {curve[-1]['loss']:>10.6f}  {curve[-1]['grad_norm']:>10.6f}")
        epoch += 1
    say(f"trained {step} steps in {time.time() - start:.1f}s")

    if args.sample:
        # generate() encodes the images (get_image_features) before its first forward, which reads the root group's
        # parameters (SigLIP's last layer norm, the projector, AMP, image_newline): outside a forward they are shards
        # ("mixed torch.Tensor and DTensor"). As an FSDP forward method, generate() runs with the root gathered.
        register_fsdp_forward_method(model, "generate")
        model.eval()
        sample = dataset[0]
        question = [message for message in sample["messages"] if message["role"] != "assistant"]
        images = collator.load_images(sample["images"], sample["source"])
        inputs = processor.apply_chat_template(
            question, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"images": images},
        ).to(device)
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, synced_gpus=world_size > 1)
        new_tokens = tokens[0, inputs["input_ids"].shape[1] :]
        say(f"sample answer (FSDP2, generate): {processor.decode(new_tokens, skip_special_tokens=True)!r} "
            f"tokens {new_tokens.tolist()}")

    state_dict = gather_full_state_dict(model)  # a collective: every process takes part
    if rank != 0:
        return None
    if args.loss_log:
        with open(args.loss_log, "w") as f:
            json.dump(curve, f)
    # the model's class is now torch's FSDP subclass: save the gathered weights in a plain model of the CLI class
    training_cli.save_cli_folder(training_cli.unsharded_model(model, state_dict).eval(), processor, output)
    say(f"saved the full model (gathered from {world_size} process(es)) to {output}")
    return output


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
