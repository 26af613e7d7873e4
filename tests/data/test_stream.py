"""The streaming input path (mdmt_tf.data.stream): sharded TFRecords scanned and streamed."""
import json

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2

from mdmt_tf.data.readers import example_bytes, random_split, read_tfrecord, write_tfrecord
from mdmt_tf.data.shards import shard_files, shard_name, write_sharded_synthetic
from mdmt_tf.data.stream import StreamData
from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec
from mdmt_tf.errors import DataError

CONFIG = SyntheticConfig(rows=3000, users=300, items=200, seed=7)
SPEC = synthetic_spec(CONFIG)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same rows as train/val/test.tfrecord.gz (read in memory) and as one shard per split."""
    plain, shards = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("shards")
    for split, table in random_split(generate(CONFIG), 0, "synthetic").items():
        write_tfrecord(table, plain / f"{split}.tfrecord.gz", SPEC)
        write_tfrecord(table, shards / shard_name(split, 0, 1), SPEC)
    return plain, shards


def test_streaming_and_in_memory_training_give_the_same_metrics(layouts, tmp_path):
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import train

    plain, shards = layouts
    model = ModelConfig("mmoe", {"expert_units": [16, 8], "tower_units": [8], "embedding_dim": 4})
    config = TrainConfig(epochs=2, batch_size=256, shuffle_buffer=0, precision="float32")  # rows in file order
    memory = train(model, MDMTData.build(SPEC, read_tfrecord(plain, SPEC)), config, tmp_path / "memory",
                   verbose=0, plots=False)
    stream = StreamData.scan(shards, SPEC)
    streamed = train(model, stream, config, tmp_path / "stream", verbose=0, plots=False)
    assert streamed["data"]["rows"] == memory["data"]["rows"]
    for split in ("val", "test"):
        assert set(streamed[split]["auc"]) == set(memory[split]["auc"])
        for key, value in memory[split]["auc"].items():
            assert streamed[split]["auc"][key] == pytest.approx(value, abs=1e-6), (split, key)
        assert streamed[split]["mean_logloss"] == pytest.approx(memory[split]["mean_logloss"], abs=1e-6)
    assert json.loads((tmp_path / "stream" / "metrics.json").read_text())["steps"] == memory["steps"]
    assert (tmp_path / "stream" / "model" / "saved_model.pb").exists()


def test_scan_builds_the_vocabularies_build_does(layouts):
    from mdmt_tf.data.vocab import Vocabularies

    plain, shards = layouts
    stream = StreamData.scan(shards, SPEC, min_count=2)
    memory = Vocabularies.build(read_tfrecord(plain, SPEC).train, SPEC, min_count=2)
    assert stream.vocab.sparse == memory.sparse and stream.vocab.domains == memory.domains
    for name in SPEC.dense:
        assert stream.vocab.dense_mean[name] == pytest.approx(memory.dense_mean[name], rel=1e-12)
        assert stream.vocab.dense_std[name] == pytest.approx(memory.dense_std[name], rel=1e-12)
    assert stream.rows("train") + stream.rows("val") + stream.rows("test") == CONFIG.rows


def test_sharded_synthetic_is_written_in_chunks(tmp_path):
    counts = write_sharded_synthetic(SyntheticConfig(rows=2000, users=100, items=80, seed=3), tmp_path, shards=3,
                                     chunk_rows=700)
    files = shard_files(tmp_path)
    assert [len(files[s]) for s in ("train", "val", "test")] == [3, 3, 3] and sum(counts.values()) == 2000
    stream = StreamData.scan(tmp_path, SPEC)
    assert {s: stream.rows(s) for s in counts} == counts
    assert 0.75 < counts["train"] / 2000 < 0.85


def _bad_shards(tmp_path, table):
    for split in ("val", "test"):
        write_tfrecord(table.head(50), tmp_path / shard_name(split, 0, 1), SPEC)
    write_tfrecord(table.head(200), tmp_path / shard_name("train", 0, 2), SPEC)
    return tmp_path / shard_name("train", 1, 2)


def test_bad_input_names_the_shard_record_and_column(tmp_path):
    table = generate(CONFIG).head(300).reset_index(drop=True)
    bad = _bad_shards(tmp_path, table)
    labels = table.copy()
    labels.loc[41, "like"] = 2
    write_tfrecord(labels, bad, SPEC)
    with pytest.raises(DataError) as err:
        StreamData.scan(tmp_path, SPEC)
    assert f"{bad}, row 42, column 'like': label 2 is not 0 or 1" in str(err.value)  # the shard's own record

    records = example_bytes(table, SPEC)
    broken = example_pb2.Example.FromString(records[7])
    del broken.features.feature["age"]  # record 8 lacks a dense feature
    with tf.io.TFRecordWriter(str(bad), tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        for i, record in enumerate(records):
            writer.write(broken.SerializeToString() if i == 7 else record)
    with pytest.raises(DataError) as err:
        StreamData.scan(tmp_path, SPEC)
    assert f"{bad}, row 8, column 'age': feature is missing" in str(err.value)

    write_tfrecord(table, bad, SPEC)
    data = bad.read_bytes()
    # a shard cut short: TF's own gzip reader reads some such cuts as a shorter valid shard
    for cut in (len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match="is truncated") as err:
            StreamData.scan(tmp_path, SPEC)
        assert str(bad) in str(err.value)
    bad.write_bytes(data[:100] + bytes(255 - b for b in data[100:200]) + data[200:])  # corrupt bytes
    with pytest.raises(DataError, match="is corrupt") as err:
        StreamData.scan(tmp_path, SPEC)
    assert str(bad) in str(err.value)


def test_a_directory_without_shards_is_named(tmp_path):
    (tmp_path / "train.tfrecord.gz").write_bytes(b"")
    with pytest.raises(DataError, match="holds no shards for"):
        shard_files(tmp_path)


def test_the_cascade_check_streams_too(tmp_path):
    from mdmt_tf.models import ModelConfig

    table = generate(CONFIG).head(300).reset_index(drop=True)
    bad = _bad_shards(tmp_path, table)
    unnested = table.copy()
    unnested.loc[12, ["click", "like"]] = (0, 1)
    write_tfrecord(unnested, bad, SPEC)
    stream = StreamData.scan(tmp_path, SPEC)
    with pytest.raises(DataError, match="like=1 but click=0") as err:
        stream.check_cascade(ModelConfig("esmm", {}))
    assert f"{bad}, row 13" in str(err.value) and "model esmm is a cascade" in str(err.value)
    stream.check_cascade(ModelConfig("mmoe", {}))  # not a cascade: fine
    stream.check_cascade(ModelConfig("esmm", {"allow_unnested": True}))  # one warning line
    assert np.isfinite(stream.vocab.dense_std["age"])


def test_a_search_streams_its_trials(layouts, tmp_path):
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.tuning.search import run_search

    _, shards = layouts
    best = run_search("mmoe", StreamData.scan(shards, SPEC), TrainConfig(epochs=1, batch_size=512), tmp_path / "s",
                      kind="random", max_trials=1, fixed={"embedding_dim": 4})
    assert best["objective"]["value"] > 0.5 and (tmp_path / "s" / "best_hparams.yaml").exists()


def test_workers_read_their_own_shards_only_when_the_shards_deal_evenly(layouts):
    """StreamedSplits.worker_batches: files dealt largest first to the worker with the fewest
    rows; FILE sharding only when every worker's rows are within 5 % (else None: DATA); an
    epoch is the steps of the worker with the fewest rows, at half the global batch."""
    import dataclasses

    _, shards = layouts
    stream = StreamData.scan(shards, SPEC)
    assert stream.file_rows[stream.files["train"][0]] == stream.rows("train")
    assert stream.worker_batches("train", 256, 2) is None  # one file, two workers
    assert stream.worker_batches("train", 256, 1) is None
    even = dataclasses.replace(stream, files={**stream.files, "train": ["a", "b", "c", "d"]},
                               file_rows={"a": 1000, "b": 990, "c": 1010, "d": 1000})
    _, steps = even.worker_batches("train", 256, 2)  # c + b = 2000 and a + d = 2000
    assert steps == 2000 // 128
    _, steps = even.worker_batches("train", 256, 2, kept=0.9)
    assert steps == 1800 // 128
    uneven = dataclasses.replace(even, file_rows={"a": 3000, "b": 100, "c": 100, "d": 100})
    assert uneven.worker_batches("train", 256, 2) is None


def test_compare_streams_and_matches_in_memory(layouts, tmp_path):
    """`mdmt compare --data shards:DIR`: the same table (popularity included), cold-start
    shares and relative-feedback groups as the same rows read into memory."""
    from mdmt_tf.cli import main

    plain, shards = layouts
    SPEC.to_yaml(tmp_path / "spec.yaml")
    flags = ["--spec", str(tmp_path / "spec.yaml"), "--models", "mlp", "--seeds", "1", "--epochs", "1",
             "--batch-size", "512", "--shuffle-buffer", "0", "--precision", "float32", "--param", "embedding_dim=4"]
    assert main(["compare", "--data", f"shards:{shards}", "--out", str(tmp_path / "s"), *flags]) == 0
    assert main(["compare", "--data", f"tfrecord:{plain}", "--out", str(tmp_path / "m"), *flags]) == 0
    streamed = json.loads((tmp_path / "s" / "compare.json").read_text())
    memory = json.loads((tmp_path / "m" / "compare.json").read_text())
    assert streamed["rows"] == memory["rows"] and set(streamed["table"]) == {"popularity", "mlp"}
    for model, row in memory["table"].items():
        for key, (mean, _) in row.items():
            assert streamed["table"][model][key][0] == pytest.approx(mean, abs=1e-6), (model, key)
    assert streamed["cold_start"] == pytest.approx(memory["cold_start"])
    assert streamed["relative_feedback"]["groups"] == memory["relative_feedback"]["groups"]


def test_evaluate_streams_the_shards(layouts, tmp_path):
    """`mdmt evaluate --data shards:DIR` scores the split batch by batch: the metrics of the
    in-memory path; an unknown domain names the shard, record and column."""
    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import train
    from mdmt_tf.training.serving_eval import evaluate_savedmodel

    plain, shards = layouts
    train(ModelConfig("mlp", {"embedding_dim": 4}), StreamData.scan(shards, SPEC),
          TrainConfig(epochs=1, batch_size=512), tmp_path / "run", verbose=0, plots=False)
    model = tmp_path / "run" / "model"
    for which in ("val", "test"):
        streamed, domains, _ = evaluate_savedmodel(model, f"shards:{shards}", which=which)
        memory, _, _ = evaluate_savedmodel(model, f"tfrecord:{plain}", which=which)
        assert streamed["count"] == memory["count"] and domains == ["0", "1", "2"]
        for key, value in memory["auc"].items():
            assert streamed["auc"][key] == pytest.approx(value, abs=1e-6), key

    bad = tmp_path / "bad"
    bad.mkdir()
    for split, table in random_split(generate(CONFIG), 0, "synthetic").items():
        table = table.head(100).copy()
        if split == "test":
            table.loc[table.index[41], SPEC.domain] = "9"
        write_tfrecord(table, bad / shard_name(split, 0, 1), SPEC)
    with pytest.raises(DataError, match=r"test-00000-of-00001.*row 42.*domain_id.*'9'"):
        evaluate_savedmodel(model, f"shards:{bad}", which="test")


def test_commands_that_do_not_stream_refuse_shards_in_one_line(layouts, tmp_path, capsys):
    from mdmt_tf.cli import main

    _, shards = layouts
    code = main(["data", "describe", "--data", f"shards:{shards}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sharded data is streamed by `mdmt train`" in err[0]
