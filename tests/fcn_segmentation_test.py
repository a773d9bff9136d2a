"""experiments/fcn_segmentation.py: loss sampling at p = 1 is the full loss, ignored pixels never
count, the eval scores come from the right confusion matrix, and `smoke` trains and resumes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import launch_here, resume_to_six
from experiments import fcn_segmentation as fcn
from maskax.masking import metrics
from maskax.models import fcn as fcn_model
from maskax.training import evaluation, restore, sharding, train
from maskax.training.train_step import make_eval_step

C, B, H, W = 4, 2, 8, 8
SMOKE = "--config=experiments/fcn_segmentation.py:smoke"


def _tiny_config():
  config = fcn.get_config("smoke")
  config.data.num_classes = C
  return config


def _key(seed):
  # XLA:CPU compiles threefry draws slowly; rbg keeps these tests quick (the loop uses threefry).
  return jax.random.key(seed, impl="rbg")


def _labels(seed, shape=(B, H, W)):
  """Random labels with a block and scattered pixels set to 255 (ignore)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, size=shape)
  labels[0, :3, :3] = 255
  labels[rng.uniform(size=shape) < 0.2] = 255
  return labels.astype(np.int32)


@pytest.fixture(scope="module")
def model_and_params():
  model = fcn.make_model(_tiny_config())
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, H, W, 3)), train=False)["params"])(_key(0))
  # Noise on every weight, then class scores centred over some images, so that the untrained
  # net predicts several classes (a non-trivial confusion matrix for the eval test).
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(
    tree, [x + rng.normal(size=x.shape).astype(np.float32) for x in leaves]
  )
  images = jnp.asarray(rng.uniform(size=(8, H, W, 3)), jnp.float32)
  mean = model.apply({"params": params}, images, train=False).mean(axis=(0, 1, 2))
  params["score"]["bias"] = params["score"]["bias"] - mean
  return model, params


def test_modes_parse_and_raise_the_batch():
  assert fcn.parse_mode("loss_sampling_p0.25", 1.0) == ("loss_sampling", 0.25)
  assert fcn.parse_mode("loss_sampling", 0.5) == ("loss_sampling", 0.5)
  for mode, keep, match in [
    ("bogus", 1.0, "train.mode='bogus'"),
    ("full", 0.5, "only applies with train.mode=loss_sampling"),
    ("loss_sampling_p0.5", 0.25, "leave loss.keep_prob at 1.0"),
    ("loss_sampling_p0", 1.0, r"in \(0, 1\]"),
  ]:
    with pytest.raises(ValueError, match=match):
      fcn.parse_mode(mode, keep)
  config = fcn.get_config()
  labels = np.zeros((128, 64, 64), np.uint8)
  labels[:, :8] = 1
  expected = {
    "full": 16,
    "loss_sampling_p0.5": 32,
    "loss_sampling_p0.25": 64,
    "patchwise": 64,
    "class_weighted": 16,
    "class_sampled": 16,
  }
  for mode, batch in expected.items():
    config.train.mode = mode
    spec, got, crop = fcn.resolve(config, labels)
    assert got == batch, mode
    assert crop == (32 if mode == "patchwise" else None)
  config.train.mode, config.train.raise_batch = "loss_sampling_p0.25", False
  assert fcn.resolve(config, labels)[1] == 16
  config.train.mode = "class_weighted"
  weights = np.asarray(fcn.resolve(config, labels)[0].class_weights)
  assert weights[0] < weights[1] and np.all(weights[2:] == 0)  # absent classes weigh nothing


@pytest.mark.parametrize("normalization", ["token_mean", "batch_mean"])
def test_loss_sampling_at_p1_equals_the_full_loss_exactly(model_and_params, normalization):
  model, params = model_and_params
  batch = {
    "image": jnp.asarray(np.random.default_rng(2).uniform(size=(B, H, W, 3)), jnp.float32),
    "label": jnp.asarray(_labels(3)),
  }
  key = jax.random.key_data(jax.random.key(7))  # the loop's key type

  def run(mode, keep_prob):
    spec = fcn_model.LossSpec(mode=mode, normalization=normalization, keep_prob=keep_prob)
    loss = fcn_model.make_loss(model, spec)

    def objective(p):
      terms, aux, _ = loss(p, {}, batch, key, train=True)
      t, w = terms["xent"]
      return t / w, (terms, aux)

    # Eager: each op runs alone, so equal inputs give bitwise equal outputs; two separately
    # jitted programs may fuse a reduction differently and differ in the last bit.
    return jax.value_and_grad(objective, has_aux=True)(params)

  (full_loss, (full_terms, full_aux)), full_grads = run("full", 1.0)
  (samp_loss, (samp_terms, samp_aux)), samp_grads = run("loss_sampling", 1.0)
  assert float(full_aux["kept_fraction"][0]) == np.sum(_labels(3) != 255)
  for a, b in zip(
    jax.tree.leaves((full_loss, full_terms, full_aux, full_grads)),
    jax.tree.leaves((samp_loss, samp_terms, samp_aux, samp_grads)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (half_loss, (half_terms, _)), _ = run("loss_sampling", 0.5)
  if normalization == "token_mean":  # the sampled loss keeps about half the valid pixels
    assert 0.25 < float(half_terms["xent"][1]) / float(full_terms["xent"][1]) < 0.75


def _xent_ref(logits, labels):
  """Float64 mean cross-entropy over non-ignored pixels."""
  x = np.asarray(logits, np.float64)
  logp = (
    x
    - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - x.max(-1, keepdims=True)
  )
  ok = labels != 255
  nll = -np.take_along_axis(logp, np.where(ok, labels, 0)[..., None], -1)[..., 0]
  return nll[ok].sum(), ok.sum()


@pytest.mark.parametrize(
  "mode, keep_prob, sample_cell",
  [
    ("full", 1.0, 1),
    ("loss_sampling", 0.5, 1),
    ("loss_sampling", 0.5, 4),
    ("class_weighted", 1.0, 1),
    ("class_sampled", 1.0, 1),
  ],
)
def test_ignored_pixels_never_count(mode, keep_prob, sample_cell):
  spec = fcn_model.LossSpec(
    mode=mode,
    keep_prob=keep_prob,
    sample_cell=sample_cell,
    class_weights=(0.5, 1.0, 2.0, 3.0),
    class_keep_probs=(0.3, 1.0, 1.0, 1.0),
  )
  labels = _labels(4)
  ignored = labels == 255
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(B, H, W, C)).astype(np.float32)

  @jax.jit
  def total_weight_grad(logits, labels):
    f = lambda x: fcn_model.pixel_loss(x, labels, _key(9), spec, train=True)[0]["xent"]
    (t, w), vjp = jax.vjp(f, logits)
    return t, w, vjp((jnp.float32(1.0), jnp.float32(0.0)))[0]

  t, w, g = total_weight_grad(logits, labels)
  assert 0 < float(w) and np.isfinite(float(t))
  kept, valid = jax.jit(
    lambda x: fcn_model.pixel_loss(x, labels, _key(9), spec, train=True)[1]["kept_fraction"]
  )(logits)
  assert float(valid) == np.sum(~ignored)
  assert float(kept) == (np.sum(~ignored) if mode == "class_weighted" else float(w))
  for garbage in (np.nan, np.inf, -1e30):
    t2, w2, g2 = total_weight_grad(np.where(ignored[..., None], garbage, logits), labels)
    assert (float(t2), float(w2)) == (float(t), float(w))
    assert np.all(np.isfinite(g2)) and not np.any(np.asarray(g2)[ignored])
    np.testing.assert_array_equal(g2, g)
  if mode in ("full", "class_weighted"):  # deterministic masks: check against a reference
    total, count = _xent_ref(logits, labels)
    if mode == "class_weighted":
      pix_w = np.asarray(spec.class_weights)[np.where(ignored, 0, labels)] * ~ignored
      x = logits.astype(np.float64)
      logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
      nll = -np.take_along_axis(logp, np.where(ignored, 0, labels)[..., None], -1)[..., 0]
      total, count = (pix_w * np.where(ignored, 0, nll)).sum(), pix_w.sum()
    np.testing.assert_allclose(float(t), total, rtol=1e-5)
    np.testing.assert_allclose(float(w), count, rtol=1e-6)
  else:
    assert float(w) < np.sum(~ignored)
  # Nothing valid: exactly zero, with zero gradients, never NaN.
  t0, w0, g0 = total_weight_grad(logits, np.full_like(labels, 255))
  assert (float(t0), float(w0)) == (0.0, 0.0) and not np.any(g0)


def test_eval_scores_equal_scores_of_a_numpy_confusion_matrix(model_and_params):
  model, params = model_and_params
  n = 6  # two eval batches of 4, the second padded with repeated rows that must not count
  rng = np.random.default_rng(6)
  images = rng.uniform(size=(n, H, W, 3)).astype(np.float32)
  labels = _labels(7, (n, H, W)).astype(np.uint8)
  batches = evaluation.fixed_batches({"image": images, "label": labels}, 4)
  # The experiment's evaluation through the loop's own evaluator, on 2 devices.
  task = train.Task(
    init=None,
    loss=None,
    optimizer=None,
    train_data=None,
    eval_data=lambda: batches,
    eval_sums=fcn_model.make_eval_sums(model),
    eval_finish=fcn_model.eval_finish,
  )
  state = train.TrainState(
    step=jnp.int32(0), params=params, opt_state={}, model_state={}, key=_key(0)
  )
  got = make_eval_step(task, sharding.make_mesh(jax.devices()[:2]))(state)

  logits = np.asarray(model.apply({"params": params}, images, train=False))
  pred = logits.argmax(-1)
  ok = labels != 255
  conf = np.zeros((C, C), np.int64)
  np.add.at(conf, (labels[ok].astype(np.int64), pred[ok]), 1)
  assert len(np.unique(pred[ok])) > 1  # a non-trivial confusion matrix
  want = metrics.segmentation_scores(conf)
  for k in ("mean_iou", "pixel_acc", "mean_acc", "fw_iou"):
    assert got[k] == want[k], k
  total, count = _xent_ref(logits, labels)
  np.testing.assert_allclose(got["xent"], total / count, rtol=1e-5)


def test_fcn_runs_on_the_default_image_size():
  config = fcn.get_config()
  model = fcn.make_model(config)
  shape = (1, config.data.height, config.data.width, 3)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
  logits = jax.jit(lambda k, x: model.apply(model.init(k, x, train=False), x, train=False))(
    _key(0), x
  )
  assert logits.shape == shape[:3] + (config.data.num_classes,)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_folder_data_split(tmp_path):
  rng = np.random.default_rng(0)
  for sub in ("images", "labels"):
    os.makedirs(tmp_path / sub)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(
      tmp_path / "images" / f"{i}.png"
    )
    lab = rng.integers(0, 3, (12, 16), dtype=np.uint8)
    lab[0] = 255
    Image.fromarray(lab, mode="L").save(tmp_path / "labels" / f"{i}.png")
  config = fcn.get_config("smoke")
  config.data.path, config.data.num_classes, config.data.eval_fraction = str(tmp_path), 3, 0.2
  tr_x, tr_y, ev_x, ev_y = fcn.make_data(config)
  assert tr_x.shape == (4, 12, 16, 3) and ev_y.shape == (1, 12, 16)
  assert set(np.unique(np.concatenate([tr_y, ev_y]))) <= {0, 1, 2, 255}
  config.data.num_classes = 2  # label 2 is out of range: a clear error
  with pytest.raises(ValueError, match="num_classes"):
    fcn.make_data(config)


@pytest.mark.slow
def test_smoke_trains_checkpoints_resumes_and_predicts(tmp_path):
  work = str(tmp_path / "w")
  # In-process on 8 simulated devices: a held-out batch of 8, a row per device.
  args = (
    SMOKE,
    f"--workdir={work}",
    "--config.train.mode=loss_sampling_p0.5",
    "--config.data.eval_batch_size=8",
  )
  first = launch_here(*args, check=True)
  assert "eval/mean_iou" in first.stdout
  assert os.path.isdir(os.path.join(work, "checkpoints", "4"))
  assert os.path.getsize(os.path.join(work, "predictions.png")) > 1000
  records = resume_to_six(args, work)
  kept = [r["kept_fraction"] for r in records if "kept_fraction" in r]
  assert all(0.2 < k < 0.8 for k in kept)  # p = 0.5 really sampled the loss
  # --predict with the default preset's config: the run's own (smoke: stride 4, 6 classes) is
  # used, so a 16x16 image passes (the default net's stride is 32). Nothing goes into the run.
  record = ("config.json", "metrics.jsonl")
  before = {p: open(os.path.join(work, p)).read() for p in record}
  _write_png(tmp_path / "in" / "a.png", (16, 20, 3))
  (tmp_path / "lines.txt").write_text(f"{tmp_path / 'in'}\n")
  proc = launch_here(
    "--config=experiments/fcn_segmentation.py",
    f"--workdir={work}",
    f"--predict={tmp_path / 'lines.txt'}",
    cwd=str(tmp_path),
    check=True,
  )
  (out,) = [json.loads(line) for line in proc.stdout.splitlines()]
  assert out["labels"] == os.path.join("predictions", "a_labels.png")
  assert np.asarray(Image.open(tmp_path / out["labels"])).shape == (16, 20)
  assert len(out["class_pixels"]) == 6 and sum(out["class_pixels"]) == 16 * 20
  assert before == {p: open(os.path.join(work, p)).read() for p in record}
  assert not any(n.endswith(".png") and n != "predictions.png" for n in os.listdir(work))
  proc = launch_here(
    "--config=experiments/fcn_segmentation.py",
    f"--workdir={work}",
    f"--predict={tmp_path / 'lines.txt'}",
    f"--predict_out={work}/out",
  )
  assert proc.returncode == 1 and "lies in the workdir" in proc.stderr
  (tmp_path / "blank.txt").write_text("\n  \n")
  proc = launch_here(
    "--config=experiments/fcn_segmentation.py",
    f"--workdir={work}",
    f"--predict={tmp_path / 'blank.txt'}",
  )
  assert proc.returncode == 1 and "blank.txt holds no input lines" in proc.stderr


def _write_png(path, shape, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(len(str(path))).integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(pixels, mode=mode).save(path)
  return str(path)


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fcn_trained"))
  config = fcn.get_config("smoke")
  config.train.batch_size = config.data.eval_batch_size = 8  # a row per simulated device
  fcn.run(config, workdir)
  return config, workdir


def test_predict_writes_class_id_and_overlay_pngs(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  one = _write_png(tmp_path / "one.png", (16, 16, 3))
  _write_png(tmp_path / "folder" / "two.png", (12, 20, 3))  # any size: fully convolutional
  Image.open(one).save(tmp_path / "folder" / "three.jpg")
  out = fcn.predict(config, workdir, [one, str(tmp_path / "folder")], out_dir=str(tmp_path / "out"))
  assert [os.path.basename(o["image"]) for o in out] == ["one.png", "three.jpg", "two.png"]
  model = fcn.make_model(config)
  params = restore.restore_params(workdir).params
  for o in out:
    image = np.asarray(Image.open(o["image"]).convert("RGB"), np.float32) / 255.0
    with Image.open(o["labels"]) as im:
      assert im.mode == "P"  # class ids as pixel values, shown in the VOC colours
      labels = np.asarray(im)
    want = np.argmax(model.apply({"params": params}, image[None], train=False), -1)[0]
    np.testing.assert_array_equal(labels, want)
    assert o["class_pixels"] == np.bincount(labels.ravel(), minlength=6).tolist()
    with Image.open(o["overlay"]) as im:
      assert im.mode == "RGB" and im.size == labels.shape[::-1]
      overlay = np.asarray(im)
    background = labels == 0  # kept as it was; classes tinted
    np.testing.assert_array_equal(overlay[background], np.round(image[background] * 255))


def test_predict_input_errors_are_one_line(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  run = lambda *lines: fcn.predict(config, workdir, list(lines), out_dir=str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="missing.png: no such file or folder"):
    run(str(tmp_path / "missing.png"))
  with pytest.raises(ValueError, match=r"grey.png: 1 channel\(s\) \(mode L\); expected an RGB"):
    run(_write_png(tmp_path / "grey.png", (8, 8), mode="L"))
  with pytest.raises(ValueError, match=r"rgba.png: 4 channel\(s\) \(mode RGBA\)"):
    run(_write_png(tmp_path / "rgba.png", (8, 8, 4)))
  with pytest.raises(ValueError, match=r"tiny.png: 2x3 pixels; expected at least 4x4"):
    run(_write_png(tmp_path / "tiny.png", (2, 3, 3)))
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match="notes.txt: unsupported file type"):
    run(str(tmp_path / "notes.txt"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="empty: a folder without image files"):
    run(str(tmp_path / "empty"))
  _write_png(tmp_path / "a" / "x.png", (8, 8, 3))
  _write_png(tmp_path / "b" / "x.png", (8, 8, 3))
  with pytest.raises(ValueError, match="would write the same outputs"):
    run(str(tmp_path / "a"), str(tmp_path / "b"))
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    fcn.predict(config, str(tmp_path), [str(tmp_path / "a")], out_dir=str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # nothing written before the inputs are checked
