"""Every notebook runs top to bottom in a fresh kernel (on a tiny model: its `parameters` cell is replaced)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tiny_llama, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1, "each notebook has one cell tagged 'parameters'"
    parameters[0].source += f'\nMODEL = "{tiny_llama}"\nTRAIN_LR = 1e-3\nDEVICE = "cpu"\nMAX_NEW_TOKENS = 8\n'
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 3  # the figures were drawn
