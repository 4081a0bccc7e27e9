"""`moe-vlm chat --workdir DIR [--stage 3] [--config CFG] [--image IMG]` or
`moe-vlm chat --ckpt DIR [--image IMG]`: a multi-turn conversation on stdin/stdout;
`exit`, `quit` or EOF ends it. Earlier turns stay in the KV cache."""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from moe_vlm.commands import infer_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("image", None, "the image to talk about (none: text-only chat)")
# LLaVA's cli.py samples at temperature 0.2 and allows long answers.
FLAGS.set_default("temperature", 0.2)
FLAGS.set_default("max_new_tokens", 512)


def main(argv: Sequence[str]) -> None:
  del argv
  im = infer_flags.load_model()
  from moe_vlm.infer.chat import ChatSession, run_chat
  session = ChatSession(im, infer_flags.generation_config(im), image=FLAGS.image,
                        seed=FLAGS.seed)
  run_chat(session, sys.stdin, sys.stdout)
