"""Useful (non-pad) tokens per second: our packed rows vs the reference's dynamic padding.

    python -m bench.packing [--tiny] [--device-note TEXT] [--reps N] [--torch-threads N]

Issue #18. Three sides train the fixed benchmark model of `bench.config` (CLIP-style ViT
4 x 256, 112 px / 14 px patches = 64 image tokens; Qwen2-style decoder 8 x 512, 8 q / 4
kv heads, 4 experts top-2 dropless in every other layer, vocab 8000; stage preset
`projector_llm`; random weights; fp32) on the SAME samples, in one run:

- jax, packed: our train step on rows of `max_length` (2048) tokens filled first-fit
  with several samples each (`moe_vlm.data.packing.first_fit`, segment ids: attention
  within a sample, positions restarting, each sample's image in its own slot of
  `default_images_per_row` slots; attention "auto" = the blocked kernel on CPU, which
  visits only the key blocks of each query block's segments);
- torch: the same weights in transformers' `LlavaForConditionalGeneration` (Qwen2-MoE,
  sdpa, `bench.train_step.TorchStep`), batches made as MoE-LLaVA makes them: each
  per-device batch padded only to its longest sample ("dynamic padding"), stage 1 in
  stream order (its script has no length grouping, per-device batch 32), stage 3 with
  `group_by_modality_length` (per modality, megabatches of world x batch samples sorted
  longest first and dealt into world chunks by the reference's greedy balance;
  `get_modality_length_grouped_indices` of `moellava/train/llava_trainer.py`;
  per-device batch 8, 8 GPUs);
- jax, padded: our train step with every sample alone in a row padded to `max_length`
  (what `data.packing="none"` does), on the first `Sizes.padded_samples` samples of each
  stage (its cost per row does not depend on the sample).

The samples are synthetic (random token ids and pixels), their lengths are not: a
sample is the bench model's 64 image tokens (stage 3 text-only samples: none) plus text
whose token count follows the stage's data (`STAGES`):
- stage 1, LLaVA-Pretrain 558k (`plain` template: image, caption, eos): BLIP captions
  of LAION/CC/SBU. BLIP captions average about 9 words (LAION-COCO, the same captioner:
  8.99 words per caption, BLIP3-KALE's table), ~1.3 tokens per word: lognormal text
  lengths with a median of 12 tokens (+ eos), clipped to [4, 60]; the loss covers the
  whole caption;
- stage 3, LLaVA-mix-665k (MoE-LLaVA's llava_image_tune_ + nlp_tune): the sources of
  LLaVA-1.5's mix in their counts (paper, Table 7), each a lognormal around a median
  estimated from how its records are built (turns per record x tokens per turn, plus the
  chat template's ~40 tokens of system prompt and role tags): LLaVA-Instruct
  conversation 58k (300), detail 23k (150), complex reasoning 77k (180); VQAv2 83k + GQA
  72k (many short questions of one image merged into one record: 180); OKVQA 9k +
  A-OKVQA 66k (90); OCR-VQA 80k (110); TextCaps 22k (60); RefCOCO 48k + VG 86k (230);
  ShareGPT 40k, text-only (900, sigma 0.7, clipped to max_length). The loss covers the
  last 40% of a record's text (the answers). These medians are estimates, not counts
  from the files (not available offline): the script prints the resulting quantiles.

The samples of a stage are the first N of a stream drawn from its mix (`Sizes.samples`);
our side packs all of them (the partly filled rows first-fit leaves at the end of the
samples count, so the pad fraction errs high), torch batches exactly the same samples.

Before timing, both sides compute the CE of every sample with the initial weights
(forward only): the per-sample sums must agree within 1e-3 (relative), which checks
that the packed rows and the padded batches hold the same samples and that packing
changes no sample's loss. Timing: `bench.common.interleaved_times`, one call of a side
= one pass over all its batches of both stages (training steps, the state carried),
rounds in alternating order; tokens/s = the useful (non-pad) tokens of the pass / its
time; ratios are medians of the per-round ratios. Pad fraction = padding / all tokens a
side computes. The line the issue asks for:

    packed tokens/s: jax X, torch Y; jax/torch = Z x; pad fraction jax A, torch B; packed/padded (ours) = W x

`--tiny` shrinks every shape so the run takes seconds (tests/test_bench_packing.py).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from bench.common import compile_all, interleaved_times, median  # noqa: E402
from moe_vlm.convert.export import export_vlm  # noqa: E402
from moe_vlm.data import packing as packing_lib  # noqa: E402
from moe_vlm.models.params import ParamCodec  # noqa: E402
from moe_vlm.train import step as step_lib  # noqa: E402
from moe_vlm.train.optim import OptimConfig  # noqa: E402

LINE = ("packed tokens/s: jax {jax:.1f}, torch {torch:.1f}; jax/torch = {ratio:.2f} x; "
        "pad fraction jax {pad_jax:.3f}, torch {pad_torch:.3f}; packed/padded (ours) = "
        "{packed_over_padded:.2f} x")
CE_TOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of a stage's data: its share (records), and its text length in tokens."""
  name: str
  records: float        # thousands of records (the share in the mix)
  median: float         # text tokens (template included)
  sigma: float = 0.45   # lognormal spread
  image: bool = True
  low: int = 4
  answer: float = 0.4   # the share of the text that carries loss (the answers)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  sources: tuple[Source, ...]
  torch_batch: int      # the reference's per-device batch
  group_world: int      # group_by_modality_length's world (0: stream order)


STAGES = {
    1: Stage("stage 1 (LLaVA-Pretrain 558k, plain template)",
             (Source("BLIP captions", 558, median=13, sigma=0.35, low=4, answer=1.0),),
             torch_batch=32, group_world=0),
    3: Stage("stage 3 (LLaVA-mix-665k: llava_image_tune_ + nlp_tune)", (
        Source("LLaVA-Instruct conversation", 58, 300),
        Source("LLaVA-Instruct detail", 23, 150, 0.3),
        Source("LLaVA-Instruct complex reasoning", 77, 180, 0.3),
        Source("VQAv2 + GQA", 155, 180, 0.5),
        Source("OKVQA + A-OKVQA", 75, 90, 0.4),
        Source("OCR-VQA", 80, 110, 0.4),
        Source("TextCaps", 22, 60, 0.3),
        Source("RefCOCO + VG", 134, 230, 0.5),
        Source("ShareGPT (text-only)", 40, 900, 0.7, image=False)),
        torch_batch=8, group_world=8),
}


@dataclasses.dataclass
class Sample:
  ids: np.ndarray       # int32 [n]
  loss: np.ndarray      # int32 [n]
  pixels: Optional[np.ndarray]


def text_lengths(stage: Stage, n: int, rng: np.random.Generator, high: int,
                 scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(text tokens, has image, answer share) of n samples drawn from the stage's mix."""
  weights = np.asarray([s.records for s in stage.sources], np.float64)
  pick = rng.choice(len(stage.sources), size=n, p=weights / weights.sum())
  lengths = np.zeros(n, np.int64)
  for i, j in enumerate(pick):
    s = stage.sources[j]
    x = s.median * scale * np.exp(s.sigma * rng.standard_normal())
    lengths[i] = int(np.clip(round(x), max(1, int(s.low * scale)), high))
  images = np.asarray([stage.sources[j].image for j in pick])
  answers = np.asarray([stage.sources[j].answer for j in pick])
  return lengths, images, answers


def make_samples(cfg, stage: Stage, n: int, max_length: int, seed: int,
                 scale: float = 1.0) -> list[Sample]:
  """n synthetic samples with the stage's lengths: (image tokens) + text; the loss on
  the last `answer` share of the text. Image samples: a few text tokens, the image's
  placeholders, then the rest (stage 1: the image first)."""
  rng = np.random.default_rng(seed)
  p, v = cfg.num_image_tokens, cfg.vision
  text, images, answers = text_lengths(stage, n, rng, max_length - p - 1, scale)
  out = []
  for t, image, answer in zip(text, images, answers):
    ids = rng.integers(0, cfg.image_token_id, int(t)).astype(np.int32)
    loss = np.zeros(int(t), np.int32)
    loss[int(t) - max(1, int(round(answer * int(t)))):] = 1
    loss[0] = 0
    pixels = None
    if image:
      at = 0 if answer >= 1.0 else min(int(t) - 1, 1 + int(rng.integers(0, 8)))
      ids = np.concatenate([ids[:at], np.full(p, cfg.image_token_id, np.int32), ids[at:]])
      loss = np.concatenate([loss[:at], np.zeros(p, np.int32), loss[at:]])
      pixels = rng.standard_normal((v.image_size, v.image_size, 3)).astype(np.float32)
    out.append(Sample(ids, loss, pixels))
  return out


# ------------------------------------------------------------------- the batches


def packed_rows(samples: Sequence[Sample],
                pcfg: packing_lib.PackingConfig) -> list[np.ndarray]:
  """The samples packed first-fit into rows (`moe_vlm.data.packing.first_fit`), in
  stream order; the last rows, flushed at the end of the samples, count as they are."""
  lengths = np.asarray([len(s.ids) for s in samples])
  images = np.asarray([s.pixels is not None for s in samples], np.int8)
  return packing_lib.first_fit(np.arange(len(samples)), lengths, images, pcfg)


def pack_batch(samples: Sequence[Sample], rows: Sequence[np.ndarray], length: int,
               slots: int, image_size: int, num_rows: int) -> dict[str, np.ndarray]:
  """Rows of several samples: the model's packed batch (segment ids 1, 2, ...), with
  empty rows up to `num_rows` (every step has the same shape)."""
  b = num_rows
  out = dict(input_ids=np.zeros((b, length), np.int32),
             attention_mask=np.zeros((b, length), np.int32),
             loss_mask=np.zeros((b, length), np.int32),
             segment_ids=np.zeros((b, length), np.int32),
             pixel_values=np.zeros((b, slots, image_size, image_size, 3), np.float32))
  for r, members in enumerate(rows):
    pos = image = 0
    for seg, i in enumerate(members, 1):
      s = samples[int(i)]
      n = len(s.ids)
      out["input_ids"][r, pos:pos + n] = s.ids
      out["attention_mask"][r, pos:pos + n] = 1
      out["loss_mask"][r, pos:pos + n] = s.loss
      out["loss_mask"][r, pos] = 0
      out["segment_ids"][r, pos:pos + n] = seg
      if s.pixels is not None:
        out["pixel_values"][r, image] = s.pixels
        image += 1
      pos += n
  return out


def pad_batch(samples: Sequence[Sample], length: int, image_size: int,
              num_rows: Optional[int] = None) -> dict[str, np.ndarray]:
  """One sample per row, right-padded to `length` (the unpacked batch contract), with
  empty rows up to `num_rows`."""
  b = num_rows or len(samples)
  out = dict(input_ids=np.zeros((b, length), np.int32),
             attention_mask=np.zeros((b, length), np.int32),
             loss_mask=np.zeros((b, length), np.int32),
             pixel_values=np.zeros((b, image_size, image_size, 3), np.float32))
  for r, s in enumerate(samples):
    n = len(s.ids)
    out["input_ids"][r, :n], out["attention_mask"][r, :n] = s.ids, 1
    out["loss_mask"][r, :n] = s.loss
    if s.pixels is not None:
      out["pixel_values"][r] = s.pixels
  return out


def split_to_even_chunks(indices: Sequence[int], lengths: np.ndarray,
                         num_chunks: int) -> list[list[int]]:
  """The reference's deal of a sorted megabatch into `num_chunks` chunks: each index to
  the chunk with the fewest tokens that is not full; strided when it does not divide."""
  if len(indices) % num_chunks:
    return [list(indices[i::num_chunks]) for i in range(num_chunks)]
  per = len(indices) // num_chunks
  chunks: list[list[int]] = [[] for _ in range(num_chunks)]
  totals = [0.0] * num_chunks
  for i in indices:
    c = totals.index(min(totals))
    chunks[c].append(i)
    totals[c] += float(lengths[i])
    if len(chunks[c]) == per:
      totals[c] = float("inf")
  return chunks


def reference_batches(samples: Sequence[Sample], chosen: Sequence[int],
                      stage: Stage) -> list[list[int]]:
  """The per-device batches MoE-LLaVA's sampler makes of the chosen samples (see the
  module docstring); a final partial megabatch of a modality is dealt into
  ceil(n / batch) chunks (the reference appends it unsorted, which with a few hundred
  samples would be all of them)."""
  lengths = np.zeros(max(chosen) + 1)
  for i in chosen:
    lengths[i] = len(samples[i].ids)
  b = stage.torch_batch
  if not stage.group_world:
    return [list(chosen[i:i + b]) for i in range(0, len(chosen), b)]
  batches = []
  for modality in (True, False):
    group = [i for i in chosen if (samples[i].pixels is not None) == modality]
    mega = stage.group_world * b
    for start in range(0, len(group), mega):
      m = sorted(group[start:start + mega], key=lambda i: -lengths[i])
      chunks = (stage.group_world if len(m) == mega else -(-len(m) // b))
      batches += [c for c in split_to_even_chunks(m, lengths, chunks) if c]
  return batches


def torch_batch(samples: Sequence[Sample], members: Sequence[int],
                image_size: int) -> dict[str, np.ndarray]:
  """Dynamic padding: the batch padded to its longest sample; `has_image` [B] says which
  rows' pixels transformers gets (it takes exactly one image per image row)."""
  chosen = [samples[i] for i in members]
  out = pad_batch(chosen, max(len(s.ids) for s in chosen), image_size)
  out["has_image"] = np.asarray([s.pixels is not None for s in chosen])
  return out


# -------------------------------------------------------------------- the sides


def per_sample_ce_jax(codec, params, batch: dict[str, np.ndarray]) -> list[float]:
  """CE summed over each segment's targets (rows in order, segments in order)."""
  @jax.jit
  def ce(params, b):
    logits, _ = codec.merge(params)(b["input_ids"], b["pixel_values"], b["attention_mask"],
                                    segment_ids=b.get("segment_ids"))
    targets, w = step_lib.next_token_targets(b["input_ids"], b["loss_mask"],
                                             b.get("segment_ids"))
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * w

  per_token = np.asarray(ce(params, {k: jnp.asarray(v) for k, v in batch.items()}))
  out = []
  for r in range(per_token.shape[0]):
    seg = batch["segment_ids"][r]
    out += [float(per_token[r][seg == s].sum()) for s in range(1, int(seg.max()) + 1)]
  return out


def per_sample_ce_torch(torch_step, batch: dict[str, np.ndarray]) -> list[float]:
  import torch
  inputs = torch_inputs(batch, torch_step.device)
  with torch.no_grad():
    logits = torch_step.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    logp = torch.log_softmax(logits.float(), -1)[:, :-1]
    ids = inputs["input_ids"][:, 1:]
    w = torch.from_numpy(batch["loss_mask"][:, 1:]).float().to(logits.device)
    ce = -logp.gather(-1, ids[..., None])[..., 0] * w
  return [float(x) for x in ce.sum(-1)]


def torch_inputs(batch: dict[str, np.ndarray], device: str) -> dict[str, Any]:
  """A batch as TorchStep feeds it (labels -100 outside the loss mask, NCHW pixels)."""
  import torch
  ids = torch.from_numpy(batch["input_ids"]).long()
  labels = ids.masked_fill(torch.from_numpy(batch["loss_mask"]) == 0, -100)
  out = dict(input_ids=ids.to(device),
             attention_mask=torch.from_numpy(batch["attention_mask"]).long().to(device),
             labels=labels.to(device))
  rows = batch.get("has_image", np.ones(len(ids), bool))
  if rows.any():
    pixels = np.ascontiguousarray(batch["pixel_values"][rows].transpose(0, 3, 1, 2))
    out["pixel_values"] = torch.from_numpy(pixels).to(device)
  return out


class JaxSide:
  """Our jit train step over a list of batches of one shape; a call runs all of them."""

  def __init__(self, cfg, batches: list[dict[str, np.ndarray]], optim: OptimConfig,
               head_fraction: Optional[float]):
    self.batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    self.step = config.jax_train_step(config.random_vlm(cfg), batches[0], optim,
                                      head_fraction=head_fraction)

  def __call__(self):
    metrics = None
    for b in self.batches:
      self.step.state, metrics = self.step.compiled(self.step.state, b)
    return metrics["loss"]


class TorchSide:
  """transformers' train step (`bench.train_step.TorchStep`) over its batches."""

  def __init__(self, step, batches: list[dict[str, np.ndarray]]):
    self.step, self.inputs = step, [torch_inputs(b, step.device) for b in batches]

  def __call__(self):
    ce = 0.0
    for inputs in self.inputs:
      self.step.inputs = inputs
      ce, _ = self.step()
    return ce


# ------------------------------------------------------------------------ main


@dataclasses.dataclass(frozen=True)
class Sizes:
  max_length: int
  samples: dict        # stage -> samples timed (the first of its stream)
  rows_per_step: int
  padded_samples: int  # per stage, on the padded side
  scale: float         # text lengths x scale (tiny)
  reps: int


FULL = Sizes(max_length=2048, samples={1: 52, 3: 64}, rows_per_step=1, padded_samples=2,
             scale=1.0, reps=2)
TINY = Sizes(max_length=64, samples={1: 24, 3: 25}, rows_per_step=2, padded_samples=2,
             scale=1 / 32, reps=2)


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> dict:
  p = argparse.ArgumentParser(prog="python -m bench.packing",
                              description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes: runs in seconds")
  p.add_argument("--device-note", default="", help="free text describing the machine")
  p.add_argument("--reps", type=int, default=None, help="interleaved timing rounds")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: XLA:CPU's thread count)")
  p.add_argument("--stages", default="1,3", help="which stages' length distributions")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  sizes = TINY if args.tiny else FULL
  reps = args.reps or sizes.reps
  stages = [int(x) for x in args.stages.split(",")]
  if any(k not in STAGES for k in stages):
    p.error(f"--stages={args.stages}: expected a subset of {sorted(STAGES)}")

  import torch
  import transformers

  from bench.train_step import TorchStep, xla_cpu_threads
  transformers.logging.set_verbosity_error()
  xla_threads = xla_cpu_threads()
  torch.set_num_threads(args.torch_threads or xla_threads)
  common.print_header(out, "bench.packing", args.tiny, args.device_note,
                      extra=f"; torch {torch.__version__}, transformers "
                      f"{transformers.__version__}")
  t0 = time.perf_counter()
  s = config.TINY if args.tiny else config.FULL
  cfg = config.vlm_config(s, "dropless")
  length = sizes.max_length
  image_size = cfg.vision.image_size
  slots = packing_lib.default_images_per_row(length, cfg.num_image_tokens)
  pcfg = packing_lib.PackingConfig("first_fit", max_length=length, images_per_row=slots)
  out(f"== model: {config.describe(cfg, sizes.rows_per_step, length)}; stage preset "
      f"{config.STAGE_PRESET}; attention {cfg.text.attention_impl} (packed rows: "
      f"{'blocked' if jax.default_backend() == 'cpu' else 'the backend kernel'})")
  out(f"threads: jax/XLA:CPU {xla_threads}, torch {torch.get_num_threads()}")

  packed_sets, torch_sets, padded, info = [], [], [], {}
  for k in stages:
    stage = STAGES[k]
    samples = make_samples(cfg, stage, sizes.samples[k], length, args.seed + k, sizes.scale)
    rows = packed_rows(samples, pcfg)
    chosen = list(range(len(samples)))
    useful = sum(len(samples[i].ids) for i in chosen)
    batches = reference_batches(samples, chosen, stage)
    lens = np.asarray([len(samples[i].ids) for i in chosen])
    text_only = sum(samples[i].pixels is None for i in chosen)
    torch_tokens = sum(len(b) * max(len(samples[i].ids) for i in b) for b in batches)
    q = np.percentile(lens, [10, 50, 90]).astype(int).tolist()
    out(f"== {stage.name}: {len(chosen)} samples ({text_only} text-only), {useful} tokens; "
        f"length p10/p50/p90 {q[0]}/{q[1]}/{q[2]}, max {int(lens.max())}")
    computed = -(-len(rows) // sizes.rows_per_step) * sizes.rows_per_step
    out(f"   jax: {len(rows)} packed rows of {length} (pad {1 - useful / (computed * length):.3f}"
        f", {max(len(r) for r in rows)} samples in the fullest); torch: {len(batches)} batches "
        f"of <= {stage.torch_batch}, padded to their longest (pad "
        f"{1 - useful / torch_tokens:.3f})")
    packed_sets += [(pack_batch(samples, rows[i:i + sizes.rows_per_step], length, slots,
                                image_size, sizes.rows_per_step),
                     [(k, int(j)) for r in rows[i:i + sizes.rows_per_step] for j in r])
                    for i in range(0, len(rows), sizes.rows_per_step)]
    torch_sets += [(torch_batch(samples, b, image_size), [(k, i) for i in b])
                   for b in batches]
    first = [samples[i] for i in chosen[:sizes.padded_samples]]
    padded += [pad_batch(first[i:i + sizes.rows_per_step], length, image_size,
                         sizes.rows_per_step)
               for i in range(0, len(first), sizes.rows_per_step)]
    info[k] = dict(samples=len(chosen), useful=useful, rows=computed,
                   torch_batches=len(batches), torch_tokens=torch_tokens,
                   padded_useful=sum(len(x.ids) for x in first),
                   padded_tokens=-(-len(first) // sizes.rows_per_step)
                   * sizes.rows_per_step * length)

  optim = OptimConfig(learning_rate=1e-4, total_steps=1000)
  model = config.random_vlm(cfg)
  with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp:
    export_vlm(model, tmp, layout="llava")
    theirs = TorchStep(tmp, torch_sets[0][0], device="cpu", dtype=s.dtype,
                       aux_loss_coef=0.01, clip_norm=optim.clip_norm,
                       lr=optim.learning_rate)
  out(f"== transformers: {type(theirs.model).__name__}, attention {theirs.attn_impl}, "
      f"experts {theirs.experts_impl}")

  # The check: every sample's CE under the initial weights, packed rows (ours) against
  # padded batches (transformers).
  codec = ParamCodec(model)
  params = codec.flatten(model)
  jax_ce, torch_ce = {}, {}
  for batch, members in packed_sets:
    for i, v in zip(members, per_sample_ce_jax(codec, params, batch)):
      jax_ce[i] = v
  for batch, members in torch_sets:
    for i, v in zip(members, per_sample_ce_torch(theirs, batch)):
      torch_ce[i] = v
  del model, params
  if set(jax_ce) != set(torch_ce):
    raise RuntimeError("the two sides hold different samples")
  rel = max(abs(jax_ce[i] - torch_ce[i]) / max(abs(torch_ce[i]), 1.0) for i in jax_ce)
  total = sum(torch_ce.values())
  out(f"per-sample CE (initial weights) of {len(jax_ce)} samples: jax packed vs torch "
      f"padded max relative diff {rel:.2e} (tolerance {CE_TOL:.0e}); sum {total:.3f}: "
      f"{'match' if rel <= CE_TOL else 'MISMATCH'}")
  if rel > CE_TOL:
    raise RuntimeError(f"per-sample losses differ by {rel:.3g}: not timing different work")

  packed = [b for b, _ in packed_sets]
  targets = lambda bs: max(int(b["loss_mask"][:, 1:].sum(1).max()) for b in bs)
  head = lambda bs: min(1.0, (targets(bs) + 8) / length)
  t1 = time.perf_counter()
  ours = JaxSide(cfg, packed, optim, head(packed))
  flat = JaxSide(cfg, padded, optim, head(padded))
  sides_jax = [ours, flat]
  for side, compiled in zip(sides_jax, compile_all([x.step.lowered for x in sides_jax])):
    side.step.set_compiled(compiled)
  out(f"compile (jax, both sides): {time.perf_counter() - t1:.1f} s")
  mine = TorchSide(theirs, [b for b, _ in torch_sets])
  fns = {"jax": ours, "torch": mine, "jax_padded": flat}
  times = interleaved_times(fns, reps=reps, warmup=1)

  useful = sum(v["useful"] for v in info.values())
  tokens = {"jax": sum(v["rows"] for v in info.values()) * length,
            "torch": sum(v["torch_tokens"] for v in info.values()),
            "jax_padded": sum(v["padded_tokens"] for v in info.values())}
  real = {"jax": useful, "torch": useful,
          "jax_padded": sum(v["padded_useful"] for v in info.values())}
  rate = {k: real[k] / median(v) for k, v in times.items()}
  pad = {k: 1.0 - real[k] / tokens[k] for k in tokens}
  per_round = lambda a, b: median([(real[a] / x) / (real[b] / y)
                                   for x, y in zip(times[a], times[b])])
  ratio, packed_over_padded = per_round("jax", "torch"), per_round("jax", "jax_padded")
  out(f"== timings: {reps} interleaved rounds; a call = one pass over a side's batches of "
      f"all stages (jax {len(packed)} steps of {sizes.rows_per_step} x {length}, torch "
      f"{len(torch_sets)} steps, jax padded {len(padded)} steps of "
      f"{sizes.rows_per_step} x {length})")
  for k in fns:
    out(f"{k:10s}: median {median(times[k]):8.2f} s per pass, {real[k]} useful of "
        f"{tokens[k]} tokens (pad {pad[k]:.3f}) = {rate[k]:.1f} useful tokens/s")
  result = dict(jax=rate["jax"], torch=rate["torch"], ratio=ratio, pad_jax=pad["jax"],
                pad_torch=pad["torch"], packed_over_padded=packed_over_padded)
  out(LINE.format(**result))
  out(f"# total wall time {time.perf_counter() - t0:.1f} s")
  return {**result, "padded": rate["jax_padded"], "pad_padded": pad["jax_padded"],
          "times": times, "ce_max_rel_diff": rel, "stages": {
              k: {key: v[key] for key in ("samples", "useful", "rows", "torch_batches",
                                           "torch_tokens")} for k, v in info.items()}}


if __name__ == "__main__":
  common.reexec_with_malloc_tunables("bench.packing", sys.argv[1:])
  main(sys.argv[1:])
