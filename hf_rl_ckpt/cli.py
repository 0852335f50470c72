"""`hf-rl-ckpt`: inspect and check checkpoints from the shell.

Commands (each has `--help`):
    list DIR [--json] [--verify]     the committed checkpoints of a run, with metrics and top-k rank
    inspect CKPT [--json]            one checkpoint: files, sizes, dtypes, parameter count, metrics, Hub status
    verify CKPT|BUNDLE               re-hash every file against the manifest (or the bundle's file list)

DIR and CKPT may be remote URLs (`s3://bucket/run`, `s3://bucket/run/step_40`: a `remote_dir` and one of its
checkpoints); `inspect` and `verify` read a downloaded copy.
    export CKPT OUT [--merge-lora]   the model folder; OUT ending in .tar (plain) or .tar.gz/.tgz (gzip) writes a single-file bundle
    convert SRC OUT                  an HF Trainer / Accelerate / NeMo-RL checkpoint folder into our layout
    push CKPT --repo-id ID           publish to the Hugging Face Hub
    plot DIR                         the ranking metric vs step

Exit codes: 0 success; 1 a check failed (`verify` found a bad file, `list` or `inspect` a
corrupt checkpoint, `export` or `push` a damaged model, a push failed); 2 bad usage or bad
input: not a checkpoint, a refused pickle, an existing output, an invalid repo id (argparse
also exits 2 on usage errors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .config import check_repo_id
from .errors import CheckpointError, CorruptCheckpointError, RemoteStorageError
from .layout import TRAINING_INFO, CheckpointLayout
from .records import Contents
from .registry import Registry
from .remote import is_remote_url, local_copy, RemoteStore
from .state.safetensors_io import check_safetensors_header
from .verify import read_training_info, verify_checkpoint

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 a check failed (a corrupt file, a failed push); "
    "2 bad usage or bad input (not a checkpoint, a refused pickle, an existing output)."
)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _format_metrics(metrics: dict[str, Any], first: str | None = None, limit: int | None = None) -> str:
    """`k=v` pairs, the ranking metric `first`; with `limit`, at most that many (Trainer runs log dozens)."""
    names = sorted(metrics, key=lambda name: (name != first, name))
    shown = [f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in names[:limit]]
    if limit is not None and len(names) > limit:
        shown.append(f"+{len(names) - limit} more")
    return ", ".join(shown) or "-"


def list_rows(directory: Path, checksums: bool = False) -> list[dict[str, Any]]:
    """One row per committed checkpoint: the registry's record plus a verification status."""
    layout = CheckpointLayout.of_run(directory)
    records = {record.step: record.to_json() for record in Registry(layout).records()}
    rows = []
    for step, path in layout.committed_steps().items():
        row = dict(records.get(step) or {"step": step, "name": path.name, "metrics": {}})
        try:
            info = verify_checkpoint(path, checksums=checksums)
            row["status"] = "verified" if checksums else "complete"
            row["size_bytes"] = sum(entry["size"] for entry in info["manifest"].values())
        except CheckpointError as err:
            row["status"] = f"CORRUPT: {err}"
        rows.append(row)
    return rows


def remote_rows(url: str, checksums: bool = False) -> list[dict[str, Any]]:
    """`list_rows` of a `remote_dir`: one row per committed remote checkpoint (its files checked by the listing, or re-hashed after a download)."""
    store = RemoteStore(url)
    rows = []
    for checkpoint in store.committed():
        info = checkpoint.info
        row = {"step": checkpoint.step, "name": checkpoint.name, "metrics": info.get("metrics") or {},
               "size_bytes": sum(entry["size"] for entry in info["manifest"].values())}
        try:
            if checksums:
                with local_copy(f"{url.rstrip('/')}/{checkpoint.name}") as path:
                    verify_checkpoint(path, checksums=True)
                row["status"] = "verified"
            else:
                problems = store.problems(checkpoint.name, info)
                row["status"] = f"CORRUPT: {'; '.join(problems)}" if problems else "complete"
        except (CheckpointError, FileNotFoundError) as err:
            row["status"] = f"CORRUPT: {err}"
        rows.append(row)
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    directory = args.dir if is_remote_url(args.dir) else Path(args.dir)
    if isinstance(directory, Path) and not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = remote_rows(directory, checksums=args.verify) if isinstance(directory, str) else list_rows(directory, checksums=args.verify)
    # Like `verify` and `inspect`: a check that found a damaged checkpoint fails the command, whatever the output format.
    exit_code = EXIT_CHECK_FAILED if any(row["status"].startswith("CORRUPT") for row in rows) else EXIT_OK
    if args.json:
        print(json.dumps(rows, indent=2))
        return exit_code
    if not rows:
        print(f"no committed checkpoints in {directory}")
        return EXIT_OK
    metric_name = None if isinstance(directory, str) else Registry(CheckpointLayout.of_run(directory)).read().get("metric_name")
    table = [("step", "metrics", "top-k", "size", "status")]
    for row in rows:
        rank = row.get("top_k_rank")
        table.append((str(row["step"]), _format_metrics(row.get("metrics") or {}, metric_name, limit=3), str(rank) if rank else "-",
                      _human_size(row.get("size_bytes", 0)), row["status"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for index, line in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    return exit_code


@contextlib.contextmanager
def _checkpoint_argument(arg: str) -> Iterator[Path]:
    """The folder a CKPT argument names: itself, or for a URL (`s3://bucket/run/step_40`) a downloaded copy."""
    if not is_remote_url(arg):
        yield Path(arg)
        return
    with local_copy(arg) as path:
        yield path


def _on_remote(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `command` on a local copy when its CKPT is a remote URL; a URL that is not a committed remote checkpoint is bad input."""
    def run(args: argparse.Namespace) -> int:
        if not is_remote_url(args.ckpt):
            return command(args)
        try:
            with _checkpoint_argument(args.ckpt) as path:
                return command(argparse.Namespace(**{**vars(args), "ckpt": str(path), "shown_as": args.ckpt}))
        except RemoteStorageError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except FileNotFoundError as err:  # listed in the manifest, missing remotely
            print(f"FAILED {args.ckpt}: {err}", file=sys.stderr)
            return EXIT_CHECK_FAILED

    return run


@_on_remote
def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import verify_bundle

    path = Path(args.ckpt)
    if path.is_file():  # a checkpoint is a folder, so a file is a bundle, whatever it is named now
        try:
            description = verify_bundle(path)
        except CorruptCheckpointError as err:
            print(f"FAILED {err.path}: {err.reason}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        print(f"OK {path}: {len(description['files'])} files match the bundle's file list (size and sha256)")
        return EXIT_OK
    if not (path / TRAINING_INFO).is_file():
        print(f"error: {path} is not a committed checkpoint (no {TRAINING_INFO})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        info = verify_checkpoint(path, checksums=True)
    except CorruptCheckpointError as err:
        print(f"FAILED {err.path}: {err.reason}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"OK {getattr(args, 'shown_as', path)}: {len(info['manifest'])} files match the manifest (size and digest)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import export_bundle, is_bundle_path, is_compressed_bundle_path  # imports transformers/peft: only for this command
    from .export import export_checkpoint

    if args.no_compress and (not is_bundle_path(args.out) or is_compressed_bundle_path(args.out)):
        what = "ends in .tar.gz/.tgz, which is always gzip-compressed" if is_bundle_path(args.out) else "is a folder, not an archive"
        print(f"error: --no-compress asks for a plain .tar, but OUT {args.out} {what}; name OUT like model.tar", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if is_bundle_path(args.out):
            out = export_bundle(args.ckpt, args.out, merge_lora=args.merge_lora, base=args.base)
        else:
            out = export_checkpoint(args.ckpt, args.out, merge_lora=args.merge_lora, base=args.base)
    except CorruptCheckpointError as err:
        print(f"FAILED {err.path}: {err.reason}; a damaged model is not exported", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"exported {args.ckpt} -> {out}" + (" (LoRA merged into its base)" if args.merge_lora else ""))
    return EXIT_OK


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """What `inspect` shows: status, step, metrics, model summary, weight dtypes and parameter count, files, Hub status."""
    info = read_training_info(path)
    try:
        verify_checkpoint(path, checksums=False)
        status = "complete (sizes and headers checked; `verify` re-hashes)"
    except CorruptCheckpointError as err:
        status = f"CORRUPT: {err.path}: {err.reason}"
    dtypes: dict[str, int] = {}
    folder = Contents.of(path, info).deployable_dir
    weights = [rel for rel in info["manifest"] if folder and rel.startswith(folder + "/") and rel.endswith(".safetensors")]
    for rel in weights:
        if status.startswith("complete"):
            for entry in check_safetensors_header(path / rel).values():
                numel = 1
                for dim in entry["shape"]:
                    numel *= dim
                dtypes[str(entry["dtype"])] = dtypes.get(str(entry["dtype"]), 0) + numel
    registry = Registry(CheckpointLayout.of_run(path.parent)).read() if (path.parent / "checkpoints.json").is_file() else {}
    hub = registry.get("hub") if isinstance(registry.get("hub"), dict) else {}
    return {
        "path": str(path),
        "status": status,
        "step": info.get("step"),
        "epoch": info.get("epoch"),
        "created_at": info.get("created_at"),
        "metrics": info.get("metrics") or {},
        "model": info.get("model") or {},
        "stored_parameters": sum(dtypes.values()),
        "parameters_by_dtype": dtypes,
        "files": {rel: entry.get("size") for rel, entry in sorted(info["manifest"].items())},
        "hub": {"repo_id": hub.get("repo_id"), **((hub.get("steps") or {}).get(str(info.get("step"))) or {"status": "not published"})},
    }


@_on_remote
def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.ckpt)
    if not (path / TRAINING_INFO).is_file():
        print(f"error: {path} is not a committed checkpoint (no {TRAINING_INFO})", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = {**inspect_checkpoint(path), "path": getattr(args, "shown_as", str(path))}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        model = report["model"]
        hub = report["hub"]
        print(f"checkpoint  {report['path']}")
        print(f"status      {report['status']}")
        print(f"step        {report['step']}  (epoch {report['epoch']}, saved {report['created_at']})")
        print(f"metrics     {_format_metrics(report['metrics'])}")
        print(f"model       {model.get('class')}, {model.get('num_parameters', 0):,} parameters, {model.get('dtype')}")
        print(f"weights     {report['stored_parameters']:,} stored parameters: "
              + (", ".join(f"{dtype} {count:,}" for dtype, count in sorted(report["parameters_by_dtype"].items())) or "-"))
        print(f"hub         {hub['status']}" + (f" ({hub['repo_id']}@{hub.get('branch')})" if hub.get("repo_id") and hub.get("branch") else ""))
        print(f"files       {len(report['files'])}, {_human_size(sum(report['files'].values()))}")
        width = max((len(rel) for rel in report["files"]), default=0)
        for rel, size in report["files"].items():
            print(f"  {rel.ljust(width)}  {_human_size(size)}")
    return EXIT_OK if report["status"].startswith("complete") else EXIT_CHECK_FAILED


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint, detect_format  # imports transformers: only for this command

    out = convert_checkpoint(
        args.src, args.out, trust_pickle=args.trust_pickle, weights_only=args.weights_only, base_model=args.base_model, step=args.step
    )
    print(f"converted {detect_format(args.src)} checkpoint {args.src} -> {out}")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from .hub.publish import HubAuthError, HubPublishError, HubUnavailableError, publish_checkpoint  # only this command talks to the Hub

    check_repo_id(args.repo_id, "--repo-id")
    path = Path(args.ckpt)
    if not (path / TRAINING_INFO).is_file():
        print(f"error: {path} is not a committed checkpoint (no {TRAINING_INFO})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sha = publish_checkpoint(
            path, args.repo_id, revision=args.revision, private=not args.public, include_training_state=args.include_training_state
        )
    except CorruptCheckpointError as err:
        print(f"FAILED {err.path}: {err.reason}; a damaged checkpoint is not pushed", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (HubAuthError, HubUnavailableError, HubPublishError) as err:
        print(f"push failed: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"pushed {path} -> {args.repo_id}@{args.revision} (commit {sha})")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    out = plot_run(args.dir, args.out or Path(args.dir) / "metrics.png", metric=args.metric)
    print(f"wrote {out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-rl-ckpt",
        description="Inspect, verify and manage hf_rl_ckpt checkpoints.",
        epilog=EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="table of the committed checkpoints of a run directory")
    p.add_argument("dir", help="the checkpoint_dir of a run, or its remote_dir URL (s3://bucket/run)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--verify", action="store_true", help="also re-hash every file (slower)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("plot", help="PNG of the ranking metric vs step with the retained top-k and published branches")
    p.add_argument("dir", help="the checkpoint_dir of a run")
    p.add_argument("--out", help="PNG path (default: DIR/metrics.png)")
    p.add_argument("--metric", help="metric to plot (default: the run's metric_name)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("verify", help="re-hash every file of a checkpoint against its manifest (or of a bundle against its file list)")
    p.add_argument("ckpt", help="a checkpoint directory, e.g. runs/ckpt/step_40 (or s3://bucket/run/step_40), or a bundle file written by `export`, e.g. model.tar")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "export", help="copy a checkpoint's model folder out (or merge its LoRA adapter into the base), as a folder or one .tar file",
        description="Export the deployable model of a checkpoint. OUT ending in .tar, .tar.gz or .tgz writes a single-file "
        "bundle (config, weights, tokenizer, model card, file list) that `tar -xf` + `from_pretrained` and "
        "`hf-rl-ckpt verify OUT` both read, gzip-compressed for .tar.gz/.tgz and plain for .tar; any other OUT is a new "
        "folder. Only the model is checked and exported: a damaged model fails (exit 1), missing training state does not.",
    )
    p.add_argument("ckpt", help="a checkpoint directory, e.g. runs/ckpt/step_40")
    p.add_argument("out", help="the folder to create, or the archive to create (model.tar, model.tar.gz)")
    p.add_argument("--merge-lora", action="store_true", help="merge the adapter into its base model and write consolidated weights")
    p.add_argument("--base", help="base model folder or cached Hub id to merge into (default: the adapter's base_model_name_or_path)")
    p.add_argument("--no-compress", action="store_true", help="assert that the archive is written uncompressed: OUT must end in .tar "
                   "(.tar is always plain, .tar.gz/.tgz always gzip; plain is faster for large safetensors)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("inspect", help="one checkpoint: files, sizes, dtypes, parameter count, metrics, Hub status")
    p.add_argument("ckpt", help="a checkpoint directory, e.g. runs/ckpt/step_40, or a remote one, e.g. s3://bucket/run/step_40")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser(
        "convert", help="convert an HF Trainer, Accelerate or NeMo-RL checkpoint folder into an hf_rl_ckpt checkpoint",
        description="Convert a foreign checkpoint folder (HF Trainer checkpoint-N, a LoRA run's included, which becomes an "
        "adapter checkpoint; Accelerate save_state; NeMo-RL legacy step_N) into a new hf_rl_ckpt checkpoint OUT. Pickled "
        "source files (.pt, .bin, .pkl, DCP) are read only with --trust-pickle, and then only through weights-only loaders.",
    )
    p.add_argument("src", help="the folder to convert")
    p.add_argument("out", help="the checkpoint directory to create")
    p.add_argument("--trust-pickle", action="store_true", help="read the source's pickled files (torch.load(weights_only=True) only)")
    p.add_argument("--weights-only", action="store_true", help="convert the model weights only (no optimizer, scheduler, RNG)")
    p.add_argument("--base-model", help="folder with the model's config.json, for sources that do not store it (Accelerate; "
                   "a LoRA checkpoint whose adapter_config.json names no base)")
    p.add_argument("--step", type=int, help="the step to record, for sources that do not say")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser(
        "push",
        help="publish a checkpoint to the Hugging Face Hub (model folder + tokenizer + model card at the repo root)",
        description="Publish a checkpoint to a Hub model repo, ready to serve: `from_pretrained(REPO, revision=BRANCH)` and "
        "`vllm serve REPO --revision BRANCH` load it. The token comes from HF_TOKEN or `hf auth login` (never from the "
        "command line, where it would land in shell history), the endpoint from HF_ENDPOINT.",
    )
    p.add_argument("ckpt", help="a checkpoint directory, e.g. runs/ckpt/step_40")
    p.add_argument("--repo-id", required=True, help="the model repo, e.g. your-name/my-run (created if missing)")
    p.add_argument("--revision", default="main", help="the branch to push to, e.g. step-40 (created if missing; default: main)")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--public", action="store_true", help="create the repo public when it does not exist yet (default: private, "
                            "like hub_private: true); an existing repo keeps its visibility")
    visibility.add_argument("--private", action="store_true", help="create the repo private (the default; kept for scripts that pass it)")
    p.add_argument("--include-training-state", action="store_true", help="also push the rest of the checkpoint under training_state/, "
                   "as hub_push_training_state does: optimizer and scheduler state, RNG, data position, training_info.json and "
                   "config.yaml (the run's training config). Default: only the model folder and its model card")
    p.set_defaults(func=cmd_push)
    for command in sub.choices.values():
        command.epilog = EXIT_CODES_HELP
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
