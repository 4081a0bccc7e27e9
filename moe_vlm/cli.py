"""`moe-vlm` command line: train (the three MoE-Tuning stages) and convert.

  moe-vlm train --config configs/synthetic_tiny.py --workdir DIR [--stage 1|2|3|all]
                [--config.stages.stage2.steps=500 ...]
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and reports go")
flags.DEFINE_string("stage", "all", "1, 2, 3, a comma list, or all")
flags.DEFINE_bool("report", True, "after training, evaluate stage 2 vs 3 on held-out data")


def _stages(text: str) -> tuple[int, ...]:
  if text == "all":
    return (1, 2, 3)
  try:
    stages = tuple(int(s) for s in text.split(","))
  except ValueError:
    raise app.UsageError(f"--stage={text!r}: expected 1, 2, 3, a comma list or 'all'")
  if not stages or any(s not in (1, 2, 3) for s in stages):
    raise app.UsageError(f"--stage={text!r}: stages are 1, 2 and 3")
  return stages


def _train(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("moe_vlm").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file at INFO
  from moe_vlm.distributed import maybe_initialize
  maybe_initialize()
  from moe_vlm.train import loop
  c = FLAGS.config
  stages = _stages(FLAGS.stage)
  try:
    loop.train(c, FLAGS.workdir, stages)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)
  if FLAGS.report and c.eval.run_after_training and set(stages) >= {2, 3}:
    from moe_vlm.eval import report
    print(report.stage_report(c, FLAGS.workdir))


COMMANDS = {"train": _train}


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: moe-vlm {{{'|'.join(COMMANDS)}}} [flags]  (see --help)", file=sys.stderr)
    sys.exit(2)
  command = argv.pop(1)
  app.run(COMMANDS[command], argv=argv)


if __name__ == "__main__":
  main()
