"""`mdmt bench scale`'s large-vocabulary data: the same batches, ids spread over big tables."""
import numpy as np

from mdmt_tf.bench.scale import widen
from mdmt_tf.training.encoded import EncodedData


def test_widen_keeps_ids_distinct_in_range_and_oov_at_zero(small_data):
    enc = EncodedData.from_data(small_data)
    sizes = {"user_id": 10_000_000, "item_id": 1_000_000}
    wide = widen(enc, sizes)
    assert dict(wide.schema.sparse)["user_id"] == 10_000_000 and dict(wide.schema.sparse)["item_id"] == 1_000_000
    for split in ("train", "val", "test"):
        for name, size in sizes.items():
            before, after = np.asarray(enc.features[split][name]), np.asarray(wide.features[split][name])
            assert after.min() >= 0 and after.max() < size
            np.testing.assert_array_equal(after == 0, before == 0)
            # a one-to-one map: equal ids stay equal, distinct ids stay distinct
            pairs = set(zip(before.tolist(), after.tolist()))
            assert len(pairs) == len(set(before.tolist())) == len(set(after.tolist()))
        np.testing.assert_array_equal(wide.features[split]["domain_id"], enc.features[split]["domain_id"])
    assert after.max() > 100 * dict(enc.schema.sparse)["item_id"]  # spread over the table, not its first rows
