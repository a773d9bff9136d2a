"""Padded scans over GRU/LSTM cells: frozen carry past each length, named output policies.

Semantics (docs/design.md, section 1). A step (b, t) is *valid* when `t < lengths[b]` and
`mask[b, t]`. A valid step updates the carry as usual; an invalid one leaves it unchanged, so
the final carry is the carry after the last valid step, or the initial carry when there is
none (flax's `nn.RNN(seq_lengths=...)` returns the state after the padding for length 0: its
`_select_last_carry` indexes step `length - 1 = -1`). Outputs at invalid steps follow a policy:
- `zero`: 0, as TF's `dynamic_rnn` and cuDNN do;
- `carry_forward`: h of the unchanged carry, i.e. the last valid output in processing order, or
  the initial h before any valid step. Keras' generic RNN repeats the last output too but starts
  from zeros, so the two agree whenever the initial carry is zero.
`reverse=True` processes steps T-1 ... 0 under the same validity rule. Invalid steps are no-ops
for the carry, so the padding at the end is skipped and each valid prefix runs x[len-1] ... x[0]
with outputs at their original positions (TF `reverse_sequence` + `dynamic_rnn`); a hole in the
mask is skipped in either direction. Under `carry_forward` the padded tail of a reversed
sequence emits the initial h (nothing processed yet), as Keras' `go_backwards` does.

Inputs at invalid steps are replaced by 0 before the input projection, so NaN/inf there never
reach the cell; gradients wrt them are exactly 0 (`jnp.where`, never a multiply by the mask).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskax.rnn import cells, skip_scan
from maskax.rnn.cells import (  # noqa: F401  (re-exported: the scan API in one place)
  gru_from_flax,
  gru_to_flax,
  init_gru,
  init_lstm,
  lstm_from_flax,
  lstm_to_flax,
  zero_carry,
)

POLICIES = ("zero", "carry_forward")


def _check(params, x, lengths, mask, initial_carry, cell, output_policy):
  if cell not in cells.GATES:
    raise ValueError(f"cell must be one of {sorted(cells.GATES)}, got {cell!r}")
  if output_policy not in POLICIES:
    raise ValueError(f"output_policy must be one of {POLICIES}, got {output_policy!r}")
  if x.ndim < 2:
    raise ValueError(f"x must be f32[..., T, F], got shape {x.shape}")
  batch_shape, (steps, features) = x.shape[:-2], x.shape[-2:]
  hidden, width = params["w_h"].shape
  if width != cells.GATES[cell] * hidden or params["w_i"].shape != (features, width):
    raise ValueError(
      f"params do not fit a {cell} cell with F={features}: w_i {params['w_i'].shape}, "
      f"w_h {params['w_h'].shape}; build them with init_{cell}(key, {features}, hidden)"
    )
  if lengths is not None:
    if lengths.shape != batch_shape or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(
        f"lengths must be int[{batch_shape}] for x of shape {x.shape}, got "
        f"{lengths.dtype}{list(lengths.shape)}"
      )
    try:
      concrete = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:
      concrete = None
    if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() > steps):
      raise ValueError(
        f"lengths must lie in [0, T={steps}], got {concrete.min()}..{concrete.max()}"
      )
  if mask is not None and (mask.shape != (*batch_shape, steps) or mask.dtype != jnp.bool_):
    raise ValueError(
      f"mask must be bool{[*batch_shape, steps]} (True = step counts), got "
      f"{mask.dtype}{list(mask.shape)}; build it with lengths or a comparison"
    )
  if initial_carry is not None:
    want = jax.eval_shape(lambda: cells.zero_carry(cell, batch_shape, hidden))
    got = jax.tree.map(jnp.shape, initial_carry)
    if jax.tree.structure(initial_carry) != jax.tree.structure(want) or (
      got != jax.tree.map(jnp.shape, want)
    ):
      raise ValueError(
        f"initial_carry must look like zero_carry({cell!r}, {batch_shape}, {hidden}) "
        f"(LSTM: a tuple (c, h)), got shapes {got}"
      )


def step_validity(steps: int, lengths=None, mask=None, batch_shape=()):
  """Which steps count: (t < lengths) AND mask.

  lengths i32[...], mask bool[..., T] -> bool[..., T].
  """
  valid = jnp.ones((*batch_shape, steps), bool)
  if lengths is not None:
    valid = jnp.arange(steps)[(None,) * len(batch_shape)] < lengths[..., None]
  if mask is not None:
    valid = valid & mask
  return valid


def _skip_padding(cell, params, x_BTF, valid_BT, carry0, *, reverse, output_policy, row_groups):
  """`recur_skipping` with rows ranked by last valid step, then the output policy."""
  batch, steps = valid_BT.shape
  last = jnp.max(jnp.where(valid_BT, jnp.arange(1, steps + 1)[None], 0), axis=1)
  chunk = -(-batch // min(row_groups, batch))
  h_BTD, final = skip_scan.recur_skipping(
    cell, params, x_BTF, valid_BT, carry0, last, chunk=chunk, reverse=reverse
  )
  if output_policy == "carry_forward":
    # Past its last valid step a row's carry is frozen: the final carry going forward, the
    # initial carry going backward (nothing processed yet).
    frozen = cells.hidden_state(cell, carry0 if reverse else final)
    running = (jnp.arange(steps)[None, :] < last[:, None])[..., None]
    h_BTD = jnp.where(running, h_BTD, frozen[:, None])
  return h_BTD, final


def padded_scan(
  params,
  x,
  lengths=None,
  *,
  cell="gru",
  mask=None,
  initial_carry=None,
  reverse=False,
  output_policy="zero",
  skip_padding=False,
  row_groups=16,
):
  """Runs a GRU/LSTM over padded sequences with frozen carry at invalid steps (module docstring).

  params: from `init_gru`/`init_lstm` (or `*_from_flax`); x f32[..., T, F]; lengths i32[...] in
  [0, T]; mask bool[..., T]; initial_carry f32[..., D] (LSTM: (c, h)), zeros by default.
  Returns (outputs f32[..., T, D], final carry shaped like initial_carry).

  Two implementations, equal to float rounding (tests/scan_test.py):
  - default: `lax.scan` over all T steps for every row, the input projection hoisted into one
    matmul, JAX autodiff (so `jax.jvp`, `jax.hessian` work). The simple path for accelerators.
  - `skip_padding=True`: rows sorted by last valid step and cut into `row_groups` chunks; a
    chunk's steps run only while its longest row does, input projection included, and a
    hand-written backward pass accumulates weight gradients over those rows (custom VJP:
    reverse mode only). A CPU path: see README "Benchmarks" for its speed against flax's
    `nn.RNN` (benchmarks/scan_bench.py). Each row group is one loop forward and one backward,
    so compile time grows with `row_groups` (B=64, T=100, D=256: about 3 s at 8, 6 s at 16,
    13 s at 32); finer groups run less padding (16 vs 8: 3-7% faster on that benchmark).
  """
  x = jnp.asarray(x)
  lengths = None if lengths is None else jnp.asarray(lengths)
  mask = None if mask is None else jnp.asarray(mask)
  _check(params, x, lengths, mask, initial_carry, cell, output_policy)
  batch_shape, (steps, features) = x.shape[:-2], x.shape[-2:]
  hidden, batch = params["w_h"].shape[0], math.prod(batch_shape)
  if initial_carry is None:
    initial_carry = cells.zero_carry(cell, batch_shape, hidden)
  carry0 = jax.tree.map(lambda c: c.reshape(batch, hidden), initial_carry)
  valid_BT = step_validity(steps, lengths, mask, batch_shape).reshape(batch, steps)
  x_BTF = x.reshape(batch, steps, features)
  if skip_padding:
    options = dict(reverse=reverse, output_policy=output_policy, row_groups=row_groups)
    h_BTD, final = _skip_padding(cell, params, x_BTF, valid_BT, carry0, **options)
  else:
    x_TBF = jnp.where(valid_BT.T[..., None], jnp.swapaxes(x_BTF, 0, 1), 0.0)
    # The input projection has no time dependence: one matmul for all steps (hoisted).
    gi_TBG = cells.add_bias(x_TBF @ params["w_i"], params["b_i"])
    h_TBD, final = cells.recur_autodiff(
      cell, params["w_h"], params["b_h"], gi_TBG, valid_BT.T, carry0, reverse=reverse
    )
    h_BTD = jnp.swapaxes(h_TBD, 0, 1)
  if output_policy == "zero":
    h_BTD = jnp.where(valid_BT[..., None], h_BTD, 0.0)
  outputs = h_BTD.reshape(*batch_shape, steps, hidden)
  return outputs, jax.tree.map(lambda c: c.reshape(*batch_shape, hidden), final)


def bidirectional_scan(
  params_fwd,
  params_bwd,
  x,
  lengths=None,
  *,
  cell,
  mask=None,
  initial_carry=None,
  output_policy="zero",
  skip_padding=False,
):
  """Forward and reversed padded scans, outputs concatenated on the feature axis.

  x f32[..., T, F]; lengths i32[...]; mask bool[..., T]; initial_carry None or a pair
  (carry_fwd, carry_bwd). Returns (outputs f32[..., T, 2D], (carry_fwd, carry_bwd)).
  """
  carry_fwd, carry_bwd = (None, None) if initial_carry is None else initial_carry
  options = dict(cell=cell, mask=mask, output_policy=output_policy, skip_padding=skip_padding)
  y_fwd, c_fwd = padded_scan(params_fwd, x, lengths, initial_carry=carry_fwd, **options)
  y_bwd, c_bwd = padded_scan(
    params_bwd, x, lengths, initial_carry=carry_bwd, reverse=True, **options
  )
  return jnp.concatenate([y_fwd, y_bwd], axis=-1), (c_fwd, c_bwd)


def stacked_scan(
  layers,
  x,
  lengths=None,
  *,
  cell,
  bidirectional=False,
  dropout_rate=0.0,
  key=None,
  deterministic=True,
  initial_carry=None,
  mask=None,
  output_policy="zero",
  skip_padding=False,
):
  """Stacked (optionally bidirectional) padded scans with dropout between layers.

  layers: list of params, or of (params_fwd, params_bwd) pairs when bidirectional; layer l
  takes F_l inputs. x f32[..., T, F]; lengths i32[...]; mask bool[..., T]; initial_carry None
  or a list with one carry (a pair when bidirectional) per layer. Dropout (inverted, explicit
  `key`) applies to each layer's outputs before the next layer, at valid steps only.
  Returns (outputs f32[..., T, D] (2D when bidirectional), list of final carries).
  """
  x = jnp.asarray(x)
  if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
    raise ValueError(f"mask must be bool (True = step counts), got {jnp.asarray(mask).dtype}")
  use_dropout = not deterministic and dropout_rate > 0.0
  if use_dropout and key is None:
    raise ValueError("stacked_scan needs key=jax.random.key(...) for dropout (deterministic=False)")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must lie in [0, 1), got {dropout_rate}")
  if initial_carry is not None and len(initial_carry) != len(layers):
    raise ValueError(
      f"initial_carry needs one carry per layer ({len(layers)}), got {len(initial_carry)}"
    )
  valid = step_validity(
    x.shape[-2], None if lengths is None else jnp.asarray(lengths), mask, x.shape[:-2]
  )
  options = dict(cell=cell, mask=valid, output_policy=output_policy, skip_padding=skip_padding)
  carries = []
  for depth, layer in enumerate(layers):
    if depth > 0 and use_dropout:
      keep = jax.random.bernoulli(jax.random.fold_in(key, depth), 1.0 - dropout_rate, x.shape)
      keep = keep & valid[..., None]
      x = jnp.where(keep, x / (1.0 - dropout_rate), 0.0)
    carry = None if initial_carry is None else initial_carry[depth]
    if bidirectional:
      x, carry = bidirectional_scan(*layer, x, initial_carry=carry, **options)
    else:
      x, carry = padded_scan(layer, x, initial_carry=carry, **options)
    carries.append(carry)
  return x, carries


def _init_fn(cell, input_size, hidden):
  if cell not in cells.GATES:
    raise ValueError(f"cell must be one of {sorted(cells.GATES)}, got {cell!r}")
  init = cells.init_gru if cell == "gru" else cells.init_lstm
  return lambda key: init(key, input_size, hidden)


class PaddedRNN(nn.Module):
  """`padded_scan` as a Flax module, used like `nn.RNN`; parameters live under 'cell'.

  __call__: x f32[..., T, F], lengths i32[...], mask bool[..., T]; returns outputs
  f32[..., T, D], or (final carry, outputs) with return_carry=True (nn.RNN's order).
  """

  cell: str
  hidden: int
  reverse: bool = False
  output_policy: str = "zero"
  skip_padding: bool = False

  @nn.compact
  def __call__(self, x, lengths=None, *, mask=None, initial_carry=None, return_carry=False):
    params = self.param("cell", _init_fn(self.cell, x.shape[-1], self.hidden))
    outputs, carry = padded_scan(
      params,
      x,
      lengths,
      cell=self.cell,
      mask=mask,
      initial_carry=initial_carry,
      reverse=self.reverse,
      output_policy=self.output_policy,
      skip_padding=self.skip_padding,
    )
    return (carry, outputs) if return_carry else outputs


class StackedRNN(nn.Module):
  """`stacked_scan` as a Flax module; dropout draws from the 'dropout' RNG stream.

  Parameters: 'layer_{l}' (or 'layer_{l}_fwd' and 'layer_{l}_bwd'). __call__: x f32[..., T, F],
  lengths i32[...], mask bool[..., T], initial_carry a list per layer; returns outputs
  f32[..., T, D] (2D if bidirectional), or (list of final carries, outputs) with return_carry.
  """

  cell: str
  hidden: int
  num_layers: int
  bidirectional: bool = False
  dropout_rate: float = 0.0
  output_policy: str = "zero"
  skip_padding: bool = False

  @nn.compact
  def __call__(
    self,
    x,
    lengths=None,
    *,
    mask=None,
    initial_carry=None,
    deterministic=True,
    return_carry=False,
  ):
    layers, width = [], x.shape[-1]
    for depth in range(self.num_layers):
      if self.bidirectional:
        layers.append(
          tuple(
            self.param(f"layer_{depth}_{side}", _init_fn(self.cell, width, self.hidden))
            for side in ("fwd", "bwd")
          )
        )
        width = 2 * self.hidden
      else:
        layers.append(self.param(f"layer_{depth}", _init_fn(self.cell, width, self.hidden)))
        width = self.hidden
    use_dropout = not deterministic and self.dropout_rate > 0.0
    outputs, carries = stacked_scan(
      layers,
      x,
      lengths,
      cell=self.cell,
      bidirectional=self.bidirectional,
      dropout_rate=self.dropout_rate,
      key=self.make_rng("dropout") if use_dropout else None,
      deterministic=deterministic,
      initial_carry=initial_carry,
      mask=mask,
      output_policy=self.output_policy,
      skip_padding=self.skip_padding,
    )
    return (carries, outputs) if return_carry else outputs
