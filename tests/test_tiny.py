"""Tests for the tiny local models, tokenizer and datasets in ``hf_rl_ckpt.testing.tiny``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_rl_ckpt.testing import tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_fresh_per_call(tok):
    other = tiny.build_tokenizer()
    assert other is not tok
    assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()

    # Retrain from scratch (bypassing the in-process cache): same vocabulary and merges.
    tiny._tokenizer_json.cache_clear()
    retrained = tiny.build_tokenizer()
    assert retrained.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_special_tokens_and_round_trip(tok):
    assert len(tok) == tiny.TOKENIZER_VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        tiny.BOS_TOKEN,
        tiny.EOS_TOKEN,
        tiny.PAD_TOKEN,
        tiny.UNK_TOKEN,
    )
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    text = "Question: What is 12 plus 30? Answer: 42\nÜnïcödé is fine too."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok(text + tok.eos_token)["input_ids"][-1] == tok.eos_token_id


def test_chat_template(tok):
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=False,
    )
    assert rendered == "user: hi</s>\nassistant: hello</s>\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("assistant: ")


def test_tokenizer_save_and_load(tmp_path: Path, tok):
    tiny.build_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    sample = "3 plus 4 is 7."
    assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]


# --------------------------------------------------------------------------- config / model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_config(arch, tok):
    cfg = tiny.tiny_config(arch)
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (64, 2, 2, 32)
    assert cfg.num_key_value_heads in (1, 2)
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 256
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tiny.tiny_config(arch, vocab_size=600, attention_dropout=0.25).vocab_size == 600


def test_unknown_arch_rejected():
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.tiny_config("gpt2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arch", "tie"),
    [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)],
)
def test_model_forward_backward_and_save_load_logits(tmp_path: Path, tok, arch, tie):
    model = tiny.build_model(arch, seed=3, tie_word_embeddings=tie)
    assert model.config.tie_word_embeddings is tie
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    ids = torch.tensor([tok("3 plus 4 is 7.")["input_ids"]])

    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert all(p.grad is not None for p in model.parameters())

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    assert reloaded.config.tie_word_embeddings is tie
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.generation_config.eos_token_id == tok.eos_token_id


def test_build_model_seed_dtype_dropout():
    state = torch.get_rng_state()
    a, b, c = tiny.build_model(seed=0), tiny.build_model(seed=0), tiny.build_model(seed=1)
    assert torch.equal(torch.get_rng_state(), state), "build_model must not consume the global RNG"
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)

    bf16 = tiny.build_model(dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert tiny.build_model(dropout=0.1).config.attention_dropout == 0.1


def test_generate(tok):
    model = tiny.build_model()
    ids = torch.tensor([tok("Hello")["input_ids"]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4


# --------------------------------------------------------------------------- datasets


def test_toy_lm_dataset(tok):
    ds = tiny.toy_lm_dataset(tok, n=10, seq_len=16, seed=0)
    assert len(ds) == 10
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    for row in ds:
        assert len(row["input_ids"]) == len(row["attention_mask"]) == len(row["labels"]) == 16
        for token, mask, label in zip(row["input_ids"], row["attention_mask"], row["labels"]):
            assert label == (token if mask else -100)
            if not mask:
                assert token == tok.pad_token_id
    assert tiny.toy_lm_dataset(tok, n=10, seq_len=16, seed=0)["input_ids"] == ds["input_ids"]
    assert tiny.toy_lm_dataset(tok, n=10, seq_len=16, seed=1)["input_ids"] != ds["input_ids"]
    # More rows than corpus lines: lines are reused.
    assert len(tiny.toy_lm_dataset(tok, n=len(tiny.corpus_lines()) + 5, seq_len=8)) == len(tiny.corpus_lines()) + 5


def test_toy_text_and_prompt_datasets():
    text = tiny.toy_text_dataset(n=5)
    assert text.column_names == ["text"] and len(text) == 5
    assert all(isinstance(t, str) and t for t in text["text"])

    prompts = tiny.toy_prompt_dataset(n=6, seed=2)
    assert prompts.column_names == ["prompt", "answer"] and len(prompts) == 6
    for row in prompts:
        assert row["prompt"].startswith("Question: What is ") and row["prompt"].endswith("Answer:")
        assert row["answer"].isdigit()

    chat = tiny.toy_prompt_dataset(n=6, seed=2, conversational=True)
    assert chat["answer"] == prompts["answer"]
    assert chat[0]["prompt"] == [
        {"role": "user", "content": prompts[0]["prompt"][len("Question: ") : -len(" Answer:")]}
    ]


def test_toy_reward():
    assert tiny.toy_reward([" 7 is it", "nope"], answer=["7", "7"]) == [1.0, 0.0]
    completions = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "3"}]]
    assert tiny.toy_reward(completions, answer=["12", "4"]) == [1.0, 0.0]


# --------------------------------------------------------------------------- training smoke tests


def test_trainer_runs_on_toy_lm_dataset(tmp_path: Path, tok):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
    )
    trainer = Trainer(model=tiny.build_model(), args=args, train_dataset=tiny.toy_lm_dataset(tok, n=16))
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert result.training_loss > 0


def test_trl_sft_and_grpo_recipes(tmp_path: Path, tok):
    trl = pytest.importorskip("trl")
    common = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        **tiny.exact_cpu_args(),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
    }
    sft = trl.SFTTrainer(
        model=tiny.build_model(),
        args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_length=32, **common),
        train_dataset=tiny.toy_text_dataset(n=8),
        processing_class=tok,
    )
    sft.train()
    assert sft.state.global_step == 2

    grpo = trl.GRPOTrainer(
        model=tiny.build_model(),
        reward_funcs=tiny.toy_reward,
        args=trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2, max_completion_length=8, **common),
        train_dataset=tiny.toy_prompt_dataset(n=8, conversational=True),
        processing_class=tok,
    )
    grpo.train()
    assert grpo.state.global_step == 2
