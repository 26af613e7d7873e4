"""Shared fixtures. Tests run with `make test` (the pinned venv) from the repository root."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = Path(__file__).resolve().parents[1]


def ml100k_path() -> Path | None:
    """MovieLens-100K raw files: $MDMT_ML100K_DIR, else ../shared/data/ml-100k beside the repo."""
    candidates = [os.environ.get("MDMT_ML100K_DIR"), REPO.parent / "shared" / "data" / "ml-100k"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "u.data").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    path = ml100k_path()
    if path is None:
        pytest.skip("MovieLens-100K not found (set MDMT_ML100K_DIR or put it in ../shared/data/ml-100k)")
    return path


@pytest.fixture(scope="session")
def small_synthetic():
    """A small synthetic dataset: (spec, typed table) with 3 domains, click -> like."""
    from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec

    config = SyntheticConfig(rows=3000, users=300, items=200, seed=7)
    return synthetic_spec(config), generate(config)


@pytest.fixture(scope="session")
def small_data(small_synthetic):
    """small_synthetic split by the seeded 80/10/10, with vocabularies: an MDMTData."""
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.data.readers import Splits, random_split

    spec, table = small_synthetic
    parts = random_split(table, 0, "synthetic")
    return MDMTData.build(spec, Splits(**parts, sources={s: s for s in parts}))


@pytest.fixture()
def csv_dir(tmp_path, small_synthetic):
    """A directory with train/val/test.csv and spec.yaml of the small synthetic data."""
    from mdmt_tf.data.readers import random_split, write_csv

    spec, table = small_synthetic
    for split, part in random_split(table, 0, "synthetic").items():
        write_csv(part, tmp_path / f"{split}.csv")
    spec.to_yaml(tmp_path / "spec.yaml")
    return tmp_path
