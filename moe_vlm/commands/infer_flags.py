"""Flags shared by the inference commands (`generate`, `chat`): which trained model,
and how to decode. Defined once here so both command modules can be imported together."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file the workdir was trained with (default: "
    "the workdir's config.json)", lock_config=True)
flags.DEFINE_string("workdir", None, "training workdir holding stage<k>/final")
flags.DEFINE_integer("stage", 3, "which stage's final parameters to load (1, 2 or 3)")
flags.DEFINE_integer("max_new_tokens", 128, "most tokens generated per answer")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise the sampling temperature")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (with temperature > 0)")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling")


def load_model():
  """The InferenceModel named by --workdir/--stage/--config."""
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  from moe_vlm.commands.common import setup_logging
  setup_logging()
  from moe_vlm.infer import load
  return load.load(FLAGS.workdir, FLAGS.stage, FLAGS.config)


def generation_config(im):
  """Decoding settings from the flags, stopping on the model's stop tokens."""
  from moe_vlm.infer.generate import GenerationConfig
  return GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, eos_ids=im.stop_ids,
                          temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                          pad_id=im.pad_id)
