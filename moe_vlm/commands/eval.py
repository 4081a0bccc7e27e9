"""`moe-vlm eval --workdir DIR --task pope|vqa|routing --questions FILE --out DIR`.

Answers a benchmark question file with a trained stage (default 3) and writes to --out:
  answers.jsonl   LLaVA's answer layout (eval_pope.py and the submission converters read it)
  results.json    the metrics (POPE: accuracy, precision, recall, F1, yes-ratio, overall
                  and per category; VQA: accuracy after the official normalisation)
  results.md      the same as a markdown table
With --routing (always for --task routing; MoE stages only): routing.json, routing.md
and routing_*.png, the paper's routing figures over the answered samples.

--config defaults to the config the workdir was trained with (<workdir>/config.json).
Images are read relative to --image_root (default: the config's data directory).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file (default: "
                                "<workdir>/config.json)", lock_config=True)
flags.DEFINE_string("workdir", None, "the training workdir")
flags.DEFINE_integer("stage", 3, "which stage's final parameters to evaluate")
flags.DEFINE_enum("task", None, ["pope", "vqa", "routing"], "benchmark kind")
flags.DEFINE_string("questions", None, "question file: JSONL (LLaVA layout) or a JSON list")
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_bool("overwrite", False, "replace --out if it exists and is not empty")
flags.DEFINE_string("image_root", None, "folder the questions' image paths are relative to")
flags.DEFINE_string("template", None, "conversation template (default: the stage's)")
flags.DEFINE_string("prompt_suffix", "", "appended to every question on a new line, e.g. "
                    "'Answer the question using a single word or phrase.'")
flags.DEFINE_integer("batch_size", 0, "generation batch (default: config eval.batch_size)")
flags.DEFINE_integer("max_new_tokens", 0, "answer length cap (default: eval.max_new_tokens)")
flags.DEFINE_integer("max_examples", 0, "evaluate only the first N questions (0: all)")
flags.DEFINE_string("model_id", None, "model_id in answers.jsonl (default: <workdir>/stage<k>)")
flags.DEFINE_bool("routing", False, "also write the routing analysis (MoE stages)")
flags.DEFINE_bool("plots", True, "draw the routing PNGs")
flags.DEFINE_integer("path_tokens", 4, "tokens per modality whose top-1 path is recorded")
flags.DEFINE_bool("vqa_leave_one_out", True, "VQA accuracy averaged over leave-one-"
                  "annotator-out subsets (the official VQAv2/TextVQA metric); false: plain "
                  "min(#matches/3, 1)")


def main(argv: Sequence[str]) -> None:
  del argv
  missing = [f"--{n}" for n in ("workdir", "task", "questions", "out") if getattr(FLAGS, n) is None]
  if missing:
    raise app.UsageError(f"eval needs {', '.join(missing)}")
  from moe_vlm.commands.common import start
  start()
  from moe_vlm.eval import tasks

  tasks.evaluate_workdir(
      FLAGS.workdir, task=FLAGS.task, questions_path=FLAGS.questions, out_dir=FLAGS.out,
      config=FLAGS.config, stage=FLAGS.stage, image_root=FLAGS.image_root,
      template=FLAGS.template, prompt_suffix=FLAGS.prompt_suffix, batch_size=FLAGS.batch_size,
      max_new_tokens=FLAGS.max_new_tokens, max_examples=FLAGS.max_examples,
      model_id=FLAGS.model_id, routing=FLAGS.routing, plots=FLAGS.plots,
      path_tokens=FLAGS.path_tokens, leave_one_out=FLAGS.vqa_leave_one_out,
      overwrite=FLAGS.overwrite)
  import jax
  if jax.process_index() == 0:  # the one that wrote it
    with open(os.path.join(FLAGS.out, "results.md")) as f:
      print(f.read())
