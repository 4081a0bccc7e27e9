"""`moe-vlm eval --workdir DIR | --ckpt DIR --task TASK --questions FILE --out DIR`.

Answers a benchmark's questions with a trained stage (default 3) and writes to --out:
  answers.jsonl   LLaVA's answer layout (eval_pope.py and the submission converters read it)
  results.json    the metrics (POPE: accuracy, precision, recall, F1, yes-ratio, overall
                  and per category; VQA: accuracy after the official normalisation; the
                  paper benchmarks: their own metric, "headline" = the paper's number)
  results.md      the same as a markdown table
  (paper benchmarks) the files LLaVA's scripts submit or convert, e.g. MME's per-subtask
                  txt files, the MMBench TSV, the MM-Vet JSON for its GPT grader
With --routing (always for --task routing; MoE stages only): routing.json, routing.md
and routing_*.png, the paper's routing figures over the answered samples.

Tasks: pope and vqa read one JSONL in LLaVA's layout (with labels / answers); routing
needs no labels; the paper's benchmarks read their released files (--questions, plus
--annotations / --image_dir where the benchmark has them):
{tasks}

Answers made elsewhere (LLaVA's model_vqa output, or ours):
  moe-vlm eval --task mme --questions MME_Benchmark_release_version --answers A.jsonl --out DIR
The paper's table row from one --out folder per task (ROOT/<task>/results.json):
  moe-vlm eval --paper_row ROOT [--model_id NAME]

--config defaults to the config the workdir was trained with (<workdir>/config.json).
Images are read relative to --image_root (default: the config's data directory).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from moe_vlm.eval import benchmarks, tasks

__doc__ = __doc__.format(tasks=benchmarks.help_text())

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file (default: "
                                "<workdir>/config.json)", lock_config=True)
flags.DEFINE_string("workdir", None, "the training workdir")
flags.DEFINE_string("ckpt", None, "instead of --workdir: a converted checkpoint (`moe-vlm "
                    "convert from-hf` output, e.g. a released MoE-LLaVA model)")
flags.DEFINE_integer("stage", 3, "which stage's final parameters to evaluate")
flags.DEFINE_enum("task", None, list(tasks.TASKS), "benchmark kind (see above)")
flags.DEFINE_string("questions", None, "question file: JSONL (LLaVA layout) or a JSON list; "
                    "a paper benchmark's released file or folder")
flags.DEFINE_string("annotations", None, "paper benchmarks: the answers file beside the "
                    "questions (GQA, TextVQA, VizWiz; MME's release folder for LLaVA's jsonl)")
flags.DEFINE_string("image_dir", None, "mmbench: where the TSV's images are written")
flags.DEFINE_string("answers", None, "score this answers JSONL instead of generating "
                    "(no --workdir)")
flags.DEFINE_string("paper_row", None, "print the paper's results row from ROOT/<task>/"
                    "results.json and write ROOT/paper_row.md")
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
  from moe_vlm.commands.common import start
  if FLAGS.paper_row:
    print(tasks.paper_row(FLAGS.paper_row, FLAGS.model_id or "ours"))
    return
  load_kw = {k: v for k, v in (("annotations", FLAGS.annotations),
                               ("image_dir", FLAGS.image_dir)) if v}
  if FLAGS.answers:
    missing = [f"--{n}" for n in ("task", "questions", "out") if getattr(FLAGS, n) is None]
    if missing:
      raise app.UsageError(f"scoring an answer file needs {', '.join(missing)}")
    start()
    tasks.score_file(FLAGS.task, FLAGS.questions, FLAGS.answers, FLAGS.out,
                     overwrite=FLAGS.overwrite, **load_kw)
    with open(os.path.join(FLAGS.out, "results.md")) as f:
      print(f.read())
    return
  missing = [f"--{n}" for n in ("task", "questions", "out") if getattr(FLAGS, n) is None]
  if (FLAGS.workdir is None) == (FLAGS.ckpt is None):
    missing.append("one of --workdir / --ckpt")
  if missing:
    raise app.UsageError(f"eval needs {', '.join(missing)}")
  start()
  tasks.evaluate_workdir(
      FLAGS.workdir, task=FLAGS.task, questions_path=FLAGS.questions, out_dir=FLAGS.out,
      config=FLAGS.config, stage=FLAGS.stage, ckpt=FLAGS.ckpt, image_root=FLAGS.image_root,
      template=FLAGS.template, prompt_suffix=FLAGS.prompt_suffix, batch_size=FLAGS.batch_size,
      max_new_tokens=FLAGS.max_new_tokens, max_examples=FLAGS.max_examples,
      model_id=FLAGS.model_id, routing=FLAGS.routing, plots=FLAGS.plots,
      path_tokens=FLAGS.path_tokens, leave_one_out=FLAGS.vqa_leave_one_out,
      overwrite=FLAGS.overwrite, load_kw=load_kw)
  import jax
  if jax.process_index() == 0:  # the one that wrote it
    with open(os.path.join(FLAGS.out, "results.md")) as f:
      print(f.read())
