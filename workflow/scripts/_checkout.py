"""Imported first by every rule script: puts this checkout on sys.path, so that editlib imports in
a job also where it is not installed (a conda environment made by `--sdm conda`). Snakemake adds
this folder to sys.path of each script it runs."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
