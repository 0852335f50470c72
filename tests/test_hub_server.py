"""The local Hub server, exercised through the REAL huggingface_hub client (no mocks of the client)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    RepoFile,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_rl_ckpt.testing.hub_server import HubServer, hub_env

# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not something under test here.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

REPO = "alice/ckpt"
WEIGHTS_SIZE = 2 * 1024 * 1024


def _weights(seed: int) -> bytes:
    return random.Random(seed).randbytes(WEIGHTS_SIZE)


def _checkpoint_dir(root: Path, seed: int) -> Path:
    """A tiny checkpoint folder: a small JSON config (regular file) and ~2 MB of weights (LFS file)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(f'{{"model_type": "tiny", "seed": {seed}}}')
    (root / "model.safetensors").write_bytes(_weights(seed))
    return root


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub") as srv, hub_env(srv, hf_home=tmp_path / "hf_home"):
        yield srv


@pytest.fixture
def api(server: HubServer) -> HfApi:
    return HfApi()


@pytest.fixture
def uploaded(api: HfApi, tmp_path: Path) -> Path:
    """REPO created and populated on main with the seed-0 checkpoint; returns the local folder."""
    api.create_repo(REPO)
    folder = _checkpoint_dir(tmp_path / "ckpt0", seed=0)
    api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="step 0")
    return folder


def test_upload_folder_stores_weights_as_lfs_and_config_as_regular(
    server: HubServer, api: HfApi, uploaded: Path
) -> None:
    entries = {e.path: e for e in api.list_repo_tree(REPO, recursive=True) if isinstance(e, RepoFile)}
    assert set(entries) == {".gitattributes", "config.json", "model.safetensors"}
    assert entries["config.json"].lfs is None
    weights = entries["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == _sha256(_weights(0))
    assert weights.size == WEIGHTS_SIZE and weights.lfs.size == WEIGHTS_SIZE
    assert _sha256(_weights(0)) in server.uploaded_objects
    assert any(r.method == "PUT" and r.path.endswith(_sha256(_weights(0))) for r in server.requests)

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == api.list_repo_refs(REPO).branches[0].target_commit
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert siblings["model.safetensors"].lfs is not None and siblings["config.json"].lfs is None
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "config.json", "model.safetensors"]
    assert [c.title for c in api.list_repo_commits(REPO)] == ["step 0", "initial commit"]


def test_branch_commit_snapshot_and_delete(api: HfApi, uploaded: Path, tmp_path: Path) -> None:
    api.create_branch(REPO, branch="step-10", revision="main")
    step10 = _checkpoint_dir(tmp_path / "ckpt10", seed=10)
    api.upload_folder(repo_id=REPO, folder_path=step10, revision="step-10", commit_message="step 10")

    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert set(refs) == {"main", "step-10"} and refs["main"] != refs["step-10"]

    snapshot = Path(snapshot_download(REPO, revision="step-10"))
    assert snapshot.name == refs["step-10"]
    assert (snapshot / "model.safetensors").read_bytes() == _weights(10)
    assert (snapshot / "config.json").read_text() == (step10 / "config.json").read_text()

    main_weights = hf_hub_download(REPO, "model.safetensors")
    assert Path(main_weights).read_bytes() == _weights(0)
    by_commit = hf_hub_download(REPO, "config.json", revision=refs["step-10"], force_download=True)
    assert Path(by_commit).read_text() == (step10 / "config.json").read_text()

    api.delete_branch(REPO, branch="step-10")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="step-10", force_download=True)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="step-10")


def test_identical_upload_sends_no_new_objects(server: HubServer, api: HfApi, uploaded: Path) -> None:
    received_before = server.uploaded_objects
    requests_before = len(server.requests)

    api.upload_folder(repo_id=REPO, folder_path=uploaded, commit_message="same again")
    # Same weights under another name: the LFS batch API knows the object, so no bytes move either.
    api.upload_file(path_or_fileobj=uploaded / "model.safetensors", path_in_repo="copy.safetensors", repo_id=REPO)

    assert server.uploaded_objects == received_before
    assert not [r for r in server.requests[requests_before:] if r.method == "PUT"]
    assert "copy.safetensors" in api.list_repo_files(REPO)


def test_commit_operations_delete_and_parent_commit(api: HfApi, uploaded: Path) -> None:
    head = api.model_info(REPO).sha
    info = api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("sub/dir/notes.txt", b"hello"),
            CommitOperationDelete("config.json"),
        ],
        commit_message="edit",
        parent_commit=head,
    )
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "model.safetensors", "sub/dir/notes.txt"]
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/dir"]

    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, parent_commit=head)
    assert stale.value.response.status_code == 412

    api.delete_folder("sub", repo_id=REPO, parent_commit=info.oid)
    assert "sub/dir/notes.txt" not in api.list_repo_files(REPO)


def test_model_card_round_trip(api: HfApi) -> None:
    api.create_repo(REPO)
    ModelCard("---\nlicense: mit\ntags:\n- rl\n---\n\n# Tiny RL checkpoint\n").push_to_hub(REPO)

    card = ModelCard.load(REPO)
    assert card.data.license == "mit" and card.data.tags == ["rl"]
    assert "# Tiny RL checkpoint" in card.text


def test_injected_commit_failures_are_survived_by_retrying(server: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    server.fail_next(2, status=500, path_contains="/commit/")

    attempts = 0
    while True:
        attempts += 1
        try:
            api.upload_file(path_or_fileobj=b'{"ok": true}', path_in_repo="config.json", repo_id=REPO)
            break
        except HfHubHTTPError as err:
            assert err.response.status_code == 500 and attempts < 5

    assert attempts == 3
    commit_statuses = [r.status for r in server.requests if "/commit/" in r.path]
    assert commit_statuses == [500, 500, 200]
    assert hf_hub_download(REPO, "config.json") and "config.json" in api.list_repo_files(REPO)


def test_client_retries_transient_preupload_errors_by_itself(server: HubServer, api: HfApi) -> None:
    # Unlike /commit, /preupload (and the LFS batch and PUT calls) go through the client's http_backoff.
    api.create_repo(REPO)
    server.fail_next(1, status=503, path_contains="/preupload/")

    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO)

    assert [r.status for r in server.requests if "/preupload/" in r.path] == [503, 200]


def test_typed_errors(api: HfApi, uploaded: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("alice/missing")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO

    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(REPO)


def test_private_repo_is_hidden_from_anonymous_callers(tmp_path: Path) -> None:
    with HubServer(tmp_path / "hub") as srv, hub_env(srv, token="any-token", hf_home=tmp_path / "home"):
        api = HfApi()
        api.create_repo(REPO, private=True)
        api.upload_file(path_or_fileobj=b"secret", path_in_repo="notes.txt", repo_id=REPO)
        assert api.model_info(REPO).private is True

        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=False).model_info(REPO)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(REPO, "notes.txt", token=False)
        assert Path(hf_hub_download(REPO, "notes.txt")).read_bytes() == b"secret"


def test_tokens_are_enforced(tmp_path: Path) -> None:
    with (
        HubServer(tmp_path / "hub", tokens={"good-token"}) as srv,
        hub_env(srv, token="good-token", hf_home=tmp_path / "home"),
    ):
        api = HfApi()
        api.create_repo(REPO)
        api.upload_file(path_or_fileobj=_weights(1), path_in_repo="model.safetensors", repo_id=REPO)
        assert api.whoami()["name"] == srv.username

        with pytest.raises(HfHubHTTPError) as wrong:
            HfApi(token="wrong-token").model_info(REPO)
        assert wrong.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as download:
            hf_hub_download(REPO, "model.safetensors", token="wrong-token")
        assert download.value.response.status_code == 401

        srv.set_auth_failure(True)
        with pytest.raises(HfHubHTTPError) as revoked:
            api.model_info(REPO)
        assert revoked.value.response.status_code == 401
        srv.set_auth_failure(False)
        assert Path(hf_hub_download(REPO, "model.safetensors")).read_bytes() == _weights(1)


def test_hub_env_patches_client_and_restores_it(tmp_path: Path) -> None:
    endpoint_before = hf_constants.ENDPOINT
    module_api_endpoint_before = huggingface_hub.hf_api.api.endpoint
    env_before = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_DISABLE_XET", "HF_TOKEN")}

    with HubServer(tmp_path / "hub") as srv:
        with hub_env(srv) as home:
            assert hf_constants.ENDPOINT == srv.url == os.environ["HF_ENDPOINT"]
            assert huggingface_hub.hf_api.api.endpoint == srv.url
            assert str(home / "hub") == hf_constants.HF_HUB_CACHE
            assert hf_constants.HF_HUB_DISABLE_XET and not hf_constants.HF_HUB_OFFLINE
            assert "HF_TOKEN" not in os.environ
            huggingface_hub.create_repo(REPO)  # module-level function, bound to the patched default HfApi
            assert HfApi().repo_exists(REPO)
        assert not home.exists()  # the temporary HF_HOME is removed

    assert endpoint_before == hf_constants.ENDPOINT
    assert huggingface_hub.hf_api.api.endpoint == module_api_endpoint_before
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_repos_persist_across_restarts(tmp_path: Path) -> None:
    with HubServer(tmp_path / "hub") as first, hub_env(first, hf_home=tmp_path / "home1"):
        HfApi().create_repo(REPO)
        HfApi().upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=REPO)
    with HubServer(tmp_path / "hub") as second, hub_env(second, hf_home=tmp_path / "home2"):
        assert Path(hf_hub_download(REPO, "a.txt")).read_bytes() == b"v1"


def test_command_line_server(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_rl_ckpt.testing.hub_server", "--root", str(tmp_path / "cli"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[3]
        assert url.startswith("http://127.0.0.1:")
        created = HfApi(endpoint=url, token=False).create_repo(REPO)
        assert created.repo_id == REPO and (tmp_path / "cli" / "repos" / "model" / "alice" / "ckpt").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
