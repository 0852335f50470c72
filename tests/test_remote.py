"""The remote tier (`remote_dir`) against a real S3 protocol server (moto) on 127.0.0.1: uploads after the local
commit, the marker last, retention mirrored, resume on a fresh node, clear errors, failures that never stop training."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, RemoteStorageError
from hf_rl_ckpt.cli import main
from hf_rl_ckpt.layout import CheckpointLayout
from hf_rl_ckpt.remote import MARKER, RemoteStore

import _trainer_run as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "dist"))
from dist_helpers import full_state, torchrun  # noqa: E402


def config(tmp_path: Path, remote: str, name: str = "ckpt", **fields) -> CheckpointConfig:
    return CheckpointConfig(
        checkpoint_dir=str(tmp_path / name), remote_dir=remote, remote_retry={"attempts": 2, "initial_delay": 0.05}, **fields,
    )


def train(objs, steps: int, manager: CheckpointManager | None = None, start: int = 0) -> None:
    batches = objs.endless_batches()
    for step in range(start + 1, start + steps + 1):
        objs.train_step(next(batches))
        if manager is not None and manager.should_save(step):
            manager.save(step, **objs.as_kwargs(), metrics={"loss": float(step)})


def remote_files(url: str) -> dict[str, int]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {path[len(root) + 1:]: entry["size"] for path, entry in fs.find(root, detail=True).items()}


def test_each_committed_checkpoint_is_uploaded_whole_and_retention_is_mirrored(tmp_path, make_objects, s3):
    objs = make_objects(seed=0)
    manager = CheckpointManager(config(tmp_path, s3.url, save_period=2, keep_top_k=2, metric_name="step"))
    train(objs, 8, manager)
    manager.finalize()

    local = CheckpointLayout(tmp_path / "ckpt").committed_steps()
    store = RemoteStore(s3.url)
    assert [c.name for c in store.committed()] == [path.name for path in local.values()] == ["step_6", "step_8"]
    files = remote_files(s3.url)
    for path in local.values():  # every byte of the retained set, nothing of the evicted ones
        info = json.loads((path / MARKER).read_text())
        for rel, entry in info["manifest"].items():
            assert files.pop(f"{path.name}/{rel}") == entry["size"]
        assert files.pop(f"{path.name}/{MARKER}") == (path / MARKER).stat().st_size
    assert files == {}, f"left on the remote: {sorted(files)}"


def test_a_fresh_node_resumes_from_the_remote_copy_exactly(tmp_path, make_objects, s3):
    objs = make_objects(seed=0)
    manager = CheckpointManager(config(tmp_path, s3.url, save_period=3))
    train(objs, 6, manager)
    manager.finalize()
    shutil.rmtree(tmp_path / "ckpt")  # the node is gone, with its disk

    restored = make_objects(seed=1)
    fresh = CheckpointManager(config(tmp_path, s3.url))
    assert fresh.should_load()
    state = fresh.resume(**restored.as_kwargs())
    assert state.step == 6 and state.path == tmp_path / "ckpt" / "step_6"
    got, want = full_state(restored.model, restored.optimizer), full_state(objs.model, objs.optimizer)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
    assert restored.scheduler.state_dict() == objs.scheduler.state_dict()
    assert restored.loader.state_dict() == objs.loader.state_dict()
    fresh.finalize()


def test_resume_takes_the_newest_commit_of_both_tiers(tmp_path, make_objects, s3):
    """A node that kept an old local checkpoint still resumes from the newer one another node uploaded."""
    objs = make_objects(seed=0)
    manager = CheckpointManager(config(tmp_path, s3.url, save_period=2))
    train(objs, 2, manager)
    manager.finalize()
    shutil.copytree(tmp_path / "ckpt", tmp_path / "stale")  # this node's disk, frozen at step 2
    manager = CheckpointManager(config(tmp_path, s3.url, save_period=2))
    train(objs, 2, manager, start=2)
    manager.finalize()
    state = CheckpointManager(config(tmp_path, s3.url, name="stale")).resume(**make_objects(seed=1).as_kwargs())
    assert state.step == 4


def test_from_path_accepts_a_remote_checkpoint_url(tmp_path, make_objects, s3):
    objs = make_objects(seed=0)
    manager = CheckpointManager(config(tmp_path, s3.url, save_period=2))
    train(objs, 4, manager)
    manager.finalize()
    restored = make_objects(seed=1)
    other = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "other"), resume={"mode": "from_path", "resume_path": f"{s3.url}/step_2"}))
    assert other.resume(**restored.as_kwargs()).step == 2
    assert (tmp_path / "other" / "step_2" / MARKER).is_file()


def test_an_unusable_remote_fails_at_start_before_anything_is_written(tmp_path, s3):
    bucketless = f"s3://no-such-bucket-{tmp_path.name.lower()[-8:]}/run"
    with pytest.raises(RemoteStorageError, match="does not exist: create it"):
        CheckpointManager(config(tmp_path, bucketless))
    assert not (tmp_path / "ckpt").exists()
    unreachable = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(RemoteStorageError, match="cannot be reached.*AWS_ENDPOINT_URL"):
        CheckpointManager(config(tmp_path, s3.url, remote_storage_options=unreachable))
    assert not (tmp_path / "ckpt").exists()


def test_secrets_in_remote_storage_options_are_never_written(tmp_path, make_objects, s3):
    options = {"key": "testing", "secret": "testing-secret-value", "client_kwargs": {"aws_session_token": "session-token-value"}}
    manager = CheckpointManager(config(tmp_path, s3.url, remote_storage_options=options))
    path = manager.save(1, **make_objects(seed=0).as_kwargs())
    manager.finalize()
    written = "".join(p.read_text(errors="replace") for p in path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".md"))
    assert "remote_storage_options" in written
    assert "testing-secret-value" not in written and "session-token-value" not in written


def test_a_remote_that_fails_later_never_stops_training(tmp_path, make_objects, caplog):
    from s3_server import S3Server

    server = S3Server()  # a server of its own, to stop mid-run
    try:
        url = f"s3://{server.bucket()}/run"
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": server.endpoint},
                   "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
        objs = make_objects(seed=0)
        manager = CheckpointManager(config(tmp_path, url, save_period=1, remote_storage_options=options))
        train(objs, 1, manager)
        manager.events.drain()
        assert [c.name for c in RemoteStore(url, options).committed()] == ["step_1"]
        server.stop()
        caplog.clear()
        train(objs, 3, manager, start=1)
        manager.finalize()
    finally:
        server.stop()
    assert sorted(CheckpointLayout(tmp_path / "ckpt").committed_steps()) == [1, 2, 3, 4]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "remote_dir" in r.getMessage()]
    assert len(errors) == 1 and "could not upload step_2" in errors[0] and "training goes on" in errors[0], errors


CRASHING_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from training_objects import make_training_objects
    from hf_rl_ckpt import CheckpointConfig, CheckpointManager
    objs = make_training_objects(seed=0)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir={ckpt!r}, remote_dir={url!r}))
    if {save}:
        manager.save(1, **objs.as_kwargs())
    manager.finalize()
""")


@pytest.mark.parametrize("point", ["remote.file_uploaded@3", "remote.before_marker"])
def test_a_kill_during_an_upload_never_shows_a_partial_checkpoint_and_the_next_start_completes_it(tmp_path, s3, point):
    def run(save: bool, kill_at: str | None) -> subprocess.CompletedProcess:
        script = tmp_path / "run.py"
        script.write_text(CRASHING_RUN.format(tests=str(REPO / "tests"), ckpt=str(tmp_path / "ckpt"), url=s3.url, save=save))
        crash = ["-m", "hf_rl_ckpt.testing.crash", "--at", kill_at, "--"] if kill_at else []
        return subprocess.run([sys.executable, *crash, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO)

    killed = run(save=True, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "ckpt" / "step_1" / MARKER).is_file(), "committed locally before the upload"
    assert RemoteStore(s3.url).committed() == []
    assert remote_files(s3.url), "the upload had started"

    restarted = run(save=False, kill_at=None)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "lacks step_1" in restarted.stderr
    assert [c.name for c in RemoteStore(s3.url).committed()] == ["step_1"]
    shutil.rmtree(tmp_path / "ckpt")
    state = CheckpointManager(config(tmp_path, s3.url)).resume(model=__import__("training_objects").make_training_objects(seed=1).model)
    assert state.step == 1  # downloaded and verified byte for byte


def test_a_trainer_run_killed_after_a_checkpoint_resumes_from_s3_on_a_fresh_disk_exactly(tmp_path, s3):
    """The must-show run: killed right after its step-4 checkpoint reached S3, the local checkpoint_dir deleted, re-run."""
    spec = {"kind": "causal", "work_dir": str(tmp_path), "checkpointing": {"remote_dir": s3.url}}
    killed = R.start([{**spec, "ckpt_dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "killed"), "kill_after_save": 4, "kill_after_upload": True}])
    R.run({**spec, "ckpt_dir": str(tmp_path / "ref_ckpt"), "out_dir": str(tmp_path / "ref"), "checkpointing": {}})
    R.finish(killed)
    local = CheckpointLayout(tmp_path / "ckpt").committed_steps()
    assert [c.step for c in RemoteStore(s3.url).committed()] == list(local) == [3, 4]  # step 2 evicted by the top-2 on eval_loss, remotely too
    shutil.rmtree(tmp_path / "ckpt")
    R.finish(R.start([{**spec, "ckpt_dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "resumed")}]))
    resumed, reference = R.result(tmp_path / "resumed"), R.result(tmp_path / "ref")
    assert resumed["global_step"] == reference["global_step"] == 10
    assert resumed["steps_trained_here"] == 6, "the re-run must continue from the step-4 checkpoint it downloaded"
    assert R.losses(resumed["log_history"]) == R.losses(reference["log_history"])
    R.assert_same_weights(resumed["weights"], reference["weights"])


def test_the_cli_lists_inspects_and_verifies_remote_checkpoints(tmp_path, make_objects, s3, capsys):
    manager = CheckpointManager(config(tmp_path, s3.url, save_period=1))
    train(make_objects(seed=0), 2, manager)
    manager.finalize()

    def cli(*args: str) -> SimpleNamespace:
        capsys.readouterr()
        returncode = main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=returncode, stdout=out, stderr=err)

    listed = cli("list", s3.url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(row["step"], row["status"]) for row in json.loads(listed.stdout)] == [(1, "complete"), (2, "complete")]
    assert cli("list", s3.url, "--verify").returncode == 0
    inspected = cli("inspect", f"{s3.url}/step_2", "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["path"] == f"{s3.url}/step_2" and report["step"] == 2 and report["stored_parameters"] > 0
    verified = cli("verify", f"{s3.url}/step_2")
    assert verified.returncode == 0 and verified.stdout.startswith(f"OK {s3.url}/step_2"), verified.stderr

    fs, root = fsspec.core.url_to_fs(s3.url)  # flip a byte of a weight file on the remote: the same size, another digest
    weights = next(path for path in fs.find(f"{root}/step_2") if path.endswith(".safetensors"))
    data = bytearray(fs.cat_file(weights))
    data[-1] ^= 0xFF
    fs.pipe_file(weights, bytes(data))
    assert cli("list", s3.url).returncode == 0, "sizes still match: only a re-hash sees it"
    failed = cli("verify", f"{s3.url}/step_2")
    assert failed.returncode == 1 and "xxh3_128 does not match" in failed.stderr
    assert cli("list", s3.url, "--verify").returncode == 1
    fs.rm_file(weights)
    assert "missing" in cli("list", s3.url).stdout
    missing = cli("verify", f"{s3.url}/step_3")
    assert missing.returncode == 2 and "not a committed checkpoint" in missing.stderr


def test_node_local_disks_upload_their_own_files_and_fresh_jobs_of_1_and_2_ranks_resume_from_the_remote(tmp_path, s3):
    script = REPO / "tests" / "dist" / "node_local.py"
    torchrun(script, 2, "save", str(tmp_path / "disks"), s3.url, str(tmp_path / "ref"))
    for nproc in (2, 1):
        torchrun(script, nproc, "resume", str(tmp_path / f"fresh_{nproc}"), s3.url, str(tmp_path / "ref"))


def test_a_checkpoint_dir_the_ranks_do_not_share_is_refused_without_remote_dir(tmp_path):
    assert "rank 1: unshared OK" in torchrun(REPO / "tests" / "dist" / "node_local.py", 2, "unshared", str(tmp_path / "disks"))
