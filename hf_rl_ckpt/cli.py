"""`hf-rl-ckpt`: inspect and check checkpoints from the shell.

Exit codes: 0 success; 1 a check failed (e.g. `verify` found a bad file); 2 bad usage or
input that is not a checkpoint (argparse also exits 2 on usage errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import CheckpointError, CorruptCheckpointError
from .layout import TRAINING_INFO, CheckpointLayout
from .registry import Registry
from .verify import verify_checkpoint

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())) or "-"


def _layout_for(directory: Path) -> CheckpointLayout:
    """The layout of a run directory, with the checkpoint name template its registry records."""
    registry = CheckpointLayout(directory).registry_path
    template = "step_{step}"
    if registry.is_file():
        try:
            template = json.loads(registry.read_text()).get("name_template", template)
        except json.JSONDecodeError:
            template = "step_{step}"
    return CheckpointLayout(directory, template)


def list_rows(directory: Path, checksums: bool = False) -> list[dict[str, Any]]:
    """One row per committed checkpoint: the registry's record plus a verification status."""
    layout = _layout_for(directory)
    records = {row["step"]: row for row in Registry(layout).records()}
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


def cmd_list(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = list_rows(directory, checksums=args.verify)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no committed checkpoints in {directory}")
        return EXIT_OK
    table = [("step", "metrics", "top-k", "size", "status")]
    for row in rows:
        rank = row.get("top_k_rank")
        table.append((str(row["step"]), _format_metrics(row.get("metrics") or {}), str(rank) if rank else "-",
                      _human_size(row.get("size_bytes", 0)), row["status"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for index, line in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.ckpt)
    if not (path / TRAINING_INFO).is_file():
        print(f"error: {path} is not a committed checkpoint (no {TRAINING_INFO})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        info = verify_checkpoint(path, checksums=True)
    except CorruptCheckpointError as err:
        print(f"FAILED {err.path}: {err.reason}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"OK {path}: {len(info['manifest'])} files match the manifest (size and sha256)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-rl-ckpt",
        description="Inspect, verify and manage hf_rl_ckpt checkpoints.",
        epilog="Exit codes: 0 success, 1 a check failed, 2 bad usage or input.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="table of the committed checkpoints of a run directory")
    p.add_argument("dir", help="the checkpoint_dir of a run")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--verify", action="store_true", help="also re-hash every file (slower)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("verify", help="re-hash every file of a checkpoint against its manifest")
    p.add_argument("ckpt", help="a checkpoint directory, e.g. runs/ckpt/step_40")
    p.set_defaults(func=cmd_verify)
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
