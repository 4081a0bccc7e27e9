"""The generation benchmark runs end to end (tiny shapes) and prints its figures.

Benchmarks are not tests: only that the ratio line carries a finite positive number and
that the greedy token agreement of the two implementations is reported is checked,
never a timing threshold. (The agreement itself is checked by tests/test_export.py.)
"""

import math
import re

import pytest

from bench import generate as bench_generate
from tests.printed import positive

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

RATIO = re.compile(r"^jax/pytorch decode tokens/s: (\S+)x$")
RATES = re.compile(r"^decode tokens/s .*: jax (\S+) \(.*\), pytorch (\S+) \(")
AGREE = re.compile(r"^greedy token agreement, first (\d+) steps: (\d+)/(\d+) \(\S+%\); "
                   r"rows equal over all (\d+) steps: (\d+)/(\d+)")


def test_tiny_generation_benchmark_prints_ratio_and_agreement():
  lines = []
  # One torch thread: on a loaded 2-core machine torch's intra-op threads wait on each
  # other for every tiny op, which makes its side 10-100x slower and the test long.
  results = bench_generate.main(["--tiny", "--torch-threads", "1", "--device-note", "pytest"],
                                out=lines.append)
  text = "\n".join(lines)
  ratio = [positive(m.group(1)) for m in map(RATIO.match, lines) if m]
  assert len(ratio) == 1, text
  rates = [m for m in map(RATES.match, lines) if m]
  assert len(rates) == 1 and all(positive(x) for x in rates[0].groups()), text
  agree = [m for m in map(AGREE.match, lines) if m]
  assert len(agree) == 1, text
  steps, equal, total, n, rows_equal, rows = map(int, agree[0].groups())
  tiny = bench_generate.TINY
  assert (steps, total, n, rows) == (tiny.check_steps, tiny.batch * tiny.check_steps,
                                     tiny.new_tokens, tiny.batch)
  assert 0 <= equal <= total and 0 <= rows_equal <= rows
  # The same figures come back as data.
  assert math.isclose(results["ratio"], ratio[0], rel_tol=0.01)
  assert results["agreement"]["first_equal"] == equal
