"""
Serve a CLI checkpoint behind transformers' own OpenAI-compatible server (`transformers serve`: FastAPI + uvicorn,
`/v1/chat/completions` with streaming, `/v1/responses`, `/health`).

    python examples/serve.py examples/shapes/model --port 8000
    python examples/serve.py path/to/CLI-7B-hf --host 0.0.0.0 --device cuda:0 --dtype bfloat16
    python examples/serve.py --help          # every option of `transformers serve`, passed through

`transformers serve` cannot load CLI by itself: for a model type it does not know it resolves
`getattr(transformers, config.architectures[0])`. This launcher adds two things and nothing else:

1. it registers the folder's own CLI classes (its remote code, after checking that every `auto_map` of the folder names
   one of CLI's three files) for `AutoModelForMultimodalLM`, the auto class the server loads image-text models with,
   and for `AutoConfig` / `AutoProcessor` / `AutoImageProcessor`; the server itself runs with `trust_remote_code=False`,
   so the one folder's code is trusted (serve folders you trust) and no model a request names can run code;
2. request errors (`ValueError`: an undecodable image, an image URL that does not answer within `CLI_IMAGE_TIMEOUT`,
   more `<image>` markers than images, a prompt over the model's length, a video or audio item; a chat template error)
   are answered with HTTP 400 and their message instead of transformers' bare 500.

The server is started with MODEL preloaded: requests name the model exactly as given on the command line (any other
name gets the server's own 400).
"""

import inspect
import json
import os
import sys
from typing import Annotated

import typer
from transformers import AutoConfig, AutoImageProcessor, AutoModelForMultimodalLM, AutoProcessor
from transformers.cli.serve import Serve
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
from transformers.utils import cached_file

CLI_REMOTE_MODULES = ("configuration_cli", "modeling_cli", "processing_cli")
CONFIG_FILES_WITH_AUTO_MAP = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
MAX_CONFIG_BYTES = 1 << 20  # a CLI-7B config.json is ~3 KB


def _split_revision(model: str) -> tuple[str, str | None]:
    """`repo@revision` -> (repo, revision), as the server reads its model names."""
    model_id, _, revision = model.partition("@")
    return model_id, revision or None


def _auto_map_references(auto_map) -> list[tuple[str | None, object]]:
    """`(auto class, reference)` of an `auto_map` (values are "module.Class", or lists of them for tokenizers)."""
    if auto_map is None:
        return []
    if not isinstance(auto_map, dict):
        return [(None, auto_map)]
    pairs = []
    for auto_class, value in auto_map.items():
        pairs.extend((auto_class, reference) for reference in (value if isinstance(value, (list, tuple)) else [value]))
    return [(auto_class, reference) for auto_class, reference in pairs if reference is not None]


def check_cli_folder(model: str) -> dict[str, str]:
    """
    Reads MODEL's config files as JSON, before any of its code runs, and raises `ValueError` unless it is a CLI
    checkpoint (`model_type == "cli"`) whose `auto_map`s (model, processor, image processor, tokenizer) reference only
    CLI's own three files in the same folder. Returns `{auto class name: "module.Class"}` over all of them.
    """
    model_id, revision = _split_revision(model)
    references = {}
    for name in CONFIG_FILES_WITH_AUTO_MAP:
        path = cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        if path is None:
            if name == "config.json":
                raise ValueError(f"{model} has no config.json: pass a folder written by convert_checkpoint.py.")
            continue
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ValueError(f"{model}'s {name} is {os.path.getsize(path)} bytes, over {MAX_CONFIG_BYTES}.")
        with open(path, encoding="utf-8") as file:
            try:
                content = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{model}'s {name} is not valid JSON: {error}") from None
        if not isinstance(content, dict):
            raise ValueError(f"{model}'s {name} must hold a JSON object.")
        if name == "config.json" and content.get("model_type") != "cli":
            raise ValueError(
                f"{model} is not a CLI checkpoint: its model_type is {content.get('model_type')!r}, expected 'cli'."
            )
        nested = [content.get("auto_map")] + [
            value.get("auto_map") for value in content.values() if isinstance(value, dict)
        ]
        for auto_map in nested:
            for auto_class, reference in _auto_map_references(auto_map):
                module = reference.split(".")[0] if isinstance(reference, str) else None
                if module not in CLI_REMOTE_MODULES or "--" in reference:
                    raise ValueError(
                        f"{model}'s {name} maps a class to {reference!r}; a CLI checkpoint references only "
                        f"{', '.join(m + '.py' for m in CLI_REMOTE_MODULES)} in its own folder."
                    )
                references.setdefault(auto_class, reference)
    return references


def served_model_class(model_class: type) -> type:
    """
    `model_class` as the server runs it: a prompt longer than the model's positions is a request error (400). A
    transformers model itself accepts any length (RoPE models extrapolate, and rope scaling extends them on purpose);
    a server answering from a 2,048-position model should refuse a 4,000-token prompt rather than return noise.
    """

    class ServedCLIForConditionalGeneration(model_class):
        def generate(self, inputs=None, **kwargs):
            prompt = kwargs.get("input_ids", inputs)
            limit = self.config.text_config.max_position_embeddings
            if prompt is not None and prompt.shape[-1] > limit:
                raise ValueError(
                    f"The input is {prompt.shape[-1]} tokens long, over this model's {limit} positions "
                    "(text_config.max_position_embeddings)."
                )
            return super().generate(inputs, **kwargs)

    return ServedCLIForConditionalGeneration


def register_cli_classes(model: str) -> type:
    """
    Checks MODEL ([`check_cli_folder`]), loads the classes its `auto_map`s name from its remote code (trusting this
    folder alone) and registers them for the auto classes the server loads with: `AutoConfig` (model type `cli`),
    `AutoModelForMultimodalLM`, `AutoProcessor` and `AutoImageProcessor`. The server then loads the folder with
    `trust_remote_code=False`, so no other model a request names (`/load_model`) can run its code. Returns the model
    class.
    """
    references = check_cli_folder(model)
    model_id, revision = _split_revision(model)

    def load(*auto_classes):
        reference = next((references[name] for name in auto_classes if name in references), None)
        if reference is None:
            raise ValueError(f"{model}'s auto_map names no {' or '.join(auto_classes)} class.")
        return get_class_from_dynamic_module(reference, model_id, revision=revision)

    config_class = load("AutoConfig")
    model_class = served_model_class(load("AutoModelForImageTextToText", "AutoModel"))
    AutoConfig.register("cli", config_class, exist_ok=True)
    AutoModelForMultimodalLM.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, load("AutoProcessor"), exist_ok=True)
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": load("AutoImageProcessor")}, exist_ok=True)
    # `ModelManager._load_model` takes the AutoModelForMultimodalLM path for the model types named here, and
    # `get_model_modality` reads the request modality (images accepted) from the class names
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES["cli"] = model_class.__name__
    return model_class


def request_error_response(request, error: Exception):
    """The answer to a request the model cannot serve: 400 with the error's message, in OpenAI's error layout."""
    from fastapi.responses import JSONResponse

    message = f"{type(error).__name__}: {error}"
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": 400}}, status_code=400)


def install_request_error_handlers() -> None:
    """Makes transformers' `build_server` give its app `request_error_response` for `ValueError` and template errors."""
    from jinja2 import TemplateError
    from transformers.cli.serving import server

    build_server = server.build_server
    if getattr(build_server, "cli_request_errors", False):
        return

    def build_server_with_request_errors(*args, **kwargs):
        app = build_server(*args, **kwargs)
        for error_class in (ValueError, TemplateError):
            app.add_exception_handler(error_class, request_error_response)
        return app

    build_server_with_request_errors.cli_request_errors = True
    server.build_server = build_server_with_request_errors


def serve(model: str, **options) -> None:
    # image sources in requests are URLs or base64 data, never files on this machine (unless the operator says so)
    os.environ.setdefault("CLI_IMAGE_LOCAL_PATHS", "0")
    register_cli_classes(model)
    install_request_error_handlers()
    Serve(force_model=model, trust_remote_code=False, **options)


def _serve_signature() -> inspect.Signature:
    """`transformers serve`'s options, with MODEL required; `--trust-remote-code` is not one (see `register_cli_classes`)."""
    model = inspect.Parameter(
        "model",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, typer.Argument(help="A CLI checkpoint folder or Hub repo (`repo@revision`).")],
    )
    options = [
        parameter
        for name, parameter in inspect.signature(Serve.__init__).parameters.items()
        if name not in ("self", "force_model", "trust_remote_code")
    ]
    return inspect.Signature([model, *options])


serve.__signature__ = _serve_signature()


def main(argv=None):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    help_text = __doc__.split("\n\n")[0].strip() + " Options are transformers serve's; see the module docstring."
    app.command(help=help_text)(serve)
    app(args=sys.argv[1:] if argv is None else argv, prog_name="serve.py")


if __name__ == "__main__":
    main()
