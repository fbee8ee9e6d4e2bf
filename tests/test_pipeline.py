"""grain train streams and eval batches over real ArrayRecords (CS-DFD streams O and S)."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
from test_builder import write_store

from csdfd_jax.data import builder, demo, pipeline, store

SIZE = 16  # stored crops are 32 px: every batch goes through the resize
B = 6  # per stream: 3 reals + 3 fakes
# train: 7 reals (every 5th crop without landmarks) : 24 fakes, an imbalanced split like FF++.
GROUPS = [
  ("toy", "train", 0, "real", 7, 1),
  ("toy", "train", 1, "swap", 4, 3),
  ("toy", "train", 1, "reenact", 4, 3),
  ("toy", "test", 0, "real", 3, 3),
  ("toy", "test", 1, "swap", 2, 3),
  ("other", "test", 1, "swap", 1, 2),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  crops = write_store(root / "store", GROUPS, no_landmarks_every=5, masks=True)
  return builder.build_records(root / "store", root / "rec", num_shards=2), crops


def marking_sbi(image, landmarks, rng, *, size):
  """Stand-in SBI: fake = 255 - real, so a fake names its real; pixel (0, 0) of both carries
  three draws of ``rng`` (determinism of the per-example rng shows in the batch)."""
  assert len(landmarks) == 68
  real = pipeline.resize_face(image, size).copy()
  fake = 255 - real
  real[0, 0] = fake[0, 0] = rng.integers(0, 256, 3)
  return real, fake


def crop_id(image: np.ndarray) -> int:
  """The store crop a (solid colour, possibly resized/flipped) image came from."""
  r, g = image[SIZE // 2, SIZE // 2, :2].astype(int)
  return r + 256 * g


def batches(it, n):
  return [next(it) for _ in range(n)]


def assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for s in x:
      for k in x[s]:
        np.testing.assert_array_equal(x[s][k], y[s][k])


def train(data, **kw):
  kw = {"batch_size": B, "image_size": SIZE, "seed": 3, "sbi_fn": marking_sbi} | kw
  return pipeline.train_iterator(data[0], **kw)


def test_streams_shapes_balance_and_pairing(data, caplog):
  out, crops = data
  with caplog.at_level(logging.WARNING), train(data) as it:
    steps = batches(it, 8)
  no_lmk = [k for k, r in crops.items() if r.split == "train" and r.label == 0 and not r.landmarks]
  assert len(no_lmk) == 1
  assert "1 real crops without landmarks skipped" in caplog.text
  train_reals = {k for k, r in crops.items() if r.split == "train" and r.label == 0}
  train_fakes = {k for k, r in crops.items() if r.split == "train" and r.label == 1}
  seen = collections.Counter()
  for step in steps:
    assert step.keys() == {"o", "s"}
    for s in "os":
      assert step[s]["image"].shape == (B, SIZE, SIZE, 3) and step[s]["image"].dtype == np.uint8
      assert step[s]["label"].dtype == np.int32
      np.testing.assert_array_equal(step[s]["label"], [0, 1] * (B // 2))
    ids = [crop_id(x) for x in step["o"]["image"]]
    assert set(ids[0::2]) <= train_reals and set(ids[1::2]) <= train_fakes
    seen.update(ids[1::2])
    real, fake = step["s"]["image"][0::2], step["s"]["image"][1::2]
    assert {crop_id(x) for x in real} <= train_reals - set(no_lmk)
    np.testing.assert_array_equal(real[:, 1:], 255 - fake[:, 1:])  # each fake from its real
    np.testing.assert_array_equal(real[:, 0, 0], fake[:, 0, 0])
  # Fakes walk epochs: 8 steps x 3 = 24 = every fake exactly once.
  assert seen == dict.fromkeys(train_fakes, 1)
  # The two streams draw their reals independently.
  o_reals = [crop_id(x) for st in steps for x in st["o"]["image"][0::2]]
  s_reals = [crop_id(x) for st in steps for x in st["s"]["image"][0::2]]
  assert o_reals != s_reals


def test_streams_alone_and_filters(data):
  with train(data, streams=("s",)) as it:
    step = next(it)
  assert step.keys() == {"s"}
  with train(data, streams=("o",), fake_domains=("reenact",)) as it:
    steps = batches(it, 4)
  assert all(s.keys() == {"o"} for s in steps)
  crops = data[1]
  domains = {crops[crop_id(x)].domain for s in steps for x in s["o"]["image"][1::2]}
  assert domains == {"reenact"}
  with pytest.raises(ValueError, match="unknown domain"):
    train(data, fake_domains=("faceswap",))
  with pytest.raises(ValueError, match="even"):
    train(data, batch_size=5)


def test_deterministic_per_seed_and_sharded_like_one_host(data):
  with train(data) as a, train(data) as b, train(data, seed=4) as c:
    first, again, other = batches(a, 3), batches(b, 3), batches(c, 3)
  assert_equal_batches(first, again)
  assert not np.array_equal(first[0]["o"]["image"], other[0]["o"]["image"])
  # Two hosts with B each see exactly the global batch of one host with 2B.
  with train(data, batch_size=2 * B) as one:
    whole = batches(one, 3)
  hosts = []
  for h in range(2):
    with train(data, shard_index=h, shard_count=2) as it:
      hosts.append(batches(it, 3))
  for t in range(3):
    for s in "os":
      for k in ("image", "label"):
        joined = np.concatenate([hosts[0][t][s][k], hosts[1][t][s][k]])
        np.testing.assert_array_equal(joined, whole[t][s][k])


def test_state_restores_bitwise(data):
  n, m = 3, 4
  with train(data) as it:
    batches(it, n)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    expected = batches(it, m)
  with train(data) as fresh:
    fresh.set_state(state)
    assert_equal_batches(batches(fresh, m), expected)
  with train(data, seed=9) as other, pytest.raises(ValueError, match="batch plan"):
    other.set_state(state)


def test_worker_count_does_not_change_batches(data):
  with train(data) as it:
    expected = batches(it, 5)
  with train(data, worker_count=2) as it:
    got = batches(it, 2)
    state = it.get_state()
    got += batches(it, 3)
  assert_equal_batches(got, expected)
  with train(data, worker_count=1) as it:  # a state restores under any worker count
    it.set_state(state)
    assert_equal_batches(batches(it, 3), expected[2:])


def test_default_sbi_runs(data):
  with train(data, sbi_fn=pipeline.sbi_pair, streams=("s",)) as it:
    step = next(it)
  assert step["s"]["image"].shape == (B, SIZE, SIZE, 3)
  assert not np.array_equal(step["s"]["image"][0], step["s"]["image"][1])


def test_eval_every_record_once_with_padding(data):
  out, crops = data
  test = {k: r for k, r in crops.items() if r.split == "test"}
  batch = 4
  with pipeline.eval_iterator(out, "test", batch_size=batch, image_size=SIZE) as it:
    got = list(it)
  assert len(got) == -(-len(test) // batch)
  valid = np.concatenate([b["valid"] for b in got])
  assert valid.sum() == len(test)
  assert valid[: len(test)].all() and not valid[len(test) :].any()
  keys, ids = [], []
  for b in got:
    assert b["image"].shape == (batch, SIZE, SIZE, 3) and b["media_id"].dtype.kind == "U"
    for i in np.flatnonzero(b["valid"]):
      keys.append((str(b["dataset"][i]), str(b["media_id"][i]), int(b["frame_index"][i])))
      ids.append(crop_id(b["image"][i]))
      assert int(b["label"][i]) == crops[ids[-1]].label
      assert int(b["face_index"][i]) == 0
    pad = ~b["valid"]
    assert (b["label"][pad] == -1).all() and (b["media_id"][pad] == "").all()
    assert (b["image"][pad] == 0).all()
  assert sorted(ids) == sorted(test)  # every record exactly once
  assert keys == sorted(keys)  # ordered: a video's frames are contiguous
  assert [(test[k].dataset, test[k].media_id, test[k].frame_index) for k in ids] == keys
  with pipeline.eval_iterator(
    out, "test", batch_size=batch, image_size=SIZE, datasets=["other"]
  ) as it:
    only = list(it)
  assert len(only) == 1 and only[0]["valid"].sum() == 2
  assert set(only[0]["dataset"][only[0]["valid"]]) == {"other"}


def test_demo_store_with_real_sbi(tmp_path):
  """End to end on the procedural demo store: stream S pairs are exactly ``sbi_pair`` of the
  drawn reals under the documented per-example rng; eval covers the unseen domain."""
  store_dir = demo.make_demo_store(tmp_path / "demo", size=64, train=4, val=0, test=2, unseen=2)
  out = builder.build_records(store_dir, tmp_path / "rec")
  with pipeline.train_iterator(out, batch_size=4, image_size=48, seed=0) as it:
    steps = batches(it, 2)
  plan = pipeline.TrainBatches(
    pipeline.Records(out, "train"), streams=("s",), batch_size=4, image_size=48, seed=0
  )
  for t, step in enumerate(steps):
    assert step["o"]["image"].shape == step["s"]["image"].shape == (4, 48, 48, 3)
    for i, (index, rng) in enumerate(plan.draw("s_real", t)):
      (rec,) = plan.records.read([index])
      real, fake = pipeline.sbi_pair(rec["image"], rec["landmarks"], rng, size=48)
      np.testing.assert_array_equal(step["s"]["image"][2 * i], real)
      np.testing.assert_array_equal(step["s"]["image"][2 * i + 1], fake)
      assert not np.array_equal(real, fake)
  with pipeline.eval_iterator(
    out, "test", batch_size=3, image_size=48, datasets=["demo_unseen"]
  ) as it:
    got = list(it)
  valid = np.concatenate([b["valid"] for b in got])
  domains = np.concatenate([b["domain"][b["valid"]] for b in got])
  unseen = [r for r in store.read_index(store_dir) if r.dataset == "demo_unseen"]
  assert valid.sum() == len(domains) == len(unseen) > 0
  assert sorted(domains) == sorted(r.domain for r in unseen)
