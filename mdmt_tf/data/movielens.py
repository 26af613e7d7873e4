"""MovieLens-100K -> an MDMT dataset (`mdmt data ml100k --src DIR --out DIR`).

MovieLens' license forbids redistribution: this converter reads the files from where
the user keeps them (u.data, u.user, u.item, u.genre) and writes derived CSVs into a
directory of the user's choosing; nothing of it ships with mdmt_tf.

Mapping:
  domains   age group of the user: "<25", "25-34", ">=35"
  tasks     click = rating > 3, like = rating > 4 (like implies click)
  sparse    user_id, item_id, gender, occupation, zip, cate_id (the movie's first genre)
  dense     age, min-max scaled over the users table
  extra     timestamp (kept for temporal splits; not a feature)
Split: seeded random 80/10/10 into train.csv / val.csv / test.csv, plus spec.yaml.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mdmt_tf.data.readers import Splits, random_split, write_csv
from mdmt_tf.data.table import ROW, coerce_table
from mdmt_tf.errors import DataError
from mdmt_tf.spec import DatasetSpec

AGE_GROUPS = ("<25", "25-34", ">=35")
ML100K_SPEC = DatasetSpec(domain="domain_id", tasks=("click", "like"),
                          sparse=("user_id", "item_id", "gender", "occupation", "zip", "cate_id"),
                          dense=("age",), domains=AGE_GROUPS)
FILES = ("u.data", "u.user", "u.item", "u.genre")


def age_group(age: np.ndarray) -> np.ndarray:
    return np.where(age < 25, AGE_GROUPS[0], np.where(age < 35, AGE_GROUPS[1], AGE_GROUPS[2]))


def load_ml100k(src: str | Path) -> pd.DataFrame:
    """Read the raw files and return one typed table of 100,000 rows (before splitting)."""
    src = Path(src)
    missing = [f for f in FILES if not (src / f).exists()]
    if missing:
        raise DataError(f"is not a MovieLens-100K directory: missing {missing} "
                        "(download ml-100k.zip from grouplens.org and unzip it)", source=str(src))
    ratings = pd.read_csv(src / "u.data", sep="\t", header=None,
                          names=["user_id", "item_id", "rating", "timestamp"])
    users = pd.read_csv(src / "u.user", sep="|", header=None, dtype=str,
                        names=["user_id", "age", "gender", "occupation", "zip"])
    genres = pd.read_csv(src / "u.genre", sep="|", header=None, names=["genre", "index"]).dropna()
    genre_names = genres.sort_values("index")["genre"].tolist()
    items = pd.read_csv(src / "u.item", sep="|", header=None, encoding="latin-1", dtype=str)
    flags = items.iloc[:, 5:5 + len(genre_names)].astype(int).to_numpy()
    first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
    items = pd.DataFrame({"item_id": items[0], "cate_id": np.asarray(genre_names)[first]})

    users["age"] = users["age"].astype(int)
    age = users["age"].to_numpy()
    users["age_scaled"] = (age - age.min()) / max(age.max() - age.min(), 1)
    users["domain_id"] = age_group(age)

    ratings["user_id"] = ratings["user_id"].astype(str)
    ratings["item_id"] = ratings["item_id"].astype(str)
    table = ratings.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    if table["domain_id"].isna().any() or table["cate_id"].isna().any():
        raise DataError("u.data refers to users or items missing from u.user / u.item", source=str(src / "u.data"))
    out = pd.DataFrame({
        "domain_id": table["domain_id"], "user_id": table["user_id"], "item_id": table["item_id"],
        "gender": table["gender"], "occupation": table["occupation"], "zip": table["zip"],
        "cate_id": table["cate_id"], "age": table["age_scaled"].astype(np.float32),
        "click": (table["rating"] > 3).astype(np.int8), "like": (table["rating"] > 4).astype(np.int8),
        "timestamp": table["timestamp"].astype(np.int64),
    })
    out[ROW] = np.arange(1, len(out) + 1)
    return coerce_table(out, ML100K_SPEC, source=str(src / "u.data"), header_row=None)


def convert_ml100k(src: str | Path, out: str | Path, seed: int = 0) -> Splits:
    """Convert and write train/val/test.csv and spec.yaml into `out`; returns the splits."""
    table = load_ml100k(src)
    parts = random_split(table, seed, source=str(src))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, frame in parts.items():
        write_csv(frame, out / f"{split}.csv")
    ML100K_SPEC.to_yaml(out / "spec.yaml")
    return Splits(**parts, sources={s: str(out / f"{s}.csv") for s in parts})
