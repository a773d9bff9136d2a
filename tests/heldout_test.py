"""`seed` changes the model and the training data order, never the held-out data: every
experiment scores every training seed on the same held-out batches (they derive from
`data.seed`, or from the content, as char_rnn's held-out tail of the text)."""

import importlib

import jax
import numpy as np
import pytest

from maskax.training import train


class _Captured(Exception):
  def __init__(self, task):
    super().__init__("captured")
    self.task = task


def _held_out(name, seed, workdir, monkeypatch):
  """The experiment's held-out batches (all eval sets) for `seed`, captured at train.train."""
  module = importlib.import_module(f"experiments.{name}")
  config = module.get_config("smoke")
  config.seed = seed

  def capture(task, *args, **kwargs):
    raise _Captured(task)

  monkeypatch.setattr(train, "train", capture)
  with pytest.raises(_Captured) as captured:
    module.run(config, str(workdir))
  data = captured.value.task.eval_data()
  sets = data.items() if isinstance(data, dict) else [("", data)]
  return {set_name: [jax.device_get(b) for b in batches] for set_name, batches in sets}


@pytest.mark.parametrize(
  "name",
  [
    "example_regression",
    "bert_pretrain",
    "char_rnn",
    "padded_gru",
    "feature_mask",
    "seq2seq",
    "fcn_segmentation",
  ],
)
def test_held_out_batches_are_the_same_for_every_training_seed(name, tmp_path, monkeypatch):
  a = _held_out(name, 0, tmp_path / "a", monkeypatch)
  b = _held_out(name, 3, tmp_path / "b", monkeypatch)
  assert a.keys() == b.keys() and all(a.values())
  for set_name in a:
    assert len(a[set_name]) == len(b[set_name])
    for x, y in zip(a[set_name], b[set_name]):
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name} {set_name} {key}")
