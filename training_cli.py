# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
Training CLI models: a data collator for chat-formatted image data, PEFT (LoRA on the LLM + the CLI modules), saving,
and helpers for the Trainer.

- [`CLIDataCollator`]: `{"messages": [...], "images": [...]}` samples -> `input_ids`, `attention_mask`, `labels`,
  `pixel_values`, `image_sizes`, `batch_num_images`, through [`CLIProcessor`]'s chat template and image processing
  (the same code as inference). Padding is on the right; only assistant replies are supervised.
- [`load_chat_jsonl`]: reads a JSONL data set, checking every line (roles, image markers, image files) up front.
- [`cli_peft_config`]: a `peft.LoraConfig` with LoRA on the language model's decoder projections and AMP + AGF as
  fully trained extra modules (`modules_to_save`); saves, reloads and merges.
- [`trainable_summary`]: trainable / total parameters per group (vision tower, projector, AMP, AGF, LLM, LoRA).
- [`save_cli_folder`] / [`refresh_saved_folder`]: a self-contained remote-code folder of a trained model.

The tiny offline models and tokenizer, and CLI-7B's parameter tables, are in `tiny_cli.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

try:  # loaded as remote code / from a package folder
    from .modeling_cli import CLIForConditionalGeneration, format_parameter_summary
    from .processing_cli import (
        IMAGE_TOKEN,
        CLIImageProcessor,
        CLIProcessor,
        check_chat_messages,
        strip_tokenizer_runtime_state,
    )
except ImportError:  # installed as top-level modules
    from modeling_cli import CLIForConditionalGeneration, format_parameter_summary
    from processing_cli import (
        IMAGE_TOKEN,
        CLIImageProcessor,
        CLIProcessor,
        check_chat_messages,
        strip_tokenizer_runtime_state,
    )

IGNORE_INDEX = -100
REMOTE_CODE_FILES = ("configuration_cli.py", "modeling_cli.py", "processing_cli.py")
SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))

# LoRA targets: the Qwen2 decoder's attention and MLP projections only (not the vision tower's q/k/v/out_proj, not
# the projector, not AGF, whose weights are raw parameters anyway).
LLM_LORA_TARGET_MODULES = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


# ----------------------------------------------------------------------------------------------------------------------
# Data: chat-formatted image samples -> model inputs
# ----------------------------------------------------------------------------------------------------------------------


class SampleError(ValueError):
    """A training sample that cannot be used; the message names the sample (its JSONL line when known)."""


def sample_name(sample: dict, index: int | None = None) -> str:
    """`"data.jsonl line 12"` when the sample came from [`load_chat_jsonl`], else `"sample 3 of the batch"`."""
    source = sample.get("source") if isinstance(sample, dict) else None
    if source:
        return str(source)
    return f"sample {index} of the batch" if index is not None else "sample"


def _is_local_path(source) -> bool:
    """True for what can only be a file path (not a URL, not base64 image data)."""
    if isinstance(source, os.PathLike):
        return True
    if not isinstance(source, str) or source.startswith(("http://", "https://", "data:")):
        return False
    if os.path.exists(source) or os.sep in source or len(source) < 64:
        return True
    import base64
    import binascii

    try:
        base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        return True
    return False


def count_image_markers(messages) -> int:
    """Image items (`{"type": "image"}`) plus literal `<image>` markers in the text of a conversation."""
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            count += content.count(IMAGE_TOKEN)
        elif isinstance(content, (list, tuple)):
            for item in content:
                if item.get("type") == "image":
                    count += 1
                elif item.get("type") == "text":
                    count += str(item.get("text", "")).count(IMAGE_TOKEN)
    return count


class EmptyReplyWarning(UserWarning):
    """A training sample whose assistant replies are all empty: only the end of turn (`<|im_end|>`) is supervised."""


def _reply_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


def check_sample(sample: dict, name: str, image_root: str | None = None) -> tuple[list, list]:
    """
    Validates one `{"messages": [...], "images": [...]}` sample and returns `(messages, images)`, image paths resolved
    against `image_root`. Raises [`SampleError`] naming the sample for: no/empty conversation, a message the chat
    template cannot render (an unknown role, content neither a string nor a list of text/image items, non-string
    text: `processing_cli.check_chat_messages`), no assistant reply, image sources inside image items, `images` that
    are not paths / URLs / base64 strings / PIL images / bytes, image markers and images that differ in number, and
    image files that do not exist. Warns ([`EmptyReplyWarning`]) when every assistant reply is empty.
    """
    if not isinstance(sample, dict):
        raise SampleError(f"{name}: expected a dict with 'messages' and 'images', got {type(sample).__name__}.")
    messages = sample.get("messages")
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise SampleError(f"{name}: empty conversation (`messages` must be a non-empty list of turns).")
    try:
        check_chat_messages(messages, name)
    except ValueError as error:
        raise SampleError(str(error)) from None
    for turn, message in enumerate(messages):
        content = message["content"]
        for item in content if not isinstance(content, str) else ():
            if item["type"] == "image" and any(key in item for key in ("image", "url", "path", "base64")):
                raise SampleError(
                    f"{name}, message {turn}: give images in the sample's 'images' list (in order), not inside the "
                    "image items, which only mark where each image stands."
                )
    replies = [message["content"] for message in messages if message["role"] == "assistant"]
    if not replies:
        raise SampleError(f"{name}: no assistant turn, nothing to train on.")
    if not any(_reply_text(reply).strip() for reply in replies):
        warnings.warn(
            f"{name}: every assistant reply is empty, so only the end of turn (<|im_end|>) is supervised: the model "
            "learns to answer nothing.",
            EmptyReplyWarning,
            stacklevel=2,
        )
    images = sample.get("images")
    if images is None:
        images = []
    elif isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise SampleError(
            f"{name}: 'images' must be a list of image paths, URLs or base64 strings (or PIL images), one per image "
            f"marker; got {type(images).__name__} {_short(images)}."
        )
    for index, image in enumerate(images):
        if not isinstance(image, (str, os.PathLike, bytes, bytearray, Image.Image)) or (
            isinstance(image, str) and not image.strip()
        ):
            raise SampleError(
                f"{name}: image {index} of 'images' is {type(image).__name__} {_short(image)}; images must be "
                "paths, URLs or base64 strings (or PIL images / bytes in Python)."
            )
    markers = count_image_markers(messages)
    if markers != len(images):
        raise SampleError(
            f"{name}: {markers} image marker(s) ({{'type': 'image'}} items or '{IMAGE_TOKEN}' in the text) but "
            f"{len(images)} image(s) in 'images'; every image needs exactly one marker where it stands."
        )
    resolved = []
    for image in images:
        if _is_local_path(image):
            path = os.fspath(image)
            if image_root is not None and not os.path.isabs(path):
                path = os.path.join(image_root, path)
            if not os.path.isfile(path):
                raise SampleError(f"{name}: image file {os.fspath(image)!r} not found (looked at {path!r}).")
            image = path
        resolved.append(image)
    return list(messages), resolved


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_chat_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """
    Reads a JSONL file of `{"messages": [...], "images": [paths]}` lines (the TRL / LLaVA chat layout: `messages` are
    `{"role", "content"}` turns, content a string or `[{"type": "image"}, {"type": "text", "text": ...}]`; each image
    item or literal `<image>` marks where the next image of `images` stands). Relative image paths are resolved
    against `image_root` (default: the JSONL's folder). Every line is checked now ([`check_sample`]) so that a bad line
    fails before training, with its line number (a line that is not UTF-8 or not JSON included); each returned sample
    carries `"source": "FILE line N"`. A sample whose assistant replies are all empty warns ([`EmptyReplyWarning`]).
    """
    path = os.fspath(path)
    image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            name = f"{path} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise SampleError(
                    f"{name}: not UTF-8 text (byte {error.start} of the line is {raw[error.start:error.start + 1]!r}); "
                    "JSONL files must be UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SampleError(f"{name}: not valid JSON ({error}).") from None
            messages, images = check_sample(record, name, image_root)
            samples.append({"messages": messages, "images": images, "source": name})
    if not samples:
        raise SampleError(f"{path}: no samples.")
    return samples


@dataclass
class CLIDataCollator:
    """
    Turns chat-formatted image samples into a training batch for [`CLIForConditionalGeneration`].

    Each sample is `{"messages": [...], "images": [...]}` (images as paths, PIL images, URLs or base64, one per image
    marker, in order; see [`load_chat_jsonl`]). The batch goes through the processor's own
    `apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True)`: the same template, image loading,
    image processing and `<image>` expansion as inference. Padding is on the right.

    Labels: the tokens the chat template marks as the assistant's reply (`{% generation %}`: the reply's text, its
    `<|im_end|>` and the newline after it, as LLaVA-NeXT's `preprocess_qwen` trains) keep their ids; the system and user
    turns, the `<|im_start|>assistant\\n` headers, image tokens and padding are `-100`. The model also reads `labels`
    to keep supervised positions out of AGF's context. Every sample must keep at least one supervised token: one
    without raises [`SampleError`] naming it, so a batch never reaches the model with all labels `-100` (its loss
    would be NaN, which the Trainer logs as 0.0). An empty reply still supervises its `<|im_end|>` (and warns,
    [`EmptyReplyWarning`]).

    Args:
        processor ([`CLIProcessor`]): the model's processor.
        max_length (`int`, *optional*): longest sequence allowed, image tokens included. A longer sample raises
            [`SampleError`] naming it, unless `truncation=True`.
        truncation (`bool`, defaults to `False`): cut samples longer than `max_length` at `max_length` tokens, which
            only drops text at the end; a cut that would go through or before an image's tokens, or leave no
            supervised token, still raises (image tokens are never cut, so images and features stay aligned).
        image_root (`str`, *optional*): folder that relative image paths are resolved against.

    Returns (per call): `input_ids`, `attention_mask`, `labels` `(batch, seq)`, and with images `pixel_values`,
    `image_sizes`, `batch_num_images`.
    """

    processor: CLIProcessor
    max_length: int | None = None
    truncation: bool = False
    image_root: str | None = None

    def load_images(self, images: list, name: str) -> list:
        """Loads a sample's images with the processor's own loader; failures name the sample."""
        loaded = []
        for image in images:
            try:
                loaded.append(self.processor.image_processor.fetch_images(image))
            except (ValueError, OSError) as error:
                raise SampleError(f"{name}: cannot load image {_short(image)}: {error}") from error
        return loaded

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise SampleError("empty batch.")
        names = [sample_name(sample, index) for index, sample in enumerate(samples)]
        conversations, images = [], []
        for sample, name in zip(samples, names):
            messages, sample_images = check_sample(sample, name, self.image_root)
            conversations.append(messages)
            images.append(self.load_images(sample_images, name))
        try:
            batch = self.processor.apply_chat_template(
                conversations,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                return_tensors="pt",
                processor_kwargs={"images": images, "padding": True, "padding_side": "right"},
            )
        except ValueError as error:
            raise SampleError(f"cannot process the batch {names}: {error}") from error
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        assistant = torch.as_tensor(batch.pop("assistant_masks")).bool()
        image_token_id = self.processor.image_token_id
        is_image = input_ids == image_token_id
        supervised = assistant & attention_mask.bool() & ~is_image
        labels = torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

        lengths = attention_mask.sum(dim=1)
        num_images = [len(group) for group in images]
        expected_tokens = is_image.sum(dim=1)
        for index, name in enumerate(names):
            if not supervised[index].any():
                raise SampleError(
                    f"{name}: no supervised token (the chat template marked no assistant reply), so its labels would "
                    "all be -100."
                )
            if num_images[index] == 0 and expected_tokens[index] > 0:
                raise SampleError(f"{name}: the text holds {IMAGE_TOKEN} tokens but the sample has no image.")
        if self.max_length is not None and int(lengths.max()) > self.max_length:
            for index, name in enumerate(names):
                length = int(lengths[index])
                if length <= self.max_length:
                    continue
                image_positions = is_image[index].nonzero()
                last_image = int(image_positions.max()) + 1 if len(image_positions) else 0
                detail = (
                    f"{name}: {length} tokens ({int(expected_tokens[index])} of them image tokens) exceed "
                    f"max_length={self.max_length}"
                )
                if not self.truncation:
                    raise SampleError(f"{detail}; raise max_length, shorten the sample or pass truncation=True.")
                if last_image > self.max_length:
                    raise SampleError(f"{detail}, and truncating would cut through its image tokens (they end at "
                                      f"position {last_image}); raise max_length or shorten the text before the image.")
                if not supervised[index, : self.max_length].any():
                    raise SampleError(f"{detail}, and truncating would leave no supervised token.")
            input_ids, attention_mask, labels = (t[:, : self.max_length] for t in (input_ids, attention_mask, labels))
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in ("pixel_values", "image_sizes", "batch_num_images"):
            if key in batch:
                result[key] = batch[key]
        return result


# ----------------------------------------------------------------------------------------------------------------------
# Parameter summaries
# ----------------------------------------------------------------------------------------------------------------------

GROUPS = ("vision_tower", "projector", "amp", "agf", "llm")


def _parameter_group(name: str) -> str:
    """Same groups as `CLIForConditionalGeneration.parameter_group`, on names with or without PEFT's wrappers."""
    name = name.removeprefix("base_model.model.")
    if ".lora_" in name and not name.startswith("model.amp."):
        return "llm_lora"
    name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    return CLIForConditionalGeneration.parameter_group(name)


def trainable_summary(model) -> dict[str, tuple[int, int]]:
    """
    `{group: (trainable, total)}` parameter counts of a CLI model as it stands (after `set_trainable` or PEFT), the
    groups of `CLIForConditionalGeneration.set_trainable` plus `llm_lora` for PEFT's LoRA matrices. With PEFT's
    `modules_to_save`, the trained copy counts and the frozen original (`original_module`) does not.
    """
    summary = {group: [0, 0] for group in GROUPS}
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        group = _parameter_group(name)
        counts = summary.setdefault(group, [0, 0])
        counts[1] += param.numel()
        counts[0] += param.numel() if param.requires_grad else 0
    return {group: tuple(counts) for group, counts in summary.items()}


# ----------------------------------------------------------------------------------------------------------------------
# PEFT: LoRA on the language model + AMP/AGF trained in full
# ----------------------------------------------------------------------------------------------------------------------


def cli_module_names(model) -> list[str]:
    """Full module names of AMP (`model.amp`) and of every AGF layer (`model.language_model.agf.<j>`)."""
    kinds = ("CLIAdaptiveMultiProjection", "CLIAdaptiveGatingFusion")
    return sorted(name for name, module in model.named_modules() if type(module).__name__ in kinds)


def cli_peft_config(
    model,
    r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = LLM_LORA_TARGET_MODULES,
    train_cli: bool = True,
    train_projector: bool = False,
    **lora_kwargs,
):
    """
    A `peft.LoraConfig` for a CLI model: LoRA on the language model's decoder projections (`target_modules`, by default
    the regex [`LLM_LORA_TARGET_MODULES`]: q/k/v/o and gate/up/down of `model.language_model.layers.*`, nothing in the
    vision tower) and, with `train_cli`, AMP and each AGF module trained in full as `modules_to_save`.

    AGF lives in an `nn.ModuleDict` that the decoder indexes by layer, so the entries are the AGF modules themselves
    (`model.language_model.agf.1`, ...; PEFT's wrapper keeps their call signature), not the dict (`"agf"` would wrap
    the dict and break indexing). `PeftModel.save_pretrained` stores LoRA + these modules, `PeftModel.from_pretrained`
    restores them and `merge_and_unload()` gives back a plain CLI model (save it with [`save_cli_folder`]).

    `train_projector` also trains the projector (`model.multi_modal_projector`) in full.
    """
    from peft import LoraConfig

    modules_to_save = list(cli_module_names(model)) if train_cli else []
    if train_projector:
        modules_to_save.append("model.multi_modal_projector")
    if train_cli and not modules_to_save:
        raise ValueError("cli_peft_config: the model has no AMP/AGF modules; is it a CLIForConditionalGeneration?")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        bias="none",
        **lora_kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Trainer helpers
# ----------------------------------------------------------------------------------------------------------------------


def loss_curve(trainer_or_history) -> list[tuple[int, float]]:
    """`[(step, loss), ...]` from a `Trainer` (or its `state.log_history`)."""
    history = getattr(getattr(trainer_or_history, "state", None), "log_history", trainer_or_history)
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]


def format_loss_curve(curve: list[tuple[int, float]], width: int = 40) -> str:
    """The loss curve as `step  loss  bar` lines."""
    if not curve:
        return "(no loss logged)"
    top = max(loss for _, loss in curve) or 1.0
    lines = [f"{'step':>6}  {'loss':>8}"]
    for step, loss in curve:
        lines.append(f"{step:>6}  {loss:>8.4f}  {'#' * max(1, round(width * loss / top))}")
    return "\n".join(lines)


def loss_printer(print_fn=print):
    """A `TrainerCallback` printing `step  loss` as the Trainer logs (the live loss curve), instead of log dicts."""
    from transformers import TrainerCallback

    class LossPrinter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            print_fn(f"{'step':>6}  {'loss':>8}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print_fn(f"{state.global_step:>6}  {float(logs['loss']):>8.4f}")

    return LossPrinter()


def quiet_trainer(trainer, print_fn=print):
    """Replaces the Trainer's log-dict printer by [`loss_printer`]; returns the trainer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(loss_printer(print_fn))
    return trainer


def training_arguments(output_dir, **overrides):
    """
    `TrainingArguments` suited to CLI fine-tuning with [`CLIDataCollator`]: `remove_unused_columns=False` (the
    collator reads `messages` / `images`), no reporting integrations, no checkpoints, a loss logged every step.
    """
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=os.fspath(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def save_cli_folder(model, processor, folder: str | os.PathLike, **save_kwargs) -> str:
    """
    Saves model and processor as a self-contained remote-code folder (weights, config with `auto_map`,
    `configuration_cli.py` / `modeling_cli.py` / `processing_cli.py`, tokenizer, processor configs, chat template).

    The folder is then tidied ([`tidy_saved_folder`]): the tokenizer files carry no loader or call state
    (`is_local`, `local_files_only`, ...) and the weights get the permissions of the folder's other files.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    processor.save_pretrained(folder)
    for name in REMOTE_CODE_FILES:  # save_pretrained copies what it reaches; make sure all three are there
        if not os.path.exists(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(SOURCE_DIR, name), os.path.join(folder, name))
    tidy_saved_folder(folder)
    return folder


def _new_file_mode(folder: str) -> int:
    """The permission bits an ordinary new file gets here (`0o666` less the umask), read off a probe file."""
    probe = os.path.join(folder, f".mode-probe-{os.getpid()}")
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(descriptor).st_mode & 0o777
    finally:
        os.close(descriptor)
        os.remove(probe)


def tidy_saved_folder(folder: str | os.PathLike) -> list[str]:
    """
    Tidies a folder written by `save_pretrained`, in place; returns what it changed:

    - `processing_cli.strip_tokenizer_runtime_state`: no `is_local`, `local_files_only` or other loader / call state
      in `tokenizer_config.json` and `tokenizer.json` (a processor loaded as remote code from an older folder saves
      with that folder's code, so this runs again here);
    - `*.safetensors` files get the permissions an ordinary new file gets (`0o666` less the umask, like
      `config.json`): safetensors >= 0.8 writes through a temporary file created with mode 0600 and renames it,
      which would leave the weights readable by their owner alone.
    """
    folder = os.fspath(folder)
    changed = strip_tokenizer_runtime_state(folder)
    weights = [name for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]
    if weights:
        mode = _new_file_mode(folder)
        for name in weights:
            path = os.path.join(folder, name)
            if os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)
                changed.append(f"{name}: mode {mode:o}")
    return changed


def copy_remote_code(folder: str | os.PathLike) -> list[str]:
    """Copies the repository's `configuration_cli.py`, `modeling_cli.py`, `processing_cli.py` into `folder`."""
    copied = []
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(SOURCE_DIR, name), os.path.join(os.fspath(folder), name))
        copied.append(name)
    return copied


def refresh_saved_folder(folder: str | os.PathLike) -> str:
    """
    Re-saves a CLI model folder with the repository's current code: loads model and processor with the repository's
    classes (not the folder's copies) and saves them back in place (weights, config, generation config, processor and
    tokenizer files, and the `configuration_cli.py` / `modeling_cli.py` / `processing_cli.py` copies). Run it after
    changing those files so that a shipped folder never carries stale code.
    """
    folder = os.fspath(folder)
    model = CLIForConditionalGeneration.from_pretrained(folder).eval()
    processor = load_processor(folder)
    save_cli_folder(model, processor, folder)
    copy_remote_code(folder)
    return folder


def load_processor(folder: str | os.PathLike) -> CLIProcessor:
    """
    The [`CLIProcessor`] of a saved CLI folder built with this repository's classes, not the folder's code copies (so
    no `trust_remote_code` is involved): its image processor config, its tokenizer (the transformers class named in
    `tokenizer_config.json`), its chat template and processor settings.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = os.fspath(folder)

    def read_json(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    tokenizer_class_name = read_json("tokenizer_config.json").get("tokenizer_class")
    tokenizer_class = tokenizer_class_from_name(tokenizer_class_name) if tokenizer_class_name else None
    if tokenizer_class is None:
        raise ValueError(
            f"{folder}: tokenizer_config.json names no transformers tokenizer class (got {tokenizer_class_name!r})."
        )
    settings = read_json("processor_config.json")
    chat_template = None
    template_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            chat_template = f.read()
    return CLIProcessor(
        image_processor=CLIImageProcessor.from_pretrained(folder),
        tokenizer=tokenizer_class.from_pretrained(folder),
        chat_template=chat_template,
        **{
            key: settings[key]
            for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token",
                        "video_token")
            if key in settings
        },
    )


__all__ = [
    "CLIDataCollator",
    "EmptyReplyWarning",
    "IGNORE_INDEX",
    "LLM_LORA_TARGET_MODULES",
    "SampleError",
    "check_sample",
    "cli_module_names",
    "cli_peft_config",
    "copy_remote_code",
    "format_loss_curve",
    "load_chat_jsonl",
    "load_processor",
    "loss_curve",
    "loss_printer",
    "quiet_trainer",
    "refresh_saved_folder",
    "save_cli_folder",
    "tidy_saved_folder",
    "trainable_summary",
    "training_arguments",
]
