"""Tiny, fully local models, tokenizers and datasets for tests, examples and benchmarks.

Nothing here touches the Hugging Face Hub: the tokenizer is trained in-process with the
``tokenizers`` library on a small English corpus shipped with the package
(``hf_rl_ckpt/testing/data/corpus.txt``), and models are randomly initialised from a tiny
config. A model has about 150k parameters, so a forward/backward pass takes milliseconds on CPU.

Example:
    >>> from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset
    >>> tok = build_tokenizer()
    >>> model = build_model("llama", seed=0)
    >>> ds = toy_lm_dataset(tok, n=8, seq_len=16)
    >>> len(ds), len(ds[0]["input_ids"])
    (8, 16)

TRL recipes verified with trl 1.16 on CPU (each finishes in a few seconds):

* ``SFTTrainer`` on :func:`toy_text_dataset` (column ``"text"``)::

      SFTConfig(output_dir=..., max_steps=2, per_device_train_batch_size=2, max_length=32,
                report_to="none", save_strategy="no", logging_steps=1, **exact_cpu_args())

* ``GRPOTrainer`` on :func:`toy_prompt_dataset` (column ``"prompt"``, plain strings or,
  with ``conversational=True``, chat messages rendered with :data:`CHAT_TEMPLATE`) and
  :func:`toy_reward`::

      GRPOConfig(output_dir=..., max_steps=2, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=8, report_to="none", save_strategy="no",
                 logging_steps=1, **exact_cpu_args())

  ``per_device_train_batch_size`` times ``gradient_accumulation_steps`` must be divisible
  by ``num_generations``. TRL's config defaults ``bf16`` and activation checkpointing to
  ``True``; :func:`exact_cpu_args` turns both off to keep CPU runs exact and fast.
"""

from __future__ import annotations

import functools
import os
import random
import re
from importlib import resources
from typing import Any, Literal, TypeVar

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    TrainingArguments,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

#: `TrainingArguments`' switch for activation (gradient) checkpointing. Newer transformers call it
#: `activation_checkpointing` and warn on the old name; older ones only know `gradient_checkpointing`.
CHECKPOINTING_ARG = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"


def exact_cpu_args() -> dict[str, Any]:
    """`TrainingArguments` (and TRL config) settings for exact, fast runs on CPU, on every supported transformers.

    TRL's configs turn bf16 and activation checkpointing on by default; both change the numbers
    a resumed run must reproduce, and neither helps a tiny model on CPU.
    """
    return {"use_cpu": True, "bf16": False, CHECKPOINTING_ARG: False}

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TOKENIZER_VOCAB_SIZE",
    "UNK_TOKEN",
    "Arch",
    "build_model",
    "build_tokenizer",
    "corpus_lines",
    "tiny_config",
    "toy_lm_dataset",
    "toy_prompt_dataset",
    "toy_reward",
    "toy_text_dataset",
]

Arch = Literal["llama", "qwen2"]
_T = TypeVar("_T")

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
TOKENIZER_VOCAB_SIZE = 512
"""Target vocabulary size of :func:`build_tokenizer` (special tokens included)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
"""A minimal Jinja chat template: one ``role: content</s>`` line per message."""

_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
_ARITHMETIC = re.compile(r"^Question: What is (\d+) (plus|times) (\d+)\? Answer: (\d+)$")


@functools.cache
def corpus_lines() -> tuple[str, ...]:
    """Return the non-empty lines of the bundled training corpus.

    Example:
        >>> lines = corpus_lines()
        >>> len(lines) > 300
        True
    """
    text = resources.files("hf_rl_ckpt.testing").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process and return its JSON serialisation."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(save_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the tiny byte-level BPE tokenizer (vocabulary of :data:`TOKENIZER_VOCAB_SIZE`).

    Training is deterministic and cached per process; every call returns a fresh
    tokenizer object, so callers may mutate it freely. ``bos``/``eos``/``pad``/``unk``
    tokens and :data:`CHAT_TEMPLATE` are set. Byte-level pre-tokenisation makes
    ``decode(encode(text)) == text`` for any text.

    Args:
        save_dir: If given, the tokenizer is also written there with ``save_pretrained``.

    Example:
        >>> tok = build_tokenizer()
        >>> tok.decode(tok("3 plus 4 is 7.")["input_ids"])
        '3 plus 4 is 7.'
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def tiny_config(arch: Arch = "llama", vocab_size: int | None = None, **overrides: Any) -> PretrainedConfig:
    """Return a tiny causal-LM config.

    Hidden size 64, 2 layers, 2 attention heads of ``head_dim`` 32 (the minimum vLLM's CPU
    backend accepts), intermediate size 128, 256 positions, untied embeddings. Llama uses
    2 key/value heads (plain multi-head attention), Qwen2 uses 1 (grouped-query attention).
    Special token ids come from :func:`build_tokenizer`.

    Args:
        arch: ``"llama"`` or ``"qwen2"``.
        vocab_size: Defaults to the size of :func:`build_tokenizer`'s vocabulary.
        **overrides: Any config attribute, e.g. ``tie_word_embeddings=True`` or
            ``attention_dropout=0.1``.

    Example:
        >>> cfg = tiny_config("qwen2", tie_word_embeddings=True)
        >>> cfg.model_type, cfg.num_key_value_heads, cfg.tie_word_embeddings
        ('qwen2', 1, True)
    """
    tokenizer = build_tokenizer()
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size if vocab_size is not None else len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        kwargs["num_key_value_heads"] = 2
        config_cls: type[PretrainedConfig] = LlamaConfig
    elif arch == "qwen2":
        kwargs["num_key_value_heads"] = 1
        config_cls = Qwen2Config
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'qwen2'")
    kwargs.update(overrides)
    return config_cls(**kwargs)


def build_model(
    arch: Arch = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM.

    Initialisation runs under ``torch.manual_seed(seed)`` inside a forked RNG, so the
    same arguments always give the same weights and the caller's global RNG state is left
    untouched. A :class:`~transformers.GenerationConfig` with the tokenizer's special ids is
    attached.

    Args:
        arch: ``"llama"`` or ``"qwen2"``.
        seed: Seed for weight initialisation.
        dtype: Parameter dtype (e.g. ``torch.bfloat16``).
        dropout: Attention dropout probability (``attention_dropout`` in the config).
        **config_overrides: Forwarded to :func:`tiny_config`.

    Example:
        >>> import torch
        >>> model = build_model("qwen2", seed=1)
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 512])
    """
    config = tiny_config(arch, attention_dropout=dropout, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=16,
    )
    return model


def toy_lm_dataset(
    tokenizer: PreTrainedTokenizerFast, n: int = 64, seq_len: int = 32, seed: int = 0
) -> datasets.Dataset:
    """Return ``n`` fixed-length language-modelling rows built from corpus lines.

    Each row holds ``input_ids``, ``attention_mask`` and ``labels`` (a copy of
    ``input_ids`` with padding set to ``-100``), all of length ``seq_len``. Lines end with
    the eos token, are right-padded and truncated. The rows feed
    :class:`transformers.Trainer` directly with its default collator.

    Args:
        tokenizer: Usually :func:`build_tokenizer`'s.
        n: Number of rows; corpus lines are reused when ``n`` exceeds the corpus.
        seq_len: Length of every row.
        seed: Seed for the choice and order of lines.

    Example:
        >>> ds = toy_lm_dataset(build_tokenizer(), n=4, seq_len=8)
        >>> ds.column_names
        ['input_ids', 'attention_mask', 'labels']
    """
    texts = [line + tokenizer.eos_token for line in _sample(corpus_lines(), n, seed)]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len)
    labels = [
        [tok if keep else -100 for tok, keep in zip(ids, mask)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])
    ]
    return datasets.Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    )


def toy_text_dataset(n: int = 32, seed: int = 0) -> datasets.Dataset:
    """Return ``n`` rows ``{"text": str}`` of corpus lines, the format TRL's ``SFTTrainer`` expects.

    Example:
        >>> toy_text_dataset(n=2).column_names
        ['text']
    """
    return datasets.Dataset.from_dict({"text": _sample(corpus_lines(), n, seed)})


def toy_prompt_dataset(n: int = 16, seed: int = 0, *, conversational: bool = False) -> datasets.Dataset:
    """Return ``n`` arithmetic prompts for TRL's ``GRPOTrainer``.

    Rows are ``{"prompt": ..., "answer": str}``. The prompt is a plain string such as
    ``"Question: What is 3 plus 4? Answer:"``, or with ``conversational=True`` a one-message
    chat ``[{"role": "user", "content": "What is 3 plus 4?"}]`` (rendered by
    :data:`CHAT_TEMPLATE`). TRL passes the ``answer`` column to reward functions such as
    :func:`toy_reward`.

    Example:
        >>> row = toy_prompt_dataset(n=1)[0]
        >>> row["prompt"].startswith("Question: What is"), row["answer"].isdigit()
        (True, True)
    """
    questions = [m for m in map(_ARITHMETIC.match, corpus_lines()) if m is not None]
    prompts: list[str | list[dict[str, str]]] = []
    answers: list[str] = []
    for match in _sample(questions, n, seed):
        a, op, b, result = match.groups()
        question = f"What is {a} {op} {b}?"
        if conversational:
            prompts.append([{"role": "user", "content": question}])
        else:
            prompts.append(f"Question: {question} Answer:")
        answers.append(result)
    return datasets.Dataset.from_dict({"prompt": prompts, "answer": answers})


def toy_reward(completions: list[str] | list[list[dict[str, str]]], answer: list[str], **_: object) -> list[float]:
    """GRPO reward function: 1.0 when the completion contains the expected answer, else 0.0.

    Accepts both plain-string and conversational completions, as TRL passes them.

    Example:
        >>> toy_reward([" 7", " 9"], answer=["7", "7"])
        [1.0, 0.0]
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if expected in text else 0.0 for text, expected in zip(texts, answer)]


def _sample(items: list[_T] | tuple[_T, ...], n: int, seed: int) -> list[_T]:
    """Pick ``n`` items in a seeded order, cycling through reshuffles when ``n > len(items)``."""
    rng = random.Random(seed)
    picked: list[_T] = []
    while len(picked) < n:
        order = list(items)
        rng.shuffle(order)
        picked.extend(order[: n - len(picked)])
    return picked
