# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""Processor of CLI: LLaVA-NeXT-faithful image processing, the `qwen_1_5` chat template and the tokenizer."""

import base64
import binascii
import io
import json
import math
import os
import re
import time
import warnings

import numpy as np
from PIL import Image
from transformers import AddedToken, LlavaOnevisionProcessor
from transformers.image_utils import make_flat_list_of_images
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# SigLIP-so400m-patch14-384: (384 / 14) ** 2 = 27 * 27 patches per view, no CLS token.
NUM_IMAGE_TOKENS = 729

# Image downloads (http(s):// sources): at most CLI_IMAGE_TIMEOUT seconds and CLI_IMAGE_MAX_BYTES bytes each.
IMAGE_TIMEOUT_ENV = "CLI_IMAGE_TIMEOUT"
DEFAULT_IMAGE_TIMEOUT = 10.0
IMAGE_MAX_BYTES_ENV = "CLI_IMAGE_MAX_BYTES"
DEFAULT_IMAGE_MAX_BYTES = 50 * 2**20

# What a chat message may hold (the qwen_1_5 template renders nothing else).
CHAT_ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image")
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")

# Keys `from_pretrained` puts into a tokenizer's init kwargs that describe how it was loaded, not what it is; saved
# tokenizer_config.json files must not carry them (see `strip_tokenizer_runtime_state`).
TOKENIZER_LOADER_KEYS = (
    "is_local",
    "local_files_only",
    "name_or_path",
    "_commit_hash",
    "_from_auto",
    "_from_pipeline",
    "cache_dir",
    "force_download",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "trust_remote_code",
    "use_auth_token",
    "user_agent",
)

# LLaVA-NeXT's `conv_qwen` ("qwen_1_5"): ChatML with a default system prompt. Every image item of a message renders as
# "<image>\n" where it stands, so text and images interleave in order; `{% generation %}` marks the assistant replies
# (their text, `<|im_end|>` and the newline: what LLaVA-NeXT's `preprocess_qwen` trains on) for
# `return_assistant_tokens_mask`. The role headers are literals chosen by the role (a role string is never echoed, so
# it cannot inject markup); any other role, item type or non-string text stops the rendering (the processor checks
# the messages first and raises a `ValueError` naming the message: see `check_chat_messages`).
CLI_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not defined or content is none -%}"
    "{%- elif content is mapping or content is not iterable -%}"
    "{{ raise_exception('Message content must be a string or a list of {\"type\": \"text\"} / {\"type\": \"image\"} items.') }}"
    "{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item is not mapping -%}"
    "{{ raise_exception('Content items must be {\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"} dicts.') }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' and item['text'] is string -%}{{ item['text'] }}"
    "{%- elif item['type'] == 'video' -%}"
    "{{ raise_exception('CLI handles images only: a video item cannot be rendered by the qwen_1_5 template.') }}"
    "{%- else -%}"
    "{{ raise_exception('Content items must be {\"type\": \"text\", \"text\": a string} or {\"type\": \"image\"}.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ render_content(message['content']) }}{{ '<|im_end|>\n' }}{% endgeneration %}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<|im_start|>user\n' }}{{ render_content(message['content']) }}{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'system' -%}"
    "{{ '<|im_start|>system\n' }}{{ render_content(message['content']) }}{{ '<|im_end|>\n' }}"
    "{%- else -%}"
    "{{ raise_exception('Message roles must be system, user or assistant.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# LLaVA-OneVision's `image_grid_pinpoints`: every (h, w) with h, w in 384 * {1..6}, 36 entries.
ANYRES_GRID_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]


def unpadded_grid_shape(
    original_height: int, original_width: int, current_height: int, current_width: int
) -> tuple[int, int]:
    """
    Height and width of an anyres feature grid after its letterbox padding is cut away, as LLaVA-NeXT computes them.

    LLaVA-NeXT truncates (`int(original * scale)`); transformers rounds (`int(round(x, 7))`), which gives one row or
    column more for some sizes. CLI checkpoints were trained with truncation, so both the processor's image-token count
    and the model's feature packing use this one function.

    Args:
        original_height, original_width: size of the image before preprocessing, in pixels.
        current_height, current_width: size of the padded feature grid (crops x patches per crop side).

    Returns:
        `(kept_height, kept_width)`: the grid size once the symmetric padding `(current - int(original * scale)) // 2`
        is removed from both sides of the padded dimension.
    """
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return current_height - 2 * padding, current_width
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return current_height, current_width - 2 * padding


def anyres_max_num_patches(vision_aspect_ratio: str | None) -> int | None:
    """`"anyres_max_9"` -> 9; `None` for plain `"anyres"` (no interpolation step)."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio or "")
    return int(match.group(1)) if match else None


def anyres_feature_grid(
    original_height: int,
    original_width: int,
    grid_rows: int,
    grid_cols: int,
    patches_per_side: int = 27,
    max_num_patches: int | None = 9,
) -> tuple[int, int]:
    """
    Final `(height, width)` of an image's anyres feature grid in LLaVA-NeXT's `spatial_unpad` + `anyres_max_N` packing.

    The `grid_rows x grid_cols` crops give a `(rows * p) x (cols * p)` grid; the padding is cut with
    [`unpadded_grid_shape`] (truncation), then, if `sqrt(h * w / (N * p * p)) = ratio > 1.1`, the grid is bilinearly
    interpolated to `(int(h // ratio), int(w // ratio))`. The image then takes `h * (w + 1)` tokens (one
    `image_newline` per row) after the `p * p` tokens of its base view.
    """
    height, width = unpadded_grid_shape(
        original_height, original_width, grid_rows * patches_per_side, grid_cols * patches_per_side
    )
    if max_num_patches is not None:
        ratio = math.sqrt(height * width / (max_num_patches * patches_per_side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    return height, width


def add_cli_special_tokens(tokenizer) -> dict[str, int]:
    """
    Adds `<image>` and `<video>` to `tokenizer` if it lacks them, as LLaVA-NeXT does: special added tokens,
    `normalized=False`, no left/right strip, appended in that order (so `<image>` gets id `len(tokenizer)`, 151646 for
    Qwen2). Tokens already present keep their ids.

    Returns:
        `{"image_token_id": ..., "video_token_id": ...}`, ready for `config.image_token_id` / `config.video_token_id`.
    """
    ids = {}
    for name, token in (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN)):
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)], special_tokens=True
            )
        ids[name] = tokenizer.convert_tokens_to_ids(token)
    return ids


def _pixel_limit_error(description: str, width: int | None, height: int | None, pixels: int, limit: int) -> ValueError:
    size = f"{width}x{height} = {pixels} pixels" if width is not None else f"{pixels} pixels"
    return ValueError(
        f"Image {description} is too large: {size}, over PIL's decompression-bomb limit of {limit} pixels "
        "(`PIL.Image.MAX_IMAGE_PIXELS`). If the image is trusted, raise `PIL.Image.MAX_IMAGE_PIXELS` (or set it to "
        "None) before processing it."
    )


def _check_pixel_limit(image: Image.Image, description: str = "") -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise _pixel_limit_error(description, image.width, image.height, image.width * image.height, limit)


def _describe(source) -> str:
    if isinstance(source, Image.Image):
        return f"({source.mode}, {source.width}x{source.height})"
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if isinstance(text, str):
        return repr(text if len(text) <= 80 else text[:77] + "...")
    return f"({type(source).__name__})"


def to_rgb_image(image: Image.Image, description: str | None = None) -> Image.Image:
    """
    LLaVA-NeXT's colour handling: `image.convert("RGB")` whatever the mode (L, LA, RGBA, P, CMYK, I;16, 1...). Alpha
    is dropped, not composited (transformers composites on white), 16-bit values are clipped to 255 by PIL. Decoding
    errors (truncated or corrupt data) and images over PIL's decompression-bomb limit raise a `ValueError`.
    """
    description = _describe(image) if description is None else description
    _check_pixel_limit(image, description)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image {description} is empty ({image.width}x{image.height} pixels).")
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"Cannot decode image {description}: {type(error).__name__}: {error}. The file is truncated, corrupt or "
            "in an unsupported format."
        ) from error


def _open_image(data_or_path, description: str) -> Image.Image:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            image = Image.open(data_or_path)
        except Image.DecompressionBombError as error:
            match = re.search(r"\((\d+) pixels\)", str(error))
            pixels = int(match.group(1)) if match else -1
            raise _pixel_limit_error(description, None, None, pixels, Image.MAX_IMAGE_PIXELS) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ValueError(f"Cannot read image {description}: {type(error).__name__}: {error}") from error
    try:
        return to_rgb_image(image, description)
    except ValueError:
        image.close()
        raise


def _positive_setting(name: str, default: float, value, cast):
    if value is None:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
    try:
        number = cast(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return number


def image_download_limits(timeout: float | None = None, max_bytes: int | None = None) -> tuple[float, int]:
    """
    `(timeout, max_bytes)` of an image download: the arguments if given, else the environment variables
    `CLI_IMAGE_TIMEOUT` (seconds, default 10) and `CLI_IMAGE_MAX_BYTES` (default 50 MiB = 52428800). A value that is not
    a positive number raises a `ValueError` naming the variable.
    """
    return (
        _positive_setting(IMAGE_TIMEOUT_ENV, DEFAULT_IMAGE_TIMEOUT, timeout, float),
        int(_positive_setting(IMAGE_MAX_BYTES_ENV, DEFAULT_IMAGE_MAX_BYTES, max_bytes, lambda v: int(str(v)))),
    )


def download_image_bytes(url: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """
    The body of `url` (`http://` or `https://`), read with a deadline and a size cap ([`image_download_limits`]): the
    connection and every read wait at most `timeout` seconds, and the download is abandoned once it has taken
    `timeout` seconds in all (checked between reads) or holds more than `max_bytes` bytes (a larger `Content-Length` is
    refused before reading). Redirects are followed to http(s) URLs only. Failures raise a `ValueError` naming the URL.
    """
    import http.client
    import socket
    import urllib.error
    import urllib.request

    timeout, max_bytes = image_download_limits(timeout, max_bytes)
    description = _describe(url)
    limits = f"{IMAGE_TIMEOUT_ENV}={timeout:g} s, {IMAGE_MAX_BYTES_ENV}={max_bytes} bytes"
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPRedirectHandler(),  # without an FTP or file handler, a redirect elsewhere fails
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    deadline = time.monotonic() + timeout
    try:
        with opener.open(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                raise ValueError(
                    f"Image {description} is {int(declared)} bytes, over the limit of {max_bytes} bytes "
                    f"({IMAGE_MAX_BYTES_ENV}); raise {IMAGE_MAX_BYTES_ENV} if the image is trusted."
                )
            read = getattr(response, "read1", response.read)
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise socket.timeout("the download took too long")
                chunk = read(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(
                        f"Image {description} is larger than {max_bytes} bytes ({IMAGE_MAX_BYTES_ENV}); the download "
                        f"was stopped. Raise {IMAGE_MAX_BYTES_ENV} if the image is trusted."
                    )
            return b"".join(chunks)
    except ValueError:
        raise
    except (TimeoutError, socket.timeout) as error:
        raise ValueError(
            f"Cannot download image {description}: no complete answer within {timeout:g} s ({IMAGE_TIMEOUT_ENV}): "
            f"{error}."
        ) from error
    except urllib.error.URLError as error:
        reason = error.reason if not isinstance(error, urllib.error.HTTPError) else f"HTTP {error.code} {error.reason}"
        if isinstance(reason, (TimeoutError, socket.timeout)):
            reason = f"no answer within {timeout:g} s ({IMAGE_TIMEOUT_ENV})"
        raise ValueError(f"Cannot download image {description}: {reason} ({limits}).") from error
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(f"Cannot download image {description}: {type(error).__name__}: {error} ({limits}).") from error


def load_cli_image(source, timeout: float | None = None, max_bytes: int | None = None) -> Image.Image:
    """
    Loads an image the way LLaVA-NeXT does (`Image.open(...).convert("RGB")`, no EXIF rotation) from a PIL image, a
    local path (`str` or `os.PathLike`), an `http(s)://` URL, a `data:image/...;base64,` URL, a raw base64 string or
    `bytes`. URLs are downloaded by [`download_image_bytes`] (`timeout` / `max_bytes` default to the environment's
    `CLI_IMAGE_TIMEOUT` / `CLI_IMAGE_MAX_BYTES`: 10 s and 50 MiB). Anything unreadable raises a `ValueError` that names
    the source.
    """
    description = _describe(source)
    if isinstance(source, Image.Image):
        return to_rgb_image(source, description)
    if isinstance(source, (bytes, bytearray)):
        return _open_image(io.BytesIO(source), description)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ValueError(f"Cannot load an image from a {type(source).__name__}; pass a PIL image, path, URL or base64.")
    if source.startswith(("http://", "https://")):
        return _open_image(io.BytesIO(download_image_bytes(source, timeout, max_bytes)), description)
    if os.path.isfile(source):
        return _open_image(source, description)
    payload = source.split(",", 1)[1] if source.startswith("data:") else source
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        data = None
    if not data:
        raise ValueError(
            f"Cannot load image {description}: it is not an existing file, an http(s) URL or base64 image data."
        )
    return _open_image(io.BytesIO(data), description)


def warn_if_already_rescaled(images) -> int:
    """
    Logs transformers' "already rescaled" warning when float images (arrays, nested lists kept) have every value within
    [0, 1] (`transformers.image_utils.is_scaled_image`); returns how many such images there are.
    """
    from transformers.image_utils import is_scaled_image

    def flat(items):
        for item in items:
            if isinstance(item, (list, tuple)):
                yield from flat(item)
            else:
                yield item

    scaled = sum(
        1 for image in flat(images) if isinstance(image, np.ndarray) and image.size and np.issubdtype(image.dtype, np.floating)
        and is_scaled_image(image)
    )
    if scaled:
        logger.warning(
            f"It looks like you are trying to rescale already rescaled images: {scaled} float image(s) have all their "
            "values within [0, 1] and `do_rescale=True` divides them by 255 again (they turn nearly black). If the "
            "input images have pixel values between 0 and 1, set `do_rescale=False` to avoid rescaling them again."
        )
    return scaled


class CLIImageProcessor(LlavaOnevisionImageProcessorPil):
    r"""
    LLaVA-NeXT `anyres_max_9` image processing for CLI on transformers' PIL/NumPy backend (no torchvision needed).

    Defaults are LLaVA-OneVision's SigLIP settings: 384x384 views, BICUBIC resizing, rescale 1/255, `image_mean =
    image_std = [0.5, 0.5, 0.5]`, RGB conversion and the 36 `image_grid_pinpoints` (384..2304 in steps of 384).

    One image in a prompt (`process_anyres_image` in LLaVA-NeXT): the best pinpoint resolution is chosen
    (`select_best_resolution`), the image is resized keeping its aspect ratio (`math.ceil` on the scaled side), pasted
    centred on a black canvas and cut into 384x384 tiles; the whole image resized to 384x384 comes first. Several
    images in one prompt (nested `images=[[a, b]]`, as `apply_chat_template` passes them): each image is only padded to
    a square with the mean colour (127) and resized to 384x384 (LLaVA-NeXT's "pad" mode for multi-image data).
    Outputs `pixel_values` `(num_images, max_views, 3, 384, 384)` (zero views pad the batch), `image_sizes` `(height,
    width)` and `batch_num_images`, as transformers' `LlavaOnevisionImageProcessor` does.

    Where transformers' LLaVA-OneVision processor and LLaVA-NeXT differ, this one follows LLaVA-NeXT:

    - images with transparency (RGBA, LA, PA, P with a transparent colour) are converted with PIL's
      `.convert("RGB")`, which drops alpha (transparent pixels keep their stored colour, often black); transformers
      composites them onto white;
    - images given as paths/URLs/base64 are not EXIF-rotated (transformers' `load_image` applies
      `ImageOps.exif_transpose`); LLaVA-NeXT opens them with `Image.open(...).convert("RGB")`;
    - transformers' mean/std default is OpenAI CLIP's; here 0.5 (SigLIP) as in LLaVA-OneVision.

    The geometry (best resolution, ceil resize, centred black padding, tiles, the base view) and the pixel arithmetic
    are the same in both; transformers' `select_best_resolution` iterates pinpoints as `(h, w)`, LLaVA-NeXT as
    `(w, h)`, which only matters for exact ties, and no image up to 4700x4700 has one with the default grid.

    Bad images raise `ValueError`: undecodable or truncated files, empty images, and images over
    `PIL.Image.MAX_IMAGE_PIXELS` (PIL's decompression-bomb limit; the message gives the size and the limit). URLs are
    downloaded with a timeout and a size cap (`CLI_IMAGE_TIMEOUT`, `CLI_IMAGE_MAX_BYTES`; see [`download_image_bytes`]).

    Float images whose values all lie within [0, 1] (what torchvision's `ToTensor` gives) while `do_rescale=True` are
    rescaled again (divided by 255: nearly black). As transformers' own image processors do, this logs a warning
    ("It looks like you are trying to rescale already rescaled images"), here on every call that has such images and
    with their count; pass `do_rescale=False` for them. It warns rather than raises because an all-dark 0..255 float
    image (e.g. zeros) is legitimate input.
    """

    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    image_grid_pinpoints = ANYRES_GRID_PINPOINTS

    def fetch_images(self, image_url_or_urls):
        """Loads paths, URLs, base64 strings and bytes (nested lists kept) with [`load_cli_image`]."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, bytes, bytearray, os.PathLike)):
            return load_cli_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def _preprocess_image_like_inputs(self, images, *args, **kwargs):
        prepared = self._prepare_image_like_inputs(images, **kwargs)
        if kwargs.get("do_rescale"):
            warn_if_already_rescaled(prepared)
        return self._preprocess(prepared, *args, **kwargs)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        if isinstance(image, Image.Image):
            if do_convert_rgb:
                image = to_rgb_image(image)
                do_convert_rgb = False
            else:
                _check_pixel_limit(image, _describe(image))
        array = super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)
        if array.ndim != 3 or 0 in array.shape:
            raise ValueError(f"Expected a non-empty image with 2 spatial dimensions, got an array of shape {array.shape}.")
        return array


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_chat_messages(messages, name: str = "conversation") -> None:
    """
    Checks one conversation against what the `qwen_1_5` template renders and raises a `ValueError` naming the message
    (`"conversation, message 2: ..."`) and what is allowed: a non-empty list of dicts with `role` in `system` / `user`
    / `assistant` and `content` a string or a list of items `{"type": "text", "text": <str>}` / `{"type": "image"}`
    (optionally with `image`, `url`, `path` or `base64`). Keys whose value is None count as absent, as in
    transformers' `apply_chat_template`. Video and audio items are refused (CLI handles images only).
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"{name}: expected a non-empty list of messages, got {_short(messages)}.")
    for index, message in enumerate(messages):
        where = f"{name}, message {index}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}.")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"{where} has role {_short(role)}; roles must be one of {list(CHAT_ROLES)}.")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(
                f"{where} ({role}): content must be a string or a list of {{'type': 'text', 'text': ...}} / "
                f"{{'type': 'image'}} items, got {type(content).__name__} {_short(content)}."
            )
        for position, item in enumerate(content):
            item_type = item.get("type") if isinstance(item, dict) else None
            if item_type in ("video", "audio"):
                raise ValueError(
                    f"{where}, item {position}: {item_type} items are not supported; CLI handles images and text only."
                )
            if item_type not in CONTENT_TYPES:
                raise ValueError(
                    f"{where}, item {position}: {_short(item)} is not a content item; items must be "
                    "{'type': 'text', 'text': <string>} or {'type': 'image'} (with 'image', 'url', 'path' or "
                    "'base64', or none when `images=` are passed separately)."
                )
            if item_type == "text" and not isinstance(item.get("text"), str):
                raise ValueError(
                    f"{where}, item {position}: a text item needs a string 'text', got {_short(item.get('text'))}."
                )
            if item_type == "image" and sum(item.get(key) is not None for key in IMAGE_SOURCE_KEYS) > 1:
                raise ValueError(
                    f"{where}, item {position}: an image item holds one image source (one of "
                    f"{list(IMAGE_SOURCE_KEYS)}), got {[key for key in IMAGE_SOURCE_KEYS if item.get(key) is not None]}."
                )


def _is_empty(inputs) -> bool:
    """None, or (nested) lists/tuples with nothing in them."""
    if inputs is None:
        return True
    if isinstance(inputs, (list, tuple)):
        return all(_is_empty(item) for item in inputs)
    return False


def strip_tokenizer_runtime_state(folder: str | os.PathLike) -> list[str]:
    """
    Removes from a saved tokenizer what describes how it was loaded or last called rather than what it is, and returns
    the keys removed:

    - from `tokenizer_config.json`: the loader's keys ([`TOKENIZER_LOADER_KEYS`]: `is_local`, `local_files_only`,
      `name_or_path`, `cache_dir`, `revision`, ...), and the keys transformers copies at load time from
      `tokenizer.json`'s padding / truncation state (`padding_side`, `pad_to_multiple_of`, `pad_token_type_id`,
      `max_length`, `truncation_side`, `stride`, `truncation_strategy`) when they equal that state;
    - from `tokenizer.json`: the `padding` / `truncation` state of the last call (every call sets its own).

    Missing files are skipped. Every folder the project saves runs through it ([`CLIProcessor.save_pretrained`]).
    """
    folder = os.fspath(folder)
    removed = []
    state = {}
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_path):
        with open(tokenizer_path, encoding="utf-8") as f:
            tokenizer_json = json.load(f)
        for block in ("padding", "truncation"):
            if tokenizer_json.get(block) is not None:
                state[block] = tokenizer_json[block]
                tokenizer_json[block] = None
                removed.append(f"tokenizer.json:{block}")
        if state:
            _write_json(tokenizer_path, tokenizer_json, indent=2)
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        derived = {}
        padding, truncation = state.get("padding") or {}, state.get("truncation") or {}
        if padding:
            derived.update(
                padding_side=str(padding.get("direction", "")).lower(),
                pad_to_multiple_of=padding.get("pad_to_multiple_of"),
                pad_token_type_id=padding.get("pad_type_id"),
                max_length=padding.get("length"),
            )
        if truncation:
            derived.update(
                truncation_side=str(truncation.get("direction", "")).lower(),
                stride=truncation.get("stride"),
                truncation_strategy=truncation.get("strategy"),
                max_length=truncation.get("max_length"),
            )
        for key in list(config):
            value = config[key]
            if key in TOKENIZER_LOADER_KEYS or (key in derived and value in (derived[key], None)):
                removed.append(key)
                del config[key]
            elif key in ("max_length", "pad_to_multiple_of", "stride") and value is None:  # call defaults, nothing set
                removed.append(key)
                del config[key]
        if any(not name.startswith("tokenizer.json:") for name in removed):
            _write_json(config_path, config, indent=2, sort_keys=True)
    return removed


def _write_json(path: str, data, **kwargs) -> None:
    """Writes `data` next to `path` and renames it over `path` (never a half-written file)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, ensure_ascii=False, **kwargs) + "\n")
    os.replace(temporary, path)


class CLIProcessor(LlavaOnevisionProcessor):
    r"""
    Processor of CLI: a [`CLIImageProcessor`], a Qwen2 tokenizer holding `<image>` and the `qwen_1_5` chat template
    ([`CLI_CHAT_TEMPLATE`], the default).

    It is transformers' `LlavaOnevisionProcessor` without a video processor, counting `<image>` tokens the way
    LLaVA-NeXT packs features: per single image, `729` base tokens plus `h * (w + 1)` for the anyres grid, where
    `(h, w)` comes from [`unpadded_grid_shape`] (truncation; transformers rounds, which gives one more row or column for
    some sizes) followed by the `anyres_max_9` interpolation (ratio `> 1.1` -> `(int(h // ratio), int(w // ratio))`);
    per image of a multi-image prompt, `729 + 1`.

    Images are grouped per prompt following the `<image>` markers of each prompt, so a prompt with several images
    always gets the multi-image treatment even when `images` is a flat list (transformers treats a flat list as one
    image per prompt). A marker/image count mismatch raises `ValueError`.

    `videos` and `audio` / `audios` may be given empty (`[]`, as evaluation harnesses such as lmms-eval pass them);
    non-empty ones raise `ValueError` (CLI handles images only). `padding_side="left"` / `"right"` is honoured.
    `apply_chat_template` checks every message first ([`check_chat_messages`]): a bad role, item or content raises
    `ValueError` naming the message. `save_pretrained` writes the tokenizer without loader or call state
    ([`strip_tokenizer_runtime_state`]).

    Args:
        image_processor ([`CLIImageProcessor`]): the image processor.
        tokenizer: a tokenizer that holds `<image>` (see [`add_cli_special_tokens`]).
        num_image_tokens (`int`, defaults to 729): tokens of one 384x384 view.
        vision_feature_select_strategy (`str`, defaults to `"full"`): `"default"` drops one token per view (CLS).
        chat_template (`str`, *optional*): defaults to [`CLI_CHAT_TEMPLATE`].
        image_token, video_token (`str`): the placeholder tokens.
        vision_aspect_ratio (`str`, defaults to `"anyres_max_9"`): `"anyres_max_N"` or `"anyres"` (no interpolation).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="full",
        chat_template=None,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("CLIProcessor needs both an `image_processor` and a `tokenizer`.")
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        vocab = tokenizer.get_vocab()
        if self.image_token not in vocab:
            raise ValueError(
                f"The tokenizer has no {self.image_token!r} token; add it first with "
                "`processing_cli.add_cli_special_tokens(tokenizer)` (and resize the model's embeddings if needed)."
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = vocab.get(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        if chat_template is None:
            chat_template = CLI_CHAT_TEMPLATE
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        audios = kwargs.pop("audios", None)
        for name, value in (("videos", videos), ("audio", audio), ("audios", audios)):
            if not _is_empty(value):
                raise ValueError(
                    f"CLIProcessor handles images only; `{name}` must be None or empty, got {type(value).__name__} "
                    f"{_short(value)}."
                )
        if images is not None and text is not None:
            images = self._group_images_by_prompt(images, text, kwargs.get("sanitize_control_tokens", False))
        return super().__call__(images=images, text=text, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """
        transformers' `ProcessorMixin.apply_chat_template`, after checking every message ([`check_chat_messages`]);
        a template error (e.g. a custom template's `raise_exception`) becomes a `ValueError`.
        """
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
            conversation[0], (list, tuple)
        )
        for index, messages in enumerate(conversation if batched else [conversation]):
            name = f"conversation {index}" if batched else "conversation"
            if isinstance(messages, (list, tuple)):
                messages = [
                    {key: value for key, value in message.items() if value is not None}
                    if isinstance(message, dict) else message
                    for message in messages
                ]
            check_chat_messages(messages, name)
        from jinja2 import TemplateError

        try:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        except TemplateError as error:
            raise ValueError(f"The chat template cannot render this conversation: {error}") from error

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """
        transformers' `save_pretrained`, then [`strip_tokenizer_runtime_state`] on the folder (no `is_local`,
        `local_files_only`, ... in `tokenizer_config.json`). With `push_to_hub`, the cleaned files are uploaded
        (`push_to_hub` saves through this method too).
        """
        files = super().save_pretrained(save_directory)
        strip_tokenizer_runtime_state(save_directory)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1])
            self.push_to_hub(repo_id, **kwargs)
        return files

    def _group_images_by_prompt(self, images, text, sanitize_control_tokens: bool = False):
        """Checks that every prompt has as many `<image>` markers as images and nests the images per prompt."""
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("`text` must be a string or a list of strings.")
        images = self.image_processor.fetch_images(images)
        if isinstance(images, (list, tuple)) and len(images) == 0:
            flat = []
        else:
            try:
                flat = make_flat_list_of_images(images)
            except ValueError as error:
                raise ValueError(
                    f"Cannot read `images`: {error}. Pass PIL images, paths, URLs or arrays, as a list or one list per "
                    "prompt."
                ) from None
        if sanitize_control_tokens:
            from transformers.processing_utils import _MARKED_RE

            prompts = [_MARKED_RE.sub("", prompt) for prompt in prompts]
        counts = [prompt.count(self.image_token) for prompt in prompts]
        if sum(counts) != len(flat):
            per_prompt = f" ({counts} per prompt)" if len(counts) > 1 else ""
            raise ValueError(
                f"The text has {sum(counts)} {self.image_token} marker(s){per_prompt} but {len(flat)} image(s) were "
                f"passed. Every image needs exactly one {self.image_token} marker where it belongs in the prompt "
                "(`apply_chat_template` writes them for image items)."
            )
        if (
            isinstance(images, (list, tuple))
            and len(images) == len(counts)
            and all(isinstance(group, (list, tuple)) for group in images)
        ):
            given = [len(make_flat_list_of_images(group)) if len(group) else 0 for group in images]
            if given != counts:
                raise ValueError(
                    f"Images per prompt {given} do not match the {self.image_token} markers per prompt {counts}."
                )
        if not flat:
            return None
        grouped, start = [], 0
        for count in counts:
            grouped.append(list(flat[start : start + count]))
            start += count
        return grouped

    def _get_unpadded_features(self, height, width, patches_height, patches_width, scale_height, scale_width):
        """
        `(unpadded_features, newline_features)` of one image in LLaVA-NeXT's packing: truncating unpad
        ([`unpadded_grid_shape`]) then the `anyres_max_N` interpolation, one newline token per kept row.
        """
        kept_height, kept_width = anyres_feature_grid(
            height,
            width,
            scale_height,
            scale_width,
            patches_per_side=patches_height,
            max_num_patches=anyres_max_num_patches(self.vision_aspect_ratio),
        )
        return kept_height * kept_width, kept_height


CLIImageProcessor.register_for_auto_class("AutoImageProcessor")
CLIProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ANYRES_GRID_PINPOINTS",
    "CLI_CHAT_TEMPLATE",
    "CLIImageProcessor",
    "CLIProcessor",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_TOKEN",
    "NUM_IMAGE_TOKENS",
    "VIDEO_TOKEN",
    "CHAT_ROLES",
    "IMAGE_MAX_BYTES_ENV",
    "IMAGE_TIMEOUT_ENV",
    "add_cli_special_tokens",
    "anyres_feature_grid",
    "anyres_max_num_patches",
    "check_chat_messages",
    "download_image_bytes",
    "image_download_limits",
    "load_cli_image",
    "strip_tokenizer_runtime_state",
    "to_rgb_image",
    "unpadded_grid_shape",
    "warn_if_already_rescaled",
]
