"""One tiny, randomly initialised model of each family people fine-tune, for tests of what a saved folder holds.

Each differs from a dense Llama in what `save_pretrained` does with it: an MoE (Qwen3-MoE,
Mixtral) is saved with one tensor per expert although transformers 5 runs it fused; a VLM
(Llava, Qwen2-VL) is saved under its original checkpoints' names; a `trust_remote_code` model
brings its code files; T5 is an encoder-decoder with embeddings tied three ways; Qwen2 ties
its head. All share :func:`~hf_rl_ckpt.testing.tiny.build_tokenizer`'s vocabulary and special ids.

Example:
    >>> model = build_family("qwen3_moe", seed=0)
    >>> type(model).__name__, model(**family_inputs("qwen3_moe")).logits.shape
    ('Qwen3MoeForCausalLM', torch.Size([1, 8, 512]))
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers
from transformers import GenerationConfig, PreTrainedModel

from .tiny import build_tokenizer, tiny_config

__all__ = ["FAMILIES", "build_family", "family_inputs"]

_INPUT_IDS = [[1, 17, 42, 99, 7, 3, 250, 8]]


def _special_ids() -> dict[str, int]:
    tokenizer = build_tokenizer()
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


_TEXT_SETTINGS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim", "num_key_value_heads",
    "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _text(**overrides: Any) -> dict[str, Any]:
    """The tiny Llama's text settings (`tiny_config`) as keyword arguments for another family's config."""
    llama = tiny_config("llama")
    return {**{name: getattr(llama, name) for name in _TEXT_SETTINGS}, **overrides}


def _qwen3_moe() -> PreTrainedModel:
    config = transformers.Qwen3MoeConfig(**_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1))
    return transformers.AutoModelForCausalLM.from_config(config)


def _mixtral() -> PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2)))


def _llava() -> PreTrainedModel:
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
    config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**_text()), image_token_index=511, **_special_ids())
    return transformers.LlavaForConditionalGeneration(config)


def _qwen2_vl() -> PreTrainedModel:
    text = _text(num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    vision = {"depth": 1, "embed_dim": 64, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2}
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=510, video_token_id=509, **_special_ids())
    return transformers.Qwen2VLForConditionalGeneration(config)


def _t5() -> PreTrainedModel:
    config = transformers.T5Config(
        vocab_size=len(build_tokenizer()), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, decoder_start_token_id=0,
        **_special_ids(),
    )
    return transformers.AutoModelForSeq2SeqLM.from_config(config)


def _custom_code() -> PreTrainedModel:
    from .custom_code.configuration_tiny import TinyCustomConfig
    from .custom_code.modeling_tiny import TinyCustomForCausalLM

    # What a `trust_remote_code=True` load or a user's own registered class gives: `is_remote_code()` is true.
    TinyCustomConfig.register_for_auto_class()
    TinyCustomForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return TinyCustomForCausalLM(TinyCustomConfig(vocab_size=len(build_tokenizer()), **_special_ids()))


FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": lambda: transformers.AutoModelForCausalLM.from_config(tiny_config("llama")),
    "qwen2_tied": lambda: transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2", tie_word_embeddings=True)),
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "custom_code": _custom_code,
    "t5": _t5,
}


def build_family(name: str, *, seed: int = 0) -> PreTrainedModel:
    """The tiny model of family `name` (a key of `FAMILIES`), the same weights for the same seed, the caller's RNG untouched."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FAMILIES[name]()
    if model.can_generate():
        model.generation_config = GenerationConfig(**_special_ids(), max_new_tokens=16)
    return model


def family_inputs(name: str) -> dict[str, torch.Tensor]:
    """A forward pass's inputs for family `name`: token ids (and decoder ids for the encoder-decoder)."""
    input_ids = torch.tensor(_INPUT_IDS)
    if name == "t5":
        return {"input_ids": input_ids, "decoder_input_ids": input_ids[:, :4]}
    return {"input_ids": input_ids}
