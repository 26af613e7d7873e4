"""A synthetic multi-domain multi-task dataset with planted structure (the embedded default).

Rows are (user, item, domain) impressions with cascaded binary labels, e.g. click -> like:
task 0 is unconditional, task k is observed only when task k-1 is positive, so each task
is rarer than the one before. Users and items are drawn with power-law (Zipf)
frequencies. The label logits are built from parts that different experts can find:

  z[t] = base[t] + bias[d, t] + pop[i]
         + w_shared * <p_u, v_i>                      shared preference (all domains, tasks)
         + w_domain * (<W_d p_u, v_i> + B[d, cat_i] + s_d * age_u)   domain-specific
         + w_task   * <T_t p_u, v_i>                  task-specific preference

p_u mixes a demographic part (gender, occupation, zip region, age) with an individual
part, so both the id and the user features carry signal; v_i is its category's centroid
plus item noise. W_d and T_t are random maps, one per domain and per task. Each base[t]
is calibrated so the task's positive rate (given the previous task) hits its target.

Everything is drawn from one numpy Generator seeded by `seed`: same config, same rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from mdmt_tf.data.table import ROW
from mdmt_tf.errors import ConfigError
from mdmt_tf.spec import DatasetSpec


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    rows: int = 60_000
    domains: int = 3
    domain_weights: tuple[float, ...] | None = None  # default: 0.55 / 0.30 / 0.15 for 3
    tasks: tuple[str, ...] = ("click", "like")
    rates: tuple[float, ...] | None = None  # positive rate of task t given task t-1; default 0.25, then 0.3
    users: int = 4000
    items: int = 2000
    categories: int = 20
    occupations: int = 12
    zips: int = 50
    latent_dim: int = 8
    user_zipf: float = 1.0
    item_zipf: float = 1.1
    shared_weight: float = 1.0
    domain_weight: float = 1.0
    task_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.rows < 10:
            raise ConfigError(f"rows must be >= 10, got {self.rows}")
        if self.domains < 1:
            raise ConfigError(f"domains must be >= 1, got {self.domains}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must be distinct names, got {self.tasks}")
        weights = self.weights()
        if len(weights) != self.domains or min(weights) <= 0:
            raise ConfigError(f"domain_weights must be {self.domains} positive numbers, got {self.domain_weights}")
        rates = self.task_rates()
        if len(rates) != len(self.tasks) or not all(0 < r < 1 for r in rates):
            raise ConfigError(f"rates must be {len(self.tasks)} numbers in (0, 1), got {self.rates}")
        for name in ("users", "items", "categories", "occupations", "zips", "latent_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def weights(self) -> np.ndarray:
        if self.domain_weights is not None:
            w = np.asarray(self.domain_weights, dtype=np.float64)
        elif self.domains == 3:
            w = np.array([0.55, 0.30, 0.15])
        else:  # unequal sizes: geometric
            w = 0.6 ** np.arange(self.domains)
        return w / w.sum()

    def task_rates(self) -> tuple[float, ...]:
        if self.rates is not None:
            return tuple(self.rates)
        return (0.25,) + (0.3,) * (len(self.tasks) - 1)


SYNTHETIC_COLUMNS = dict(domain="domain_id", sparse=("user_id", "item_id", "gender", "occupation", "zip", "cate_id"),
                         dense=("age",))


def synthetic_spec(config: SyntheticConfig = SyntheticConfig()) -> DatasetSpec:
    return DatasetSpec(domain=SYNTHETIC_COLUMNS["domain"], tasks=config.tasks,
                       sparse=SYNTHETIC_COLUMNS["sparse"], dense=SYNTHETIC_COLUMNS["dense"],
                       domains=tuple(str(d) for d in range(config.domains)))


def _zipf_probs(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    ranks = rng.permutation(n) + 1  # which id gets which rank is random
    p = ranks.astype(np.float64) ** (-exponent)
    return p / p.sum()


def _scaled(x: np.ndarray, std: float) -> np.ndarray:
    return x * (std / max(float(x.std()), 1e-12))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _calibrate(z: np.ndarray, target: float) -> float:
    """The offset b with mean(sigmoid(z + b)) == target (bisection, deterministic)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(z + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _world(c: SyntheticConfig, rng: np.random.Generator) -> dict:
    """Users, items, domain and task maps: everything but the impressions."""
    k = c.latent_dim
    sigma = k ** -0.25  # <p, v> then has unit variance

    # ---- users: demographics and latent preference
    gender = rng.integers(0, 2, c.users)
    occupation = rng.integers(0, c.occupations, c.users)
    zip_code = rng.integers(0, c.zips, c.users)
    zip_region = zip_code % 5
    age = np.clip(rng.normal(34, 11, c.users), 16, 75).round()
    age_std = (age - 34) / 11
    demo = (rng.normal(size=(2, k))[gender] + rng.normal(size=(c.occupations, k))[occupation]
            + rng.normal(size=(5, k))[zip_region] + np.outer(age_std, rng.normal(size=k)))
    p = _scaled(_scaled(demo, 1.0) + rng.normal(size=(c.users, k)), sigma)

    # ---- items: category centroid + noise, popularity bias
    category = rng.integers(0, c.categories, c.items)
    v = _scaled(rng.normal(size=(c.categories, k))[category] + 0.7 * rng.normal(size=(c.items, k)), sigma)
    popularity = 0.4 * rng.normal(size=c.items)

    # ---- domains and tasks
    return dict(gender=gender, occupation=occupation, zip_code=zip_code, age=age, age_std=age_std, p=p,
                category=category, v=v, popularity=popularity,
                W=rng.normal(size=(c.domains, k, k)) / np.sqrt(k),
                T=rng.normal(size=(len(c.tasks), k, k)) / np.sqrt(k),
                cat_pref=0.6 * rng.normal(size=(c.domains, c.categories)),
                age_slope=np.linspace(-0.5, 0.5, c.domains) if c.domains > 1 else np.zeros(1),
                domain_task_bias=0.3 * rng.normal(size=(c.domains, len(c.tasks))))


def _impressions(c: SyntheticConfig, w: dict, rng: np.random.Generator, rows: int, first_row: int = 1,
                 probs: tuple | None = None, bases: list | None = None, return_truth: bool = False):
    """`rows` impressions as a typed table. probs: the (user, item) Zipf probabilities (drawn
    here, in generate's order, when None); bases: each task's calibrated offset (calibrated
    on these rows when None). Returns (table, truth, bases)."""
    user_p = probs[0] if probs is not None else _zipf_probs(c.users, c.user_zipf, rng)
    user = rng.choice(c.users, size=rows, p=user_p)
    item_p = probs[1] if probs is not None else _zipf_probs(c.items, c.item_zipf, rng)
    item = rng.choice(c.items, size=rows, p=item_p)
    domain = rng.choice(c.domains, size=rows, p=c.weights())

    pu, vi = w["p"][user], w["v"][item]
    shared = np.einsum("nk,nk->n", pu, vi)
    dom = (np.einsum("nk,nk->n", np.einsum("nkj,nj->nk", w["W"][domain], pu), vi)
           + w["cat_pref"][domain, w["category"][item]] + w["age_slope"][domain] * w["age_std"][user])
    truth, labels, used = {}, {}, []
    previous = np.ones(rows, dtype=bool)
    for t, (task, rate) in enumerate(zip(c.tasks, c.task_rates())):
        task_part = np.einsum("nk,nk->n", np.einsum("kj,nj->nk", w["T"][t], pu), vi)
        z = (w["domain_task_bias"][domain, t] + w["popularity"][item] + c.shared_weight * shared
             + c.domain_weight * dom + c.task_weight * task_part)
        base = bases[t] if bases is not None else _calibrate(z[previous], rate)  # rate given the previous task
        used.append(base)
        prob = _sigmoid(z + base)
        positive = previous & (rng.random(rows) < prob)
        labels[task] = positive.astype(np.int8)
        if return_truth:
            truth[task] = {"base": base, "shared": c.shared_weight * shared, "domain": c.domain_weight * dom,
                           "task": c.task_weight * task_part, "logit": z + base}
        previous = positive

    table = pd.DataFrame({
        "domain_id": domain.astype(str),
        "user_id": np.char.add("u", user.astype(str)),
        "item_id": np.char.add("i", item.astype(str)),
        "gender": np.where(w["gender"][user] == 0, "F", "M"),
        "occupation": np.char.add("occ", w["occupation"][user].astype(str)),
        "zip": np.char.add("z", np.char.zfill(w["zip_code"][user].astype(str), 3)),
        "cate_id": np.char.add("c", np.char.zfill(w["category"][item].astype(str), 2)),
        "age": w["age"][user].astype(np.float32),
        **labels,
    })
    for name in ("domain_id", "user_id", "item_id", "gender", "occupation", "zip", "cate_id"):
        table[name] = table[name].astype(object)
    table[ROW] = np.arange(first_row, first_row + rows)
    return table, truth, used


def generate(config: SyntheticConfig = SyntheticConfig(), return_truth: bool = False):
    """Generate a typed table (see mdmt_tf.data.table) for `synthetic_spec(config)`.

    With return_truth=True also returns a dict of the logit parts per task:
    truth[task] = {"base", "shared", "domain", "task", "logit"} (arrays over rows).
    """
    rng = np.random.default_rng(config.seed)
    world = _world(config, rng)
    table, truth, _ = _impressions(config, world, rng, config.rows, return_truth=return_truth)
    return (table, truth) if return_truth else table


CALIBRATION_ROWS = 200_000


def generate_chunks(config: SyntheticConfig = SyntheticConfig(), chunk_rows: int = 250_000):
    """The same world as `generate`, its `config.rows` impressions made `chunk_rows` at a time
    (memory bounded by a chunk, so 10^7 rows fit a small machine): yields typed tables. Each
    task's offset is calibrated once, on the first min(rows, CALIBRATION_ROWS) impressions,
    and each chunk has its own seeded stream, so the rows follow generate's distribution
    but are not generate's rows."""
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    rng = np.random.default_rng(config.seed)
    world = _world(config, rng)
    probs = (_zipf_probs(config.users, config.user_zipf, rng), _zipf_probs(config.items, config.item_zipf, rng))
    calibration = np.random.default_rng([config.seed, 1])
    _, _, bases = _impressions(config, world, calibration, min(config.rows, CALIBRATION_ROWS), probs=probs)
    done, chunk = 0, 0
    while done < config.rows:
        n = min(chunk_rows, config.rows - done)
        table, _, _ = _impressions(config, world, np.random.default_rng([config.seed, 2, chunk]), n,
                                   first_row=done + 1, probs=probs, bases=bases)
        yield table
        done, chunk = done + n, chunk + 1
