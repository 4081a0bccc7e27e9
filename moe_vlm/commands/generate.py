"""`moe-vlm generate --workdir DIR [--stage 3] [--config CFG] --questions Q.jsonl
--answers OUT.jsonl`: batched answers in LLaVA's model_vqa.py layout. `--ckpt DIR` (a
converted checkpoint) replaces --workdir; `--mesh data=-1` shards the batch."""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from moe_vlm.commands import infer_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("questions", None, 'JSONL, one {"question_id", "image", "text"} a line')
flags.DEFINE_string("answers", None, "JSONL output, one answer a line")
flags.DEFINE_string("image_folder", None, "root of the questions' image paths (default: "
                    "the questions file's directory)")
flags.DEFINE_integer("batch_size", 8, "questions per generation batch")
flags.DEFINE_bool("overwrite", False, "replace --answers if it exists")
flags.DEFINE_string("model_id", None, "the answers' model_id (default: <workdir>/stage<k>)")


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.questions is None or FLAGS.answers is None:
    raise app.UsageError("generate needs --questions and --answers")
  from moe_vlm.infer import vqa
  # A bad question file (missing image, wrong field) or an answers file that exists
  # fails before the model loads.
  vqa.load_questions(FLAGS.questions, FLAGS.image_folder)
  vqa.check_answers_path(FLAGS.answers, FLAGS.overwrite)
  im = infer_flags.load_model()
  model_id = FLAGS.model_id or infer_flags.model_name()
  n = vqa.answer_file(im, FLAGS.questions, FLAGS.answers,
                      config=infer_flags.generation_config(im), model_id=model_id,
                      batch_size=FLAGS.batch_size, image_folder=FLAGS.image_folder,
                      seed=FLAGS.seed, overwrite=FLAGS.overwrite)
  import jax
  if jax.process_index() == 0:
    print(f"wrote {n} answers to {FLAGS.answers}")
