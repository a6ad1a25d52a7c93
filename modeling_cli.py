# Copyright 2026 The CLI for transformers authors. Licensed under the Apache License, Version 2.0.
"""
CLI (Cross-Layer Injection, arXiv 2601.10710): LLaVA-OneVision-Qwen2 with a many-to-many vision-language bridge.

- AMP (Adaptive Multi-Projection): the features of every extraction layer `k` of the vision tower go through the shared
  projector plus a per-layer LoRA, `V_k = P(F_k) + (alpha / r) B_k A_k F_k`, and are packed like the baseline features.
- AGF (Adaptive Gating Fusion): before each injection decoder layer `j`, a gate per vision layer is computed from two
  single-query attentions (one over each `V_k`, one over the context hidden states) and `sum_k g_k V_k` is added to the
  hidden states at the image positions. Gates start at 0, so an untrained CLI model is exactly its base LLaVA-OV.

The per-layer features travel in `deepstack_features` (`[layer][image] -> (tokens, hidden_size)`, the Qwen3-VL layout)
so that `generate()` expands them for beams / `num_return_sequences` like the pooled image features.
"""

import math
import re
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionModelOutputWithPast,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs


# With `device_map="auto"` and offloading, transformers' device map gives LLaVA-OneVision's root parameter
# `model.image_newline` its own entry, and accelerate's `check_device_map` then warns that the entry names no submodule
# although it places the parameter correctly (transformers' own LlavaOnevisionForConditionalGeneration warns the same).
warnings.filterwarnings(
    "ignore", message=r"The following device_map keys do not match any submodules in the model: \['model\.image_newline'\]"
)

try:  # loaded as remote code: a package folder
    from .configuration_cli import CLIConfig
    from .processing_cli import unpadded_grid_shape
except ImportError:  # installed as top-level modules
    from configuration_cli import CLIConfig
    from processing_cli import unpadded_grid_shape


@dataclass
class CLIImageFeaturesOutput(BaseModelOutputWithPooling):
    """
    Output of [`CLIModel.get_image_features`].

    pooler_output (`list[torch.Tensor]`): per image, the baseline features `(num_image_tokens, hidden_size)`.
    deepstack_features (`list[list[torch.Tensor]]`): `[layer][image] -> (num_image_tokens, hidden_size)`, the AMP
        features `V_k` of every extraction layer, packed exactly like `pooler_output`.
    packed_features (`torch.Tensor` of shape `(K + 1, total_image_tokens, hidden_size)`): the one buffer all of the
        above are views of (slot 0 = baseline, slot `1 + k` = `V_k`), so the forward pass needs no copy of them.
    """

    deepstack_features: list | None = None
    packed_features: torch.Tensor | None = None


@dataclass
class CLITextModelOutputWithPast(BaseModelOutputWithPast):
    """
    gate_weights (`torch.FloatTensor` of shape `(num_injection_layers, batch_size, num_extraction_layers)`, *optional*):
        AGF gates `g_k` of every injection layer, returned with `output_gate_weights=True` on a step that injects.
    """

    gate_weights: torch.FloatTensor | None = None


@dataclass
class CLIModelOutputWithPast(LlavaOnevisionModelOutputWithPast):
    """
    gate_weights (`torch.FloatTensor` of shape `(num_injection_layers, batch_size, num_extraction_layers)`, *optional*):
        AGF gates, returned with `output_gate_weights=True` on a step that injects (prefill).
    """

    gate_weights: torch.FloatTensor | None = None


@dataclass
class CLICausalLMOutputWithPast(LlavaOnevisionCausalLMOutputWithPast):
    """
    gate_weights (`torch.FloatTensor` of shape `(num_injection_layers, batch_size, num_extraction_layers)`, *optional*):
        AGF gates, returned with `output_gate_weights=True` on a step that injects (prefill). Row `j` is the
        injection layer `config.llm_injection_layers[j]`, column `k` the vision layer
        `config.vision_extraction_layers[k]`: the paper's "criss-cross" picture.
    """

    gate_weights: torch.FloatTensor | None = None


class PackingPlan(NamedTuple):
    """Where one image's features go: its packed token count and, for an anyres image, the grid geometry."""

    num_tokens: int
    grid_shape: tuple[int, int] | None = None  # crops per column, crops per row
    crop_box: tuple[int, int, int, int] | None = None  # top, left, height, width kept after unpadding
    output_shape: tuple[int, int] | None = None  # rows, cols after the anyres_max_N interpolation (or the kept size)


class CLIAdaptiveMultiProjection(nn.Module):
    """
    AMP: one LoRA `(A_k, B_k)` per extraction layer beside the shared projector: `V_k = P(F_k) + (alpha / r) B_k A_k F_k`.

    `lora_A` is `(K, r, vision_hidden_size)`, `lora_B` is `(K, text_hidden_size, r)` and starts at zero. Layers are
    projected one at a time (see `CLIModel.get_image_features`): stacking all K first costs more memory than it saves.
    """

    def __init__(self, config: CLIConfig):
        super().__init__()
        num_layers = len(config.vision_extraction_layers)
        rank = config.amp_lora_rank
        self.lora_A = nn.Parameter(torch.empty(num_layers, rank, config.vision_config.hidden_size))
        self.lora_B = nn.Parameter(torch.zeros(num_layers, config.text_config.hidden_size, rank))
        self.scaling = config.amp_lora_alpha / rank

    def forward(self, layer_features: torch.Tensor, projected_features: torch.Tensor, index: int) -> torch.Tensor:
        """
        Args:
            layer_features: `(..., vision_hidden_size)`, the vision features `F_k` of extraction layer number `index`.
            projected_features: `(..., text_hidden_size)`, the shared projector's output `P(F_k)`.

        Returns:
            `(..., text_hidden_size)`: `P(F_k) + (alpha / r) B_k A_k F_k`.
        """
        low_rank = layer_features.flatten(0, -2) @ self.lora_A[index].T
        updated = torch.addmm(projected_features.flatten(0, -2), low_rank, self.lora_B[index].T, alpha=self.scaling)
        return updated.view_as(projected_features)


def single_query_readout(
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    score_vectors: torch.Tensor,
    value_vectors: torch.Tensor,
    constant: torch.Tensor,
    score_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `sum_h softmax(X u_h + shift_h) . (X z_h) + constant` over each group of tokens: the folded form of
    `w . MHA(q; X)` (see [`CLISingleQueryAttention`]). One `(tokens, d) x (d, 2 * heads)` matmul; softmax in float32.

    Args:
        tokens: `(*batch, num_tokens, hidden_size)`.
        token_mask: bool, broadcastable to `(*batch, num_groups, num_tokens)`: row `m` says which tokens group `m`
            attends to (each group must have at least one token, or its output is meaningless).
        score_vectors, value_vectors: `(hidden_size, heads)`, the `u_h` and `z_h`.
        constant: `(1,)`. score_shift: `(heads,)`, added to every score of a head (it cancels in the softmax).

    Returns:
        `(*batch, num_groups)` float32.
    """
    heads = score_vectors.shape[-1]
    projections = torch.matmul(tokens, torch.cat([score_vectors, value_vectors], dim=-1)).float()  # (*batch, T, 2H)
    scores = projections[..., :heads]
    if score_shift is not None:
        scores = scores + score_shift.float()
    scores = scores.transpose(-1, -2).unsqueeze(-3).masked_fill(~token_mask.unsqueeze(-2), torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1)  # (*batch, groups, heads, tokens)
    values = projections[..., heads:].transpose(-1, -2).unsqueeze(-3)  # (*batch, 1, heads, tokens)
    return (weights * values).sum(dim=(-1, -2)) + constant.float()


class CLISingleQueryAttention(nn.Module):
    """
    AGF's attention form: multi-head attention of one learned query `q` over a set of tokens, read out along a learned
    vector `w` (its half of the gate's weight): `w . MHA(q; X)`, with `d x d` query/key/value/output projections.

    The gate reads the attention only through `w . MHA(q; X)`, so the whole attention folds into two projections of
    the tokens per head (exact algebra, nothing approximated): with `Q = W_q q + b_q`, per head `h`
    - scores `X u_h + shift_h`, `u_h = W_k[h]^T Q_h / sqrt(d_h)`, `shift_h = Q_h . b_k[h] / sqrt(d_h)` (the key bias
      shifts all scores of a head equally and cancels in the softmax; kept for a literal equivalence);
    - values read out along `w`: `X z_h`, `z_h = W_v[h]^T (W_o^T w)_h`, plus `c = (W_o^T w) . b_v + w . b_o`.
    [`fold`] computes them; the forward pass uses them, so it never projects the tokens with a `d x d` matrix.

    Every tensor it uses is its own (none is passed in), as module hooks (accelerate offloading, DeepSpeed ZeRO-3,
    FSDP, torch's FLOP counter) expect. The weights follow `nn.Linear` (`y = x W^T + b`) but are held directly.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query_vector = nn.Parameter(torch.empty(hidden_size))
        self.readout_vector = nn.Parameter(torch.zeros(hidden_size))
        for name in ("query", "key", "value", "output"):
            setattr(self, f"{name}_weight", nn.Parameter(torch.empty(hidden_size, hidden_size)))
            setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(hidden_size)))

    def fold(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The folded vectors, computed in `dtype` (default: the weights' own).

        Returns:
            `(score_vectors (hidden_size, heads), value_vectors (hidden_size, heads), constant (1,), score_shift
            (heads,))`.
        """
        heads, head_dim = self.num_heads, self.head_dim
        weight = {name: param if dtype is None else param.to(dtype) for name, param in self.named_parameters()}
        query = (weight["query_weight"] @ weight["query_vector"] + weight["query_bias"]).view(heads, head_dim)
        query = query * head_dim**-0.5
        head_readout = (weight["readout_vector"] @ weight["output_weight"]).view(heads, head_dim)
        score_vectors = torch.einsum("hc,hcd->dh", query, weight["key_weight"].view(heads, head_dim, -1))
        value_vectors = torch.einsum("hc,hcd->dh", head_readout, weight["value_weight"].view(heads, head_dim, -1))
        score_shift = (query * weight["key_bias"].view(heads, head_dim)).sum(-1)
        constant = (head_readout.flatten() @ weight["value_bias"] + weight["readout_vector"] @ weight["output_bias"])
        return score_vectors, value_vectors, constant.view(1), score_shift

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """`(*batch, num_tokens, hidden_size)`, mask `(*batch, groups, num_tokens)` -> `(*batch, groups)`: see [`single_query_readout`]."""
        score_vectors, value_vectors, constant, score_shift = self.fold()
        return single_query_readout(tokens, token_mask, score_vectors, value_vectors, constant, score_shift)


class CLIFoldedSingleQueryAttention(nn.Module):
    """
    AGF's folded form (`agf_form="folded"`): only what `w . MHA(q; X)` depends on, per head a score vector `u_h` and
    a value vector `z_h` (`score_vectors`, `value_vectors`: `(hidden_size, heads)`) and one `constant`:
    `sum_h softmax(X u_h) . (X z_h) + constant`. `2 * heads * d + 1` numbers instead of `4 d^2 + 6 d`; it computes
    exactly what [`CLISingleQueryAttention`] computes from its folded vectors (the key-bias shift cancels in the
    softmax) and trains as the same function class.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.score_vectors = nn.Parameter(torch.empty(hidden_size, num_heads))
        self.value_vectors = nn.Parameter(torch.zeros(hidden_size, num_heads))
        self.constant = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """`(*batch, num_tokens, hidden_size)`, mask `(*batch, groups, num_tokens)` -> `(*batch, groups)`: see [`single_query_readout`]."""
        return single_query_readout(tokens, token_mask, self.score_vectors, self.value_vectors, self.constant)


AGF_ATTENTION_CLASSES = {"attention": CLISingleQueryAttention, "folded": CLIFoldedSingleQueryAttention}


class CLIAdaptiveGatingFusion(nn.Module):
    """
    AGF of one injection layer: `g_k = tanh(w . [s_k ; s_h] + c_k)` and `H[image positions] += sum_k g_k V_k`, with
    `s_k = MHA_v(q_v; V_k)` over a sample's image tokens and `s_h = MHA_h(q_h; H[context])` over its context positions.
    `w . [s_k ; s_h] = w_v . s_k + w_h . s_h`: each attention holds its query and its half of `w` (`readout_vector`)
    and returns its readout; `agf_form` chooses their parameterisation. `w` and `c` start at zero, so the injection
    starts as the identity.
    """

    def __init__(self, config: CLIConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        attention_class = AGF_ATTENTION_CLASSES[config.agf_form]
        self.vision_attention = attention_class(hidden_size, config.agf_num_heads)
        self.context_attention = attention_class(hidden_size, config.agf_num_heads)
        self.gate_bias = nn.Parameter(torch.zeros(len(config.vision_extraction_layers)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_features: torch.Tensor,
        image_positions: tuple[torch.Tensor, torch.Tensor],
        context_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: `(batch, seq_len, hidden_size)`, the hidden states entering the decoder layer.
            layer_features: `(K, num_image_tokens, hidden_size)`, the AMP features in placeholder order.
            image_positions: `(sample_index, seq_index)` of the image tokens, each `(num_image_tokens,)`.
            context_mask: `(batch, seq_len)` bool, the positions `s_h` may attend to.

        Returns:
            The injected hidden states `(batch, seq_len, hidden_size)` and the gates `(batch, K)` (zero for samples
            without image tokens).
        """
        sample_index, seq_index = image_positions
        samples = torch.arange(hidden_states.shape[0], device=sample_index.device)
        token_in_sample = sample_index[None, :] == samples[:, None]  # (batch, num_image_tokens)
        vision_logits = self.vision_attention(layer_features, token_in_sample)  # (K, batch)
        context_logits = self.context_attention(hidden_states, context_mask[:, None])  # (batch, 1)
        gates = torch.tanh(vision_logits.T + context_logits + self.gate_bias.float())  # (batch, K)
        gates = gates * token_in_sample.any(dim=-1, keepdim=True)

        token_gates = gates[sample_index].to(layer_features.dtype)  # (num_image_tokens, K)
        injection = token_gates[:, :1] * layer_features[0]
        for k in range(1, layer_features.shape[0]):  # K is small; this reads each feature set once, with no copy
            injection = injection.addcmul(token_gates[:, k : k + 1], layer_features[k])
        hidden_states = hidden_states.index_put(
            (sample_index, seq_index), injection.to(hidden_states.dtype), accumulate=True
        )
        return hidden_states, gates.to(hidden_states.dtype)


def check_vision_aspect_ratio(vision_aspect_ratio) -> int:
    """The `N` of `"anyres_max_N"`, LLaVA-OneVision's packing; anything else raises a `ValueError`."""
    match = re.fullmatch(r"anyres_max_([1-9]\d{0,2})", vision_aspect_ratio if isinstance(vision_aspect_ratio, str) else "")
    if match is None:
        raise ValueError(
            f"`vision_aspect_ratio`={vision_aspect_ratio!r} is not supported: CLI packs images as LLaVA-OneVision does, "
            "'anyres_max_N' (e.g. 'anyres_max_9')."
        )
    return int(match.group(1))


def attended_positions(attention_mask, shape: tuple[int, int]) -> torch.Tensor:
    """
    `(batch, seq_len)` bool mask of the non-padding positions of a prompt prefilled from an empty cache.

    `attention_mask` is what the model received: `None`, a 2D padding mask, or the 4D masks (or the dict of them per
    layer type) that `generate()` pre-builds for static caches, where the last query row tells which keys are attended.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -shape[1] :].bool()
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, : shape[1]]
        return last_row if last_row.dtype == torch.bool else last_row == 0
    return torch.ones(shape, dtype=torch.bool)


def init_cli_module(module: nn.Module, std: float) -> None:
    """Initialises AMP and AGF so that a fresh CLI model computes exactly its base LLaVA-OneVision (zero gates)."""
    if isinstance(module, CLIAdaptiveMultiProjection):
        # the LoRA convention: A like nn.Linear's default, B zero (so the branch starts at zero)
        init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        init.zeros_(module.lora_B)
    elif isinstance(module, CLISingleQueryAttention):
        for name in ("query", "key", "value", "output"):
            init.normal_(getattr(module, f"{name}_weight"), mean=0.0, std=std)
            init.zeros_(getattr(module, f"{name}_bias"))
        init.normal_(module.query_vector, mean=0.0, std=1 / math.sqrt(module.query_vector.shape[0]))
        init.zeros_(module.readout_vector)
    elif isinstance(module, CLIFoldedSingleQueryAttention):
        # random scores break the symmetry between heads; zero values and constant make the readout (and gate) zero
        init.normal_(module.score_vectors, mean=0.0, std=std)
        init.zeros_(module.value_vectors)
        init.zeros_(module.constant)
    elif isinstance(module, CLIAdaptiveGatingFusion):
        init.zeros_(module.gate_bias)


class _SwitchableAttention:
    """
    transformers decides whether a model may switch `attn_implementation` at run time by scanning its module's source
    for `*Attention*(nn.Module)` classes that do not dispatch through `ALL_ATTENTION_FUNCTIONS`. The classes of this
    file that match are AGF's single-query readouts, which have no implementation to choose; every decoder and vision
    layer is transformers' own Qwen2 / SigLIP layer, which dispatches through the attention interface.
    """

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True


class CLIPreTrainedModel(_SwitchableAttention, LlavaOnevisionPreTrainedModel):
    config_class = CLIConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer", "CLIAdaptiveGatingFusion"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_cli_module(module, getattr(self.config.get_text_config(), "initializer_range", 0.02))


class CLITextModel(_SwitchableAttention, Qwen2Model):
    """
    The Qwen2 decoder with AGF modules: `agf[str(j)]` injects into the hidden states entering decoder layer `j`.
    """

    def __init__(self, config, cli_config: CLIConfig):
        super().__init__(config)
        self.agf = nn.ModuleDict(
            {str(layer): CLIAdaptiveGatingFusion(cli_config) for layer in cli_config.llm_injection_layers}
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # a sub-model initialises its own subtree (`smart_apply`), so the AGF modules are initialised here
        super()._init_weights(module)
        init_cli_module(module, self.config.initializer_range)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cli_features: torch.Tensor | None = None,
        image_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_mask: torch.Tensor | None = None,
        output_gate_weights: bool = False,
        **kwargs,
    ) -> CLITextModelOutputWithPast:
        r"""
        cli_features (`torch.Tensor` of shape `(K, num_image_tokens, hidden_size)`, *optional*):
            AMP features of the image tokens in placeholder order; when given, every AGF layer injects.
        image_positions (`tuple(torch.LongTensor, torch.LongTensor)`, *optional*):
            `(sample_index, seq_index)` of the image tokens, each of shape `(num_image_tokens,)`.
        context_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*):
            Positions AGF's context attention reads (attended, not a training target).
        output_gate_weights (`bool`, *optional*):
            Return the gates `(num_injection_layers, batch_size, K)` as `gate_weights`.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        gate_weights = []
        for layer_index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if cli_features is not None and str(layer_index) in self.agf:
                hidden_states, gates = self.agf[str(layer_index)](
                    hidden_states,
                    cli_features.to(hidden_states.device),
                    tuple(index.to(hidden_states.device) for index in image_positions),
                    context_mask.to(hidden_states.device),
                )
                gate_weights.append(gates)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[layer_index]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return CLITextModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            gate_weights=torch.stack([g.to(gate_weights[0].device) for g in gate_weights])
            if output_gate_weights and gate_weights
            else None,
        )


class CLIModel(CLIPreTrainedModel, LlavaOnevisionModel):
    """LLaVA-OneVision with AMP (`self.amp`) and a decoder that carries AGF (`self.language_model.agf`)."""

    def __init__(self, config: CLIConfig):
        CLIPreTrainedModel.__init__(self, config)
        if config.text_config.model_type != "qwen2":
            raise ValueError(f"CLI needs a Qwen2 language model, got text_config.model_type={config.text_config.model_type!r}.")
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = CLITextModel(config.text_config, config)
        self.amp = CLIAdaptiveMultiProjection(config)
        self.post_init()

    def packing_plans(self, crops_per_image, image_sizes, vision_aspect_ratio="anyres_max_9") -> list[PackingPlan]:
        """
        LLaVA-NeXT's packing geometry per image: unpad by truncation ([`unpadded_grid_shape`]), then the
        `anyres_max_N` down-interpolation when the kept grid is over 1.1x N crops; the base view first and one
        `image_newline` per row. An image encoded as one crop (multi-image prompts) is its base view + one newline.
        """
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        max_num_crops = check_vision_aspect_ratio(vision_aspect_ratio)
        plans = []
        for num_crops, image_size in zip(crops_per_image, image_sizes):
            if num_crops == 1:
                plans.append(PackingPlan(side * side + 1))
                continue
            grid_height, grid_width = get_anyres_image_grid_shape(
                image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            rows, cols = grid_height * side, grid_width * side
            kept_height, kept_width = unpadded_grid_shape(int(image_size[0]), int(image_size[1]), rows, cols)
            ratio = math.sqrt(kept_height * kept_width / (max_num_crops * side**2))
            out_height, out_width = kept_height, kept_width
            if ratio > 1.1:
                out_height, out_width = int(kept_height // ratio), int(kept_width // ratio)
            plans.append(
                PackingPlan(
                    side * side + out_height * (out_width + 1),
                    (grid_height, grid_width),
                    ((rows - kept_height) // 2, (cols - kept_width) // 2, kept_height, kept_width),
                    (out_height, out_width),
                )
            )
        return plans

    def pack_into(self, image_features, plans: list[PackingPlan], image_newline: torch.Tensor, out: torch.Tensor):
        """
        Writes the packed features of every image into consecutive rows of `out`.

        Args:
            image_features (`list[torch.Tensor]`): per image, `(num_crops, patches_per_crop, channels)`, base view first.
            plans (`list[PackingPlan]`): from [`packing_plans`].
            image_newline (`torch.Tensor` of shape `(channels,)`): the row separator.
            out (`torch.Tensor` of shape `(sum of plan.num_tokens, channels)`): the destination (any row stride).

        The grid stays channels-last throughout (crop, bilinear interpolation with the channels-last kernel, rows
        written next to their newline), which avoids transposing the whole grid twice as channels-first packing does.
        """
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        offset = 0
        for image_feature, plan in zip(image_features, plans):
            destination = out[offset : offset + plan.num_tokens]
            offset += plan.num_tokens
            destination[: side * side] = image_feature[0]
            if plan.grid_shape is None:
                destination[side * side] = image_newline
                continue
            (grid_height, grid_width), (top, left, height, width), (out_height, out_width) = (
                plan.grid_shape, plan.crop_box, plan.output_shape
            )
            grid = image_feature[1:].view(grid_height, grid_width, side, side, -1).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(grid_height * side, grid_width * side, -1)[top : top + height, left : left + width]
            if (out_height, out_width) != (height, width):
                grid = grid.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
                grid = nn.functional.interpolate(grid, [out_height, out_width], mode="bilinear")[0].permute(1, 2, 0)
            rows = destination[side * side :].unflatten(0, (out_height, out_width + 1))
            rows[:, :out_width] = grid
            rows[:, out_width] = image_newline

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        """
        LLaVA-OneVision's `pack_image_features` API with LLaVA-NeXT's truncating unpad (see [`packing_plans`]).

        Returns:
            `(list[torch.Tensor], torch.LongTensor)`: per image `(num_image_tokens, channels)`, and the token counts.
        """
        plans = self.packing_plans([feature.shape[0] for feature in image_features], image_sizes, vision_aspect_ratio)
        if image_newline is None:
            raise ValueError("CLI packs every image with `image_newline`; pass it.")
        out = image_features[0].new_empty(sum(plan.num_tokens for plan in plans), image_features[0].shape[-1])
        self.pack_into(image_features, plans, image_newline.to(out), out)
        feature_lens = [plan.num_tokens for plan in plans]
        return list(out.split(feature_lens)), torch.tensor(feature_lens, device=out.device)

    def crops_per_image(self, pixel_values, image_sizes, batch_num_images=None) -> list[int]:
        """
        The number of crops of every image (anyres crops plus the base view; 1 for each image of a multi-image
        sample), after checking that `pixel_values`, `image_sizes` and `batch_num_images` describe the same images.
        """
        if pixel_values.dim() not in (4, 5):
            raise ValueError(f"`pixel_values` must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}.")
        image_sizes = torch.as_tensor(image_sizes)
        if image_sizes.dim() != 2 or image_sizes.shape[-1] != 2 or image_sizes.is_floating_point():
            raise ValueError(f"`image_sizes` must be integer (height, width) pairs, got shape {tuple(image_sizes.shape)}.")
        if image_sizes.numel() and image_sizes.min() <= 0:
            bad = [tuple(size) for size in image_sizes.tolist() if min(size) <= 0][:5]
            raise ValueError(f"`image_sizes` must be positive (height, width) pairs, got {bad}.")
        num_images = len(image_sizes)
        if batch_num_images is None:
            images_per_sample = [1] * num_images
        else:
            images_per_sample = [int(n) for n in torch.as_tensor(batch_num_images).flatten().tolist()]
            if min(images_per_sample, default=0) < 0 or sum(images_per_sample) != num_images:
                raise ValueError(
                    f"`batch_num_images` {images_per_sample[:8]} adds up to {sum(images_per_sample)} images but "
                    f"`image_sizes` describes {num_images}."
                )
        grid_pinpoints, crop_size = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        crops = [
            image_size_to_num_patches(size, grid_pinpoints, crop_size) if num == 1 else 1
            for size, num in zip(image_sizes.tolist(), (n for n in images_per_sample for _ in range(n)))
        ]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != num_images:
                raise ValueError(
                    f"`pixel_values` holds {pixel_values.shape[0]} images but `image_sizes` describes {num_images}."
                )
            short = [(index, need) for index, need in enumerate(crops) if need > pixel_values.shape[1]]
            if short:
                index, need = short[0]
                raise ValueError(
                    f"Image {index} of size {tuple(image_sizes[index].tolist())} needs {need} crops but `pixel_values` "
                    f"holds at most {pixel_values.shape[1]} per image; image_sizes and pixel_values disagree."
                )
        elif sum(crops) != pixel_values.shape[0]:
            raise ValueError(
                f"`pixel_values` holds {pixel_values.shape[0]} crops but `image_sizes` describes images of {sum(crops)} "
                f"crops in all ({crops[:8]} per image); image_sizes and pixel_values disagree."
            )
        return crops

    @merge_with_config_defaults
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        **kwargs,
    ) -> CLIImageFeaturesOutput:
        r"""
        One vision-tower pass; then, one layer at a time (so that only one layer's projection is ever in memory), the
        baseline features of `vision_feature_layer` and the AMP features of every extraction layer are projected and
        packed straight into their slot of one `(K + 1, total_image_tokens, hidden_size)` buffer.

        pixel_values (`torch.Tensor` of shape `(num_images, max_crops, 3, H, W)` or `(total_crops, 3, H, W)`)
        image_sizes (`torch.Tensor` of shape `(num_images, 2)`): original `(height, width)`.
        batch_num_images (`torch.LongTensor` of shape `(batch_size,)`, *optional*): images per sample; a sample with
            several images uses the base view of each (LLaVA-OV's multi-image mode).

        Returns:
            [`CLIImageFeaturesOutput`] with `pooler_output` (`[image] -> (tokens, hidden)`), `deepstack_features`
            (`[layer][image] -> (tokens, hidden)`) and `packed_features`, the buffer they are views of.
        """
        crops_per_image = self.crops_per_image(pixel_values, image_sizes, batch_num_images)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([crops[:num] for crops, num in zip(pixel_values, crops_per_image)], dim=0)
        check_vision_aspect_ratio(vision_aspect_ratio)
        num_hidden_states = self.config.vision_config.num_hidden_layers + 1
        if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
            raise ValueError(f"`vision_feature_layer` must be one int for CLI, got {vision_feature_layer!r}.")
        if not -num_hidden_states <= vision_feature_layer < num_hidden_states:
            raise ValueError(
                f"`vision_feature_layer`={vision_feature_layer} is out of range for the vision tower's "
                f"{num_hidden_states} hidden states (allowed: {-num_hidden_states}..{num_hidden_states - 1})."
            )
        base_layer = vision_feature_layer % num_hidden_states
        # slot 0 is the baseline; a baseline layer that is also extracted gets its own slot (the LoRA must not touch it)
        layers = [base_layer] + list(self.config.vision_extraction_layers)
        # only the layers CLI reads are kept, unless the caller asks for all of them
        output_hidden_states = kwargs.pop("output_hidden_states", None) is True
        vision_outputs = self.vision_tower(
            pixel_values, output_hidden_states=True if output_hidden_states else sorted(set(layers)), return_dict=True,
            **kwargs,
        )
        plans = self.packing_plans(crops_per_image, image_sizes, vision_aspect_ratio)
        num_tokens = [plan.num_tokens for plan in plans]
        packed = None
        for slot, layer in enumerate(layers):
            features = vision_outputs.hidden_states[layer]
            if vision_feature_select_strategy == "default":
                features = features[:, 1:]
            projected = self.multi_modal_projector(features)
            if slot > 0:
                projected = self.amp(features, projected, slot - 1)
            if packed is None:
                packed = projected.new_empty(len(layers), sum(num_tokens), projected.shape[-1])
            newline = self.image_newline.to(projected)
            self.pack_into(torch.split(projected, crops_per_image, dim=0), plans, newline, packed[slot])
        per_slot = [list(slot_features.split(num_tokens)) for slot_features in packed]
        return CLIImageFeaturesOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states if output_hidden_states else None,
            attentions=vision_outputs.attentions,
            pooler_output=per_slot[0],
            deepstack_features=per_slot[1:],
            packed_features=packed,
        )

    def get_video_features(self, *args, **kwargs):
        raise ValueError("CLI injects image features only; video inputs (`pixel_values_videos`) are not supported.")

    @merge_with_config_defaults
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        labels: torch.LongTensor | None = None,
        output_gate_weights: bool | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        **kwargs,
    ) -> CLIModelOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
            Only read to keep training targets (`labels != -100`) out of AGF's context attention.
        output_gate_weights (`bool`, *optional*):
            Return AGF's gates `(num_injection_layers, batch_size, num_extraction_layers)` as `gate_weights`.
        mm_encoder_outputs (`dict[str, CLIImageFeaturesOutput]`, *optional*):
            Pre-encoded images (`generate()` encodes them once, before prefill).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values_videos is not None or (mm_encoder_outputs or {}).get("video") is not None:
            self.get_video_features()
        if pixel_values is not None and (mm_encoder_outputs or {}).get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs['image'].")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if (image_outputs is not None or pixel_values is not None) and past_key_values is not None:
            if (cached := past_key_values.get_seq_length()) > 0:
                raise ValueError(
                    f"Images were given for a forward pass that continues a cache of {cached} tokens (a second chat "
                    "turn on a reused `past_key_values`, or chunked prefill). CLI's gates read the hidden states of "
                    "the whole prompt at every injection layer, so images can only be encoded in a prompt prefilled "
                    "from an empty cache: call generate() on the whole conversation without `past_key_values` "
                    "(text-only turns may reuse the cache)."
                )
        if image_outputs is None and pixel_values is not None:
            if image_sizes is None:
                raise ValueError("`pixel_values` needs `image_sizes` (the original (height, width) of each image).")
            image_outputs = self.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                vision_aspect_ratio=vision_aspect_ratio,
                batch_num_images=batch_num_images,
            )

        cli_features = image_positions = context_mask = None
        if image_outputs is not None:
            image_mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds)
            image_mask = image_mask[..., 0]
            num_image_tokens = int(image_mask.sum())
            packed = getattr(image_outputs, "packed_features", None)
            if packed is None or packed.shape[1] != sum(len(f) for f in image_outputs.pooler_output):
                # e.g. after generate() expanded the per-image lists for beams: rebuild the buffer from them
                packed = torch.stack(
                    [torch.cat(list(features)) for features in [image_outputs.pooler_output, *image_outputs.deepstack_features]]
                )
            image_features = packed[0].to(inputs_embeds.device, inputs_embeds.dtype)
            if num_image_tokens != image_features.shape[0]:
                raise ValueError(
                    f"The prompt holds {num_image_tokens} image tokens (id {self.config.image_token_id}) but the images "
                    f"give {image_features.shape[0]} features. Build the prompt with the CLI processor, which expands "
                    "each `<image>` to its feature count; pixel values need a prompt with their image tokens."
                )
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], image_features)
            cli_features = packed[1:]
            image_positions = image_mask.nonzero(as_tuple=True)
            context_mask = attended_positions(attention_mask, image_mask.shape)
            if labels is not None:
                context_mask = context_mask & (labels.to(context_mask.device) == -100)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cli_features=cli_features,
            image_positions=image_positions,
            context_mask=context_mask,
            output_gate_weights=bool(output_gate_weights),
            **kwargs,
        )
        return CLIModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features if image_outputs is not None else None,
            gate_weights=outputs.gate_weights,
        )


def format_parameter_summary(summary: dict[str, tuple[int, int]]) -> str:
    """A table of `{group: (trainable, total)}` parameter counts."""
    lines = [f"{'group':<14}{'trainable':>16}{'total':>16}"]
    for group, (trainable, total) in summary.items():
        lines.append(f"{group:<14}{trainable:>16,}{total:>16,}")
    trainable, total = (sum(counts[i] for counts in summary.values()) for i in (0, 1))
    lines.append(f"{'all':<14}{trainable:>16,}{total:>16,}  ({100 * trainable / max(total, 1):.3f}% trainable)")
    return "\n".join(lines)


class CLIForConditionalGeneration(CLIPreTrainedModel, LlavaOnevisionForConditionalGeneration, GenerationMixin):
    """CLI with a language-modeling head; `generate()`, the pipeline and the Trainer work as for LLaVA-OneVision."""

    def __init__(self, config: CLIConfig):
        CLIPreTrainedModel.__init__(self, config)
        self.model = CLIModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_video_features(self, *args, **kwargs):
        return self.model.get_video_features()

    TRAINABLE_CHOICES = {
        "cli": ("amp", "agf"),
        "cli+projector": ("amp", "agf", "projector"),
        "cli+llm": ("amp", "agf", "llm"),
        "all": ("amp", "agf", "projector", "llm", "vision_tower"),
    }

    @staticmethod
    def parameter_group(name: str) -> str:
        """The group of a parameter name: `vision_tower`, `projector` (+ `image_newline`), `amp`, `agf` or `llm`."""
        if name.startswith("model.amp."):
            return "amp"
        if name.startswith("model.language_model.agf."):
            return "agf"
        if name.startswith("model.vision_tower."):
            return "vision_tower"
        if name.startswith(("model.multi_modal_projector.", "model.image_newline")):
            return "projector"
        return "llm"

    def set_trainable(self, what: str = "cli", verbose: bool = True) -> dict[str, tuple[int, int]]:
        """
        Chooses what trains: `"cli"` (AMP + AGF only: the parameter-efficient upgrade, base model frozen),
        `"cli+projector"`, `"cli+llm"` (also the language model and its head) or `"all"`.

        Returns `{group: (trainable, total)}` parameter counts per group and, with `verbose`, prints them.
        """
        if what not in self.TRAINABLE_CHOICES:
            raise ValueError(f"set_trainable({what!r}): choose one of {sorted(self.TRAINABLE_CHOICES)}.")
        groups = self.TRAINABLE_CHOICES[what]
        summary = {group: [0, 0] for group in ("vision_tower", "projector", "amp", "agf", "llm")}
        for name, param in self.named_parameters():
            group = self.parameter_group(name)
            param.requires_grad_(group in groups)
            summary[group][1] += param.numel()
            summary[group][0] += param.numel() if group in groups else 0
        summary = {group: tuple(counts) for group, counts in summary.items()}
        if verbose:
            print(format_parameter_summary(summary))
        return summary

    @torch.no_grad()
    def fold_agf(self) -> "CLIForConditionalGeneration":
        """
        Turns AGF's attention form into the folded form in place (exact: the folded vectors are computed in float64
        and stored in the model's dtype), sets `config.agf_form = "folded"` and returns the model. `save_pretrained`
        then writes the folded form, which loads as folded. A model that is already folded is returned unchanged.
        Call it on a model whose weights are materialised (not offloaded to disk or the meta device).
        """
        for agf in self.model.language_model.agf.values():
            for name in ("vision_attention", "context_attention"):
                attention = getattr(agf, name)
                if not isinstance(attention, CLISingleQueryAttention):
                    continue
                score_vectors, value_vectors, constant, _ = attention.fold(torch.float64)  # the shift cancels
                weight = attention.query_weight
                folded = CLIFoldedSingleQueryAttention(weight.shape[0], attention.num_heads)
                folded.to(device=weight.device, dtype=weight.dtype).requires_grad_(weight.requires_grad)
                folded.load_state_dict(
                    {"score_vectors": score_vectors, "value_vectors": value_vectors, "constant": constant}
                )
                setattr(agf, name, folded)
        self.config.agf_form = "folded"
        return self

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        output_gate_weights: bool | None = None,
        **kwargs,
    ) -> CLICausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
            Language-modeling targets (`-100` = ignored); supervised positions are also kept out of AGF's context.
        output_gate_weights (`bool`, *optional*):
            Return AGF's gates `(num_injection_layers, batch_size, num_extraction_layers)` as `gate_weights`.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_aspect_ratio=vision_aspect_ratio,
            batch_num_images=batch_num_images,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            labels=labels,
            output_gate_weights=output_gate_weights,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CLICausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            gate_weights=outputs.gate_weights,
        )

    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
        chunk_size = generation_config.prefill_chunk_size
        has_images = model_kwargs.get("pixel_values") is not None or (
            (model_kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        )
        if chunk_size is not None and has_images and is_first_iteration and input_ids.shape[-1] > chunk_size:
            raise ValueError(
                f"prefill_chunk_size={chunk_size} cannot be used with images: CLI's gates read the whole prompt's hidden "
                "states at every injection layer, so a prompt with images is prefilled in one pass. Pass "
                "prefill_chunk_size=None (text-only prompts may be chunked)."
            )
        outputs = super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=is_first_iteration)
        if is_first_iteration and getattr(outputs, "gate_weights", None) is not None:
            self._prefill_gate_weights = outputs.gate_weights
        return outputs

    def generate(self, *args, **kwargs):
        """
        [`GenerationMixin.generate`]; with `output_gate_weights=True` (and `return_dict_in_generate=True`) the output
        also carries `gate_weights`, AGF's gates of the prefill, `(num_injection_layers, rows, num_extraction_layers)`
        where `rows` is the batch as generate expands it (`batch_size * num_beams` or `* num_return_sequences`).
        """
        if not kwargs.get("output_gate_weights"):
            return super().generate(*args, **kwargs)
        generation_config = kwargs.get("generation_config") or self.generation_config
        if not kwargs.get("return_dict_in_generate", generation_config.return_dict_in_generate):
            raise ValueError(
                "generate(output_gate_weights=True) returns the prefill's gates as `output.gate_weights`, which needs "
                "`return_dict_in_generate=True` (the plain output is a tensor of token ids). Pass both, or call the "
                "model's forward with `output_gate_weights=True`."
            )
        self._prefill_gate_weights = None
        try:
            output = super().generate(*args, **kwargs)
        finally:
            gate_weights = self.__dict__.pop("_prefill_gate_weights", None)
        output["gate_weights"] = gate_weights
        return output


# `save_pretrained` copies this file and its relative imports; the config's `auto_map` names every auto class.
CLIForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CLIForConditionalGeneration", "CLIModel", "CLIPreTrainedModel", "CLITextModel"]
