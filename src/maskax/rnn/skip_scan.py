"""The skip-padding recurrence: each step runs only on the chunks of rows still running.

Rows are ranked by descending length (inside `recur_skipping`) and grouped in chunks of
`chunk` rows; a chunk runs the steps before its first (longest) row ends, in one loop per
number of running chunks, so padding past a chunk's longest row costs nothing. Forward and
backward passes are written by hand (custom VJP, reverse mode only) so the backward pass
touches the same rows.

A CPU path (`scan.padded_scan(..., skip_padding=True)`). Where its time goes, why it is shaped
this way (saved vectors, pre-transposed weights, per-segment carries, row order) and the
attempts that measured no faster are in docs/performance.md.
"""

import jax
import jax.numpy as jnp
from jax import lax

from maskax.rnn.cells import BACKWARD, FORWARD, add_bias, hidden_state, keep_valid


def _segments(lengths_B, chunk: int, reverse: bool):
  """(rows, first step, end step) per active-row count, in processing order.

  With rows sorted by descending length, during steps [len[j*chunk], len[(j-1)*chunk]) only
  the first j chunks hold a row that is still running.
  """
  batch = lengths_B.shape[0]
  segments = []
  for j in range(-(-batch // chunk), 0, -1):
    start = lengths_B[j * chunk] if j * chunk < batch else jnp.zeros((), lengths_B.dtype)
    segments.append((min(j * chunk, batch), start, lengths_B[(j - 1) * chunk]))
  return segments[::-1] if reverse else segments


def _at(tree, t, rows):
  """Rows [:rows] of step t of every [B, T, ...] leaf."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a[:rows], t, 1, False), tree)


def _put(tree, t, values):
  """Writes values into rows [:R] of step t of every [B, T, ...] leaf (in place in a loop)."""
  return jax.tree.map(
    lambda a, v: lax.dynamic_update_slice(a, v[:, None], (0, t) + (0,) * (a.ndim - 2)),
    tree,
    values,
  )


def _rows(tree, stop):
  return jax.tree.map(lambda a: a[:stop], tree)


def _put_rows(tree, values):
  return jax.tree.map(lambda a, v: lax.dynamic_update_slice(a, v, (0,) * a.ndim), tree, values)


def _loop(segment, reverse, body, state):
  rows, start, end = segment
  step = (lambda i: end - 1 - i) if reverse else (lambda i: start + i)
  carry, rest = state[0], state[1:]
  head, *rest = lax.fori_loop(
    0, end - start, lambda i, s: body(rows, step(i), s), (_rows(carry, rows), *rest)
  )
  return (_put_rows(carry, head), *rest)


def _gather(a_BT, t, rows_R):
  """Step t of the given rows of a [B, T, ...] array in the caller's row order: [R, ...]."""
  return lax.dynamic_index_in_dim(a_BT, t, 1, False)[rows_R]


def _safe_x(x_BTF, valid_BT, t, order_B, rows):
  """x at step t with invalid entries replaced by 0, so NaN/inf there never reach the cell.

  x is in the caller's row order and valid sorted: rows are fetched per step (a few rows,
  microseconds) rather than sorting all of x, a [B, T, F] temporary per call.
  """
  valid = _at(valid_BT, t, rows)
  return jnp.where(valid[:, None], _gather(x_BTF, t, order_B[:rows]), 0.0), valid


def _skip_fwd(cell, chunk, reverse, params, x_BTF, valid_BT, carry0, lengths_B, order_B, inverse_B):
  """Forward pass: x_BTF in the caller's row order; valid_BT, carry0, lengths_B sorted by
  `order_B` (descending length); returns h in the caller's order, the final carry sorted."""
  (batch, steps, _), hidden = x_BTF.shape, params["w_h"].shape[0]

  def body(rows, t, state):
    head, hist, acts_BTA = state
    x, valid = _safe_x(x_BTF, valid_BT, t, order_B, rows)
    gi = add_bias(x @ params["w_i"], params["b_i"])
    gh = add_bias(hidden_state(cell, head) @ params["w_h"], params["b_h"])
    new, acts = FORWARD[cell](gi, gh, head)
    head = keep_valid(valid, new, head)
    return head, _put(hist, t, head), _put(acts_BTA, t, acts)

  acts_width = 4 * hidden  # both cells save 4 vectors per row and step
  hist = jax.tree.map(lambda c: jnp.zeros((batch, steps, hidden), c.dtype), carry0)
  state = (carry0, hist, jnp.zeros((batch, steps, acts_width), x_BTF.dtype))
  for segment in _segments(lengths_B, chunk, reverse):
    state = _loop(segment, reverse, body, state)
  final, hist, acts_BTA = state
  residuals = (params, x_BTF, valid_BT, carry0, lengths_B, hist, acts_BTA, order_B)
  return (hidden_state(cell, hist)[inverse_B], final), residuals


def _skip_bwd(cell, chunk, reverse, residuals, cotangents):
  params, x_BTF, valid_BT, carry0, lengths_B, hist, acts_BTA, order_B = residuals
  d_h_BTD, d_final = cotangents
  batch, steps, _ = x_BTF.shape
  # Row b's chunk runs steps [0, span[b]); its carry before step t is in hist at the step
  # processed just before t, or is the initial carry if t came first.
  span = jnp.repeat(lengths_B[::chunk], chunk)[:batch]
  # The transposed weights, laid out once before the loop. Left to XLA, `d @ w.T` contracts
  # over w's minor axis inside every step, which XLA:CPU's dot runs at about half speed for a
  # few rows (8 rows, D=256: 56 vs 29 us; LSTM-256 in a same-process A/B of the scan
  # benchmark: 1.38x -> 1.45x flax).
  # The barrier keeps the transpose from being folded back into the dots.
  w_i_T, w_h_T = lax.optimization_barrier((params["w_i"].T, params["w_h"].T))

  def add_to_h(carry, dh):
    return (carry[0], carry[1] + dh) if cell == "lstm" else carry + dh

  def body(rows, t, state):
    d_carry, d_x, d_w = state
    before = t + 1 if reverse else t - 1
    has_before = (before < span[:rows]) if reverse else jnp.broadcast_to(t > 0, (rows,))
    earlier = _at(hist, jnp.clip(before, 0, steps - 1), rows)
    head = keep_valid(has_before, earlier, _rows(carry0, rows))
    x, valid = _safe_x(x_BTF, valid_BT, t, order_B, rows)
    d_head = add_to_h(d_carry, _gather(d_h_BTD, t, order_B[:rows]))
    d_new = jax.tree.map(lambda d: jnp.where(valid[:, None], d, 0.0), d_head)
    # hist at t is the carry after step t (for rows not running there it is the frozen
    # carry, finite, and their d_new is 0).
    d_gi, d_gh, d_prev = BACKWARD[cell](_at(acts_BTA, t, rows), head, _at(hist, t, rows), d_new)
    d_prev = add_to_h(d_prev, d_gh @ w_h_T)
    d_carry = keep_valid(valid, d_prev, d_head)
    # Weight gradients accumulate over the running rows only. (Packing those rows for a few
    # large matmuls after the loop measured no faster on a 2-core CPU.)
    d_w = {
      "w_i": d_w["w_i"] + x.T @ d_gi,
      "b_i": d_w["b_i"] + d_gi.sum(axis=0),
      "w_h": d_w["w_h"] + hidden_state(cell, head).T @ d_gh,
      "b_h": d_w["b_h"] + d_gh.sum(axis=0),
    }
    d_x = d_x.at[order_B[:rows], t].set(d_gi @ w_i_T, unique_indices=True)
    return d_carry, d_x, d_w

  state = (d_final, jnp.zeros_like(x_BTF), jax.tree.map(jnp.zeros_like, params))
  for segment in _segments(lengths_B, chunk, not reverse):
    state = _loop(segment, not reverse, body, state)
  d_carry0, d_x, d_params = state
  return d_params, d_x, None, d_carry0, None, None, None


_skip = jax.custom_vjp(
  lambda cell, chunk, reverse, *args: _skip_fwd(cell, chunk, reverse, *args)[0],
  nondiff_argnums=(0, 1, 2),
)
_skip.defvjp(_skip_fwd, _skip_bwd)


@jax.custom_vjp
def _permute(a, order, inverse):
  """a[order] along axis 0, with the gradient as a gather by `inverse` (no scatter-add)."""
  return a[order]


_permute.defvjp(
  lambda a, order, inverse: (a[order], inverse), lambda inverse, g: (g[inverse], None, None)
)


def recur_skipping(
  cell: str, params, x_BTF, valid_BT, carry0, lengths_B, *, chunk: int, reverse: bool
):
  """The recurrence, input projection included, run only on chunks of rows still running.

  Rows are ranked by descending `lengths_B` (last valid step + 1) and grouped in chunks of
  `chunk`; a step is computed for a chunk while its first (longest) row runs, in one loop per
  number of running chunks, so padded steps cost nothing. Reverse-mode only (custom VJP): the
  backward pass accumulates the weight gradients over running rows.
  Batch-major, unlike `recur_autodiff`: each step reads and writes a few rows, and the caller
  saves two transposes. x_BTF f32[B, T, F] (any values at invalid steps: they are replaced by
  0 and get gradient 0), valid_BT bool[B, T], carry0 f32[B, D] or (c, h), lengths_B i32[B],
  all in any row order. Returns (h_BTD f32[B, T, D], final carry) in the same order; h_BTD
  equals `recur_autodiff`'s (transposed) for t < lengths_B and is undefined after it.
  """
  order = jnp.argsort(-lengths_B, stable=True)
  inverse = jnp.argsort(order)

  def sort(tree, by=order, undo=inverse):
    return jax.tree.map(lambda a: _permute(a, by, undo), tree)

  # Only the small arrays are sorted here; x, the outputs and their gradients stay in the
  # caller's order and the loops fetch or write their running rows by index.
  args = (x_BTF, valid_BT[order], sort(carry0), lengths_B[order], order, inverse)
  h_BTD, final = _skip(cell, chunk, reverse, params, *args)
  return h_BTD, sort(final, inverse, order)
