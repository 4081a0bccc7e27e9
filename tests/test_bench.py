"""The MoE-layer benchmark runs end to end (tiny shapes) and prints its figures.

Benchmarks are not tests: only that every ratio line and the MFU line are printed
with finite positive numbers is checked, never a timing threshold.
"""

import dataclasses
import math
import re

from bench import moe_layer
from tests.printed import positive

RATIO = re.compile(r"^(moe_\S+)/\(top_k\*dense\) (fwd\+bwd|fwd): (\S+)x\b")
MFU = re.compile(r"^MFU vs measured matmul peak: (\S+)%$")
XLA = re.compile(r"^XLA cost_analysis flops: (\S+) GFLOP; formula / XLA = (\S+)$")


def test_tiny_benchmark_prints_ratio_and_mfu_lines():
  lines = []
  results = moe_layer.main(["--tiny", "--device-note", "pytest"], out=lines.append)
  ratios = {}
  for line in lines:
    m = RATIO.match(line)
    if m:
      ratios[(m.group(1), m.group(2))] = positive(m.group(3))
  expected = {(name, mode) for name in ("moe_dropless", "moe_dropless_blocked",
                                        "moe_capacity1.5", "moe_capacity2.0")
              for mode in ("fwd+bwd", "fwd")}
  assert set(ratios) == expected, "\n".join(lines)
  # Optional figure: printed as "n/a (reason)" if the layer's internals moved.
  assert any(line.startswith(("router+dispatch share of moe_dropless",
                              "router+dispatch overhead for moe_dropless: n/a"))
             for line in lines)
  mfu = [positive(m.group(1)) for m in map(MFU.match, lines) if m]
  assert len(mfu) == 1, "\n".join(lines)
  xla = [m for m in map(XLA.match, lines) if m]
  assert len(xla) == 1 and positive(xla[0].group(2)), "\n".join(lines)
  # The same figures come back as data.
  for (name, mode), printed in ratios.items():
    assert math.isclose(results["layer"][f"{name}/{mode}"], printed, abs_tol=0.006)
  assert results["step"]["mfu"] > 0


def test_flop_formula_counts_active_experts_only():
  cfg = moe_layer.vlm_config(moe_layer.FULL)
  f = moe_layer.train_step_flops(cfg, 8, 256)
  t = cfg.text
  d, ff, tokens = t.hidden_size, t.intermediate_size, 8 * 256
  # One more active expert per token in every MoE layer adds 6 * 3*D*F per token.
  more = moe_layer.train_step_flops(
      moe_layer.vlm_config(dataclasses.replace(moe_layer.FULL, top_k=3)), 8, 256)
  added = more["ffn"] - f["ffn"]
  assert added == 6 * len(t.moe_layers()) * 3 * d * ff * tokens
  # Dropless with ragged_dot (dense on CPU) executes every row against all E experts,
  # (E - 1) x the active term beyond it; the blocked gmm executes the active rows only
  # (its padding is data-dependent and left out). Model FLOPs are the same.
  dense, blocked = (train_step_flops_with(cfg, gmm_impl=impl) for impl in ("ragged_dot",
                                                                           "blocked"))
  assert dense["expert_extra"] == 6 * len(t.moe_layers()) * (4 - 1) * 2 * tokens * 3 * d * ff
  assert blocked["expert_extra"] == 0
  assert dense["model"] == blocked["model"] == f["model"]


def train_step_flops_with(cfg, **moe):
  """The formula for `cfg` with MoE config fields replaced."""
  t = cfg.text
  text = dataclasses.replace(t, moe=dataclasses.replace(t.moe, **moe))
  return moe_layer.train_step_flops(dataclasses.replace(cfg, text=text), 8, 256)
