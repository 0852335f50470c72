"""A process killed between a commit and its Hub push: the next start still publishes it (real Hub client, local server)."""

from __future__ import annotations

import signal

import pytest
from faultlib import alive, check_after_fault, reported, wait_for
from huggingface_hub import HfApi

from hf_rl_ckpt.testing.hub_server import HubServer, hub_env


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")  # huggingface_hub's own LFS upload
def test_kill_before_the_hub_queue_update_still_publishes(tmp_path, zygote):
    """Killed after a commit but before its Hub push was queued: the next start queues and pushes it."""
    token, repo = "hf_fault_token_0123456789", "alice/fault-run"
    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    with HubServer(tmp_path / "hub", tokens={token}) as server, hub_env(server, token=token, hf_home=tmp_path / "hf_home"):
        hub = {
            "push_to_hub": True, "hub_model_id": repo, "hub_endpoint": server.url, "hub_token": token,
            "hub_retry": {"attempts": 5, "initial_delay": 0.01, "max_delay": 0.05},
        }
        pid = zygote.run(ckpt, ready, fault="commit.before_hub_enqueue@2", config=hub)
        wait_for(lambda: not alive(pid), timeout=60, what="the child to reach commit.before_hub_enqueue")
        assert zygote.wait(pid) == {"signal": signal.SIGKILL}
        assert check_after_fault(ckpt, set(reported(ready)), config=hub) == 2  # its finalize() drains the queued pushes
        branches = {ref.name for ref in HfApi(endpoint=server.url, token=token).list_repo_refs(repo).branches}
    assert {"step-1", "step-2"} <= branches
