"""The Evaluator's blessing (pipeline.eval_config, TFMA) refuses a model whose predictions
are not finite. TFMA is run on precomputed predictions, as the TFX Evaluator validates
them (no baseline: change thresholds rubber-stamped), without training or a pipeline.

Measured with TFMA 0.52 / TFX 1.21: +-inf predictions score a finite AUC and logloss
(they fall in the histogram's end buckets), so AUC thresholds alone bless such a model;
a NaN prediction makes TFMA's calibration histogram raise ("cannot convert float NaN to
integer"), so the Evaluator fails and nothing is blessed or pushed."""
import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow_model_analysis as tfma
from tfx_bsl.arrow import table_util

from pipeline.pipeline import eval_config
from tests.pipeline.conftest import make_config

SPEC = {"domain": "domain_id", "tasks": ["click", "like"], "sparse": ["user_id"], "dense": []}


def _validate(config, columns: dict, out) -> tfma.ValidationResult:
    """TFMA's validation of `columns` (labels, `<task>_pred` predictions, the domain) against
    the pipeline's metrics, slices and thresholds, as the Evaluator runs it without a baseline."""
    ec = eval_config(config)
    del ec.model_specs[:]  # the model's outputs are the `<task>_pred` columns
    ec.model_specs.add(label_keys={t: t for t in SPEC["tasks"]},
                       prediction_keys={t: f"{t}_pred" for t in SPEC["tasks"]})
    ec = tfma.utils.update_eval_config_with_defaults(ec, has_baseline=False, rubber_stamp=True)
    batch = pa.RecordBatch.from_arrays([pa.array(v) for v in columns.values()], names=list(columns))
    with beam.Pipeline() as p:
        _ = (p | beam.Create([table_util.CanonicalizeRecordBatch(batch)])
             | tfma.ExtractEvaluateAndWriteResults(eval_config=ec, output_path=str(out)))
    return tfma.load_validation_result(str(out))


def _columns(seed=0, n=600):
    rng = np.random.default_rng(seed)
    columns = {"domain_id": np.array(["0", "1", "2"])[rng.integers(0, 3, n)]}
    for task in SPEC["tasks"]:
        y = rng.integers(0, 2, n)
        columns[task] = y
        columns[f"{task}_pred"] = np.clip(0.35 * y + 0.65 * rng.random(n), 0.0, 1.0)  # AUC ~0.85
    return columns


def _failing_metrics(result) -> set:
    return {failure.metric_key.name for v in result.metric_validations_per_slice for failure in v.failures}


@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["+inf", "-inf"])
def test_infinite_predictions_are_not_blessed(tmp_path, value):
    config = make_config(tmp_path, tmp_path, SPEC, auc_floor=0.55)
    clean = _columns()
    assert _validate(config, clean, tmp_path / "clean").validation_ok  # the same predictions, finite: blessed
    bad = {k: v.copy() for k, v in clean.items()}
    bad["click_pred"][np.flatnonzero(bad["domain_id"] == "0")[:12]] = value
    result = _validate(config, bad, tmp_path / "bad")
    assert not result.validation_ok
    assert _failing_metrics(result) == {"mean_prediction"}, result
