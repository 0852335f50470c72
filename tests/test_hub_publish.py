"""Publishing to the Hub, through the REAL huggingface_hub client against the local HubServer.

Every run here trains a tiny model for a few steps and saves with `CheckpointManager` (and
once through the Trainer callback); the Hub side is asserted through the client as a user
would see it: refs, trees, downloads, `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoFile, hf_hub_download, snapshot_download
from huggingface_hub import lfs as hf_lfs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ConfigError, verify_checkpoint
from hf_rl_ckpt.cli import main as cli_main
from hf_rl_ckpt.hub import HubEntry, HubState
from hf_rl_ckpt.retention import RetentionPolicy
from hf_rl_ckpt.testing import tiny
from hf_rl_ckpt.testing.hub_server import HubServer, hub_env

# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not something under test here.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

REPO = "alice/tiny-rl-run"
TOKEN = "hf_test_token_0123456789"
REWARDS = [0.1, 0.5, 0.3, 0.9, 0.2]  # top-2: steps 4 and 2; step 3 enters the top-2 and leaves it again


#: Retries of a test Hub's injected failures: 5 tries within a fraction of a second.
FAST_RETRY = {"attempts": 5, "initial_delay": 0.01, "max_delay": 0.05}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", tokens={TOKEN}) as srv, hub_env(srv, token=TOKEN, hf_home=tmp_path / "hf_home"):
        yield srv


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def hub_config(tmp_path: Path, **overrides) -> CheckpointConfig:
    fields = dict(
        checkpoint_dir=str(tmp_path / "ckpt"), metric_name="val_reward", keep_top_k=2, push_to_hub=True, hub_model_id=REPO, hub_retry=FAST_RETRY,
    )
    return CheckpointConfig(**{**fields, **overrides})


class Loop:
    """A plain training loop on the tiny model: one optimizer step, then a save, per evaluation."""

    def __init__(self, manager: CheckpointManager, tokenizer, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.manager, self.tokenizer = manager, tokenizer
        self.model = tiny.build_model("llama", seed=seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def step_and_save(self, step: int, reward: float) -> None:
        batch = torch.randint(0, self.model.config.vocab_size, (2, 8))
        self.model(input_ids=batch, labels=batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.manager.save(step, model=self.model, optimizer=self.optimizer, metrics={"val_reward": reward}, tokenizer=self.tokenizer)


def branches(api: HfApi) -> set[str]:
    return {b.name for b in api.list_repo_refs(REPO).branches}


def tree(api: HfApi, revision: str) -> dict[str, str]:
    """path -> content hash (LFS sha256 or git blob id) of every file of a revision."""
    return tree_of(api, REPO, revision)


def tree_of(api: HfApi, repo: str, revision: str) -> dict[str, str]:
    return {
        e.path: e.lfs.sha256 if e.lfs else e.blob_id
        for e in api.list_repo_tree(repo, revision=revision, recursive=True)
        if isinstance(e, RepoFile)
    }


def hub_section(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "ckpt" / "checkpoints.json").read_text())["hub"]


def lfs_puts(server: HubServer) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in server.requests if r.method == "PUT"]


def assert_published(api: HfApi, tmp_path: Path, best: int, others: list[int]) -> None:
    """Exactly the top-k as branches, main == best file for file, and the registry agrees with the refs."""
    assert branches(api) == {"main"} | {f"step-{s}" for s in [best, *others]}
    assert tree(api, "main") == tree(api, f"step-{best}")
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    hub = hub_section(tmp_path)
    assert {int(k): (e["status"], e["commit"]) for k, e in hub["steps"].items()} == {
        s: ("pushed", refs[f"step-{s}"]) for s in [best, *others]
    }
    assert hub["main"]["step"] == best and hub["main"]["commit"] == refs["main"]


def test_hub_state_reads_and_writes_the_stored_section_unchanged() -> None:
    """checkpoints.json's `hub` section, as earlier releases wrote it, round-trips through the typed HubState byte for byte."""
    at = "2026-01-01T00:00:00+00:00"
    stored = {
        "repo_id": REPO,
        "steps": {
            "4": {"status": "pushed", "branch": "step-4", "commit": "c4", "fingerprint": "f4", "updated_at": at},
            "2": {"status": "failed", "branch": "step-2", "updated_at": at, "error": "could not push step-2: HTTP 413"},
            "1": {"status": "pushed", "branch": "step-1", "commit": "c1", "fingerprint": "f1", "updated_at": at, "evicted": True},
            "5": {"status": "pending", "branch": "step-5"},
        },
        "main": {"step": 4, "commit": "c4", "fingerprint": "f4", "updated_at": at},
    }
    state = HubState.from_json(json.loads(json.dumps(stored)), REPO)
    assert state.steps[4] == HubEntry(4, "step-4", "pushed", commit="c4", fingerprint="f4", updated_at=at)
    assert state.steps[1].evicted and state.steps[2].error and state.main is not None and state.main.step == 4
    assert json.dumps(state.to_json()) == json.dumps(stored)
    assert HubState.from_json(stored, "someone/else") == HubState("someone/else")  # another repo's section: start afresh
    assert HubState.from_json(None, REPO).to_json() == {"repo_id": REPO, "steps": {}, "main": None}


def test_push_to_hub_requires_a_repo_id() -> None:
    with pytest.raises(ConfigError, match="hub_model_id"):
        CheckpointConfig(push_to_hub=True)
    with pytest.raises(ConfigError, match="hub_model_id 'a/b/c'"):
        CheckpointConfig(push_to_hub=True, hub_model_id="a/b/c")


def test_run_publishes_top_k_branches_and_best_on_main(server: HubServer, tmp_path: Path, tokenizer, monkeypatch) -> None:
    hashed = []
    monkeypatch.setattr(hf_lfs, "sha_fileobj", lambda fileobj, *a, **k: hashed.append(fileobj.name))
    api = HfApi()
    manager = CheckpointManager(hub_config(tmp_path))
    loop = Loop(manager, tokenizer)
    seen: dict[int, set[str]] = {}
    for step, reward in enumerate(REWARDS, start=1):
        loop.step_and_save(step, reward)
        manager.finalize(terminate=False)  # wait for the queue, so every intermediate state is observable
        seen[step] = branches(api)
    manager.finalize()

    assert seen[3] == {"main", "step-2", "step-3"}  # step 1 was evicted at step 3: its branch went with it
    assert seen[4] == {"main", "step-4", "step-2"}  # step 3 left the top-2
    assert seen[5] == seen[4]  # step 5 is kept locally (newest, for resume) but is not a top-2 serving candidate
    assert_published(api, tmp_path, best=4, others=[2])

    # Served as is: snapshot + from_pretrained, the same weights as the local checkpoint.
    for step in (4, 2):
        folder = Path(snapshot_download(REPO, revision=f"step-{step}"))
        assert not (folder / "training_state").exists() and (folder / "tokenizer.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        local = load_file(tmp_path / "ckpt" / f"step_{step}" / "model" / "consolidated" / "model.safetensors")
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in local.items())
        assert AutoTokenizer.from_pretrained(folder).decode(tokenizer("3 plus 4")["input_ids"]) == "3 plus 4"
    direct = AutoModelForCausalLM.from_pretrained(REPO, revision="step-2")
    assert torch.equal(direct.lm_head.weight, load_file(tmp_path / "ckpt/step_2/model/consolidated/model.safetensors")["lm_head.weight"])

    # Weights went up once each (main reused the branches' LFS objects), hashed by the manifest, not re-read.
    assert len(lfs_puts(server)) == len(set(lfs_puts(server))) == 4  # steps 1-4 were each pushed once
    assert hashed == []

    # The card on main parses, carries the metrics and names every retained branch.
    card = ModelCard.load(REPO)
    assert card.data.library_name == "transformers" and "hf_rl_ckpt" in card.data.tags
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("val_reward", 0.9)]
    assert "`step-4` = `main`" in card.text and "`step-2`" in card.text and "step-3" not in card.text
    assert 'vllm serve alice/tiny-rl-run --revision step-4' in card.text
    branch_card = ModelCard.load(hf_hub_download(REPO, "README.md", revision="step-2"))
    assert branch_card.data.eval_results[0].metric_value == 0.5 and "`step-4` = `main`" in branch_card.text


class GatedHub(HubServer):
    """Holds every commit request until `gate` opens: a Hub exactly as slow as the test needs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.holding = threading.Event(), threading.Event()

    def _respond(self, request):
        if "/commit/" in request.path and not self.gate.is_set():
            self.holding.set()
            self.gate.wait(timeout=120)
        return super()._respond(request)


def test_server_errors_are_retried_while_training_goes_on(tmp_path: Path, tokenizer) -> None:
    with GatedHub(tmp_path / "hub", tokens={TOKEN}) as server, hub_env(server, token=TOKEN, hf_home=tmp_path / "hf_home"):
        server.fail_next(3, status=500, path_contains="/commit/")
        manager = CheckpointManager(hub_config(tmp_path))
        loop = Loop(manager, tokenizer)
        loop.step_and_save(1, REWARDS[0])
        assert server.holding.wait(timeout=60), "the worker never reached the commit"
        for step, reward in enumerate(REWARDS[1:], start=2):
            loop.step_and_save(step, reward)
        # All saves returned while the worker's commit request was still in flight: none waited on the network.
        assert not [r for r in server.requests if "/commit/" in r.path]
        assert hub_section(tmp_path)["steps"]["4"]["status"] == "pending"

        server.gate.set()
        manager.finalize()

        statuses = [r.status for r in server.requests if "/commit/" in r.path]
        assert statuses[:4] == [500, 500, 500, 200] and set(statuses[4:]) == {200}
        assert_published(HfApi(), tmp_path, best=4, others=[2])


def test_auth_error_is_reported_once_and_training_continues(server: HubServer, tmp_path: Path, tokenizer, caplog) -> None:
    manager = CheckpointManager(hub_config(tmp_path, hub_token="hf_revoked_token"))
    loop = Loop(manager, tokenizer)
    for step, reward in enumerate(REWARDS, start=1):
        loop.step_and_save(step, reward)
    manager.finalize()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "HTTP 401" in message and "hub_token / HF_TOKEN" in message and f"write access to {REPO}" in message
    assert "Training continues" in message and "hf_revoked_token" not in caplog.text
    for step in (2, 4, 5):
        verify_checkpoint(tmp_path / "ckpt" / f"step_{step}")
    steps = hub_section(tmp_path)["steps"]
    assert {"2", "4"} <= set(steps) and {e["status"] for e in steps.values()} == {"pending"}  # resumed at the next start
    assert not HfApi().repo_exists(REPO)


def test_restart_finishes_pending_pushes_and_never_writes_the_token(tmp_path: Path, tokenizer, caplog) -> None:
    secret = "hf_secret_never_on_disk_42"
    first = HubServer(tmp_path / "hub", tokens={secret}).start()
    port = int(first.url.rsplit(":", 1)[1])
    with hub_env(first, hf_home=tmp_path / "hf_home"):  # no HF_TOKEN: the token comes from the config only
        first.stop()  # the Hub goes down before training starts
        config = hub_config(tmp_path, hub_token=secret)
        manager = CheckpointManager(config)
        loop = Loop(manager, tokenizer)
        for step, reward in enumerate(REWARDS, start=1):
            loop.step_and_save(step, reward)
        manager.finalize()
        assert {e["status"] for e in hub_section(tmp_path)["steps"].values()} <= {"pending", "failed"}
        del manager, loop  # the process ends with pushes pending

        with HubServer(tmp_path / "hub", tokens={secret}, port=port):  # the Hub is back, at the same address
            restarted = CheckpointManager(config)  # resume: the pending pushes start at once
            restarted.finalize()
            api = HfApi(token=secret)
            assert_published(api, tmp_path, best=4, others=[2])
            snapshot_download(REPO, revision="step-2", token=secret)  # fill the HF cache too, then scan it

    written = [p for root in ("ckpt", "hf_home") for p in (tmp_path / root).rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]
    assert secret not in caplog.text


def test_training_state_and_kept_evicted_branches(server: HubServer, tmp_path: Path, tokenizer) -> None:
    config = hub_config(tmp_path, keep_top_k=1, hub_keep_evicted=True, hub_push_training_state=True)
    manager = CheckpointManager(config)
    loop = Loop(manager, tokenizer)
    loop.step_and_save(1, 0.2)
    manager.finalize(terminate=False)
    loop.step_and_save(2, 0.7)  # step 1 is evicted locally; its branch stays
    manager.finalize()

    api = HfApi()
    assert branches(api) == {"main", "step-1", "step-2"} and not (tmp_path / "ckpt" / "step_1").exists()
    assert hub_section(tmp_path)["steps"]["1"] == {**hub_section(tmp_path)["steps"]["1"], "status": "pushed", "evicted": True}
    files = tree(api, "step-2")
    manifest = verify_checkpoint(tmp_path / "ckpt" / "step_2")["manifest"]
    step_2 = tmp_path / "ckpt" / "step_2"
    state = {f"training_state/{rel}" for rel in manifest if not rel.startswith("model/") and rel != "README.md"}
    assert state | {"training_state/training_info.json", "model.safetensors", "README.md"} <= set(files)
    rng = (step_2 / "rng" / "rank_0.safetensors").read_bytes()
    assert files["training_state/rng/rank_0.safetensors"] == hashlib.sha256(rng).hexdigest()  # the LFS oid: the file's sha256
    assert tree(api, "main") == files


def test_peft_adapter_is_published_at_the_repo_root(server: HubServer, tmp_path: Path, tokenizer) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(tiny.build_model("llama", seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    manager = CheckpointManager(hub_config(tmp_path, keep_top_k=None))
    manager.save(3, model=model, metrics={"val_reward": 0.4}, tokenizer=tokenizer)
    manager.finalize()

    folder = Path(snapshot_download(REPO, revision="step-3"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}
    loaded = PeftModel.from_pretrained(tiny.build_model("llama", seed=5), folder)
    batch = torch.tensor([[1, 17, 42, 99]])
    assert torch.allclose(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and "AutoPeftModelForCausalLM" in card.text


def test_push_command(server: HubServer, tmp_path: Path, tokenizer, capsys) -> None:
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), metric_name="val_reward"))
    Loop(manager, tokenizer).step_and_save(7, 0.6)
    ckpt = tmp_path / "ckpt" / "step_7"

    assert cli_main(["push", str(ckpt), "--repo-id", REPO, "--revision", "step-7", "--private", "--include-training-state"]) == 0
    assert f"pushed {ckpt} -> {REPO}@step-7" in capsys.readouterr().out
    api = HfApi()
    assert api.model_info(REPO).private and branches(api) == {"main", "step-7"}
    assert {"model.safetensors", "README.md", "training_state/training_info.json"} <= set(tree(api, "step-7"))
    assert 'revision="step-7"' in ModelCard.load(hf_hub_download(REPO, "README.md", revision="step-7")).text
    assert cli_main(["push", str(ckpt), "--repo-id", REPO]) == 0 and "model.safetensors" in tree(api, "main")

    assert cli_main(["push", str(tmp_path), "--repo-id", REPO]) == 2
    server.set_auth_failure(True)
    assert cli_main(["push", str(ckpt), "--repo-id", REPO]) == 1
    assert "write access" in capsys.readouterr().err
    with pytest.raises(SystemExit) as shown:
        cli_main(["push", "--help"])
    assert shown.value.code == 0 and "--include-training-state" in capsys.readouterr().out


def test_trainer_run_publishes_its_best_checkpoints(server: HubServer, tmp_path: Path, tokenizer) -> None:
    from hf_rl_ckpt import CheckpointCallback
    from transformers import Trainer, TrainingArguments

    config = hub_config(tmp_path, metric_name="eval_loss", higher_is_better=False)
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=10, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=2,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny.build_model("llama", seed=1), args=args, processing_class=tokenizer, callbacks=[CheckpointCallback(config)],
        train_dataset=tiny.toy_lm_dataset(tokenizer, n=16, seq_len=16), eval_dataset=tiny.toy_lm_dataset(tokenizer, n=4, seq_len=16, seed=2),
    )
    trainer.train()  # on_train_end finalizes: the queue is drained when train() returns

    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert len(evals) == 5
    best, second = RetentionPolicy(2, "eval_loss", higher_is_better=False).top_k(evals)
    assert_published(HfApi(), tmp_path, best=best, others=[second])


def test_push_command_creates_a_private_repo_unless_public(server: HubServer, tmp_path: Path, tokenizer, capsys) -> None:
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")))
    Loop(manager, tokenizer).step_and_save(3, 0.5)
    ckpt = tmp_path / "ckpt" / "step_3"
    api = HfApi()
    assert cli_main(["push", str(ckpt), "--repo-id", "alice/by-default"]) == 0
    assert api.model_info("alice/by-default").private, "like hub_private: true, a repo the CLI creates is private"
    assert cli_main(["push", str(ckpt), "--repo-id", "alice/opted-out", "--public"]) == 0
    assert not api.model_info("alice/opted-out").private
    assert cli_main(["push", str(ckpt), "--repo-id", "alice/explicit", "--private"]) == 0 and api.model_info("alice/explicit").private
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli_main(["push", str(ckpt), "--repo-id", "alice/both", "--private", "--public"])
    assert refused.value.code == 2 and not api.repo_exists("alice/both")


def test_push_command_publishes_what_the_run_publishes(server: HubServer, tmp_path: Path, tokenizer) -> None:
    """The CLI's default and --include-training-state push the same files as hub_push_training_state false / true."""
    api = HfApi()
    for training_state in (False, True):
        run = tmp_path / f"run-{training_state}"
        repo = f"alice/run-{str(training_state).lower()}"
        config = hub_config(tmp_path, checkpoint_dir=str(run), hub_model_id=repo, keep_top_k=None, hub_push_training_state=training_state)
        manager = CheckpointManager(config)
        Loop(manager, tokenizer).step_and_save(2, 0.5)
        manager.finalize()
        flags = ["--include-training-state"] if training_state else []
        assert cli_main(["push", str(run / "step_2"), "--repo-id", repo, "--revision", "by-hand", *flags]) == 0
        by_run = {p: h for p, h in tree_of(api, repo, "step-2").items() if p != "README.md"}
        assert by_run == {p: h for p, h in tree_of(api, repo, "by-hand").items() if p != "README.md"}
        assert any(p.startswith("training_state/optim/") for p in by_run) is training_state
        assert ("training_state/config.yaml" in by_run) is training_state


def test_push_command_refuses_a_bad_repo_id_before_any_request(server: HubServer, tmp_path: Path, tokenizer) -> None:
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")))
    Loop(manager, tokenizer).step_and_save(1, 0.5)
    pushed = subprocess.run(
        [sys.executable, "-m", "hf_rl_ckpt.cli", "push", str(tmp_path / "ckpt" / "step_1"), "--repo-id", "bad id!!"],
        capture_output=True, text=True, timeout=120,
    )
    assert pushed.returncode == 2, pushed.stderr
    assert "Traceback" not in pushed.stderr and "--repo-id 'bad id!!'" in pushed.stderr and "namespace/name" in pushed.stderr
    assert server.requests == [], "nothing reached the Hub"


PUBLISHING_CHILD = """
import sys
from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.testing import tiny

retry = {"attempts": int(sys.argv[3]), "initial_delay": 0.2, "max_delay": 0.2}
config = CheckpointConfig(checkpoint_dir=sys.argv[1], push_to_hub=True, hub_model_id="alice/logged", hub_endpoint=sys.argv[2], hub_retry=retry)
manager = CheckpointManager(config)
manager.save(1, model=tiny.build_model("llama", seed=0), tokenizer=tiny.build_tokenizer())
manager.finalize()
"""


def _publish_in_a_child(tmp_path: Path, endpoint: str, attempts: int) -> bytes:
    """stderr of a process that saves one checkpoint with push_to_hub and finalizes, written to a pipe (as a job log is)."""
    child = subprocess.run(
        [sys.executable, "-c", PUBLISHING_CHILD, str(tmp_path / "ckpt"), endpoint, str(attempts)], capture_output=True, timeout=300
    )
    assert child.returncode == 0, child.stderr.decode()[-3000:]
    return child.stderr


def test_finalize_with_the_hub_down_writes_no_progress_bar_redraws_to_a_log(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: every request is refused, as when the Hub is down
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    log = _publish_in_a_child(tmp_path, endpoint, attempts=20)  # about 4 s of retries while finalize() waits
    assert b"\r" not in log and b"Publishing to" not in log, log.decode()[-2000:]
    assert b"1 checkpoint(s) are not on the Hub yet" in log, "the log still says what happened"
    assert len(log.splitlines()) <= 5, log.decode()


def test_retried_uploads_draw_no_progress_bars_in_a_log(server: HubServer, tmp_path: Path) -> None:
    server.fail_next(3, status=500, path_contains="/commit/")  # each commit attempt re-runs the upload
    log = _publish_in_a_child(tmp_path, server.url, attempts=5)
    assert HfApi().file_exists("alice/logged", "model.safetensors", revision="step-1")
    assert b"\r" not in log and b"Upload" not in log and b"model.safetensors:" not in log, log.decode()[-2000:]


def test_a_shards_only_checkpoint_is_not_published_and_the_final_one_is(server: HubServer, tmp_path: Path, tokenizer, caplog) -> None:
    """`save_consolidated: final` on a sharded (FSDP2, one process) model: step 1 has no folder to serve and gets
    no branch, quietly; step 2, the final save, is published and loads."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny.build_model("llama", seed=2)
        fully_shard(model)
        manager = CheckpointManager(hub_config(tmp_path, keep_top_k=None, save_consolidated="final"))
        with caplog.at_level(logging.ERROR, logger="hf_rl_ckpt"):
            manager.save(1, model=model, metrics={"val_reward": 0.1}, tokenizer=tokenizer)
            manager.save(2, model=model, metrics={"val_reward": 0.2}, tokenizer=tokenizer, final=True)
            manager.finalize()
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "ckpt" / "step_1" / "model" / "consolidated").exists()
    assert branches(HfApi()) >= {"step-2"} and "step-1" not in branches(HfApi())
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], "no error for the unpublishable checkpoint"
    loaded = AutoModelForCausalLM.from_pretrained(snapshot_download(REPO, revision="step-2"))
    assert torch.equal(loaded.model.norm.weight, tiny.build_model("llama", seed=2).model.norm.weight)
