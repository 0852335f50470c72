"""Helpers shared by the multi-process test scripts in this folder and the pytest files that launch them.

Imported both by scripts run under `torchrun` (this folder is on their sys.path) and by
tests/test_distributed.py / tests/test_accelerate.py (which put this folder on sys.path).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from hf_rl_ckpt.state.sharded import hf_state_dict

REPO = Path(__file__).resolve().parents[2]
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".pickle")


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor, unsharded (a collective for a sharded model), keyed `model.*` / `optim.*`."""
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    out = {}
    for prefix, state in (("model.", hf_state_dict(model)), ("optim.", optim)):
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone().contiguous()
    return out


def assert_state_equal(actual: dict[str, torch.Tensor], reference: str | os.PathLike, what: str) -> None:
    """Bit-exact comparison with a reference written by `safetensors.torch.save_file(full_state(...))`."""
    expected = load_file(os.fspath(reference))
    assert sorted(actual) == sorted(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))[:6]}"
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"{what}: {len(different)} tensor(s) differ, e.g. {different[:4]}"


def _is_pickle(path: Path) -> bool:
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":  # torch.save's zip container
        return True
    if path.suffix == ".safetensors":  # DCP's writer pickles non-tensor values into files named .safetensors
        try:
            with safe_open(os.fspath(path), framework="pt"):
                return False
        except Exception:
            return True
    return data[:1] == b"\x80" and data[-1:] == b"."  # pickle protocol >= 2: PROTO opcode ... STOP opcode


def pickle_files(root: str | os.PathLike) -> list[str]:
    """Files under `root` that are pickles (by content) or named like one (.bin, .pkl, .pt, ...)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if name.endswith(PICKLE_SUFFIXES) or _is_pickle(path):
                found.append(str(path.relative_to(root)))
    return found


#: DeepSpeed JIT-compiles its CPU shared-memory op (`deepspeed_shm_comm`) at the first `init_distributed` (20-60 s on
#: 2 cores). torch's default build folder is one per Python version, so the newest- and oldest-releases environments
#: (another torch include path each) rebuilt it in turn on every CI half; a folder per environment keeps each build.
TORCH_EXTENSIONS_DIR = Path.home() / ".cache" / "hf_rl_ckpt-tests" / "torch_extensions" / hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str | os.PathLike, nproc: int, *args: str, timeout: float = 240) -> str:
    """Run `script` under `torchrun --nproc_per_node nproc` on a free port; return its output, fail with its tail."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), os.fspath(script), *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # A session of its own: on a timeout the whole job (torchrun and every rank) is killed, not left hanging.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"torchrun {Path(script).name} {' '.join(args)} did not finish within {timeout:g}s (a hang):\n{output[-6000:]}") from None
    assert process.returncode == 0, f"torchrun {Path(script).name} {' '.join(args)} exited with {process.returncode}:\n{output[-6000:]}"
    return output
