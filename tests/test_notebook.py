"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel, offline, as a reader would run it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook with its outputs cleared"
    # The kernel runs this interpreter; its `!hf-rl-ckpt` must be this environment's console script too.
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the notebook's hub_env turns it off for its local server only
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    text = "\n".join(
        output.get("text", "") + "".join(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "resumed from" in text and "finished at step 20" in text
    assert "step  metrics" in text, "the `hf-rl-ckpt list` table is shown"
    assert "['main', 'step-" in text, "the Hub repo has main and the step-N branches"
    assert any("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    kept = {path.name for path in (tmp_path / "runs" / "quickstart" / "ckpt").glob("step_*")}
    assert "step_20" in kept and len(kept) <= 3  # top-2 by eval_loss plus the newest
