"""The notebooks as researchers use them: one live kernel, run top to bottom, then a parameter changed
and a single section rerun (nbclient, the smoke profile, generated demo data)."""

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT


class LiveNotebook:
    """A notebook in one kernel, with cells run by position, as in Jupyter."""

    def __init__(self, name: str, workdir: Path):
        self.nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        self.client = NotebookClient(self.nb, kernel_name="python3", timeout=900,
                                     resources={"metadata": {"path": str(ROOT)}})
        self.workdir = workdir
        self.code = [i for i, c in enumerate(self.nb.cells) if c.cell_type == "code"]

    def index_of(self, marker: str) -> int:
        (i,) = [i for i in self.code if marker in self.nb.cells[i].source]
        return i

    def run(self, i: int) -> str:
        cell = self.nb.cells[i]
        self.client.execute_cell(cell, i)
        return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    def set_parameters(self, **values) -> str:
        """Edit the parameters cell as a user would (smoke profile, workdir, values) and run it."""
        i = next(i for i in self.code if "parameters" in self.nb.cells[i].metadata.get("tags", []))
        src = self.nb.cells[i].source
        for k, v in {"workdir": str(self.workdir), **values}.items():
            src, n = re.subn(rf"^{k} = .*?(\s+#|$)", f"{k} = {v!r}\\1", src, count=1, flags=re.M)
            assert n == 1, k
        self.nb.cells[i].source = src
        return self.run(i)

    def run_range(self, first: str, last: str) -> str:
        a, b = self.index_of(first), self.index_of(last)
        return "\n".join(self.run(i) for i in self.code if a <= i <= b)

    def run_all(self) -> None:
        self.set_parameters()
        for i in self.code:
            if "parameters" not in self.nb.cells[i].metadata.get("tags", []):
                self.run(i)


NOTEBOOKS = {
    # name: (config cell, first and last cell of Train..Save, the cache cell, another input size)
    "DFER_GCViT": ("config = H.resolve_config(", "def run_key_of(cfg):", "H.publish_run(",
                   "cache_path = H.build_hdf5_cache(", {"image_size": 32}),
    "GReFEL": ("config = H.resolve_config(", "H.require(globals(), config=\"Configuration\", meta=", "H.publish_run(",
               "cache_path = H.build_hdf5_cache(",
               {"image_size": 64, "patch_sizes": [16, 8, 4], "window": 4}),
}


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_changing_a_parameter_and_rerunning_one_section(name, tmp_path):
    config_cell, train_first, save_last, cache_cell, other_size = NOTEBOOKS[name]
    nb = LiveNotebook(name, tmp_path)
    with nb.client.setup_kernel():
        nb.run_all()
        out_dir = tmp_path / name
        first = json.loads((out_dir / "final_results.json").read_text())
        # rerun Preprocess with unchanged data settings: the cache is reused, not rebuilt
        printed = nb.run(nb.index_of(cache_cell))
        assert "Reusing cache" in printed and "Cached " not in printed
        # a new learning rate: edit Parameters, rerun Parameters + Configuration, then Train .. Save
        nb.set_parameters(lr=3e-4)
        nb.run(nb.index_of(config_cell))
        nb.run_range(train_first, save_last)
        second = json.loads((out_dir / "final_results.json").read_text())
        assert second["config"]["lr"] == 3e-4 and first["config"]["lr"] != 3e-4
        assert second["run_key"] != first["run_key"] and Path(second["run_dir"]) != Path(first["run_dir"])
        assert json.loads((Path(first["run_dir"]) / "final_results.json").read_text()) == first  # kept
        # another image size: Configuration, then Preprocess builds a new cache beside the old one
        nb.set_parameters(lr=3e-4, **other_size)
        nb.run(nb.index_of(config_cell))
        printed = "\n".join(nb.run(i) for i in nb.code
                            if nb.index_of(config_cell) < i <= nb.index_of(cache_cell))
        assert "Cached " in printed
        assert len(list((tmp_path / "cache").glob("*.h5"))) == 2


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_a_section_run_before_its_inputs_names_the_sections_to_run_first(name, tmp_path):
    from nbclient.exceptions import CellExecutionError

    train_first = NOTEBOOKS[name][1]
    nb = LiveNotebook(name, tmp_path)
    with nb.client.setup_kernel():
        nb.run(nb.code[0])  # Setup only, as after opening the notebook and running its first cell
        with pytest.raises(CellExecutionError, match=r"run the section\(s\) \['Configuration'"):
            nb.run(nb.index_of(train_first))
