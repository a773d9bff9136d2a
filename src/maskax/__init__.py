"""maskax: which elements count? Masks, masked losses and padded scans in JAX.

Submodules are imported explicitly (`from maskax import losses`); nothing heavy runs at import.
"""

__version__ = "0.1.0"
