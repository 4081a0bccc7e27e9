"""bench.packing runs end to end (tiny shapes) and prints its line. Benchmarks are not
tests: no timing threshold."""

import math
import re

import numpy as np
import pytest

from bench import packing as bench_packing
from tests.printed import positive

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

LINE = re.compile(r"^packed tokens/s: jax (\S+), torch (\S+); jax/torch = (\S+) x; "
                  r"pad fraction jax (\S+), torch (\S+); packed/padded \(ours\) = (\S+) x$")


def test_tiny_packing_benchmark_prints_its_line_and_checks_the_losses():
  lines = []
  results = bench_packing.main(["--tiny", "--torch-threads", "1"], out=lines.append)
  text = "\n".join(lines)
  found = [m.groups() for m in map(LINE.match, lines) if m]
  assert len(found) == 1, text
  jax_rate, torch_rate, ratio = (positive(x) for x in found[0][:3])
  pad_jax, pad_torch = (float(x) for x in found[0][3:5])
  packed_over_padded = positive(found[0][5])
  assert 0 <= pad_jax < pad_torch < 1, text  # the tiny samples leave torch more padding
  assert math.isclose(results["jax"], jax_rate, rel_tol=1e-3)
  assert math.isclose(results["torch"], torch_rate, rel_tol=1e-3)
  assert math.isclose(results["ratio"], ratio, rel_tol=0.01)
  assert math.isclose(results["packed_over_padded"], packed_over_padded, rel_tol=0.01)
  assert results["pad_padded"] > pad_jax
  # Same samples, same losses: every sample's CE, packed (ours) vs padded (transformers).
  assert results["ce_max_rel_diff"] <= bench_packing.CE_TOL
  assert "match" in text and {k for k in results["stages"]} == {1, 3}


def test_reference_batches_group_like_the_reference_sampler():
  samples = [bench_packing.Sample(np.zeros(n, np.int32), np.zeros(n, np.int32),
                                  None if i % 5 == 4 else np.zeros(1))
             for i, n in enumerate(range(10, 90))]
  stage = bench_packing.Stage("s", (), torch_batch=4, group_world=2)
  batches = bench_packing.reference_batches(samples, list(range(80)), stage)
  assert sorted(i for b in batches for i in b) == list(range(80))
  for b in batches:  # one modality per batch
    assert len({samples[i].pixels is None for i in b}) == 1
  # A full megabatch (2 x 4 image samples) is dealt into 2 chunks of equal token count.
  chunks = bench_packing.split_to_even_chunks([7, 6, 5, 4, 3, 2, 1, 0],
                                              np.asarray([1, 2, 3, 4, 5, 6, 7, 8]), 2)
  assert [sorted(c) for c in chunks] == [[0, 3, 4, 7], [1, 2, 5, 6]]

