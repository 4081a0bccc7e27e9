"""Reading the figures the benchmark scripts print (shared by the bench tests)."""

import math


def positive(text: str) -> float:
  """A printed figure as a float, asserted finite and > 0 (a rotten line reads nan/0)."""
  value = float(text)
  assert math.isfinite(value) and value > 0, text
  return value
