"""models/char_rnn.py and experiments/char_rnn.py: initial loss, generation (chunked, banned,
seeded, ragged), long-context evaluation, stateful training, and the `smoke` run end to end."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maskax.launcher import runner
from conftest import launch_here
from experiments import char_rnn as exp
from maskax.masking import losses, sampling
from maskax.training import runs, sharding, train
from maskax.data import chars
from maskax.models import char_rnn

V, E, D = 24, 8, 16
PROMPT = np.array([[3, 1, 4, 1, 5], [2, 7, 0, 0, 0], [6, 5, 3, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 3], np.int32)
BANNED = np.arange(V) == chars.UNKNOWN
SMOKE = "--config=experiments/char_rnn.py:smoke"


@pytest.fixture(scope="module")
def model_and_params():
  model = char_rnn.CharRNN(V, E, D)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32))["params"])(
    jax.random.key(0)
  )
  # Sharper output weights than at init, so that sampling is far from uniform.
  params["logits"]["kernel"] = params["logits"]["kernel"] * 6.0
  return model, params


@pytest.fixture(scope="module")
def apply(model_and_params):
  """Jitted `(params, tokens, lengths=None) -> (logits, carries)` (one compile per shape)."""
  model, _ = model_and_params
  return jax.jit(lambda p, x, lengths=None: model.apply({"params": p}, x, lengths))


@pytest.fixture(scope="module")
def gen(model_and_params):
  """One jitted generator shared by every test: calls of equal shapes compile once."""
  model, _ = model_and_params
  return jax.jit(functools.partial(char_rnn.generate, model), static_argnames=("steps", "top_k"))


def _keys(seed, batch=3):
  return char_rnn.row_keys(jax.random.key(seed), batch)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_initial_loss_is_log_vocab(cell):
  model = char_rnn.CharRNN(60, E, D, num_layers=2, cell=cell)
  tokens = np.random.default_rng(0).integers(0, 60, size=(4, 16)).astype(np.int32)

  @jax.jit
  def initial_loss(key):
    logits, carries = model.apply(model.init(key, tokens), tokens)
    assert logits.shape == (4, 16, 60) and len(carries) == 2
    return losses.safe_div(*losses.masked_xent(logits, tokens, jnp.ones((4, 16), bool)))

  assert abs(float(initial_loss(jax.random.key(1))) - math.log(60)) < 0.03


def test_padded_batch_equals_each_row_alone(model_and_params, apply):
  _, params = model_and_params
  logits, carry = apply(params, PROMPT, LENGTHS)
  for b, n in enumerate(LENGTHS):
    alone, alone_carry = apply(params, PROMPT[b : b + 1, :n])
    np.testing.assert_allclose(logits[b, :n], alone[0], atol=1e-5)
    np.testing.assert_allclose(carry[0][b], alone_carry[0][0], atol=1e-5)


def test_chunked_generation_equals_one_call(model_and_params, gen):
  _, params = model_and_params
  options = dict(temperature=0.7, banned=BANNED)
  tokens, carry = gen(params, PROMPT, LENGTHS, _keys(3), steps=12, **options)
  # Two chunks: the second starts from the first's last token and carry.
  first, c = gen(params, PROMPT, LENGTHS, _keys(3), steps=7, **options)
  second, c = gen(
    params, first[:, -1:], np.ones(3, np.int32), _keys(3), steps=5, carry=c, start_step=7, **options
  )
  np.testing.assert_array_equal(np.concatenate([first, second], axis=1), tokens)
  np.testing.assert_allclose(c[0], carry[0], atol=1e-6)


def test_chunked_generation_through_apply_fn(model_and_params):
  model, params = model_and_params
  run = jax.jit(sampling.generate, static_argnums=(0, 5), static_argnames=("top_k",))
  apply_fn = char_rnn.make_apply_fn(model)
  key, options = jax.random.key(7), dict(top_k=5, banned=BANNED)
  whole, _ = run(apply_fn, params, PROMPT, LENGTHS, model.zero_carry(3), 10, key, **options)
  head, c = run(apply_fn, params, PROMPT, LENGTHS, model.zero_carry(3), 6, key, **options)
  tail, _ = run(
    apply_fn, params, head[:, -1:], np.ones(3, np.int32), c, 4, key, start_step=6, **options
  )
  np.testing.assert_array_equal(np.concatenate([head, tail], axis=1), whole)


def test_generation_never_emits_the_unknown_id(model_and_params, gen):
  _, params = model_and_params
  # Make the unknown id by far the most likely character: it still must never be drawn.
  biased = jax.tree.map(lambda x: x, params)
  biased["logits"]["bias"] = params["logits"]["bias"].at[chars.UNKNOWN].set(20.0)
  for options in (dict(temperature=1.0), dict(temperature=0.0), dict(temperature=2.0, top_k=3)):
    tokens, _ = gen(biased, PROMPT, LENGTHS, _keys(0), steps=12, banned=BANNED, **options)
    assert not np.any(np.asarray(tokens) == chars.UNKNOWN), options
  unbanned, _ = gen(biased, PROMPT, LENGTHS, _keys(0), steps=12, temperature=1.0)
  assert np.mean(np.asarray(unbanned) == chars.UNKNOWN) > 0.9  # the test has teeth


def test_same_seed_same_text_different_seed_different_text(model_and_params, gen):
  _, params = model_and_params
  a, _ = gen(params, PROMPT, LENGTHS, _keys(11), steps=12, banned=BANNED)
  b, _ = gen(params, PROMPT, LENGTHS, _keys(11), steps=12, banned=BANNED)
  c, _ = gen(params, PROMPT, LENGTHS, _keys(12), steps=12, banned=BANNED)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


def test_ragged_batch_generates_what_each_prompt_generates_alone(model_and_params, gen):
  _, params = model_and_params
  keys = _keys(5)
  for temperature in (0.9, 0.0):  # traced: one compile per prompt shape
    batch, carry = gen(
      params, PROMPT, LENGTHS, keys, steps=12, banned=BANNED, temperature=temperature
    )
    for b, n in enumerate(LENGTHS):
      alone, alone_carry = gen(
        params,
        PROMPT[b : b + 1, :n],
        LENGTHS[b : b + 1],
        keys[b : b + 1],
        steps=12,
        banned=BANNED,
        temperature=temperature,
      )
      np.testing.assert_array_equal(batch[b], alone[0])
      np.testing.assert_allclose(carry[0][b], alone_carry[0][0], atol=1e-5)


def test_stream_xent_carried_equals_one_long_run_and_reset_equals_fresh_windows(
  model_and_params, apply
):
  model, params = model_and_params
  ids = np.random.default_rng(2).integers(1, V, size=61).astype(np.int32)
  layout = chars.stream_windows(ids, 2, 6)  # [2 streams, 5 windows, 6]
  sums = jax.jit(functools.partial(char_rnn.stream_xent, model))(
    params, layout["inputs"], layout["targets"]
  )
  x, y = layout["inputs"], layout["targets"]
  every = np.ones((2, 30), bool)
  long_logits, _ = apply(params, x.reshape(2, 30))
  want_carried = losses.masked_xent(long_logits, y.reshape(2, 30), every)
  short_logits, _ = apply(params, x.reshape(10, 6))
  want_reset = losses.masked_xent(short_logits, y.reshape(10, 6), every.reshape(10, 6))
  np.testing.assert_allclose(sums["carried"], want_carried, rtol=1e-5)
  np.testing.assert_allclose(sums["reset"], want_reset, rtol=1e-5)
  assert float(sums["reset"][0]) != pytest.approx(float(sums["carried"][0]), rel=1e-4)


def test_stateful_loss_carries_and_resets_the_state(model_and_params, apply):
  model, params = model_and_params
  loss = jax.jit(exp.make_loss(model, stateful=True), static_argnames=("train",))
  ids = np.random.default_rng(3).integers(1, V, size=(2, 13)).astype(np.int32)
  first = {"inputs": ids[:, :6], "targets": ids[:, 1:7], "reset": np.array([True, True])}
  second = {"inputs": ids[:, 6:12], "targets": ids[:, 7:13], "reset": np.array([False, True])}
  state = {"carry": [jnp.full((2, D), 0.5)]}  # stale carry: the reset must zero it
  _, _, state = loss(params, state, first, None, train=True)
  terms, _, state = loss(params, state, second, None, train=True)
  logits, carry = apply(params, ids[:, :12])
  alone, alone_carry = apply(params, ids[1:, 6:12])
  # Row 0 continued its stream (one 12-step run); row 1 was reset before its second window.
  np.testing.assert_allclose(state["carry"][0][0], carry[0][0], atol=1e-5)
  np.testing.assert_allclose(state["carry"][0][1], alone_carry[0][0], atol=1e-5)
  per_row = [
    losses.masked_xent(logits[:1, 6:], ids[:1, 7:13], np.ones((1, 6), bool)),
    losses.masked_xent(alone, ids[1:, 7:13], np.ones((1, 6), bool)),
  ]
  np.testing.assert_allclose(terms["xent"][0], per_row[0][0] + per_row[1][0], rtol=1e-5)
  # Gradients stop at the window boundary: nothing flows into the incoming carry.
  grad = jax.grad(lambda c: loss(params, {"carry": [c]}, second, None, train=True)[0]["xent"][0])(
    state["carry"][0]
  )
  assert not np.any(np.asarray(grad))


def test_config_presets_and_steps_scale_inversely_with_seq_len():
  with pytest.raises(ValueError, match="presets"):
    exp.get_config("nope")
  for preset in exp.PRESETS:
    exp.get_config(preset)
  config = exp.get_config("ablation")
  steps = {}
  for seq_len in (25, 100, 400):
    config.data.seq_len = seq_len
    steps[seq_len] = exp.resolve_steps(config)
  assert steps[25][0] == 4 * steps[100][0] == 16 * steps[400][0]
  assert steps[25][1] == 4 * steps[100][1] == 16 * steps[400][1] > 0
  assert steps[100] == (512, 256)  # 1,638,400 characters, evaluated every 819,200
  config.train.batch_chars = 3200  # equal steps and characters per step: B scales instead
  for seq_len, batch in ((25, 128), (100, 32), (400, 8)):
    config.data.seq_len = seq_len
    assert exp.batch_size(config) == batch and exp.resolve_steps(config) == (512, 256)
  config.data.seq_len = 300
  with pytest.raises(ValueError, match="batch_chars"):
    exp.batch_size(config)


def _tiny_train(workdir, stop_at):
  """Stateful smoke-sized training to step `stop_at` of a 6-step run (the schedule spans 6)."""
  config = exp.get_config("smoke")
  ids = np.random.default_rng(0).integers(1, V, size=2000).astype(np.int32)
  model = exp.make_model(config, V)
  task = exp.make_task(config, model, ids)
  options = train.LoopOptions.from_config(
    {**config.train.to_dict(), "steps": stop_at, "async_checkpoints": False}
  )
  mesh = sharding.make_mesh(jax.devices()[:1])
  state, _ = train.train(task, options, workdir, seed=0, mesh=mesh)
  return jax.device_get(state)


@pytest.mark.slow
def test_stateful_resume_restores_the_carry_exactly(tmp_path):
  straight = _tiny_train(str(tmp_path / "a"), 6)
  _tiny_train(str(tmp_path / "b"), 3)
  resumed = _tiny_train(str(tmp_path / "b"), 6)
  assert exp.get_config("smoke").train.mode == "stateful"
  for want, got in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
  assert np.any(np.asarray(resumed.model_state["carry"][0]) != 0)


@pytest.mark.slow
def test_smoke_trains_checkpoints_the_carry_resumes_and_predicts(tmp_path):
  workdir = str(tmp_path / "run")
  # In-process on the test process's 8 simulated devices: a row per device.
  rows = ("--config.train.batch_size=8", "--config.data.eval_streams=8")
  first = launch_here(SMOKE, *rows, f"--workdir={workdir}", check=True)
  assert "eval/bpc_carried" in first.stdout and "eval/bpc_reset" in first.stdout
  ckpt = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())[-1] == 6
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "6", "state"))
  carry = np.asarray(state["model_state"]["carry"][0])
  assert carry.shape == (8, 16) and np.any(carry != 0)
  # The schedule depends on train.steps, so extending the run is an explicit choice.
  resumed = launch_here(
    SMOKE,
    *rows,
    f"--workdir={workdir}",
    "--config.train.steps=9",
    "--allow_config_change",
    check=True,
  )
  assert "resumed at step 6" in resumed.stderr
  assert os.path.isdir(os.path.join(ckpt, "9"))
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert records[-1]["step"] == 9
  # --predict samples after each line with the run's config and the command's length/top_k,
  # and leaves the training record as it was.
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in ("config.json", "metrics.jsonl")}
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The \nimport os\n")
  gen = launch_here(
    "--config=experiments/char_rnn.py",
    f"--workdir={workdir}",
    f"--predict={prompts}",
    "--config.length=30",
    "--config.top_k=5",
    check=True,
  )
  out = [json.loads(line) for line in gen.stdout.splitlines()]
  assert [o["prompt"] for o in out] == ["The ", "import os"]
  assert [len(o["text"]) for o in out] == [30, 30]
  assert before == {p: os.path.getmtime(os.path.join(workdir, p)) for p in before}


@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
  """The smoke run, trained in-process once; its config.json (as the launcher writes it) goes
  into its checkpoints, so `launch.trained_config` finds it."""
  workdir = str(tmp_path_factory.mktemp("char_rnn_trained"))
  config = exp.get_config("smoke")
  config.train.batch_size = config.data.eval_streams = 8  # a row per simulated device (conftest)
  runs.write_config(workdir, config.to_dict())
  exp.run(config, workdir)
  return config, workdir


def test_predict_samples_length_characters_after_each_prompt(trained_smoke):
  config, workdir = trained_smoke
  config = config.copy_and_resolve_references()
  config.length, config.top_k = 12, 3
  prompts = ["The ", "import os", "x"]
  out = exp.predict(config, workdir, prompts)
  assert [o["prompt"] for o in out] == prompts
  vocab = chars.load_vocab(os.path.join(workdir, exp.VOCAB_FILE))
  assert all(len(o["text"]) == 12 and set(o["text"]) <= set(vocab.chars) for o in out)
  assert exp.predict(config, workdir, prompts) == out  # sample_seed fixes the text
  config.sample_seed = 1
  assert exp.predict(config, workdir, prompts) != out


def test_predict_input_errors_are_one_line(trained_smoke, tmp_path):
  config, workdir = trained_smoke
  with pytest.raises(ValueError, match=r"outside the run's vocabulary of \d+: \['€', '☃'\]"):
    exp.predict(config, workdir, ["The ☃ costs 5€"])
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    exp.predict(config, str(tmp_path), ["The "])


def test_trained_config_takes_only_predict_keys_from_the_command(trained_smoke):
  config, workdir = trained_smoke
  command = exp.get_config()  # the default preset: other sizes than the smoke run's
  command.temperature, command.model.hidden = 0.5, 999
  used = runner.trained_config(exp, command, workdir)
  assert used.temperature == 0.5 and used.length == command.length  # how to sample: the command
  assert used.model.hidden == config.model.hidden == 16  # what was trained: the run
  assert runner.trained_config(exp, command, "/nonexistent") is command


def test_continuation_study_scores_reset_and_carried(trained_smoke, capsys):
  config, workdir = trained_smoke
  config = config.copy_and_resolve_references()
  config.length = 20
  out = exp.continuation_study(config, workdir, context_chars=16)
  assert sorted(out) == ["continuation_bpc_carried", "continuation_bpc_reset"]
  assert all(0 < v < 10 for v in out.values())
  assert "sampled after the 16-character context" in capsys.readouterr().out
