"""Tiny random CLI / LLaVA-OneVision models for the tests (no downloads)."""

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from configuration_cli import CLIConfig
from modeling_cli import CLIForConditionalGeneration

IMAGE_SIZE = 28  # one crop; 7-pixel patches -> 4x4 = 16 patches per crop
IMAGE_TOKEN_ID = 250
VOCAB_SIZE = 256
PINPOINTS = [[IMAGE_SIZE * h, IMAGE_SIZE * w] for h in range(1, 7) for w in range(1, 7)]


def tiny_config_kwargs(**overrides) -> dict:
    kwargs = dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=5,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=7,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=IMAGE_TOKEN_ID + 1,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    kwargs.update(overrides)
    return kwargs


def tiny_cli_config(**overrides) -> CLIConfig:
    kwargs = dict(vision_extraction_layers=[1, 3, 4], llm_injection_layers=[1, 3], amp_lora_rank=4)
    kwargs.update(overrides)
    return CLIConfig(**tiny_config_kwargs(**kwargs))


def tiny_cli_model(seed: int = 0, attn_implementation: str = "eager", **overrides) -> CLIForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_cli_config(**overrides)
    config._attn_implementation = attn_implementation
    return CLIForConditionalGeneration(config).eval()


def native_twin(cli_model) -> LlavaOnevisionForConditionalGeneration:
    """transformers' own LLaVA-OneVision with the CLI model's base weights (the independent reference)."""
    cli_config = cli_model.config.to_dict()
    for key in ("vision_extraction_layers", "llm_injection_layers", "amp_lora_rank", "amp_lora_alpha", "agf_num_heads",
                "auto_map", "model_type", "architectures"):
        cli_config.pop(key, None)
    config = LlavaOnevisionConfig(**cli_config)
    config._attn_implementation = cli_model.config._attn_implementation
    native = LlavaOnevisionForConditionalGeneration(config).eval()
    base_state = {k: v for k, v in cli_model.state_dict().items() if ".amp." not in k and ".agf." not in k}
    missing, unexpected = native.load_state_dict(base_state, strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings], (
        missing,
        unexpected,
    )
    return native


def randomize_cli_modules(model, seed: int = 1, scale: float = 0.5) -> None:
    """Gives AMP's B, AGF's gates and attention biases non-zero values so that the injection really runs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("amp.lora_B", "readout_vector", "value_vectors", "gate_bias")):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif ".agf." in name and name.endswith(("_bias", "constant")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
