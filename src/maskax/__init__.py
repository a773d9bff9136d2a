"""maskax: which elements count? Masks, masked losses and padded scans in JAX.

The layers, each importing only from the ones above it (docs/design.md, section 2):
  maskax.masking   what counts: masks, masked losses, loss sampling, confusion-matrix metrics
  maskax.rnn       padded scans over GRU/LSTM cells, mask-aware layers, decoding
  maskax.data      host-side data: tokenizers, corpora, prepared shards, resumable iterators
  maskax.models    the experiments' models, built from the two layers above
  maskax.training  the loop, evaluation, sharding, checkpoints, preemption, progress
  maskax.ablation  sweeps over configs and seeds, their statistics and reports

Submodules are imported explicitly (`from maskax.masking import losses`); nothing heavy runs at
import.
"""

__version__ = "0.1.0"
