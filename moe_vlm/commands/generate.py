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
flags.DEFINE_string("model_id", None, "the answers' model_id (default: <workdir>/stage<k>)")


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.questions is None or FLAGS.answers is None:
    raise app.UsageError("generate needs --questions and --answers")
  im = infer_flags.load_model()
  from moe_vlm.infer import vqa
  model_id = FLAGS.model_id or infer_flags.model_name()
  n = vqa.answer_file(im, FLAGS.questions, FLAGS.answers,
                      config=infer_flags.generation_config(im), model_id=model_id,
                      batch_size=FLAGS.batch_size, image_folder=FLAGS.image_folder,
                      seed=FLAGS.seed)
  print(f"wrote {n} answers to {FLAGS.answers}")
