"""experiments/padded_gru.py: the fully masked model ignores padding (amount and contents), the
plain ones do not; Keras' value rule differs from lengths exactly on real all-zero steps; the
loss counts what the variant says; `smoke` trains, checkpoints and resumes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import launch_here, resume_to_six
from experiments import padded_gru as pg
from maskax.masking import masks
from maskax.data import synthetic
from maskax.models import padded_gru

B, T, F = 4, 12, 4
LENGTHS = np.array([12, 7, 3, 5], np.int32)  # the first row touches T at pad1x
GARBAGE = (0.0, np.nan, 1e3)
SMOKE = "--config=experiments/padded_gru.py:smoke"


def _model(variant):
  return padded_gru.PaddedGRUClassifier(
    pg.VARIANTS[variant], hidden=8, conv_layers=2, conv_features=4, conv_kernel=3
  )


def _padded(x, steps, fill):
  """x f32[B, T, F] (valid up to LENGTHS) padded to `steps`, `fill` at every invalid step."""
  x = np.pad(x, ((0, 0), (0, steps - x.shape[1]), (0, 0)))
  valid = np.arange(steps)[None] < LENGTHS[:, None]
  return np.where(valid[..., None], x, fill).astype(np.float32), valid


@pytest.fixture(scope="module")
def setups():
  """Per variant: (model, params, model_state with non-trivial BN statistics, predict)."""
  x = np.random.default_rng(0).normal(size=(B, T, F)).astype(np.float32)
  x_pad, valid = _padded(x, T, 0.0)
  out = {}
  for variant in ("fully_masked", "plain_bn", "plain_conv", "unmasked"):
    model = _model(variant)
    variables = model.init(jax.random.key(1), x_pad, valid, train=False)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    state = padded_gru.apply(model, params, state, x_pad * 2.0 + 1.0, valid, train=True)[2]

    def predict(params, state, x, mask, train, model=model):
      return jax.nn.softmax(padded_gru.apply(model, params, state, x, mask, train=train)[1])

    out[variant] = (model, params, state, jax.jit(predict, static_argnums=4))
  return x, out


def _drift(setups, variant, *, train, pads=(2, 4), garbage=GARBAGE):
  """Largest change of a predicted probability against pad1x with zero padding."""
  x, models = setups
  _, params, state, predict = models[variant]
  ref = predict(params, state, *_padded(x, T, 0.0), train)
  worst = 0.0
  for factor in (1,) + pads:
    for fill in garbage:
      p = predict(params, state, *_padded(x, factor * T, fill), train)
      worst = max(worst, float(jnp.max(jnp.abs(p - ref))))
  return worst


@pytest.mark.parametrize("train", [False, True])
def test_fully_masked_predictions_ignore_padding_amount_and_contents(setups, train):
  assert _drift(setups, "fully_masked", train=train) < 1e-5


def test_plain_bn_predictions_move_with_the_padding_amount(setups):
  # Batch statistics over every position: the padding share changes the normalisation.
  assert _drift(setups, "plain_bn", train=True, garbage=(0.0,)) > 1e-3
  # With running statistics BN is one fixed affine map and the frozen carry ignores padded
  # steps, so inference is invariant (as the experiment measures: eval/drift_pad4x = 0).
  assert _drift(setups, "plain_bn", train=False, garbage=(0.0,)) < 1e-5


def test_running_statistics_see_padding_only_in_plain_bn(setups):
  x, models = setups
  means = {}
  for variant in ("fully_masked", "plain_bn"):
    model, params, state, _ = models[variant]
    means[variant] = [
      padded_gru.apply(model, params, state, *_padded(x, k * T, 0.0), train=True)[2]["batch_stats"][
        "bn"
      ]["mean"]
      for k in (1, 4)
    ]
  np.testing.assert_allclose(*means["fully_masked"], atol=1e-6)
  assert float(jnp.max(jnp.abs(means["plain_bn"][0] - means["plain_bn"][1]))) > 1e-3


def test_plain_conv_and_unmasked_read_the_padding(setups):
  # A plain conv reads the padding's contents (and its own bias written there).
  assert _drift(setups, "plain_conv", train=False, pads=(), garbage=(1e3,)) > 1e-3
  # No state mask: the GRU runs through the padded steps.
  assert _drift(setups, "unmasked", train=False, garbage=(0.0,)) > 1e-3


def test_keras_rule_differs_from_lengths_exactly_on_real_zero_steps():
  seqs = synthetic.drift_recall_sequences(
    np.random.default_rng(3), 64, max_length=40, blackout_prob=0.5, blackout_max=3
  )
  explicit = np.asarray(masks.sequence_mask(seqs["lengths"], 40))
  keras = np.asarray(masks.mask_from_value(seqs["x"]))
  t = np.arange(40)[None]
  start, steps = seqs["blackout_start"][:, None], seqs["blackout_steps"][:, None]
  dark = (t >= start) & (t < start + steps)
  np.testing.assert_array_equal(explicit & ~keras, dark)  # the only disagreements
  assert not np.any(keras & ~explicit)  # padding is masked by both
  rows = np.any(explicit != keras, axis=1)
  np.testing.assert_array_equal(rows, seqs["blackout_steps"] > 0)
  assert 0 < rows.sum() < 64
  # A trailing blackout makes the Keras mask a shorter sequence, not a hole.
  trailing = seqs["blackout_start"] + seqs["blackout_steps"] == seqs["lengths"]
  np.testing.assert_array_equal(
    masks.lengths_from_mask(jnp.asarray(keras))[trailing & rows],
    (seqs["lengths"] - seqs["blackout_steps"])[trailing & rows],
  )


def test_loss_counts_valid_steps_only_when_masked(setups):
  x, models = setups
  x_pad, _ = _padded(x, 2 * T, 0.0)
  labels = np.random.default_rng(2).integers(0, pg.CLASSES, size=(B, 2 * T)).astype(np.int32)
  batch = {"x": x_pad, "labels": labels, "lengths": LENGTHS}
  garbage = dict(batch, labels=np.where(np.arange(2 * T)[None] < LENGTHS[:, None], labels, 3))
  for variant, weight in (("fully_masked", LENGTHS.sum()), ("unmasked", B * 2 * T)):
    model, params, state, _ = models[variant]
    loss = jax.jit(lambda p, b, loss=pg.make_loss(model): loss(p, state, b, None, train=False))
    terms, metrics, _ = loss(params, batch)
    assert float(terms["xent"][1]) == weight
    assert float(metrics["acc"][1]) == B
    changed = float(loss(params, garbage)[0]["xent"][0]) != float(terms["xent"][0])
    assert changed == (variant == "unmasked")  # padded labels count only when unmasked


def test_eval_sums_count_real_rows_and_see_no_drift_when_fully_masked(setups):
  """The experiment's held-out sums on one batch with a filler row: accuracy counts real rows
  only; drift is float noise for the fully masked model and large for the unmasked one."""
  x, models = setups
  x_pad, _ = _padded(x, T, 0.0)
  labels = np.random.default_rng(4).integers(0, pg.CLASSES, size=(B, T)).astype(np.int32)
  batch = {
    "x": x_pad,
    "labels": labels,
    "lengths": LENGTHS,
    "valid": np.array([True, True, True, False]),
  }
  final = labels[np.arange(B), LENGTHS - 1]
  for variant in ("fully_masked", "unmasked"):
    model, params, state, predict = models[variant]
    sums = jax.jit(pg.make_eval_sums(model, (1, 2, 4)))(params, state, batch, None)
    pred = np.asarray(predict(params, state, x_pad, np.arange(T)[None] < LENGTHS[:, None], False))
    correct = (pred.argmax(-1) == final)[:3].sum()
    assert [float(v) for v in sums["acc_pad1x"]] == [correct, 3.0]
    drift = float(sums["drift_pad4x"].value)
    assert drift < 1e-6 if variant == "fully_masked" else drift > 1e-3, (variant, drift)
    # No real all-zero steps in x: Keras' value rule finds exactly the lengths' mask.
    assert float(sums["keras_drift"].value) < 1e-6


def test_classifier_reads_the_carry_at_each_length(setups):
  x, models = setups
  model, params, state, predict = models["fully_masked"]
  classify = padded_gru.make_classifier(model)
  padded, valid = _padded(x, T + 5, np.nan)
  probs = classify(params, state, padded, LENGTHS)
  assert isinstance(probs, np.ndarray) and probs.shape == (B, pg.CLASSES)
  np.testing.assert_allclose(probs, predict(params, state, padded, valid, False), rtol=1e-6)


def test_pad_batch_and_unknown_variant():
  seqs = synthetic.drift_recall_sequences(np.random.default_rng(0), 3, max_length=10)
  out = synthetic.pad_sequences(seqs, 16)
  assert out["x"].shape == (3, 16, 4) and np.all(out["x"][:, 10:] == 0)
  np.testing.assert_array_equal(out["labels"][:, 10:], np.repeat(seqs["labels"][:, -1:], 6, 1))
  config = pg.get_config("smoke")
  config.ablation.variant = "bogus"
  with pytest.raises(ValueError, match="ablation.variant='bogus'"):
    pg.make_model(config)
  with pytest.raises(ValueError, match="unknown preset"):
    pg.get_config("nope")


@pytest.mark.slow
def test_smoke_trains_checkpoints_resumes(tmp_path):
  work = str(tmp_path / "w")
  first = launch_here(SMOKE, f"--workdir={work}", check=True)
  assert "eval/acc_pad4x" in first.stdout and "eval/drift_pad4x" in first.stdout
  assert os.path.isdir(os.path.join(work, "checkpoints", "4"))
  records = resume_to_six((SMOKE, f"--workdir={work}"), work)
  final = [r for r in records if "eval/drift_pad4x" in r][-1]
  assert final["eval/drift_pad4x"] < 1e-5  # the smoke preset is the fully masked variant


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("padded_gru_trained"))
  config = pg.get_config("smoke")
  pg.run(config, workdir)
  return config, workdir


def _csv(path, x, lengths):
  """The .csv layout of maskax.data.user_files: a header, then `id,f0,...` per valid step."""
  lines = ["sequence," + ",".join(f"f{i}" for i in range(x.shape[2]))]
  lines += [
    f"s{b}," + ",".join(repr(float(v)) for v in x[b, t])
    for b, n in enumerate(lengths)
    for t in range(n)
  ]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_predict_classifies_npz_and_csv_alike(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  x = np.random.default_rng(0).normal(size=(B, T, F)).astype(np.float32)
  np.savez(tmp_path / "seqs.npz", x=x, lengths=LENGTHS)
  # 20 more steps of NaN: values past a length are never read, and the fully masked smoke
  # model's predictions ignore the amount of padding.
  np.savez(
    tmp_path / "padded.npz",
    x=np.pad(x, ((0, 0), (0, 20), (0, 0)), constant_values=np.nan),
    lengths=LENGTHS,
  )
  inputs = [
    str(tmp_path / "seqs.npz"),
    str(tmp_path / "padded.npz"),
    _csv(tmp_path / "rows.csv", x, LENGTHS),
  ]
  out = pg.predict(config, workdir, inputs, out_dir=str(tmp_path / "out"))
  assert [(o["input"], o["rows"], o["steps"]) for o in out] == list(
    zip(inputs, [B] * 3, [T, T + 20, T])
  )
  preds = [np.load(o["output"]) for o in out]
  probs, classes = preds[0]["probs"], preds[0]["classes"]
  assert probs.shape == (B, pg.CLASSES) and np.allclose(probs.sum(-1), 1.0)
  np.testing.assert_array_equal(classes, probs.argmax(-1))
  assert out[0]["class_counts"] == np.bincount(classes, minlength=pg.CLASSES).tolist()
  for p in preds[1:]:
    np.testing.assert_allclose(p["probs"], probs, atol=1e-5)


def test_predict_input_errors_are_one_line(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  run = lambda name: pg.predict(
    config, workdir, [str(tmp_path / name)], out_dir=str(tmp_path / "out")
  )
  x = np.zeros((2, 5, F), np.float32)
  cases = {
    "nolen.npz": (
      dict(x=x),
      r"no array lengths \(it has x\); expected x f32\[B, T, 4\] "
      r"and lengths i32\[B\]",
    ),
    "f3.npz": (dict(x=x[..., :3], lengths=[5, 5]), r"x has shape \[2, 5, 3\]; expected x"),
    "long.npz": (dict(x=x, lengths=[5, 6]), r"lengths must lie in \[1, 5\] \(T\), got 5..6"),
    "nan.npz": (dict(x=x + np.nan, lengths=[5, 1]), "x holds NaN or infinite values within"),
  }
  for name, (arrays, message) in cases.items():
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(ValueError, match=f"{name}: {message}"):
      run(name)
  texts = {
    "junk.npz": ("PK not a zip", "not a readable .npz file"),
    "cols.csv": ("s,a,b\ns,1,2\n", "cols.csv:2: 3 columns; expected the sequence id and 4"),
    "split.csv": (
      "s,a,b,c,d\ns,1,2,3,4\nt,1,2,3,4\ns,1,2,3,4\n",
      "split.csv:4: sequence 's' continues after another one",
    ),
    "blank.csv": ("s,a,b,c,d\ns,1,,3,4\n", "blank.csv:2: a feature value is empty"),
    "empty.csv": ("s,a,b,c,d\n", "empty.csv: no data lines after the header"),
  }
  for name, (text, message) in texts.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
      run(name)
  with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
    run("missing.npz")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    pg.predict(config, str(tmp_path), [str(tmp_path / "nolen.npz")], out_dir=str(tmp_path))
