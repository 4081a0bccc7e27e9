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
flags.DEFINE_bool("preflight", False, "first compile every requested stage's train step "
                  "and report its memory per device (moe_vlm.train.preflight)")
flags.DEFINE_float("hbm_gib", 0.0, "with --preflight: stop unless every stage fits this "
                   "many GiB per device (0: report only)")


def parse_stages(text: str) -> tuple[int, ...]:
  from moe_vlm.train import preflight
  try:
    return preflight.parse_stages(text)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  from moe_vlm.commands.common import start
  start()
  from moe_vlm.models.config import ConfigError
  from moe_vlm.train import loop, preflight
  c = FLAGS.config
  stages = parse_stages(FLAGS.stage)
  try:
    if FLAGS.preflight:
      preflight.preflight_config(c, stages, workdir=FLAGS.workdir,
                                 hbm_budget_bytes=FLAGS.hbm_gib * preflight.GiB or None)
    loop.train(c, FLAGS.workdir, stages)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)
  except preflight.HBMBudgetError as e:
    logging.error("PREFLIGHT FAILED: %s", e)
    sys.exit(3)
  except (ConfigError, loop.StageSettingsError) as e:  # nothing has trained yet
    logging.error("%s", e)
    sys.exit(2)
  if FLAGS.report and c.eval.run_after_training and set(stages) >= {2, 3}:
    import jax
    from moe_vlm.eval import report
    md = report.stage_report(c, FLAGS.workdir)
    if jax.process_index() == 0:
      print(md)
