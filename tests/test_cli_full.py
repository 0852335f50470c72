"""The whole `hf-rl-ckpt` command line: every subcommand's --help, inspect, verify, export (folder and .tar), convert, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.bundle import extract_bundle
from hf_rl_ckpt.cli import EXIT_CODES_HELP, build_parser, main
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer

COMMANDS = ("list", "inspect", "verify", "export", "convert", "push")


@pytest.fixture
def checkpoint(tmp_path, make_objects):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "run")))
    path = manager.save(5, **objs.as_kwargs(), metrics={"val_reward": 0.75}, tokenizer=build_tokenizer())
    manager.finalize()
    return path, objs.model


@pytest.mark.parametrize("command", (None,) + COMMANDS)
def test_every_command_has_help_with_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(([command] if command else []) + ["--help"])
    assert exit_.value.code == 0
    assert " ".join(EXIT_CODES_HELP.split()) in " ".join(capsys.readouterr().out.split())


def test_commands_are_all_there():
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)
    assert "Exit codes: 0 success; 1" in sys.modules["hf_rl_ckpt.cli"].__doc__


def test_inspect(checkpoint, capsys):
    path, model = checkpoint
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 5 and report["metrics"] == {"val_reward": 0.75}
    assert report["stored_parameters"] == sum(p.numel() for p in model.parameters()) == report["model"]["num_parameters"]
    assert report["parameters_by_dtype"] == {"F32": report["stored_parameters"]}
    assert report["hub"]["status"] == "not published"
    assert report["files"]["model/consolidated/model.safetensors"] == (path / "model/consolidated/model.safetensors").stat().st_size
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "val_reward=0.75" in text and "F32" in text and "tokenizer.json" in text

    (path / "scheduler.json").write_text("{}")
    assert main(["inspect", str(path)]) == 1
    assert "CORRUPT" in capsys.readouterr().out and main(["inspect", str(path.parent)]) == 2


def test_export_tar_loads_with_plain_tar_and_from_pretrained(checkpoint, tmp_path):
    path, model = checkpoint
    assert main(["export", str(path), str(tmp_path / "out" / "tiny.tar.gz")]) == 0
    assert main(["export", str(path), str(tmp_path / "out" / "raw.tar"), "--no-compress"]) == 0
    assert (tmp_path / "out" / "tiny.tar.gz").read_bytes()[:2] == b"\x1f\x8b" and tarfile.is_tarfile(tmp_path / "out" / "raw.tar")
    assert main(["verify", str(tmp_path / "out" / "tiny.tar.gz")]) == 0

    subprocess.run(["tar", "-xf", str(tmp_path / "out" / "raw.tar"), "-C", str(tmp_path / "out")], check=True)
    folder = tmp_path / "out" / "raw"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "hf_rl_ckpt_bundle.json"} <= {p.name for p in folder.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 4]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)

    assert main(["export", str(path), str(tmp_path / "out" / "raw.tar")]) == 2, "an existing output is refused"
    assert main(["export", str(path), str(tmp_path / "folder"), "--no-compress"]) == 2
    assert main(["export", str(path), str(tmp_path / "folder")]) == 0 and (tmp_path / "folder" / "model.safetensors").is_file()


def test_convert_command(tmp_path, capsys):
    src = tmp_path / "checkpoint-3"
    build_model("llama", seed=0).save_pretrained(src)  # an HF Trainer folder saved with save_only_model: no pickles
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 3, "epoch": 0.5, "log_history": [{"step": 3, "loss": 2.5}]}))
    assert main(["convert", str(src), str(tmp_path / "step_3")]) == 0
    assert "converted hf_trainer checkpoint" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "step_3")]) == 0
    info = json.loads((tmp_path / "step_3" / "training_info.json").read_text())
    assert (info["step"], info["epoch"], info["metrics"]) == (3, 0.5, {"loss": 2.5})
    assert main(["convert", str(src), str(tmp_path / "step_3")]) == 2
    assert main(["convert", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a checkpoint folder convert recognises" in capsys.readouterr().err


def test_exit_codes_of_the_installed_command(checkpoint, tmp_path):
    path, _ = checkpoint
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hf_rl_ckpt.cli", *args], capture_output=True, text=True, timeout=120)
    assert cli("verify", str(path)).returncode == 0
    (path / "config.yaml").write_text("tampered: true\n")
    failed = cli("verify", str(path))
    assert failed.returncode == 1 and "config.yaml" in failed.stderr
    assert cli("verify", str(tmp_path)).returncode == 2
    assert cli("no-such-command").returncode == 2


def test_a_renamed_bundle_is_still_a_valid_bundle(checkpoint, tmp_path):
    path, model = checkpoint
    bundle = tmp_path / "model.tar.gz"
    assert main(["export", str(path), str(bundle)]) == 0
    renamed = tmp_path / "run42-step1.tar.gz"
    shutil.copyfile(bundle, renamed)
    assert main(["verify", str(renamed)]) == 0, "a bundle's validity does not depend on its file name"
    folder = extract_bundle(renamed, tmp_path / "dest")
    assert folder == tmp_path / "dest" / "model", "extracting gives the folder the archive holds, as `tar -xf` does"
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder).lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    shutil.copyfile(bundle, tmp_path / "model.backup")
    assert main(["verify", str(tmp_path / "model.backup")]) == 0, "nor on its suffix: a file given to verify is a bundle"


@pytest.mark.parametrize("name, gzipped", [("model.tar", False), ("model.tar.gz", True), ("model.tgz", True)])
def test_export_archive_compression_follows_the_suffix(checkpoint, tmp_path, name, gzipped):
    path, _ = checkpoint
    assert main(["export", str(path), str(tmp_path / name)]) == 0
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") is gzipped
    assert tarfile.open(tmp_path / name, "r:gz" if gzipped else "r:").getnames()[0] == "model"


def test_no_compress_contradicting_the_suffix_is_refused(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["export", str(path), str(tmp_path / "model.tar.gz"), "--no-compress"]) == 2
    assert "--no-compress" in capsys.readouterr().err and not (tmp_path / "model.tar.gz").exists()
    assert main(["export", str(path), str(tmp_path / "model.tar"), "--no-compress"]) == 0
    assert tarfile.open(tmp_path / "model.tar", "r:").getnames()[0] == "model"


def test_export_checks_only_what_it_exports(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    (path / "scheduler.json").unlink()  # training state export does not read
    assert main(["export", str(path), str(tmp_path / "folder")]) == 0
    assert main(["export", str(path), str(tmp_path / "model.tar")]) == 0 and main(["verify", str(tmp_path / "model.tar")]) == 0
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "folder").lm_head.weight, model.lm_head.weight, rtol=0, atol=0)

    weights = path / "model" / "consolidated" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the digest tells
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["export", str(path), str(tmp_path / "damaged")]) == 1
    assert "model.safetensors" in capsys.readouterr().err and not (tmp_path / "damaged").exists()
    assert main(["export", str(path), str(tmp_path / "damaged.tar")]) == 1 and not (tmp_path / "damaged.tar").exists()
