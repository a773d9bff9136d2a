"""Tests for maskax.data.segmentation: synthetic shapes, folder loader, crops, batch iterator."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from maskax.data import segmentation as seg

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def default_set():
  start = time.perf_counter()
  images, labels = seg.make_dataset(300, height=64, width=64, seed=0, num_classes=NUM_CLASSES)
  elapsed = time.perf_counter() - start
  print(f"make_dataset(300, 64x64): {elapsed:.2f}s")
  return images, labels, elapsed


def test_shapes_dtypes_ranges(default_set):
  images, labels, elapsed = default_set
  assert images.shape == (300, 64, 64, 3) and images.dtype == np.float32
  assert labels.shape == (300, 64, 64) and labels.dtype == np.uint8
  assert images.min() >= 0.0 and images.max() <= 1.0
  assert set(np.unique(labels)) <= set(range(NUM_CLASSES)) | {255}
  # Generous bound: the CI machine is shared; alone it takes well under a second.
  assert elapsed < 10.0


def test_deterministic_per_seed():
  a = seg.make_dataset(8, height=24, width=32, seed=3)
  b = seg.make_dataset(8, height=24, width=32, seed=3)
  c = seg.make_dataset(8, height=24, width=32, seed=4)
  assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
  assert not np.array_equal(a[1], c[1])


def test_class_frequency_profile(default_set):
  _, labels, _ = default_set
  freq = seg.class_frequencies(labels, NUM_CLASSES)
  print(f"class frequencies: {np.round(freq, 4)}")
  assert 0.70 <= freq[0] <= 0.80  # background, about VOC's three quarters
  assert np.all(np.diff(freq[1:]) < 0)  # object classes from common to rare
  assert freq[-1] < 0.01  # the rarest class is rare ...
  per_image = [(labels == c).any(axis=(1, 2)).mean() for c in range(NUM_CLASSES)]
  assert min(per_image) > 0.1  # ... but present in a good share of images
  assert freq[1] / freq[-1] > 10  # a long tail


def test_ignore_band_is_exactly_the_boundary():
  _, plain = seg.make_dataset(20, height=32, width=32, seed=1, ignore_width=0)
  _, banded = seg.make_dataset(20, height=32, width=32, seed=1, ignore_width=1)
  assert not np.any(plain == 255)
  # A pixel is on the boundary when one of its 4 in-image neighbours has another label.
  boundary = np.zeros(plain.shape, bool)
  boundary[:, 1:] |= plain[:, 1:] != plain[:, :-1]
  boundary[:, :-1] |= plain[:, 1:] != plain[:, :-1]
  boundary[:, :, 1:] |= plain[:, :, 1:] != plain[:, :, :-1]
  boundary[:, :, :-1] |= plain[:, :, 1:] != plain[:, :, :-1]
  np.testing.assert_array_equal(banded, np.where(boundary, 255, plain))
  assert 0.03 < boundary.mean() < 0.2


def test_class_frequencies_counts_and_errors():
  labels = np.array([[0, 0, 1, 255], [2, 255, 0, 1]], np.uint8)
  np.testing.assert_array_equal(seg.class_frequencies(labels, 4, normalize=False), [3, 2, 1, 0])
  np.testing.assert_allclose(seg.class_frequencies(labels, 4), [0.5, 1 / 3, 1 / 6, 0.0])
  np.testing.assert_array_equal(seg.class_frequencies(np.full((2, 2), 255), 3), np.zeros(3))
  with pytest.raises(ValueError, match="num_classes"):
    seg.class_frequencies(labels, 2)


def test_make_dataset_rejects_bad_num_classes():
  with pytest.raises(ValueError, match="num_classes"):
    seg.make_dataset(2, num_classes=seg.MAX_CLASSES + 1)


def _write_folder(root, names, size=(6, 5), label_mode="P"):
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  rng = np.random.default_rng(0)
  images, labels = [], []
  for name in names:
    img = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
    lab = rng.integers(0, 3, size=size, dtype=np.uint8)
    lab[0, :] = 255
    Image.fromarray(img).save(root / "images" / name)
    im = Image.fromarray(lab)  # mode L
    if label_mode == "P":  # VOC-style: indices plus a colour palette
      im = Image.frombytes("P", lab.shape[::-1], lab.tobytes())
      im.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
    elif label_mode == "RGB":
      im = im.convert("RGB")
    im.save(root / "labels" / name)
    images.append(img)
    labels.append(lab)
  return np.stack(images), np.stack(labels)


def test_load_folder_round_trip(tmp_path):
  images, labels = _write_folder(tmp_path, ["b.png", "a.png"])
  got_images, got_labels = seg.load_folder(str(tmp_path), num_classes=3)
  order = [1, 0]  # files are read in sorted order
  np.testing.assert_allclose(got_images, images[order] / 255.0, atol=1e-7)
  np.testing.assert_array_equal(got_labels, labels[order])
  assert got_images.dtype == np.float32 and got_labels.dtype == np.uint8


def test_load_folder_greyscale_labels(tmp_path):
  _, labels = _write_folder(tmp_path, ["x.png"], label_mode="L")
  np.testing.assert_array_equal(seg.load_folder(str(tmp_path))[1], labels)


def test_load_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="not a folder"):
    seg.load_folder(str(tmp_path / "nope"))
  (tmp_path / "empty" / "images").mkdir(parents=True)
  with pytest.raises(ValueError, match="missing folder"):
    seg.load_folder(str(tmp_path / "empty"))
  (tmp_path / "empty" / "labels").mkdir()
  with pytest.raises(ValueError, match="no .png files"):
    seg.load_folder(str(tmp_path / "empty"))
  _write_folder(tmp_path / "names", ["a.png", "b.png"])
  (tmp_path / "names" / "labels" / "b.png").rename(tmp_path / "names" / "labels" / "c.png")
  with pytest.raises(ValueError, match=r"names must match.*b\.png.*c\.png"):
    seg.load_folder(str(tmp_path / "names"))
  _write_folder(tmp_path / "sizes", ["a.png"])
  Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(tmp_path / "sizes" / "images" / "a.png")
  with pytest.raises(ValueError, match="image size"):
    seg.load_folder(str(tmp_path / "sizes"))
  _write_folder(tmp_path / "mixed", ["a.png"])
  _write_folder(tmp_path / "mixed2", ["b.png"], size=(4, 4))
  for sub in ("images", "labels"):
    (tmp_path / "mixed2" / sub / "b.png").rename(tmp_path / "mixed" / sub / "b.png")
  with pytest.raises(ValueError, match="share one size"):
    seg.load_folder(str(tmp_path / "mixed"))
  _write_folder(tmp_path / "rgb", ["a.png"], label_mode="RGB")
  with pytest.raises(ValueError, match="palette"):
    seg.load_folder(str(tmp_path / "rgb"))
  _write_folder(tmp_path / "range", ["a.png"])
  with pytest.raises(ValueError, match="num_classes"):
    seg.load_folder(str(tmp_path / "range"), num_classes=2)


def _coordinate_set(n=10, height=9, width=11):
  """Labels encode (image, y, x) so a crop reveals where it came from."""
  idx = np.arange(n * height * width, dtype=np.int32).reshape(n, height, width)
  images = np.stack([idx, -idx, 2 * idx], axis=-1).astype(np.float32)
  return images, idx


def test_random_crops_are_windows_of_their_image():
  images, labels = _coordinate_set()
  crops_i, crops_l = seg.random_crops(7, images, labels, (4, 5))
  assert crops_i.shape == (10, 4, 5, 3) and crops_l.shape == (10, 4, 5)
  for k in range(10):
    n, y, x = np.unravel_index(crops_l[k, 0, 0], labels.shape)
    assert n == k
    np.testing.assert_array_equal(crops_l[k], labels[k, y : y + 4, x : x + 5])
    np.testing.assert_array_equal(crops_i[k], images[k, y : y + 4, x : x + 5])
  again = seg.random_crops(np.random.default_rng(7), images, labels, (4, 5))
  np.testing.assert_array_equal(again[1], crops_l)
  # Every offset is reachable: 400 crops of one 9x11 image hit all 6 x 7 windows.
  one_i, one_l = np.repeat(images[:1], 400, 0), np.repeat(labels[:1], 400, 0)
  offsets = {divmod(int(v), 11) for v in seg.random_crops(0, one_i, one_l, (4, 5))[1][:, 0, 0]}
  assert offsets == {(y, x) for y in range(6) for x in range(7)}
  with pytest.raises(ValueError, match="crop"):
    seg.random_crops(0, images, labels, 12)


@pytest.mark.parametrize("crop", [None, 4])
def test_iterator_resumes_exactly(crop):
  images, labels = _coordinate_set()
  kw = dict(batch_size=4, seed=5, crop=crop, process_index=0, process_count=1)
  it = seg.SegmentationBatches(images, labels, **kw)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]  # crosses epoch boundaries (2 steps per epoch)
  resumed = seg.SegmentationBatches(images, labels, **kw)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == {"image", "label"}
    assert got["label"].dtype == np.int32 and got["image"].dtype == np.float32
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_iterator_epoch_is_a_permutation_and_epochs_differ():
  images, labels = _coordinate_set()
  it = seg.SegmentationBatches(
    images, labels, batch_size=5, seed=0, process_index=0, process_count=1
  )
  epochs = [[next(it)["label"][:, 0, 0] // 99 for _ in range(2)] for _ in range(2)]
  firsts = [np.concatenate(e) for e in epochs]
  assert sorted(firsts[0]) == list(range(10)) and sorted(firsts[1]) == list(range(10))
  assert not np.array_equal(firsts[0], firsts[1])


@pytest.mark.parametrize("crop", [None, (3, 6)])
def test_process_shards_tile_the_global_batch(crop):
  images, labels = _coordinate_set()

  def batches(index, count):
    it = seg.SegmentationBatches(
      images, labels, batch_size=4, seed=2, crop=crop, process_index=index, process_count=count
    )
    return [next(it) for _ in range(3)]

  full = batches(0, 1)
  shards = [batches(p, 2) for p in range(2)]
  for step in range(3):
    for key in ("image", "label"):
      joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
      np.testing.assert_array_equal(joined, full[step][key])
    assert shards[0][step]["label"].shape[0] == 2


def test_iterator_errors():
  images, labels = _coordinate_set()
  with pytest.raises(ValueError, match="divisible by process_count"):
    seg.SegmentationBatches(images, labels, batch_size=3, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    seg.SegmentationBatches(images, labels, batch_size=11, process_index=0, process_count=1)
  it = seg.SegmentationBatches(
    images, labels, batch_size=2, seed=1, process_index=0, process_count=1
  )
  with pytest.raises(ValueError, match="seed"):
    it.set_state({"step": 3, "seed": 2, "batch_size": 2})
