"""Decode throughput of our JAX `generate` vs transformers' PyTorch `generate`, same model.

    python -m bench.generate [--tiny] [--device-note TEXT] [--reps N] [--new-tokens N]
                             [--torch-threads N]

One VLM with the benchmark config of `bench.config` (CLIP-style ViT 4 x 256, 112 px
/ 14 px patches; Qwen2-style decoder 8 x 512, 8 q / 4 kv heads, FFN 1408, 4 experts
top-2 in every other layer, vocab 8000; random N(0, 0.02) weights, fp32) is exported with
`export_vlm(..., layout="llava")` and loaded back by
`transformers.LlavaForConditionalGeneration.from_pretrained`: both sides run the same
weights. Both get the same batch of prompts (an image + text of different lengths,
left-padded), decode greedily with no stop token (exactly `new_tokens` per row) and
never emit the image placeholder (ours masks it; HF gets `suppress_tokens`).

Before any timing the greedy tokens of the two are compared (first `check_steps` steps
and the whole run): timing two programs that compute different things would be moot.

Timing. Each side is called with max_new_tokens = N (prefill + N - 1 decode steps) and
with max_new_tokens = 1 (prefill + first token only); the four calls run in interleaved
rounds (order reversed every other round, see `bench.common.interleaved_times`; with
`per_round` > 1, as in --tiny where a decode step is far below the per-call noise, each
candidate is called that many times per round and the round keeps its fastest). Per
round, decode time = t(N) - t(1) and decode tokens/s = B x (N - 1) / decode time; the
ratio line is the median over rounds of the per-round jax/pytorch rate ratio. The
max_new_tokens=1 call is the prefill figure (vision tower + projector + prompt forward
+ first token). Our call is the library's `generate` as a user calls it (host-side
checks, one jit-compiled program with the prefill and a `lax.while_loop` of decode
steps); HF's is `model.generate` with its default attention (sdpa) and experts
implementation (grouped_mm), DynamicCache, under torch's default thread count unless
`--torch-threads` is given. Our MoE layers decode dropless (`ragged_dot`), which XLA:CPU
lowers densely (every routed row times every expert, see BENCHMARKS.md section 1).

Threads: on a 2-core machine shared with other jobs, torch's default 2 intra-op (OpenMP)
threads can slow its decode 10-20x (each small op waits for a descheduled thread), while
XLA's thread pool does not suffer so. The printed thread count and `--torch-threads 1`
(and `XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`
for single-threaded XLA) are there to tell that apart from the implementations' speed.

`--tiny` shrinks every shape so the whole run takes seconds (tests/test_bench_generate.py).
Benchmarks print figures; they assert nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, config  # noqa: E402
from bench.common import fmt_time, interleaved_times, median  # noqa: E402
from moe_vlm.convert.export import export_vlm  # noqa: E402
from moe_vlm.infer.generate import GenerationConfig, generate, left_pad  # noqa: E402

PAD_ID = 0
BOS_ID = 1


@dataclasses.dataclass(frozen=True)
class Sizes:
  model: config.Sizes         # the VLM (only its model fields are read)
  batch: int                  # prompts per batch
  text_min: int               # text tokens per prompt (besides the image), spread evenly
  text_max: int
  new_tokens: int             # generated per row (no stop token: exactly this many)
  check_steps: int            # greedy agreement reported for these first steps
  reps: int                   # interleaved timing rounds
  per_round: int = 1          # calls of each candidate per round; the round keeps the fastest


FULL = Sizes(model=config.FULL, batch=8, text_min=8, text_max=64, new_tokens=64,
             check_steps=8, reps=5)
TINY = Sizes(model=config.TINY, batch=4, text_min=2, text_max=10, new_tokens=48,
             check_steps=8, reps=2, per_round=3)


def prompts(s: Sizes, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-padded [B, P] ids and mask, and [B, H, W, 3] pixels: row i is
  BOS, the image placeholders, then text_i random tokens (lengths spread evenly)."""
  rng = np.random.default_rng(0)
  lengths = np.linspace(s.text_min, s.text_max, s.batch).round().astype(int)
  rows = []
  for n in lengths:
    text = rng.integers(BOS_ID + 1, cfg.text.vocab_size, size=n)
    text[text == cfg.image_token_id] = BOS_ID + 1
    rows.append(np.concatenate([[BOS_ID], np.full(cfg.num_image_tokens, cfg.image_token_id),
                                text]).astype(np.int32))
  ids, mask = left_pad(rows, PAD_ID, max(len(r) for r in rows))
  size = cfg.vision.image_size
  pixels = rng.standard_normal((s.batch, size, size, 3)).astype(np.float32)
  return ids, mask, pixels


random_vlm = config.random_vlm  # moved to bench.config; the name stays for callers


def agreement(ours: np.ndarray, theirs: np.ndarray, steps: int) -> dict[str, Any]:
  """Greedy token agreement: over the first `steps` steps, rows equal over all steps,
  and each row's length of the common prefix."""
  eq = ours == theirs
  prefix = [int(np.argmin(r)) if not r.all() else len(r) for r in eq]
  return {"first_equal": int(eq[:, :steps].sum()), "first_total": int(eq[:, :steps].size),
          "rows_equal": int(eq.all(axis=1).sum()), "rows": eq.shape[0], "prefix": prefix}


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
  p.add_argument("--device-note", default="", help="free text describing the machine")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: runs in seconds")
  p.add_argument("--reps", type=int, default=None, help="interleaved timing rounds")
  p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's own, one per core)")
  args = p.parse_args(argv)
  s = TINY if args.tiny else FULL
  if args.reps:
    s = dataclasses.replace(s, reps=args.reps)
  if args.new_tokens:
    s = dataclasses.replace(s, new_tokens=args.new_tokens)
  if s.new_tokens < 2:
    p.error("--new-tokens must be >= 2 (decode = N - 1 steps after the prefill)")

  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  common.print_header(out, "bench.generate", args.tiny, args.device_note,
                      extra=f"; torch {torch.__version__} ({torch.get_num_threads()} threads), "
                      f"transformers {transformers.__version__}")
  t0 = time.perf_counter()

  cfg = config.vlm_config(s.model)
  model = random_vlm(cfg)
  ids, mask, pixels = prompts(s, cfg)
  b, plen, n = ids.shape[0], ids.shape[1], s.new_tokens
  t = cfg.text
  out(f"== model: ViT {cfg.vision.num_layers}x{cfg.vision.hidden_size} "
      f"({cfg.vision.image_size} px / {cfg.vision.patch_size} px patches, "
      f"{cfg.num_image_tokens} image tokens); decoder {t.num_layers}x{t.hidden_size}, "
      f"{t.num_heads} q / {t.num_kv_heads} kv heads, FFN {t.intermediate_size}, "
      f"{t.moe.num_experts} experts top-{t.moe.top_k} in layers {list(t.moe_layers())}, "
      f"vocab {t.vocab_size}; random init, {t.dtype}")
  out(f"== prompts: batch {b}, left-padded to {plen} tokens (text "
      f"{s.text_min}-{s.text_max} + {cfg.num_image_tokens} image + BOS), greedy, "
      f"{n} new tokens per row, no stop token")

  with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
    layout = export_vlm(model, tmp, layout="llava")
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp)
  hf_model.eval()
  text_cfg = hf_model.config.text_config
  try:
    experts_impl = hf_model.get_experts_implementation()
  except Exception:  # noqa: BLE001  (informative only)
    experts_impl = "n/a"
  out(f"== exported ({layout} layout) and loaded by transformers: "
      f"{type(hf_model).__name__} / {text_cfg.model_type}, "
      f"attention {getattr(hf_model.config, '_attn_implementation', 'n/a')}, "
      f"experts {experts_impl}, {sum(x.numel() for x in hf_model.parameters()) / 1e6:.2f} M "
      f"params (build + export + load: {time.perf_counter() - t0:.1f} s)")

  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  px_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  ids_j, mask_j, px_j = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)

  def ours(new: int) -> Callable[[], Any]:
    gen = GenerationConfig(max_new_tokens=new, eos_ids=(), pad_id=PAD_ID)
    return lambda: generate(model, ids_j, mask_j, px_j, gen)

  def theirs(new: int) -> Callable[[], Any]:
    gen = transformers.GenerationConfig(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
        eos_token_id=None, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        suppress_tokens=[cfg.image_token_id], use_cache=True)

    def call():
      with torch.inference_mode():
        seq = hf_model.generate(input_ids=ids_t, attention_mask=mask_t, pixel_values=px_t,
                                generation_config=gen)
      return seq[:, plen:].numpy()
    return call

  thunks = {"jax": ours(n), "pytorch": theirs(n), "jax_prefill": ours(1),
            "pytorch_prefill": theirs(1)}

  # The greedy tokens first (these calls also compile our programs).
  first = {}
  for name, fn in thunks.items():
    t1 = time.perf_counter()
    first[name] = np.asarray(jax.block_until_ready(fn()))
    first[name + "_s"] = time.perf_counter() - t1
  for name in ("jax", "pytorch"):
    if first[name].shape != (b, n):
      raise RuntimeError(f"{name} generated {first[name].shape}, expected {(b, n)}")
  agree = agreement(first["jax"], first["pytorch"], min(s.check_steps, n))
  k = min(s.check_steps, n)
  out(f"greedy token agreement, first {k} steps: {agree['first_equal']}/"
      f"{agree['first_total']} ({100 * agree['first_equal'] / agree['first_total']:.1f}%); "
      f"rows equal over all {n} steps: {agree['rows_equal']}/{agree['rows']}; "
      f"common prefix per row: {agree['prefix']}")
  if not np.array_equal(first["jax_prefill"][:, 0], first["pytorch_prefill"][:, 0]):
    out("WARNING: the first tokens differ between the two sides")
  out(f"first calls (jax: trace + compile + run): jax {first['jax_s']:.1f} s + prefill-only "
      f"{first['jax_prefill_s']:.1f} s; pytorch {first['pytorch_s']:.1f} s + prefill-only "
      f"{first['pytorch_prefill_s']:.1f} s")

  samples = interleaved_times(thunks, reps=s.reps, warmup=0,
                              per_round={k: s.per_round for k in thunks})
  # One time per candidate and round: the fastest of its `per_round` calls in that round.
  times = {k: [min(v[r * s.per_round:(r + 1) * s.per_round]) for r in range(s.reps)]
           for k, v in samples.items()}
  decode_tokens = b * (n - 1)
  rates: dict[str, list[float]] = {"jax": [], "pytorch": []}
  ratios, skipped = [], 0
  for r in range(s.reps):
    dj = times["jax"][r] - times["jax_prefill"][r]
    dp = times["pytorch"][r] - times["pytorch_prefill"][r]
    if dj <= 0 or dp <= 0:  # load noise larger than the decode itself: no figure this round
      skipped += 1
      continue
    rates["jax"].append(decode_tokens / dj)
    rates["pytorch"].append(decode_tokens / dp)
    ratios.append(rates["jax"][-1] / rates["pytorch"][-1])
  results: dict[str, Any] = {"agreement": agree, "times": times}

  best = f", fastest of {s.per_round} calls" if s.per_round > 1 else ""
  out(f"== timings: median of {s.reps} interleaved rounds (per round: generate with "
      f"max_new_tokens={n} and with max_new_tokens=1, each side{best})")
  for name in ("jax", "pytorch"):
    full, pre = median(times[name]), median(times[name + "_prefill"])
    out(f"{name:8s} generate {n} tokens: {fmt_time(full)}  prefill + first token: "
        f"{fmt_time(pre)}  end-to-end {b * n / full:8.1f} tokens/s")
  e2e = common.paired_ratio(times["pytorch"], times["jax"])
  pre_ratio = common.paired_ratio(times["pytorch_prefill"], times["jax_prefill"])
  results.update(end_to_end_ratio=e2e, prefill_ratio=pre_ratio,
                 prefill_s={k: median(times[k + "_prefill"]) for k in ("jax", "pytorch")})
  if skipped:
    out(f"({skipped} of {s.reps} rounds skipped: t(N) <= t(1) under load)")
  if ratios:
    rj, rp, ratio = median(rates["jax"]), median(rates["pytorch"]), median(ratios)
    out(f"decode tokens/s (B x (N-1) = {decode_tokens} tokens / (t(N) - t(1))): "
        f"jax {rj:.1f} ({1e3 * b / rj:.2f} ms per step), "
        f"pytorch {rp:.1f} ({1e3 * b / rp:.2f} ms per step)")
    results.update(decode_tokens_per_s={"jax": rj, "pytorch": rp}, ratio=ratio)
    out(f"jax/pytorch decode tokens/s: {ratio:.2f}x")
  else:
    out("jax/pytorch decode tokens/s: n/a (every round skipped)")
  out(f"jax/pytorch end-to-end tokens/s (prefill + {n} tokens): {e2e:.2f}x")
  out(f"pytorch/jax prefill time (prefill + first token; >1 = jax faster): {pre_ratio:.2f}x")
  out(f"# total wall time {time.perf_counter() - t0:.1f} s")
  if not math.isfinite(results.get("ratio", float("nan"))):
    results.pop("ratio", None)
  return results


if __name__ == "__main__":
  common.reexec_with_malloc_tunables("bench.generate", sys.argv[1:])
  main(sys.argv[1:])
