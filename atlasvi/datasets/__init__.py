"""Small real datasets shipped with atlasvi (provenance and license in README.md beside this file)."""

from pathlib import Path

CELLBENCH = Path(__file__).parent / "cellbench_sc_mixology_3tech_hvg4000.h5ad"
"""CellBench sc_mixology (Tian et al. 2019, MIT): 1408 cells x 4000 genes; batch `batch`, labels `cell_line`."""
