"""The model card: metadata that round-trips through `huggingface_hub.ModelCard`, leaderboard, usage, redaction."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, verify_checkpoint
from hf_rl_ckpt.hub.card import Leaderboard, render_model_card
from hf_rl_ckpt.retention import RetentionPolicy
from hf_rl_ckpt.testing import tiny

ROWS = [{"step": s, "metrics": {"val:reward": r}} for s, r in [(10, 0.2), (20, 0.8), (30, 0.5), (40, 0.1)]]
POLICY = RetentionPolicy(keep_top_k=2, metric_name="val:reward")


def fake_checkpoint(root: Path, *, name_or_path: str = "meta-llama/Llama-3.2-1B", adapter_base: str | None = None) -> Path:
    """The files a card reads: the model folder's config, the checkpoint's config.yaml (with secrets in it) and
    the `contents` its training_info.json records."""
    weights = "consolidated" if adapter_base is None else "adapter"
    contents = {"weights": weights, "consolidated": adapter_base is None, "optimizer": None, "scheduler": False, "dataloader": False}
    root.mkdir(parents=True)
    listed = "model/consolidated/config.json" if adapter_base is None else "model/adapter/adapter_config.json"
    manifest = {listed: {"size": 0, "sha256": "0" * 64}}  # sizes are not checked by the card
    (root / "training_info.json").write_text(json.dumps({"format_version": 1, "step": 0, "contents": contents, "manifest": manifest}))
    if adapter_base is None:
        folder = root / "model" / "consolidated"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "_name_or_path": name_or_path}))
    else:
        folder = root / "model" / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": adapter_base, "peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    document = {
        "checkpoint": {"metric_name": "val:reward", "keep_top_k": 2, "hub_token": "hf_leaked_in_config"},
        "training": {"optimizer": {"learning_rate": 3e-4, "api_key": "sk-very-secret"}, "seed": 7, "hf_token": "hf_other"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(document))
    return root


def test_leaderboard_publishes_the_top_k_and_names_main() -> None:
    board = Leaderboard.from_rows(ROWS, POLICY)
    assert [(e.step, e.value, e.rank, e.branch) for e in board.entries] == [(20, 0.8, 1, "step-20"), (30, 0.5, 2, "step-30")]
    assert board.main == 20  # the newest (40) is kept locally for resume, but it is no serving candidate

    lower = Leaderboard.from_rows(ROWS, RetentionPolicy(keep_top_k=1, metric_name="val:reward", higher_is_better=False))
    assert lower.steps == [40] and lower.main == 40
    every = Leaderboard.from_rows(ROWS + [{"step": 50, "metrics": {}}], RetentionPolicy(keep_top_k=None, metric_name="val:reward"))
    assert every.steps == [20, 30, 10, 40, 50] and every.main == 20  # no k: everything kept is published
    unranked = Leaderboard.from_rows(ROWS, RetentionPolicy(keep_top_k=None, metric_name=None))
    assert unranked.main == 40  # no metric: main is the newest


def test_card_metadata_leaderboard_usage_and_redaction(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "step_20")
    board = Leaderboard.from_rows(ROWS, POLICY)
    card = render_model_card(ckpt, step=20, metrics={"val": {"reward": 0.8}, "loss": 1.25, "note": "text"}, leaderboard=board,
                             repo_id="alice/run", revision="step-20")
    text = str(card)
    assert render_model_card(ckpt, step=20, metrics={"val": {"reward": 0.8}, "loss": 1.25, "note": "text"}, leaderboard=board,
                             repo_id="alice/run", revision="step-20").content == text  # same inputs, same bytes

    parsed = ModelCard(text)  # what ModelCard.load does with a downloaded README.md
    data = parsed.data
    assert data.base_model == "meta-llama/Llama-3.2-1B" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and {"hf_rl_ckpt", "checkpoint", "llama"} <= set(data.tags)
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == {("val:reward", 0.8), ("loss", 1.25)}
    assert data.eval_results[0].task_type == "text-generation"

    assert "| 1 | **20** | 0.8 | `step-20` = `main` |" in parsed.text
    assert "| 2 | 30 | 0.5 | `step-30` |" in parsed.text and "step-40" not in parsed.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/run", revision="step-20")' in parsed.text
    assert "get_peft_model" in parsed.text and "vllm serve alice/run --revision step-20" in parsed.text
    assert "- `learning_rate`: 0.0003" in parsed.text and "- `seed`: 7" in parsed.text
    assert "Full configuration" not in text, "a pushed card carries the summary only, no configuration dump (local paths, URLs)"
    local = str(render_model_card(ckpt, step=20, metrics={"loss": 1.25}, leaderboard=board))  # a run that does not publish
    for secret in ("hf_leaked_in_config", "sk-very-secret", "hf_other"):
        assert secret not in text and secret not in local
    assert "Full configuration (secrets redacted)" in local and local.count("<redacted>") == 3


def test_base_model_only_when_it_names_a_hub_model(tmp_path: Path) -> None:
    board = Leaderboard.from_rows(ROWS[:1], POLICY)
    for name in ("", str(tmp_path), "../relative/../path"):
        ckpt = fake_checkpoint(tmp_path / f"ckpt{len(name)}", name_or_path=name)
        assert ModelCard(str(render_model_card(ckpt, step=10, metrics={}, leaderboard=board))).data.base_model is None


def test_adapter_card(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "step_10", adapter_base="Qwen/Qwen2-0.5B")
    board = Leaderboard.from_rows(ROWS[:1], POLICY)
    card = render_model_card(ckpt, step=10, metrics={"val": {"reward": 0.2}}, leaderboard=board, repo_id="alice/lora", revision="step-10")
    assert card.data.library_name == "peft" and card.data.base_model == "Qwen/Qwen2-0.5B" and "lora" in card.data.tags
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/lora", revision="step-10")' in card.text
    assert "hf download alice/lora --revision step-10 --local-dir adapter-step-10" in card.text
    assert "vllm serve Qwen/Qwen2-0.5B --enable-lora --lora-modules step-10=adapter-step-10" in card.text


def test_every_checkpoint_carries_its_card(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), metric_name="val_reward", keep_top_k=3))
    model, tok = tiny.build_model("llama"), tiny.build_tokenizer()
    manager.save(1, model=model, metrics={"val_reward": 0.3}, tokenizer=tok)
    manager.save(2, model=model, metrics={"val_reward": 0.6}, tokenizer=tok)

    for step in (1, 2):
        assert "README.md" in verify_checkpoint(tmp_path / f"step_{step}")["manifest"]
    first = ModelCard.load(tmp_path / "step_1" / "README.md")
    second = ModelCard.load(tmp_path / "step_2" / "README.md")
    assert "| 1 | **1** | 0.3 |" in first.text and "step_2" not in first.text  # as of its save: committed checkpoints never change
    assert "| 1 | **2** | 0.6 |" in second.text and "| 2 | 1 | 0.3 |" in second.text
    assert f'from_pretrained("{tmp_path / "step_2" / "model" / "consolidated"}")' in second.text  # not published: the local folder
    assert second.data.eval_results[0].metric_value == 0.6
