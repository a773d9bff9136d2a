"""Padded scans: the docs/design.md rules, against a plain loop and against flax.linen.RNN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskax.rnn import cells, scan

B, T, F, D = 4, 6, 3, 5
LENGTHS = np.array([6, 0, 3, 5], np.int32)
MASK = np.ones((B, T), bool)
MASK[0, 2] = MASK[2, 1] = MASK[3, 0] = MASK[3, 4] = False  # holes, Keras Masking style
STATIC = ("cell", "reverse", "output_policy", "skip_padding", "row_groups")
SCAN = jax.jit(scan.padded_scan, static_argnames=STATIC)
COMBOS = [
  (cell, reverse, policy)
  for cell in ("gru", "lstm")
  for reverse in (False, True)
  for policy in scan.POLICIES
]


def _noisy(tree, key, scale=0.5):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef, [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)]
  )


@pytest.fixture(scope="module")
def params():
  init = {"gru": cells.init_gru, "lstm": cells.init_lstm}
  return {c: _noisy(init[c](jax.random.key(0), F, D), jax.random.key(1)) for c in init}


def _carry0(cell, batch_shape=(B,), seed=2):
  return _noisy(cells.zero_carry(cell, batch_shape, D), jax.random.key(seed))


def _x(seed=3, shape=(B, T, F)):
  return jax.random.normal(jax.random.key(seed), shape)


def _leaves_equal(a, b, **tol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if tol:
      np.testing.assert_allclose(u, v, **tol)
    else:
      np.testing.assert_array_equal(u, v)


def reference(cell, params, x, valid, carry0, *, reverse, output_policy):
  """Each row run alone over its valid steps only, one `cell_step` at a time."""
  outputs, finals = np.zeros((*x.shape[:-1], D), np.float32), []
  for b in range(x.shape[0]):
    carry = jax.tree.map(lambda c, b=b: c[b : b + 1], carry0)
    for t in range(T - 1, -1, -1) if reverse else range(T):
      if valid[b, t]:
        carry, h = cells.cell_step(cell, params, carry, x[b : b + 1, t])
        outputs[b, t] = h[0]
      elif output_policy == "carry_forward":
        outputs[b, t] = cells.hidden_state(cell, carry)[0]
    finals.append(carry)
  return outputs, jax.tree.map(lambda *c: jnp.concatenate(c), *finals)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_matches_reference_loop(params, data):
  cell, reverse, policy = data.draw(st.sampled_from(COMBOS))
  skip = data.draw(st.booleans())
  lengths = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)), np.int32)
  mask = np.array(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
  x, carry0 = _x(data.draw(st.integers(0, 99))), _carry0(cell)
  options = dict(cell=cell, reverse=reverse, output_policy=policy, skip_padding=skip)
  got_y, got_c = SCAN(params[cell], x, lengths, mask=mask, initial_carry=carry0, **options)
  valid = mask & (np.arange(T)[None] < lengths[:, None])
  want_y, want_c = reference(
    cell, params[cell], x, valid, carry0, reverse=reverse, output_policy=policy
  )
  np.testing.assert_allclose(got_y, want_y, atol=1e-5)
  _leaves_equal(got_c, want_c, atol=1e-5)


@functools.partial(jax.jit, static_argnames=STATIC)
def loss_and_grads(params, x, lengths, mask, carry0, weights, **options):
  """Outputs, final carry and the gradients of a weighted sum of both wrt params, x, carry0."""

  def loss(params, x, carry0):
    y, final = scan.padded_scan(params, x, lengths, mask=mask, initial_carry=carry0, **options)
    total = jnp.sum(y * weights)
    for c in jax.tree.leaves(final):
      total = total + jnp.sum(jnp.sin(c))
    return total, (y, final)

  (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, carry0)
  return outputs, grads


def _grad_inputs(cell, x=None):
  weights = jax.random.normal(jax.random.key(4), (B, T, D))
  return (_x() if x is None else x), LENGTHS, MASK, _carry0(cell), weights


VALID = MASK & (np.arange(T)[None] < LENGTHS[:, None])


CLEAN = np.where(VALID[..., None], np.asarray(_x()), 0.0)
GARBAGE = np.tile(np.array([np.nan, np.inf, -np.inf], np.float32), B * T * F)[: B * T * F]
DIRTY = np.where(VALID[..., None], CLEAN, GARBAGE.reshape(B, T, F))


@pytest.mark.parametrize("cell,reverse,policy", COMBOS)
def test_garbage_never_leaks(params, cell, reverse, policy):
  options = dict(cell=cell, reverse=reverse, output_policy=policy, skip_padding=False)
  want = loss_and_grads(params[cell], *_grad_inputs(cell, CLEAN), **options)
  got = loss_and_grads(params[cell], *_grad_inputs(cell, DIRTY), **options)
  _leaves_equal(got, want)
  (y, _), (_, d_x, _) = got
  assert np.isfinite(d_x).all() and not np.asarray(d_x)[~VALID].any()
  if policy == "zero":
    assert not np.asarray(y)[~VALID].any()


@pytest.mark.parametrize("cell,reverse,policy", [COMBOS[i] for i in (0, 3, 5, 6)])
def test_skip_padding_equals_plain(params, cell, reverse, policy):
  """On garbage inputs too, so the skipping path inherits test_garbage_never_leaks."""
  options = dict(cell=cell, reverse=reverse, output_policy=policy)
  plain = loss_and_grads(params[cell], *_grad_inputs(cell, CLEAN), skip_padding=False, **options)
  skip = loss_and_grads(params[cell], *_grad_inputs(cell, DIRTY), skip_padding=True, **options)
  _leaves_equal(skip, plain, rtol=1e-5, atol=1e-6)
  (_, _), (_, d_x, _) = skip
  assert np.isfinite(d_x).all() and not np.asarray(d_x)[~VALID].any()


@pytest.mark.parametrize("row_groups", [1, 3, 4])
def test_skip_padding_any_row_groups(params, row_groups):
  options = dict(cell="lstm", reverse=False, output_policy="carry_forward")
  plain = loss_and_grads(params["lstm"], *_grad_inputs("lstm"), skip_padding=False, **options)
  skip = loss_and_grads(
    params["lstm"], *_grad_inputs("lstm"), skip_padding=True, row_groups=row_groups, **options
  )
  _leaves_equal(skip, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_extra_padding_changes_nothing(params, cell):
  x, carry0 = _x(), _carry0(cell)
  y, final = SCAN(params[cell], x, LENGTHS, mask=MASK, initial_carry=carry0, cell=cell)
  longer = jnp.concatenate([x, jnp.full((B, 3, F), jnp.nan)], axis=1)
  mask = np.concatenate([MASK, np.ones((B, 3), bool)], axis=1)
  y_long, final_long = SCAN(
    params[cell], longer, LENGTHS, mask=mask, initial_carry=carry0, cell=cell
  )
  _leaves_equal((y_long[:, :T], final_long), (y, final))
  assert not y_long[:, T:].any()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("cell,reverse,policy", COMBOS[::3])
def test_length_zero_keeps_initial_carry(params, cell, reverse, policy, skip):
  carry0 = _carry0(cell)
  options = dict(cell=cell, reverse=reverse, output_policy=policy, skip_padding=skip)
  y, final = SCAN(params[cell], _x(), LENGTHS, initial_carry=carry0, **options)
  assert LENGTHS[1] == 0
  _leaves_equal(
    jax.tree.map(lambda c: c[1], final),
    jax.tree.map(lambda c: c[1], carry0),
  )
  h0 = cells.hidden_state(cell, carry0)[1]
  want = np.zeros((T, D)) if policy == "zero" else np.broadcast_to(h0, (T, D))
  np.testing.assert_array_equal(y[1], want)


def _flax_rnn(cell, reverse=False):
  flax_cell = nn.GRUCell(D) if cell == "gru" else nn.OptimizedLSTMCell(D)
  return nn.RNN(flax_cell, return_carry=True, reverse=reverse, keep_order=True)


def test_flax_rnn_gets_length_zero_wrong():
  """flax 0.12.8's nn.RNN returns the state after the padding for a length-0 row."""
  rnn = _flax_rnn("gru")
  variables = rnn.init(jax.random.key(0), _x())
  carry, _ = rnn.apply(variables, _x(), seq_lengths=jnp.asarray(LENGTHS))
  assert LENGTHS[1] == 0 and np.abs(carry[1]).max() > 1e-3  # not the zero initial carry
  ours = cells.gru_from_flax(variables["params"]["cell"])
  _, final = SCAN(ours, _x(), LENGTHS, cell="gru")
  assert not final[1].any()
  # flax's carry for the empty row is the one after running all T padded steps.
  _, full = SCAN(ours, _x(), np.full(B, T, np.int32), cell="gru")
  np.testing.assert_allclose(carry[1], full[1], atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_matches_flax_rnn(cell, reverse):
  lengths = np.array([6, 1, 3, 5], np.int32)  # flax's carry is wrong at length 0
  rnn = _flax_rnn(cell, reverse)
  variables = rnn.init(jax.random.key(0), _x())
  variables = {"params": _noisy(variables["params"], jax.random.key(5))}
  want_c, want_y = rnn.apply(variables, _x(), seq_lengths=jnp.asarray(lengths))
  from_flax = cells.gru_from_flax if cell == "gru" else cells.lstm_from_flax
  ours = from_flax(variables["params"]["cell"])
  for skip in (False, True):
    y, final = SCAN(ours, _x(), lengths, cell=cell, reverse=reverse, skip_padding=skip)
    valid = (np.arange(T)[None] < lengths[:, None])[..., None]
    np.testing.assert_allclose(np.where(valid, y, 0), np.where(valid, want_y, 0), atol=1e-5)
    _leaves_equal(final, want_c, atol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_reverse_equals_flipped_prefix(params, cell):
  """TF reverse_sequence semantics: x[len-1] ... x[0], outputs at their original positions."""
  x = np.asarray(_x())
  flip = np.stack([np.r_[np.arange(n)[::-1], np.arange(n, T)] for n in LENGTHS])
  flipped = np.take_along_axis(x, flip[..., None], axis=1)
  y_rev, c_rev = SCAN(params[cell], x, LENGTHS, cell=cell, reverse=True)
  y_fwd, c_fwd = SCAN(params[cell], flipped, LENGTHS, cell=cell)
  np.testing.assert_allclose(
    y_rev, np.take_along_axis(np.asarray(y_fwd), flip[..., None], axis=1), atol=1e-6
  )
  _leaves_equal(c_rev, c_fwd, atol=1e-6)


def test_bidirectional_concatenates(params):
  p_fwd, p_bwd = params["gru"], _noisy(params["gru"], jax.random.key(9))
  carries = (_carry0("gru", seed=6), _carry0("gru", seed=7))
  y, (c_fwd, c_bwd) = scan.bidirectional_scan(
    p_fwd, p_bwd, _x(), LENGTHS, cell="gru", mask=MASK, initial_carry=carries
  )
  want_f = SCAN(p_fwd, _x(), LENGTHS, cell="gru", mask=MASK, initial_carry=carries[0])
  want_b = SCAN(p_bwd, _x(), LENGTHS, cell="gru", mask=MASK, initial_carry=carries[1], reverse=True)
  assert y.shape == (B, T, 2 * D)
  _leaves_equal((y[..., :D], c_fwd), want_f, atol=1e-6)
  _leaves_equal((y[..., D:], c_bwd), want_b, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_stacked_equals_layer_by_layer(bidirectional):
  width = 2 * D if bidirectional else D
  inits = [cells.init_lstm(jax.random.key(k), F if k < 2 else width, D) for k in range(4)]
  layers = [(inits[0], inits[1]), (inits[2], inits[3])] if bidirectional else [inits[0], inits[2]]
  y, carries = scan.stacked_scan(layers, _x(), LENGTHS, cell="lstm", bidirectional=bidirectional)
  run = functools.partial(
    scan.bidirectional_scan if bidirectional else scan.padded_scan, cell="lstm"
  )
  args = (lambda layer: layer) if bidirectional else (lambda layer: (layer,))
  h, want_c0 = run(*args(layers[0]), _x(), LENGTHS)
  want_y, want_c1 = run(*args(layers[1]), h, LENGTHS)
  _leaves_equal((y, carries), (want_y, [want_c0, want_c1]), atol=1e-6)


def test_stacked_dropout():
  layers = [cells.init_gru(jax.random.key(0), F, D), cells.init_gru(jax.random.key(1), D, D)]
  x = jnp.where(VALID[..., None], _x(), jnp.nan)
  run = functools.partial(
    scan.stacked_scan, layers, x, LENGTHS, cell="gru", mask=MASK, dropout_rate=0.5
  )
  y_det, _ = run()
  y_a, _ = run(key=jax.random.key(0), deterministic=False)
  y_b, _ = run(key=jax.random.key(1), deterministic=False)
  assert np.isfinite(y_a).all() and not np.asarray(y_a)[~VALID].any()
  assert not np.allclose(y_a, y_det) and not np.allclose(y_a, y_b)
  with pytest.raises(ValueError, match="needs key"):
    run(deterministic=False)


@pytest.mark.parametrize("skip", [False, True])
def test_leading_batch_dims(params, skip):
  carry0 = _carry0("lstm", (2, 2))
  x, lengths, mask = _x(shape=(2, 2, T, F)), LENGTHS.reshape(2, 2), MASK.reshape(2, 2, T)
  y, final = SCAN(
    params["lstm"], x, lengths, mask=mask, initial_carry=carry0, cell="lstm", skip_padding=skip
  )
  flat = jax.tree.map(lambda c: c.reshape(B, D), carry0)
  want_y, want_c = SCAN(
    params["lstm"],
    x.reshape(B, T, F),
    LENGTHS,
    mask=MASK,
    initial_carry=flat,
    cell="lstm",
    skip_padding=skip,
  )
  assert y.shape == (2, 2, T, D) and final[0].shape == (2, 2, D)
  _leaves_equal(
    (y.reshape(B, T, D), jax.tree.map(lambda c: c.reshape(B, D), final)),
    (want_y, want_c),
    atol=1e-6,
  )


@pytest.mark.parametrize("skip", [False, True])
def test_jit_equals_eager(params, skip):
  options = dict(cell="lstm", reverse=True, output_policy="carry_forward", skip_padding=skip)
  carry0 = _carry0("lstm")
  eager = scan.padded_scan(
    params["lstm"], _x(), LENGTHS, mask=MASK, initial_carry=carry0, **options
  )
  jitted = SCAN(params["lstm"], _x(), LENGTHS, mask=MASK, initial_carry=carry0, **options)
  _leaves_equal(jitted, eager, atol=1e-6)


def test_bad_inputs_raise(params):
  p, x = params["gru"], _x()
  with pytest.raises(ValueError, match="lengths must be int"):
    scan.padded_scan(p, x, np.zeros(B + 1, np.int32))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=6\]"):
    scan.padded_scan(p, x, np.array([7, 0, 0, 0], np.int32))
  with pytest.raises(ValueError, match="mask must be bool"):
    scan.padded_scan(p, x, mask=MASK.astype(np.float32))
  with pytest.raises(ValueError, match="initial_carry must look like"):
    scan.padded_scan(p, x, cell="gru", initial_carry=jnp.zeros((B, D + 1)))
  with pytest.raises(ValueError, match="params do not fit a lstm cell"):
    scan.padded_scan(p, x, cell="lstm")
  with pytest.raises(ValueError, match="output_policy must be one of"):
    scan.padded_scan(p, x, output_policy="keras")
  with pytest.raises(ValueError, match="cell must be one of"):
    scan.padded_scan(p, x, cell="rnn")


def test_padded_rnn_module(params):
  module = scan.PaddedRNN(cell="gru", hidden=D, reverse=True, output_policy="carry_forward")
  variables = module.init(jax.random.key(0), _x(), LENGTHS)
  assert jax.tree.map(jnp.shape, variables["params"]["cell"]) == jax.tree.map(
    jnp.shape, params["gru"]
  )
  carry, y = module.apply(variables, _x(), LENGTHS, mask=MASK, return_carry=True)
  want = SCAN(
    variables["params"]["cell"],
    _x(),
    LENGTHS,
    mask=MASK,
    cell="gru",
    reverse=True,
    output_policy="carry_forward",
  )
  _leaves_equal((y, carry), want, atol=1e-6)


def test_stacked_rnn_module():
  bidirectional = scan.StackedRNN(cell="lstm", hidden=D, num_layers=2, bidirectional=True)
  shapes = jax.eval_shape(bidirectional.init, jax.random.key(0), _x(), LENGTHS)["params"]
  assert sorted(shapes) == ["layer_0_bwd", "layer_0_fwd", "layer_1_bwd", "layer_1_fwd"]
  assert shapes["layer_1_fwd"]["w_i"].shape == (2 * D, 4 * D)
  module = scan.StackedRNN(cell="gru", hidden=D, num_layers=2, dropout_rate=0.5)
  variables = module.init(jax.random.key(0), _x(), LENGTHS)
  apply = jax.jit(module.apply, static_argnames=("deterministic", "return_carry"))
  carries, y = apply(variables, _x(), LENGTHS, return_carry=True)
  layers = [variables["params"][f"layer_{k}"] for k in range(2)]
  want = scan.stacked_scan(layers, _x(), LENGTHS, cell="gru")
  _leaves_equal((y, carries), want, atol=1e-6)
  dropped = apply(
    variables, _x(), LENGTHS, deterministic=False, rngs={"dropout": jax.random.key(1)}
  )
  assert dropped.shape == (B, T, D) and not np.allclose(dropped, y)
