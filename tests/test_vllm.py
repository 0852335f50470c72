"""vLLM serves what hf_rl_ckpt writes: a checkpoint's `model/consolidated/` folder, the
`model/adapter/` folder of a LoRA run (with `LoRARequest`), and a `step-<N>` branch published
to a Hub produce the same greedy tokens in `vllm.LLM` as in transformers/peft.

Needs vLLM (skipped without it; excluded from the default run by the `vllm` marker):

    pytest -m vllm tests/test_vllm.py

Both checkpoints are written by `CheckpointManager.save` after a training step; the LoRA
run's base model is the consolidated folder of the first checkpoint, loaded with
`from_pretrained` as a user would (so its adapter_config.json names that folder). Compared in
float32 with `initializer_range=0.5`: a tiny model with the default init has top-1/top-2 logit
margins small enough that the two engines' different kernels may pick different argmaxes.
"""

from __future__ import annotations

import os

# vLLM reads these once, when its first engine starts in this process, so they are set at import.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default 4 is far more than needed
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: loads in seconds, not tens

import json  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_rl_ckpt import CheckpointConfig, CheckpointManager  # noqa: E402
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer  # noqa: E402

PROMPTS = ["The cat sat on", "What is 3 plus 4?"]
MAX_TOKENS = 8
LORA_RANK = 8


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    batch = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def transformers_greedy(model: torch.nn.Module, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) per prompt, never stopping at eos (vLLM runs with ignore_eos)."""
    model.eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                                       eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        outputs.append((ids[0].tolist(), generated[0, ids.shape[1]:].tolist()))
    return outputs


def engine(model: str, **kwargs) -> "vllm.LLM":
    """A small float32 vLLM engine (eager, 128-token context) for `model`, a folder or a Hub repo id."""
    return vllm.LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=128, max_num_seqs=4,
                    max_num_batched_tokens=128, **kwargs)


def vllm_greedy(llm, **kwargs) -> list[tuple[list[int], list[int]]]:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [(list(out.prompt_token_ids), list(out.outputs[0].token_ids)) for out in llm.generate(PROMPTS, params, use_tqdm=False, **kwargs)]


@pytest.fixture(scope="module", params=[("llama", "5GB"), ("qwen2", "300KB")], ids=["llama", "qwen2-sharded"])
def checkpoints(request, tmp_path_factory):
    """A full-model checkpoint and a LoRA checkpoint on top of it, with transformers' greedy tokens for each.

    The qwen2 run uses a small `max_shard_size`, so its consolidated folder is split into
    several safetensors files with an index, as a large model's is.
    """
    from peft import LoraConfig, get_peft_model

    arch, max_shard_size = request.param
    work = tmp_path_factory.mktemp(arch)
    tokenizer = build_tokenizer()

    model = build_model(arch, seed=0, initializer_range=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer)
    full = CheckpointManager(CheckpointConfig(checkpoint_dir=str(work / "full"), max_shard_size=max_shard_size))
    full.save(1, model=model, optimizer=optimizer, tokenizer=tokenizer)
    full.finalize()
    consolidated = full.consolidated_path(1)
    assert consolidated.name == "consolidated"
    assert (consolidated / "model.safetensors.index.json").is_file() == (max_shard_size != "5GB")

    # The reference is what transformers loads from the folder, tokenizer included: for a qwen2 config,
    # AutoTokenizer picks Qwen2Tokenizer, which splits digits unlike the tokenizer object that was saved (so does vLLM).
    served_tokenizer = AutoTokenizer.from_pretrained(consolidated)
    base = AutoModelForCausalLM.from_pretrained(consolidated)  # the LoRA run starts from the checkpoint, as a user's would
    base_reference = transformers_greedy(base, served_tokenizer)
    peft_model = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # peft initialises lora_B to zero; random values make the adapter change the output
        generator = torch.Generator().manual_seed(1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    lora = CheckpointManager(CheckpointConfig(checkpoint_dir=str(work / "lora")))
    lora.save(1, model=peft_model, tokenizer=tokenizer)
    lora.finalize()
    adapter = lora.consolidated_path(1)
    assert adapter.name == "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(consolidated)
    lora_reference = transformers_greedy(peft_model, served_tokenizer)
    assert [out for _, out in lora_reference] != [out for _, out in base_reference], "the adapter must change the greedy tokens"
    return SimpleNamespace(consolidated=consolidated, adapter=adapter, base_reference=base_reference, lora_reference=lora_reference)


def test_vllm_serves_consolidated_and_lora_checkpoints_like_transformers(checkpoints) -> None:
    from vllm.lora.request import LoRARequest

    llm = engine(str(checkpoints.consolidated), enable_lora=True, max_lora_rank=LORA_RANK, max_loras=1)
    try:
        assert vllm_greedy(llm) == checkpoints.base_reference
        adapter = LoRARequest("checkpoint-adapter", 1, str(checkpoints.adapter))
        assert vllm_greedy(llm, lora_request=adapter) == checkpoints.lora_reference
    finally:
        del llm


def test_vllm_serves_a_published_step_branch(tmp_path) -> None:
    """`vllm serve REPO --revision step-N` (here `vllm.LLM(REPO, revision=...)`) on a branch the manager pushed."""
    from hf_rl_ckpt.testing.hub_server import HubServer, hub_env

    repo, token = "test-user/vllm-run", "hf_local_token"
    model = build_model("llama", seed=0, initializer_range=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with HubServer(tmp_path / "hub", tokens={token}) as server, hub_env(server, token=token, hf_home=tmp_path / "hf_home"):
        config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), metric_name="reward", keep_top_k=1, push_to_hub=True, hub_model_id=repo)
        manager = CheckpointManager(config)
        for step, reward in [(1, 0.9), (2, 0.1)]:  # top-1 by reward is step 1: it alone gets a branch (and main)
            train_step(model, optimizer)
            manager.save(step, model=model, optimizer=optimizer, metrics={"reward": reward}, tokenizer=build_tokenizer())
        manager.finalize()  # waits for the background pushes

        published = AutoModelForCausalLM.from_pretrained(repo, revision="step-1")
        local = AutoModelForCausalLM.from_pretrained(manager.consolidated_path(1))
        assert all(torch.equal(a, b) for a, b in zip(published.state_dict().values(), local.state_dict().values()))
        reference = transformers_greedy(published, AutoTokenizer.from_pretrained(repo, revision="step-1"))
        llm = engine(repo, revision="step-1")
        try:
            assert vllm_greedy(llm) == reference
        finally:
            del llm


def test_live_vllm_engine_reloads_each_published_weight_version(tmp_path) -> None:
    """The synchronous RL loop: train a step, `sync_weights`, `reload_vllm` on the live engine, generate again.

    After each reload the engine's greedy tokens are transformers' with the trainer's weights of that step, and
    the version it reports is that step. The engine is never restarted; it starts from version 0.
    """
    from hf_rl_ckpt.weight_sync import reload_vllm

    model = build_model("llama", seed=0, initializer_range=0.5)
    tokenizer = build_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    link = tmp_path / "serve" / "policy"
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(link)))
    llm = engine(str(manager.sync_weights(0, model=model, tokenizer=tokenizer)))
    served_tokenizer = AutoTokenizer.from_pretrained(link)
    try:
        outputs = [vllm_greedy(llm)]
        assert outputs[0] == transformers_greedy(model, served_tokenizer)
        for step in (1, 2, 3):
            model.train()
            train_step(model, optimizer)
            manager.sync_weights(step, model=model, tokenizer=tokenizer)
            started = time.perf_counter()
            version = reload_vllm(llm, link)
            print(f"step {step}: engine reloaded {version.folder.name} in {1000 * (time.perf_counter() - started):.0f} ms")  # for the record (-s)
            assert (version.step, version.policy_version, version.dtype) == (step, step, "float32")
            outputs.append(vllm_greedy(llm))
            assert outputs[-1] == transformers_greedy(model, served_tokenizer), f"step {step}"
        assert len({str(out) for out in outputs}) > 1, "training must change the greedy tokens, or reloading proves nothing"
    finally:
        del llm
        manager.finalize()


def test_vllm_serves_an_moe_checkpoint_like_transformers(tmp_path) -> None:
    """A Qwen3-MoE checkpoint's folder holds one tensor per expert, as `save_pretrained` writes it; vLLM loads it and
    generates transformers' greedy tokens."""
    from hf_rl_ckpt.testing.families import build_family

    model = build_family("qwen3_moe", seed=0)
    with torch.no_grad():  # wide margins between the top logits (see the module docstring); the router too
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), max_shard_size="300KB"))
    manager.save(1, model=model, optimizer=optimizer, tokenizer=build_tokenizer())
    manager.finalize()
    folder = manager.consolidated_path(1)
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names and not any(name.endswith("experts.gate_up_proj") for name in names)
    reference = transformers_greedy(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    llm = engine(str(folder))
    try:
        assert vllm_greedy(llm) == reference
    finally:
        del llm
