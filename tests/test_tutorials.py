"""Every tutorial notebook executes top to bottom (small sizes via PYROFORGE_TUTORIAL_SMALL=1)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = sorted(pathlib.Path(__file__).resolve().parents[1].joinpath("tutorials").glob("*.ipynb"))


def test_there_are_tutorials():
    assert TUTORIALS, "no notebooks found in tutorials/"


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("PYROFORGE_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
