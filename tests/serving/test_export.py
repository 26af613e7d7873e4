"""publish_version / `mdmt export` into a TF Serving base path: concurrent publishers each
get their own version (they once collided with a raw OSError), every version appears
complete or not at all, with ordinary permissions, and nothing is left behind."""
from __future__ import annotations

import os
import stat
import threading

import pytest

from mdmt_tf.errors import ConfigError

PUBLISHERS = 8


def _publish_concurrently(models, base, count: int) -> tuple[list, list]:
    from mdmt_tf.export.savedmodel import publish_version

    start = threading.Barrier(count)
    results, errors = [None] * count, []

    def publish(i):
        start.wait()
        try:
            results[i] = publish_version(models[1 + i % 2], base)
        except Exception as err:  # noqa: BLE001 - the test reports whatever a publisher hit
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, errors


def test_concurrent_exports_get_distinct_versions(models, tmp_path):
    base = tmp_path / "mdmt"
    results, errors = _publish_concurrently(models, base, PUBLISHERS)
    assert not errors
    assert sorted(int(p.name) for p in results) == list(range(1, PUBLISHERS + 1))
    for path in results:
        assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
        assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert sorted(os.listdir(base)) == sorted(str(v) for v in range(1, PUBLISHERS + 1)), "no claims or temp dirs left"


def test_concurrent_exports_next_to_existing_versions(models, tmp_path):
    from mdmt_tf.export.savedmodel import publish_version, versions

    base = tmp_path / "mdmt"
    publish_version(models[1], base, version=5)
    results, errors = _publish_concurrently(models, base, 4)
    assert not errors and sorted(int(p.name) for p in results) == [6, 7, 8, 9]
    assert versions(base) == [5, 6, 7, 8, 9]


def test_a_taken_version_is_refused_and_an_abandoned_claim_is_skipped(models, tmp_path):
    from mdmt_tf.export.savedmodel import publish_version

    base = tmp_path / "mdmt"
    publish_version(models[1], base)
    with pytest.raises(ConfigError, match="exists already"):
        publish_version(models[1], base, version=1)
    (base / ".2.claim").mkdir()  # a publisher copying version 2 (or one that crashed)
    with pytest.raises(ConfigError, match="being published"):
        publish_version(models[1], base, version=2)
    assert publish_version(models[1], base).name == "3"


def test_published_versions_have_ordinary_permissions(models, tmp_path):
    from mdmt_tf.export.savedmodel import publish_version

    path = publish_version(models[1], tmp_path / "mdmt")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE(models[1].stat().st_mode), oct(mode)  # readable by a server run as another user


def test_a_failed_copy_leaves_nothing_behind(models, tmp_path, monkeypatch):
    import shutil

    from mdmt_tf.export import savedmodel

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken)
    base = tmp_path / "mdmt"
    with pytest.raises(OSError, match="disk full"):
        savedmodel.publish_version(models[1], base)
    assert os.listdir(base) == []
