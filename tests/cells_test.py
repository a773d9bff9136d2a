"""Cells: flax gate conventions both ways, hand-written backward passes, initialisers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskax.rnn import cells

B, F, D = 3, 5, 4


def _noisy(tree, key):
  """Random values everywhere, biases included (flax initialises biases to zero)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
  )


FLAX = {
  "gru": (nn.GRUCell, cells.gru_from_flax, cells.gru_to_flax),
  "lstm": (nn.OptimizedLSTMCell, cells.lstm_from_flax, cells.lstm_to_flax),
}


def _carry(cell, key):
  carry = cells.zero_carry(cell, (B,), D)
  return _noisy(carry, key)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_from_flax_matches_flax_cell(cell):
  flax_cls, from_flax, _ = FLAX[cell]
  x = jax.random.normal(jax.random.key(0), (B, F))
  carry = _carry(cell, jax.random.key(1))
  variables = flax_cls(D).init(jax.random.key(2), carry, x)
  variables = {"params": _noisy(variables["params"], jax.random.key(3))}
  want_carry, want_h = flax_cls(D).apply(variables, carry, x)
  got_carry, got_h = cells.cell_step(cell, from_flax(variables), carry, x)
  np.testing.assert_allclose(got_h, want_h, atol=1e-6)
  for got, want in zip(jax.tree.leaves(got_carry), jax.tree.leaves(want_carry)):
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_to_flax_computes_the_same_cell(cell):
  flax_cls, from_flax, to_flax = FLAX[cell]
  init = cells.init_gru if cell == "gru" else cells.init_lstm
  # Both biases nonzero: to_flax has to fold one into the other.
  params = _noisy(init(jax.random.key(0), F, D), jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (B, F))
  carry = _carry(cell, jax.random.key(3))
  _, want = cells.cell_step(cell, params, carry, x)
  _, got = flax_cls(D).apply({"params": to_flax(params)}, carry, x)
  np.testing.assert_allclose(got, want, atol=1e-6)
  _, round_trip = cells.cell_step(cell, from_flax(to_flax(params)), carry, x)
  np.testing.assert_allclose(round_trip, want, atol=1e-6)
  flax_shapes = jax.tree.map(jnp.shape, flax_cls(D).init(jax.random.key(0), carry, x)["params"])
  assert jax.tree.map(jnp.shape, to_flax(params)) == flax_shapes


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_backward_matches_autodiff(cell):
  gates = cells.GATES[cell]
  gi, gh = jax.random.normal(jax.random.key(0), (2, B, gates * D))
  carry = _carry(cell, jax.random.key(1))
  d_new = _carry(cell, jax.random.key(2))
  new, vjp = jax.vjp(cells.GATE_FNS[cell], gi, gh, carry)
  after, acts = cells.FORWARD[cell](gi, gh, carry)
  want = vjp(d_new)
  got = cells.BACKWARD[cell](acts, carry, after, d_new)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_init_matches_flax_initialisers(cell):
  init = cells.init_gru if cell == "gru" else cells.init_lstm
  gates = cells.GATES[cell]
  params = init(jax.random.key(0), F, D)
  shapes = {k: v.shape for k, v in params.items()}
  assert shapes == {
    "w_i": (F, gates * D),
    "b_i": (gates * D,),
    "w_h": (D, gates * D),
    "b_h": (gates * D,),
  }
  assert not params["b_i"].any() and not params["b_h"].any()
  # flax draws each gate's recurrent kernel as its own orthogonal matrix.
  for block in jnp.split(params["w_h"], gates, axis=1):
    np.testing.assert_allclose(block.T @ block, np.eye(D), atol=1e-5)


def test_zero_carry():
  assert cells.zero_carry("gru", (2, 3), D).shape == (2, 3, D)
  c, h = cells.zero_carry("lstm", (2,), D)
  assert c.shape == h.shape == (2, D) and not c.any() and not h.any()
  with pytest.raises(ValueError, match="cell must be one of"):
    cells.zero_carry("rnn", (2,), D)
