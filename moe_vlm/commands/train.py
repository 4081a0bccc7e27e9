"""`moe-vlm train --config CFG --workdir DIR [--stage 1|2|3|all] [--config.x=y ...]`."""

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
flags.DEFINE_bool("report", True, "after stages 2 and 3, evaluate both on held-out data")


def parse_stages(text: str) -> tuple[int, ...]:
  if text == "all":
    return (1, 2, 3)
  try:
    stages = tuple(int(s) for s in text.split(","))
  except ValueError:
    raise app.UsageError(f"--stage={text!r}: expected 1, 2, 3, a comma list or 'all'")
  if not stages or any(s not in (1, 2, 3) for s in stages):
    raise app.UsageError(f"--stage={text!r}: stages are 1, 2 and 3")
  return stages


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  from moe_vlm.commands.common import setup_logging
  setup_logging()
  from moe_vlm.distributed import maybe_initialize
  maybe_initialize()
  from moe_vlm.train import loop
  c = FLAGS.config
  stages = parse_stages(FLAGS.stage)
  try:
    loop.train(c, FLAGS.workdir, stages)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)
  if FLAGS.report and c.eval.run_after_training and set(stages) >= {2, 3}:
    from moe_vlm.eval import report
    print(report.stage_report(c, FLAGS.workdir))
