"""GRU and LSTM cells as pure functions, and the two recurrence kernels the padded scan runs.

Both cells share one fused parameter layout, with gate blocks side by side along the last axis:
`w_i f32[F, G*D]`, `b_i f32[G*D]`, `w_h f32[D, G*D]`, `b_h f32[G*D]`, with G = 3 gates
(r, z, n) for the GRU and G = 4 (i, f, g, o) for the LSTM. The input half `x @ w_i + b_i` has no
time dependence, so the scan computes it for every step in one matmul; only `h @ w_h + b_h`
and the elementwise gates stay inside the recurrence.

GRU (`flax.linen.GRUCell`; also PyTorch's `nn.GRU`, which keeps both biases):
  r = σ(gi_r + gh_r), z = σ(gi_z + gh_z), n = tanh(gi_n + r * gh_n), h' = (1 - z) n + z h.
LSTM (`flax.linen.OptimizedLSTMCell`; carry `(c, h)` as in flax):
  i, f, o = σ(.), g = tanh(.) of gi + gh;  c' = f c + i g,  h' = o tanh(c').
Flax has one bias per gate, so `*_from_flax` puts zeros in the other and `*_to_flax` folds the
two together; the functions computed are identical either way.
"""

import jax
import jax.numpy as jnp
from jax import lax

GATES = {"gru": 3, "lstm": 4}
_FLAX_NAMES = {"gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o")}


def _init(key, input_size: int, hidden: int, cell: str):
  """Flax's default initialisers: lecun_normal input kernels, orthogonal per gate, zero biases."""
  gates = GATES[cell]
  k_in, *k_rec = jax.random.split(key, gates + 1)
  orthogonal = jax.nn.initializers.orthogonal()
  return {
    "w_i": jax.nn.initializers.lecun_normal()(k_in, (input_size, gates * hidden)),
    "b_i": jnp.zeros((gates * hidden,), jnp.float32),
    "w_h": jnp.concatenate([orthogonal(k, (hidden, hidden)) for k in k_rec], axis=1),
    "b_h": jnp.zeros((gates * hidden,), jnp.float32),
  }


def init_gru(key, input_size: int, hidden: int) -> dict:
  """GRU parameters: w_i f32[F, 3D], b_i f32[3D], w_h f32[D, 3D], b_h f32[3D] (gates r, z, n)."""
  return _init(key, input_size, hidden, "gru")


def init_lstm(key, input_size: int, hidden: int) -> dict:
  """LSTM parameters: w_i f32[F, 4D], b_i f32[4D], w_h f32[D, 4D], b_h f32[4D] (i, f, g, o)."""
  return _init(key, input_size, hidden, "lstm")


def _unwrap(flax_params):
  return flax_params["params"] if "params" in flax_params else flax_params


def _zeros_like_bias(kernel):
  return jnp.zeros(kernel.shape[-1:], kernel.dtype)


def gru_from_flax(flax_params) -> dict:
  """Our GRU parameters from a `flax.linen.GRUCell`'s (keys ir, iz, in, hr, hz, hn)."""
  p = _unwrap(flax_params)
  names = _FLAX_NAMES["gru"]
  return {
    "w_i": jnp.concatenate([p[f"i{g}"]["kernel"] for g in names], axis=1),
    "b_i": jnp.concatenate([p[f"i{g}"]["bias"] for g in names]),
    "w_h": jnp.concatenate([p[f"h{g}"]["kernel"] for g in names], axis=1),
    "b_h": jnp.concatenate(
      [
        _zeros_like_bias(p["hr"]["kernel"]),
        _zeros_like_bias(p["hz"]["kernel"]),
        p["hn"]["bias"],
      ]
    ),
  }


def gru_to_flax(params) -> dict:
  """`flax.linen.GRUCell` parameters from ours; b_h's r and z blocks fold into input biases."""
  w_i, w_h = jnp.split(params["w_i"], 3, axis=1), jnp.split(params["w_h"], 3, axis=1)
  b_i, b_h = jnp.split(params["b_i"], 3), jnp.split(params["b_h"], 3)
  out = {}
  for k, g in enumerate(_FLAX_NAMES["gru"]):
    out[f"i{g}"] = {"kernel": w_i[k], "bias": b_i[k] + b_h[k] if g != "n" else b_i[k]}
    out[f"h{g}"] = {"kernel": w_h[k]}
  out["hn"]["bias"] = b_h[2]
  return out


def lstm_from_flax(flax_params) -> dict:
  """Our LSTM parameters from a flax `OptimizedLSTMCell`'s or `LSTMCell`'s (ii..io, hi..ho)."""
  p = _unwrap(flax_params)
  names = _FLAX_NAMES["lstm"]
  w_i = jnp.concatenate([p[f"i{g}"]["kernel"] for g in names], axis=1)
  return {
    "w_i": w_i,
    "b_i": _zeros_like_bias(w_i),
    "w_h": jnp.concatenate([p[f"h{g}"]["kernel"] for g in names], axis=1),
    "b_h": jnp.concatenate([p[f"h{g}"]["bias"] for g in names]),
  }


def lstm_to_flax(params) -> dict:
  """`flax.linen.OptimizedLSTMCell` parameters from ours; b_i folds into the hidden biases."""
  w_i, w_h = jnp.split(params["w_i"], 4, axis=1), jnp.split(params["w_h"], 4, axis=1)
  bias = jnp.split(params["b_i"] + params["b_h"], 4)
  out = {}
  for k, g in enumerate(_FLAX_NAMES["lstm"]):
    out[f"i{g}"] = {"kernel": w_i[k]}
    out[f"h{g}"] = {"kernel": w_h[k], "bias": bias[k]}
  return out


def zero_carry(cell: str, batch_shape: tuple, hidden: int):
  """Zero initial carry: GRU f32[..., D]; LSTM a tuple (c, h) of f32[..., D]."""
  if cell not in GATES:
    raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
  zeros = jnp.zeros((*batch_shape, hidden), jnp.float32)
  return (zeros, zeros) if cell == "lstm" else zeros


def hidden_state(cell: str, carry):
  """The output h of a carry: f32[..., D]."""
  return carry[1] if cell == "lstm" else carry


def gru_forward(gi, gh, h):
  """GRU update from gi, gh f32[B, 3D] and h f32[B, D] -> (h' f32[B, D], acts f32[B, 4D]).

  acts = (r, z, n, gh_n): what `gru_backward` needs, so the backward pass recomputes nothing.
  """
  gi_r, gi_z, gi_n = jnp.split(gi, 3, axis=-1)
  gh_r, gh_z, gh_n = jnp.split(gh, 3, axis=-1)
  r = jax.nn.sigmoid(gi_r + gh_r)
  z = jax.nn.sigmoid(gi_z + gh_z)
  n = jnp.tanh(gi_n + r * gh_n)
  return n + z * (h - n), jnp.concatenate([r, z, n, gh_n], axis=-1)


def gru_backward(acts, h, new, d_new):
  """VJP of `gru_forward` at saved acts: (d_gi, d_gh f32[B, 3D], d_h f32[B, D] not via gh).

  `new` (the carry after the step) is unused: the signature matches `lstm_backward`'s.
  """
  del new
  r, z, n, gh_n = jnp.split(acts, 4, axis=-1)
  d_z = d_new * (h - n) * z * (1.0 - z)
  d_n = d_new * (1.0 - z) * (1.0 - n * n)
  d_r = d_n * gh_n * r * (1.0 - r)
  return (
    jnp.concatenate([d_r, d_z, d_n], axis=-1),
    jnp.concatenate([d_r, d_z, d_n * r], axis=-1),
    d_new * z,
  )


def lstm_forward(gi, gh, carry):
  """LSTM update from gi, gh f32[B, 4D] and (c, h) f32[B, D] -> ((c', h'), acts f32[B, 4D]).

  acts = (i, f, g, o) after their nonlinearities, for `lstm_backward`. tanh(c') is not saved:
  the backward pass recomputes it from c', which the caller keeps anyway (saving it made the
  residuals 25% larger, and on a CPU filling those buffers is a visible part of the time).
  """
  c, _ = carry
  a_i, a_f, a_g, a_o = jnp.split(gi + gh, 4, axis=-1)
  i, f, o, g = jax.nn.sigmoid(a_i), jax.nn.sigmoid(a_f), jax.nn.sigmoid(a_o), jnp.tanh(a_g)
  new_c = f * c + i * g
  return (new_c, o * jnp.tanh(new_c)), jnp.concatenate([i, f, g, o], axis=-1)


def lstm_backward(acts, carry, new, d_new):
  """VJP of `lstm_forward` at saved acts, given the carry before (c, h) and after (c', h').

  Returns (d_gi, d_gh f32[B, 4D] (equal), (d_c, d_h=0)).
  """
  c, _ = carry
  tanh_c = jnp.tanh(new[0])
  d_c_new, d_h_new = d_new
  i, f, g, o = jnp.split(acts, 4, axis=-1)
  d_c = d_c_new + d_h_new * o * (1.0 - tanh_c * tanh_c)
  d_a = jnp.concatenate(
    [
      d_c * g * i * (1.0 - i),
      d_c * c * f * (1.0 - f),
      d_c * i * (1.0 - g * g),
      d_h_new * tanh_c * o * (1.0 - o),
    ],
    axis=-1,
  )
  return d_a, d_a, (d_c * f, jnp.zeros_like(d_h_new))


def gru_gates(gi, gh, h):
  """GRU update from gate pre-activations gi, gh f32[B, 3D] and h f32[B, D] -> f32[B, D]."""
  return gru_forward(gi, gh, h)[0]


def lstm_gates(gi, gh, carry):
  """LSTM update from gi, gh f32[B, 4D] and carry (c, h) f32[B, D] -> (c', h')."""
  return lstm_forward(gi, gh, carry)[0]


GATE_FNS = {"gru": gru_gates, "lstm": lstm_gates}
FORWARD = {"gru": gru_forward, "lstm": lstm_forward}
BACKWARD = {"gru": gru_backward, "lstm": lstm_backward}


def cell_step(cell: str, params, carry, x):
  """One step of the cell on x f32[B, F] (for reference loops): returns (carry', h' f32[B, D])."""
  gi = add_bias(x @ params["w_i"], params["b_i"])
  gh = add_bias(hidden_state(cell, carry) @ params["w_h"], params["b_h"])
  new = GATE_FNS[cell](gi, gh, carry)
  return new, hidden_state(cell, new)


def add_bias(y, b):
  """y f32[..., G] + b f32[G], broadcast explicitly (rank promotion is an error in tests)."""
  return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def keep_valid(valid_B, new, old):
  """new where valid_B[b] else old, per row b of every leaf of a carry (frozen carry)."""
  return jax.tree.map(lambda n, o: jnp.where(valid_B[:, None], n, o), new, old)


def recur_autodiff(cell: str, w_h, b_h, gi_TBG, valid_TB, carry0, *, reverse: bool):
  """Reference recurrence, differentiated by JAX: frozen carry wherever valid is False.

  gi_TBG f32[T, B, G*D] (input projections), valid_TB bool[T, B], carry0 f32[B, D] or (c, h).
  Returns (h_TBD f32[T, B, D]: h of the carry after each step, final carry).
  """
  gates = GATE_FNS[cell]

  def step(carry, inputs):
    gi, valid = inputs
    new = gates(gi, add_bias(hidden_state(cell, carry) @ w_h, b_h), carry)
    carry = keep_valid(valid, new, carry)
    return carry, hidden_state(cell, carry)

  final, h_TBD = lax.scan(step, carry0, (gi_TBG, valid_TB), reverse=reverse)
  return h_TBD, final
