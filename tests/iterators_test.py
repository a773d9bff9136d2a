"""Host-side bucketing of variable lengths into a few padded shapes (maskax.data.iterators)."""

import numpy as np
import pytest

from maskax.data import iterators


def test_bucketing():
  assert iterators.bucket_boundaries(100, 4) == (25, 50, 75, 100)
  assert iterators.bucket_boundaries(100, 3, multiple_of=8) == (40, 72, 100)
  assert iterators.bucket_boundaries(5, 8) == (1, 2, 3, 4, 5)
  bounds = (25, 50, 75, 100)
  assert iterators.bucket_for(0, bounds) == 25 and iterators.bucket_for(25, bounds) == 25
  assert iterators.bucket_for(26, bounds) == 50
  np.testing.assert_array_equal(iterators.bucket_for(np.array([1, 60, 100]), bounds), [25, 75, 100])
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    iterators.bucket_for(101, bounds)
