"""Every model family's deployable folder is what `save_pretrained` writes, and every family resumes exactly.

The families (`hf_rl_ckpt.testing.families`) are those where a folder that is merely
loadable by transformers 5 differs from the one `save_pretrained` writes: MoE models run
their experts fused but are saved one tensor per expert, VLMs are saved under their original
checkpoints' names, custom code travels with the folder, T5 and Qwen2 tie embeddings. The
reference is `save_pretrained` of the same model in the same state, compared file by file and
byte by byte (a small `max_shard_size` splits every folder, so the index is compared too), for
each path that hands a folder to an engine: the checkpoint, `sync_weights`, `export`,
`export --merge-lora` and a Hub branch.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.export import export_checkpoint
from hf_rl_ckpt.testing.families import FAMILIES, build_family, family_inputs
from hf_rl_ckpt.testing.tiny import build_tokenizer

#: Bytes per weights file: every family's folder is split into several files and an index.
SHARD = 100_000


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def preprocessor(family: str, tokenizer):
    """What the run saves beside the weights: Llava's processor (image processor, tokenizer, chat template), else the tokenizer."""
    if family != "llava":
        return tokenizer
    import transformers

    from hf_rl_ckpt.testing.tiny import CHAT_TEMPLATE

    with warnings.catch_warnings():  # without torchvision transformers picks the PIL image processor, and says so
        warnings.simplefilter("ignore")
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, patch_size=16, image_token="<unk>")


def batches(family: str, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, 500, (2, 8), generator=generator) for _ in range(count)]
    return [{"input_ids": batch, "labels": batch} for batch in ids]  # T5 builds its decoder inputs from the labels


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[dict[str, torch.Tensor]]) -> list[float]:
    model.train()
    losses = []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def optimizer_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    """AdamW over what text batches train: a VLM's vision tower and projector, which they never reach, are frozen (as in text-only fine-tuning)."""
    model(**batch).loss.backward()
    for param in model.parameters():
        param.requires_grad_(param.grad is not None)
        param.grad = None
    return torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)


def save_pretrained_folder(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size=SHARD)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_folder(ours: Path, reference: Path, *, besides: tuple[str, ...] = ()) -> None:
    """`ours` holds exactly the files of the `save_pretrained` folder `reference`, byte for byte (and the files named in `besides`)."""
    names = sorted(path.name for path in ours.iterdir() if path.name not in besides)
    assert names == sorted(path.name for path in reference.iterdir())
    assert [name for name in names if (ours / name).read_bytes() != (reference / name).read_bytes()] == [], "files that differ from save_pretrained's"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_deployable_folder_is_save_pretrained_and_the_run_resumes_exactly(tmp_path, family, tokenizer) -> None:
    tokenizer = preprocessor(family, tokenizer)
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), max_shard_size=SHARD, sync_weight_path=str(tmp_path / "policy"))
    model = build_family(family, seed=0)
    data = batches(family, 4)
    optimizer = optimizer_of(model, data[0])
    train(model, optimizer, data[:2])
    manager = CheckpointManager(config)
    checkpoint = manager.save(2, model=model, optimizer=optimizer, tokenizer=tokenizer)
    published = manager.sync_weights(2, model=model, tokenizer=tokenizer)
    manager.finalize()
    reference = save_pretrained_folder(model, tokenizer, tmp_path / "save_pretrained")
    assert_same_folder(manager.consolidated_path(2), reference)
    assert_same_folder(published, reference, besides=("weight_sync.json",))
    assert_same_folder(export_checkpoint(checkpoint, tmp_path / "export"), reference)

    expected_losses = train(model, optimizer, data[2:])
    resumed = build_family(family, seed=1)  # other weights: whatever matches was loaded
    resumed_optimizer = optimizer_of(resumed, data[0])
    assert CheckpointManager(config).resume(model=resumed, optimizer=resumed_optimizer).step == 2
    assert train(resumed, resumed_optimizer, data[2:]) == expected_losses
    expected = model.state_dict()
    assert [name for name, tensor in resumed.state_dict().items() if not torch.equal(tensor, expected[name])] == []


#: Run in a fresh interpreter, elsewhere, with an empty modules cache: each folder loads as a user would load it,
#: its custom code from the folder itself, and gives the logits the trained model gave.
_LOAD_IN_A_CLEAN_PROCESS = """
import json, sys, torch, transformers
from safetensors.torch import load_file
torch.set_num_threads(1)  # as the logits to match were computed: bitwise-reproducible CPU math
results = {}
for family, folder in json.loads(sys.argv[1]).items():
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if getattr(config, "auto_map", None):
        loader, options = transformers.AutoModelForCausalLM, {"trust_remote_code": True}
    else:
        loader, options = getattr(transformers, config.architectures[0]), {}
    model, info = loader.from_pretrained(folder, output_loading_info=True, **options)
    expected = load_file(folder + ".expected.safetensors")
    inputs = {name: tensor for name, tensor in expected.items() if name != "logits"}
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    results[family] = {"class": type(model).__name__, "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
                       "logits_equal": torch.equal(logits, expected["logits"])}
print(json.dumps(results))
"""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """CPU math on one thread, so another process reproduces it bit for bit (an MoE's expert sums change order with the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_every_family_loads_from_its_checkpoint_in_a_clean_process(tmp_path, tokenizer) -> None:
    folders, classes = {}, {}
    for family in FAMILIES:
        model = build_family(family, seed=0).eval()
        manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / family), max_shard_size=SHARD))
        manager.save(0, model=model, tokenizer=tokenizer)
        manager.finalize()
        folders[family], classes[family] = str(manager.consolidated_path(0)), type(model).__name__
        inputs = family_inputs(family)
        with torch.no_grad(), one_thread():
            tensors = {**inputs, "logits": model(**inputs).logits}
            save_file({name: tensor.clone() for name, tensor in tensors.items()}, folders[family] + ".expected.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules_cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_CLEAN_PROCESS, json.dumps(folders)], cwd=elsewhere, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {family: {"class": classes[family], "loading_info": {}, "logits_equal": True} for family in FAMILIES}
    assert any((tmp_path / "modules_cache").rglob("modeling_tiny.py")), "the custom code was loaded from the folder"


def test_an_moe_adapter_is_peft_save_pretrained_and_its_merge_export_is_merge_and_unload_save_pretrained(tmp_path, tokenizer) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_pretrained_folder(build_family("qwen3_moe", seed=0), tokenizer, tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    with torch.no_grad():  # peft starts lora_B at zero: a merge of that would equal the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(1))
    train(model, optimizer, batches("qwen3_moe", 1))
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), max_shard_size=SHARD))
    checkpoint = manager.save(1, model=model, tokenizer=tokenizer)
    manager.finalize()
    peft_reference = tmp_path / "peft_save_pretrained"
    model.save_pretrained(peft_reference)
    tokenizer.save_pretrained(peft_reference)
    (peft_reference / "README.md").unlink()  # PeftModel's card template; a checkpoint's card is its README.md at the root
    assert_same_folder(manager.consolidated_path(1), peft_reference)
    merged = export_checkpoint(checkpoint, tmp_path / "merged", merge_lora=True)
    assert_same_folder(merged, save_pretrained_folder(model.merge_and_unload(), tokenizer, tmp_path / "reference"))


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")  # huggingface_hub's own LFS PUT
def test_a_hub_branch_of_an_moe_checkpoint_is_its_save_pretrained_folder(tmp_path, tokenizer) -> None:
    from huggingface_hub import snapshot_download

    from hf_rl_ckpt.testing.hub_server import HubServer, hub_env

    token, repo = "hf_test_token_0123456789", "alice/tiny-moe"
    model = build_family("qwen3_moe", seed=0)
    with HubServer(tmp_path / "hub", tokens={token}) as server, hub_env(server, token=token, hf_home=tmp_path / "hf_home"):
        manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), max_shard_size=SHARD, push_to_hub=True, hub_model_id=repo))
        manager.save(1, model=model, tokenizer=tokenizer)
        manager.finalize()
        branch = Path(snapshot_download(repo, revision="step-1"))
        assert_same_folder(branch, save_pretrained_folder(model, tokenizer, tmp_path / "reference"), besides=("README.md", ".gitattributes"))


def test_weights_published_in_bfloat16_are_save_pretrained_of_the_model_cast_to_it(tmp_path, tokenizer) -> None:
    """`consolidated_dtype: bfloat16` (fp32 training, bf16 serving): the MoE folders as `save_pretrained` writes the cast model,
    experts split by their bf16 sizes."""
    model = build_family("qwen3_moe", seed=0)
    config = CheckpointConfig(
        checkpoint_dir=str(tmp_path / "ckpt"), max_shard_size=SHARD // 2, sync_weight_path=str(tmp_path / "policy"), consolidated_dtype="bfloat16",
    )
    manager = CheckpointManager(config)
    manager.save(1, model=model, tokenizer=tokenizer)
    published = manager.sync_weights(1, model=model, tokenizer=tokenizer)
    manager.finalize()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "reference", max_shard_size=SHARD // 2)
    tokenizer.save_pretrained(tmp_path / "reference")
    assert_same_folder(manager.consolidated_path(1), tmp_path / "reference")
    assert_same_folder(published, tmp_path / "reference", besides=("weight_sync.json",))


def test_a_model_whose_weight_conversion_does_not_invert_is_refused_before_anything_is_written(tmp_path, tokenizer) -> None:
    """Two runtime tensors that would be saved under one name could be served but never resumed: refused, naming the model."""
    from transformers.core_model_loading import WeightRenaming

    from hf_rl_ckpt import CheckpointError

    model = build_family("llama", seed=0)
    model._weight_conversions = [WeightRenaming("self_attn.k_proj", "self_attn.q_proj")]  # saving maps q_proj and k_proj to k_proj
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(tmp_path / "policy")))
    for write in (lambda: manager.save(1, model=model, tokenizer=tokenizer), lambda: manager.sync_weights(1, model=model, tokenizer=tokenizer)):
        with pytest.raises(CheckpointError, match=r"LlamaForCausalLM's weights cannot be written as save_pretrained writes them.*does not invert.*Nothing was written"):
            write()
    manager.finalize()
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir() if not path.name.startswith(".")) == []
    assert not any((tmp_path / "ckpt" / ".incomplete").glob("*")) and not (tmp_path / "policy").exists()
