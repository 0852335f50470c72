"""Hostile and broken inputs: each is refused with an error naming the file, and nothing is modified.

For every kind of damage to the newest checkpoint: `verify` names the file, `resume.mode:
auto` falls back to the previous checkpoint with a warning that says what was wrong (and
`on_corrupt: error` raises instead), the damaged checkpoint and a sibling directory outside
the run are byte-for-byte and mtime-for-mtime unchanged, and no planted pickle ever runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ConfigError, CorruptCheckpointError, verify_checkpoint
from hf_rl_ckpt.bundle import export_bundle, extract_bundle
from hf_rl_ckpt.cli import main as cli_main
from hf_rl_ckpt.convert import convert_checkpoint
from hf_rl_ckpt.export import export_checkpoint
from hf_rl_ckpt.state.pickled import UntrustedPickleError
from hf_rl_ckpt.state.safetensors_io import check_safetensors_header

WEIGHTS = "model/consolidated/model.safetensors"


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry below `root` (symlinks not followed): mtime, size and content hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else os.readlink(path) if path.is_symlink() else ""
        found[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size, digest)
    return found


def pickle_bomb(marker: Path) -> bytes:
    """A pickle that runs `touch marker` when unpickled by anything but a weights-only loader."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


@pytest.fixture
def run(tmp_path, make_objects):
    """A run with committed steps 1 and 2, and a sibling directory that nothing may touch."""
    objs = make_objects()
    batches = iter(objs.loader)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "run")))
    objs.train_step(next(batches))
    manager.save(1, **objs.as_kwargs())
    step_1 = {k: v.clone() for k, v in objs.model.state_dict().items()}
    objs.train_step(next(batches))
    manager.save(2, **objs.as_kwargs())
    manager.finalize()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not touch")
    return tmp_path / "run", outside, step_1


def rewrite_manifest(ckpt: Path, rel: str) -> None:
    """Re-list `rel` with its current size and hash, as an attacker who can write the checkpoint would."""
    info = json.loads((ckpt / "training_info.json").read_text())
    data = (ckpt / rel).read_bytes()
    info["manifest"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "training_info.json").write_text(json.dumps(info))


def rewrite_header(ckpt: Path, mutate: Callable[[dict], None], length: int | None = None) -> None:
    path = ckpt / WEIGHTS
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    mutate(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", length if length is not None else len(encoded)) + encoded + raw[8 + size:])
    rewrite_manifest(ckpt, WEIGHTS)


def _tensors(header: dict) -> list[dict]:
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda entry: entry["data_offsets"][0])


def _overlap(header: dict) -> None:
    first, second = _tensors(header)[:2]
    second["data_offsets"] = list(first["data_offsets"])
    second["shape"], second["dtype"] = list(first["shape"]), first["dtype"]


def _huge(header: dict) -> None:
    last = _tensors(header)[-1]
    begin = last["data_offsets"][0]
    last["shape"], last["dtype"], last["data_offsets"] = [2**40], "U8", [begin, begin + 2**40]


def _wrong_dtype(header: dict) -> None:
    _tensors(header)[0]["dtype"] = "F16"


def _truncate(ckpt: Path, outside: Path) -> None:
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[:-100])


def _flip(ckpt: Path, outside: Path) -> None:
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x10
    (ckpt / WEIGHTS).write_bytes(bytes(data))


def _manifest_entry(name: Callable[[Path], str]) -> Callable[[Path, Path], None]:
    def corrupt(ckpt: Path, outside: Path) -> None:
        info = json.loads((ckpt / "training_info.json").read_text())
        info["manifest"][name(outside)] = {"size": 12, "sha256": hashlib.sha256(b"do not touch").hexdigest()}
        (ckpt / "training_info.json").write_text(json.dumps(info))
    return corrupt


def _symlink_out(ckpt: Path, outside: Path) -> None:
    (ckpt / "model/consolidated/config.json").unlink()
    (ckpt / "model/consolidated/config.json").symlink_to(outside / "secret.txt")


def _linked_folder(ckpt: Path, outside: Path) -> None:
    """A folder inside the model folder that links out of the run: verification lists it, export must not copy what it holds."""
    (ckpt / "model/consolidated/leak").symlink_to(outside, target_is_directory=True)


def _relinked_model_folder(ckpt: Path, outside: Path) -> None:
    """The model folder moved and linked back under its name: every manifest path passes through the link."""
    (ckpt / "model/consolidated").rename(ckpt / "model/real")
    (ckpt / "model/consolidated").symlink_to("real", target_is_directory=True)


def _plant_pickle(ckpt: Path, outside: Path) -> None:
    (ckpt / "model/consolidated/pytorch_model.bin").write_bytes(pickle_bomb(outside / "pwned"))


def _set_info(**fields) -> Callable[[Path, Path], None]:
    def corrupt(ckpt: Path, outside: Path) -> None:
        info = json.loads((ckpt / "training_info.json").read_text())
        info.update(fields)
        (ckpt / "training_info.json").write_text(json.dumps(info))
    return corrupt


CORRUPTIONS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "truncated": (_truncate, r"model\.safetensors: size \d+ bytes, manifest says \d+ \(truncated"),
    "bit_flipped": (_flip, r"model\.safetensors: xxh3_128 does not match"),
    "header_length_huge": (lambda c, o: rewrite_header(c, lambda h: None, length=2**62), r"model\.safetensors: invalid safetensors header: header length"),
    "header_claims_huge_tensor": (lambda c, o: rewrite_header(c, _huge), r"model\.safetensors: invalid safetensors header: tensors cover \d+ bytes"),
    "header_overlapping_offsets": (lambda c, o: rewrite_header(c, _overlap), r"model\.safetensors: invalid safetensors header: .*overlaps"),
    "header_dtype_vs_bytes": (lambda c, o: rewrite_header(c, _wrong_dtype), r"model\.safetensors: invalid safetensors header: .*needs \d+ bytes"),
    "manifest_dotdot": (_manifest_entry(lambda o: "../outside/secret.txt"), r"refusing path '\.\./outside/secret\.txt': it climbs out"),
    "manifest_absolute": (_manifest_entry(lambda o: str(o / "secret.txt")), r"refusing path '/.*secret\.txt': paths must be relative"),
    "symlink_escape": (_symlink_out, r"config\.json: is a symlink \(to .*secret\.txt\); checkpoints hold regular files only"),
    "linked_folder": (_linked_folder, r"consolidated/leak: is a symlink, and checkpoints hold regular files only"),
    "relinked_model_folder": (_relinked_model_folder, r"model/consolidated: is a symlink \(to real\); checkpoints hold regular files only"),
    "planted_pickle": (_plant_pickle, r"pytorch_model\.bin: not listed in the manifest"),
    "training_info_not_json": (lambda c, o: (c / "training_info.json").write_text("{not json"), r"training_info\.json: not valid JSON"),
    "newer_format_version": (_set_info(format_version=99), r"training_info\.json: written in checkpoint format 99, newer than"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_newest_checkpoint_is_refused_and_auto_resume_falls_back(run, kind, make_objects, caplog, capsys):
    root, outside, step_1_weights = run
    corrupt, expected = CORRUPTIONS[kind]
    newest = root / "step_2"
    corrupt(newest, outside)
    before = snapshot(newest), snapshot(outside)

    with pytest.raises(CorruptCheckpointError, match=expected):
        verify_checkpoint(newest)
    assert cli_main(["verify", str(newest)]) == 1
    assert str(newest) in capsys.readouterr().err

    objs = make_objects(seed=9)
    state = CheckpointManager(CheckpointConfig(checkpoint_dir=str(root))).resume(**objs.as_kwargs())
    assert state.step == 1, "auto resume falls back to the previous complete checkpoint"
    assert all(torch.equal(objs.model.state_dict()[k], v) for k, v in step_1_weights.items())
    warning = next(r.getMessage() for r in caplog.records if "falling back" in r.getMessage())
    assert str(newest) in warning and re.search(expected, warning), warning

    strict = CheckpointConfig(checkpoint_dir=str(root), resume={"on_corrupt": "error"})
    with pytest.raises(CorruptCheckpointError, match=expected):
        CheckpointManager(strict).resume(**make_objects(seed=9).as_kwargs())
    try:
        exported = export_checkpoint(newest, root.parent / "exported")
    except CorruptCheckpointError as err:
        assert re.search(expected, str(err)) and not (root.parent / "exported").exists()
    else:  # the damage is outside the model folder, which an export does not read: it copies that folder's files, nothing else
        assert kind in ("manifest_dotdot", "manifest_absolute"), kind
        assert sorted(path.name for path in exported.iterdir()) == sorted(path.name for path in (root / "step_1" / "model" / "consolidated").iterdir())
    assert (snapshot(newest), snapshot(outside)) == before, "nothing may be modified, inside the checkpoint or outside"
    assert not (outside / "pwned").exists()


def _victim(outside: Path) -> Path:
    victim = outside / "victim"
    (victim / "datasets").mkdir(parents=True)
    (victim / "datasets" / "train.jsonl").write_text("{}\n")
    return victim


@pytest.mark.parametrize("name", [".trash", ".incomplete", ".lock"])
def test_a_symlink_where_the_library_keeps_its_own_entries_is_refused_at_start(run, name):
    """`.trash` and `.incomplete` are emptied at start and `.lock` is written: a link there would delete or overwrite its target."""
    root, outside, _ = run
    victim = _victim(outside)
    link = root / name
    if link.exists() or link.is_symlink():
        link.unlink() if link.is_file() or link.is_symlink() else link.rmdir()
    link.symlink_to(victim / "datasets" / "train.jsonl" if name == ".lock" else victim)
    before = snapshot(outside)
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(name)}: is a symlink to {re.escape(str(victim))}"):
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(root)))
    assert snapshot(outside) == before, "nothing outside the run directory changes"


def test_recovery_deletes_only_what_the_library_created_and_follows_no_link(run):
    root, outside, _ = run
    victim = _victim(outside)
    for folder in (".incomplete", ".trash"):
        (root / folder).mkdir(exist_ok=True)
    (root / ".incomplete" / "step_5").mkdir()  # an interrupted save: removed
    (root / ".incomplete" / "notes.txt").write_text("mine")  # not ours: left alone
    (root / ".trash" / "evicted-step_7").symlink_to(victim, target_is_directory=True)  # named like ours, but a link: unlinked only
    before = snapshot(outside)
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(root))).finalize()
    assert sorted(path.name for path in (root / ".incomplete").iterdir()) == ["notes.txt"]
    assert not (root / ".trash" / "evicted-step_7").is_symlink()
    assert snapshot(outside) == before


def test_the_lock_file_is_private_and_records_no_arguments(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py", "--hub_token=hf_abcdefghijklmnopqrstuvwxyz0123"])
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "run")))
    lock = tmp_path / "run" / ".lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    holder = json.loads(lock.read_text())
    assert holder["program"] == "train.py" and "hf_abcdefghij" not in lock.read_text()
    manager.finalize()


def test_header_precheck_runs_before_safetensors_reads_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(CorruptCheckpointError, match=r"x\.safetensors: invalid safetensors header: the file is 2 bytes"):
        check_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CorruptCheckpointError, match="not a JSON object"):
        check_safetensors_header(path)
    header = json.dumps({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="shape \\[-1\\]"):
        check_safetensors_header(path)


def test_a_listed_planted_pickle_is_never_unpickled(run, make_objects):
    root, outside, _ = run
    _plant_pickle(root / "step_2", outside)
    rewrite_manifest(root / "step_2", "model/consolidated/pytorch_model.bin")  # the attacker also rewrote the manifest
    verify_checkpoint(root / "step_2")
    assert CheckpointManager(CheckpointConfig(checkpoint_dir=str(root))).resume(**make_objects(seed=9).as_kwargs()).step == 2
    assert not (outside / "pwned").exists()


def test_hostile_registry_entries_touch_nothing_outside(run, make_objects):
    root, outside, _ = run
    registry = json.loads((root / "checkpoints.json").read_text())
    registry["name_template"] = "../outside/{step}"
    registry["checkpoints"] += [{"step": 2, "name": "../outside"}, {"step": 7, "name": str(outside)}]
    (root / "checkpoints.json").write_text(json.dumps(registry))
    (root / "step_9").symlink_to(outside, target_is_directory=True)  # a symlinked "checkpoint" pointing out
    before = snapshot(outside)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(root)))
    assert [row.step for row in manager.checkpoints()] == [1, 2]
    assert manager.resume(**make_objects(seed=9).as_kwargs()).step == 2
    assert cli_main(["list", str(root)]) == 0
    assert snapshot(outside) == before


@pytest.mark.parametrize(
    "content, expected",
    [("{broken", r"checkpoints\.json: not valid JSON"), (json.dumps({"format_version": 99, "checkpoints": []}), r"checkpoints\.json: format_version 99 is newer")],
)
def test_broken_registry_is_refused_naming_it(run, content, expected):
    root, _, _ = run
    (root / "checkpoints.json").write_text(content)
    before = snapshot(root)
    with pytest.raises(CorruptCheckpointError, match=expected):
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(root)))
    after = snapshot(root)
    after.pop(".lock"), before.pop(".lock")  # the lock was taken (and its holder written) before the registry was read
    assert after == before


def test_malformed_yaml_config_is_refused_naming_it(tmp_path):
    (tmp_path / "ckpt.yaml").write_text("checkpointing:\n  keep_top_k: [1,\n")
    with pytest.raises(ConfigError, match=r"ckpt\.yaml is not valid YAML"):
        CheckpointConfig.from_yaml(tmp_path / "ckpt.yaml")


def test_foreign_checkpoint_with_a_planted_pickle(tmp_path):
    from hf_rl_ckpt.testing.tiny import build_model

    src, outside = tmp_path / "checkpoint-4", tmp_path / "outside"
    outside.mkdir()
    build_model("llama", seed=0).save_pretrained(src)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    (src / "optimizer.pt").write_bytes(pickle_bomb(outside / "pwned"))
    with pytest.raises(UntrustedPickleError, match=r"checkpoint-4/optimizer\.pt.*--trust-pickle"):
        convert_checkpoint(src, tmp_path / "out")
    with pytest.raises(CorruptCheckpointError, match=r"optimizer\.pt: refused by torch\.load\(weights_only=True\)"):
        convert_checkpoint(src, tmp_path / "out", trust_pickle=True)
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--trust-pickle"]) == 2
    assert not (outside / "pwned").exists() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no conversion leftovers"


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _member(name: str, data: bytes = b"x", **fields) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if fields.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if info.type == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    "member, expected",
    [
        (_member("model/../../escaped.txt"), "would land outside model/"),
        (_member("/tmp/absolute.txt"), "would land outside model/"),
        (_member("other/file.txt"), "would land outside model/"),
        (_member("model/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "regular files only"),
        (_member("model/hard", type=tarfile.LNKTYPE, linkname="model/config.json"), "regular files only"),
    ],
)
def test_hostile_bundle_members_are_refused(tmp_path, member, expected):
    archive, dest = tmp_path / "model.tar", tmp_path / "dest"
    _tar_with(archive, [_member("model/config.json", b"{}"), member])
    before = snapshot(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=rf"model\.tar: refusing member .*{expected}"):
        extract_bundle(archive, dest)
    assert snapshot(tmp_path).keys() - before.keys() <= {"dest"} and not any(dest.iterdir())


def test_tampered_bundle_fails_verification(run, tmp_path):
    root, _, _ = run
    bundle = export_bundle(root / "step_2", tmp_path / "model.tar")
    with tarfile.open(bundle) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    tampered = [(m, data[:-4] + b"\0\0\0\0" if m.name.endswith(".safetensors") else data) for m, data in members]
    (tmp_path / "evil").mkdir()
    _tar_with(tmp_path / "evil" / "model.tar", tampered)
    assert cli_main(["verify", str(bundle)]) == 0
    assert cli_main(["verify", str(tmp_path / "evil" / "model.tar")]) == 1


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("trainer_state.json", "{not json", r"trainer_state\.json: not valid JSON"),
        ("model.safetensors", "header-less junk", r"model\.safetensors: invalid safetensors header"),
    ],
)
def test_broken_foreign_checkpoint_files_are_named(tmp_path, name, content, expected):
    from hf_rl_ckpt.testing.tiny import build_model

    src = tmp_path / "checkpoint-4"
    build_model("llama", seed=0).save_pretrained(src)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (src / name).write_text(content)
    before = snapshot(src)
    with pytest.raises(CorruptCheckpointError, match=expected):
        convert_checkpoint(src, tmp_path / "out", weights_only=True)
    assert snapshot(src) == before and not (tmp_path / "out").exists()


#: Twenty kinds of secrets as training scripts hold them: under secret-naming keys, and inside ordinary values.
SECRETS = {
    "hf_token": "hf_Secret0123456789abcdefghijkl",
    "aws_access_key_id": "AKIASECRET0123456789",
    "aws_secret_access_key": "wJalrSecretKeyEXAMPLE0123456789abcdEFGH",
    "aws_session_token": "FwoGZXIvYXdzSecretSessionToken0123",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEsecretPEMbody0123\n-----END RSA PRIVATE KEY-----",
    "passwd": "hunter2-secret-passwd",
    "db_password": "pg-secret-password-42",
    "wandb_api_key": "0123456789secretwandbkey0123456789abcdef",
    "client_secret": "oauth-secret-client-value",
    "azure_connection_string": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=secretAzureKey==",
    "sas_token": "sv=2024&sig=secretSasSignature",
    "cookie": "sessionid=secret-cookie-value",
    "credentials": {"user": "bob", "pass": "secret-nested-credential"},
    "headers": {"Authorization": "Bearer secretBearerToken0123456789"},
}
SECRETS_IN_VALUES = {
    "database_url": "postgres://trainer:secretUrlPassword@db.internal:5432/runs",
    "endpoint_url": "http://minio:secretMinioPassword@minio:9000",
    "cmd": "python train.py --hub_token=hf_SecretInArgv0123456789abcd --lr 3e-4",
    "argv": ["train.py", "--password", "secret-argv-password", "--seed", "0"],
    "github": "ghp_SecretGithubToken0123456789abcdefghij",
    "note": "resume with Bearer secretInlineBearer0123456789 if asked",
}


def _secret_strings() -> list[str]:
    found = []

    def walk(value):
        if isinstance(value, dict):
            [walk(item) for item in value.values()]
        elif isinstance(value, list):
            [walk(item) for item in value]
        elif isinstance(value, str):
            found.extend(re.findall(r"[Ss]ecret[\w=/-]*|hf_Secret\w+|AKIASECRET\w+|MIIEsecret\w+|hunter2[\w-]*", value))

    walk(SECRETS)
    walk(SECRETS_IN_VALUES)
    return sorted(set(found))


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_no_secret_is_written_logged_or_pushed(tmp_path, make_objects, monkeypatch, caplog):
    from huggingface_hub import snapshot_download

    from hf_rl_ckpt.testing.hub_server import HubServer, hub_env

    token, repo = "hf_PushTokenSecret0123456789abcdef", "alice/secret-scan"
    monkeypatch.setattr("sys.argv", ["train.py", "--hub_token", token, "--api-key=secretArgvApiKey0123"])
    training = {**SECRETS, **SECRETS_IN_VALUES, "learning_rate": 3e-4, "nested": [{"token": "secret-list-token"}]}
    objs = make_objects()
    with HubServer(tmp_path / "hub", tokens={token}) as server, hub_env(server, token=token, hf_home=tmp_path / "hf_home"):
        config = CheckpointConfig(
            checkpoint_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id=repo, hub_token=token, hub_push_training_state=True,
        )
        manager = CheckpointManager(config, training_config=training)
        objs.train_step(next(iter(objs.loader)))
        manager.save(1, **objs.as_kwargs())
        manager.finalize()
        pushed = Path(snapshot_download(repo, revision="step-1", token=token))
        card = (pushed / "README.md").read_text()
    secrets = _secret_strings() + [token, "secretArgvApiKey0123"]
    assert len(secrets) >= 20
    written = {path: path.read_bytes() for root in (tmp_path / "run", pushed) for path in root.rglob("*") if path.is_file()}
    leaks = {str(path): [s for s in secrets if s.encode() in data] for path, data in written.items()}
    assert {path: found for path, found in leaks.items() if found} == {}, "secrets in written or pushed files"
    assert [s for s in secrets if any(s in record.getMessage() for record in caplog.records)] == [], "secrets in log lines"
    assert "Full configuration" not in card and str(tmp_path) not in card, "a pushed card holds no configuration dump and no local path"
    assert "learning_rate" in card  # the summary stays
    recorded = (tmp_path / "run" / "step_1" / "config.yaml").read_text()
    assert "learning_rate: 0.0003" in recorded and recorded.count("<redacted>") >= 20, "config.yaml keeps the run's settings, secrets redacted"
