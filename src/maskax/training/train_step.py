"""The jitted train and eval steps: one division per loss term, skipped non-finite updates.

`train_step(state, batch) -> (state, out)` is pure; it is compiled once with the state
replicated and donated and the batch split over the `data` axis. `out` holds
  finite  bool[]: the loss, every gradient and the updated parameters, optimizer state and
          model state were all finite (else the whole update was skipped: a NaN or infinite
          learning rate, or an update that overflows, is caught here, not only a bad loss);
  sums    {name: (total, weight)} of every loss term and metric, plus `loss` as (value, 1),
          so a log interval reports sum(total) / sum(weight).
With `stop_vote=True` the step also takes `stop_flags` (`sharding.process_flag`, bool[D]) and
`out["stop"]` is their OR over every process: riding on the step's own collectives, the
preemption vote costs no extra dispatch or host sync (see `maskax.training.preemption`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from maskax.training import evaluation
from maskax.training import sharding as sharding_lib
from maskax.masking.losses import safe_div

# Evaluation draws its dropout/sampling key from a fixed fold of the state key.
_EVAL_FOLD = 0x7FFFFFFF


def _objective(terms) -> jax.Array:
  return sum(safe_div(t, w) for t, w in terms.values())


def _all_finite(tree) -> jax.Array:
  # Integer leaves (step counters) are always finite; typed PRNG keys cannot be tested.
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _single_batch_grads(task, state, batch, key):
  def objective(params):
    terms, metrics, model_state = task.loss(params, state.model_state, batch, key, train=True)
    return _objective(terms), (terms, metrics, model_state)

  (loss, (terms, metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
    state.params
  )
  return loss, grads, terms, metrics, model_state


def _accumulated_grads(task, state, batch, key, num_micro):
  """Gradients of sum_k safe_div(total_k, weight_k) over `num_micro` micro-batches.

  Row i of the batch goes to micro-batch i % num_micro, so every micro-batch stays evenly split
  over the devices. The weights are data, not parameters, so
  d/dp sum_k T_k/W_k = sum_k (sum_m dT_km/dp) / W_k: accumulate each term's gradient, divide once.
  """

  def split(x):
    rows = x.shape[0]
    if rows % num_micro:
      raise ValueError(f"batch of {rows} rows does not split into grad_accum_steps={num_micro}.")
    return jnp.swapaxes(x.reshape((rows // num_micro, num_micro) + x.shape[1:]), 0, 1)

  micro = jax.tree.map(split, batch)

  def term_totals(params, model_state, mb, mkey):
    terms, metrics, new_state = task.loss(params, model_state, mb, mkey, train=True)
    return {k: t for k, (t, _) in terms.items()}, (terms, metrics, new_state)

  def body(carry, inputs):
    grads, sums, model_state = carry
    mb, index = inputs
    jac, (terms, metrics, model_state) = jax.jacrev(term_totals, has_aux=True)(
      state.params, model_state, mb, jax.random.fold_in(key, index)
    )
    grads = jax.tree.map(jnp.add, grads, jac)
    sums = jax.tree.map(jnp.add, sums, {"terms": terms, "metrics": metrics})
    return (grads, sums, model_state), None

  first = jax.tree.map(lambda x: x[0], micro)
  jac_shape, (terms_shape, metrics_shape, _) = jax.eval_shape(
    lambda p: jax.jacrev(term_totals, has_aux=True)(p, state.model_state, first, key), state.params
  )
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  init = (
    zeros(jac_shape),
    zeros({"terms": terms_shape, "metrics": metrics_shape}),
    state.model_state,
  )
  (jac, sums, model_state), _ = jax.lax.scan(body, init, (micro, jnp.arange(num_micro)))
  terms = sums["terms"]
  grads = jax.tree.map(
    lambda *gs: sum(g for g in gs),
    *[jax.tree.map(lambda g, w=terms[k][1]: safe_div(g, w), jac[k]) for k in terms],
  )
  return _objective(terms), grads, terms, sums["metrics"], model_state


def make_train_step(task, options, mesh, *, stop_vote: bool = False):
  """Compiles `train_step` once for `task` with state replicated/donated and batch sharded."""

  def train_step(state, batch, *stop_flags):
    key = jax.random.fold_in(state.key, state.step)
    if options.grad_accum_steps == 1:
      loss, grads, terms, metrics, model_state = _single_batch_grads(task, state, batch, key)
    else:
      loss, grads, terms, metrics, model_state = _accumulated_grads(
        task, state, batch, key, options.grad_accum_steps
      )
    updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The new state is checked too: a finite gradient times a NaN, inf or huge learning rate
    # gives a non-finite update that would otherwise be applied and checkpointed.
    finite = (
      jnp.isfinite(loss)
      & _all_finite(grads)
      & _all_finite(params)
      & _all_finite(opt_state)
      & _all_finite(model_state)
    )
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      model_state=keep_if_finite(model_state, state.model_state),
    )
    # A skipped step adds nothing to the logged averages (its numbers may be NaN).
    sums = {**terms, **metrics, "loss": (loss, jnp.float32(1.0))}
    sums = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), sums)
    out = {"finite": finite, "sums": sums}
    if stop_flags:
      out["stop"] = jnp.any(stop_flags[0])
    return new_state, out

  repl, split = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  return jax.jit(
    train_step,
    in_shardings=(repl, split) + ((split,) if stop_vote else ()),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )


def make_eval_step(task, mesh):
  """The task's `evaluation.Evaluator` (None without `task.eval_data`): `task.eval_sums`, or
  every `(total, weight)` term and metric of `task.loss(train=False)`, over each eval batch."""
  if task.eval_data is None:
    return None

  def eval_sums(state, batch):
    key = jax.random.fold_in(state.key, _EVAL_FOLD)
    if task.eval_sums is not None:
      return task.eval_sums(state.params, state.model_state, batch, key)
    terms, metrics, _ = task.loss(state.params, state.model_state, batch, key, train=False)
    return {**terms, **metrics}

  return evaluation.Evaluator(eval_sums, task.eval_data, mesh, finish=task.eval_finish)
