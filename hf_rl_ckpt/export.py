"""`hf-rl-ckpt export`: a checkpoint's weights as a plain model folder, for whatever serves them.

Without merging, the deployable folder is copied as it is: `model/consolidated/`, or
`model/adapter/` for a PEFT run (serve it with its base, e.g. vLLM `--lora-modules`). With
`merge_lora`, the adapter is merged into its base model and written as consolidated HF
weights, for engines that cannot apply LoRA. What the export reads is verified first (a
damaged model is never exported; the training state, which an export does not read, is not
checked) and the output appears whole or not at all: it is written beside `out` and renamed
into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import tqdm

from .atomic import atomic_directory
from .config import parse_size
from .errors import CheckpointError
from .layout import ADAPTER_DIR, CONFIG_YAML, CONSOLIDATED_DIR, safe_join
from .records import Contents
from .state.model import save_consolidated
from .state.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_merged_model
from .verify import verify_checkpoint

#: The folders an export may read (a checkpoint holds one of them); a merge also reads config.yaml (cache dir, shard size).
_MODEL_FOLDERS = (ADAPTER_DIR, CONSOLIDATED_DIR)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, merge_lora: bool = False, base: str | None = None) -> Path:
    """Write the model of `checkpoint` to the new folder `out` and return it.

    Args:
        checkpoint: a committed checkpoint directory, e.g. `runs/ckpt/step_40`.
        out: the folder to create; it must not exist yet.
        merge_lora: merge a PEFT checkpoint's adapter into its base model.
        base: the base model to merge into (local folder or cached Hub id); defaults to the
            adapter's `base_model_name_or_path`, looked up in the run's `model_cache_dir`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists():
        raise CheckpointError(f"export target {out} already exists; choose a new folder or remove it first")
    info = verify_checkpoint(checkpoint, only=_MODEL_FOLDERS + ((CONFIG_YAML,) if merge_lora else ()))
    with atomic_directory(out) as staging:
        if merge_lora:
            _write_merged(checkpoint, staging, base)
        else:
            folder = _model_folder(checkpoint)
            prefix = folder.relative_to(checkpoint).as_posix() + "/"
            _copy_with_progress(checkpoint, [rel for rel in info["manifest"] if rel.startswith(prefix)], prefix, staging)
    return out


def _copy_with_progress(checkpoint: Path, files: list[str], prefix: str, target: Path) -> None:
    """Copy exactly the manifest's `files` (under the folder `prefix`) into `target`, with a progress bar in bytes: a large model's
    weights take minutes to copy. Nothing else in the folder is read, and no link is followed (verification refused any).

    The bar is huggingface_hub's (a widget in notebooks; `HF_HUB_DISABLE_PROGRESS_BARS=1` turns it off).
    """
    sources = {rel: safe_join(checkpoint, rel) for rel in files}
    with tqdm(total=sum(path.stat().st_size for path in sources.values()), unit="B", unit_scale=True, desc=f"Exporting {checkpoint / prefix}", name="hf_rl_ckpt") as bar:
        for rel, source in sources.items():
            destination = target / rel.removeprefix(prefix)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination, follow_symlinks=False)
            bar.update(source.stat().st_size)


def _model_folder(checkpoint: Path) -> Path:
    if (folder := Contents.of(checkpoint).deployable_dir) is not None:
        return checkpoint / folder
    raise CheckpointError(f"{checkpoint} holds no model folder ({CONSOLIDATED_DIR}/ or {ADAPTER_DIR}/); it was saved without weights")


def _write_merged(checkpoint: Path, out: Path, base: str | None) -> None:
    adapter = checkpoint / ADAPTER_DIR
    if Contents.of(checkpoint).deployable_dir != ADAPTER_DIR:
        raise CheckpointError(
            f"{checkpoint} holds no adapter ({ADAPTER_DIR}/), so there is no LoRA to merge; "
            f"export it without --merge-lora to copy its {CONSOLIDATED_DIR}/ folder"
        )
    settings = _checkpoint_settings(checkpoint)
    model = load_merged_model(adapter, base=base, cache_dir=settings.get("model_cache_dir"))
    save_consolidated(model, out, max_shard_size=parse_size(settings.get("max_shard_size") or "5GB"))
    # The tokenizer files as the run saved them (loading and saving a tokenizer again adds loader settings to its config).
    for path in sorted(adapter.iterdir()):
        if path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and path.is_file() and not path.is_symlink():
            shutil.copy2(path, out / path.name)


def _checkpoint_settings(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint config the run used (from the checkpoint's config.yaml), for its cache dir and shard size."""
    document = yaml.safe_load((checkpoint / CONFIG_YAML).read_text()) if (checkpoint / CONFIG_YAML).is_file() else None
    return (document or {}).get("checkpoint") or {}
