"""Multi-turn chat about one image, in the model's conversation template.

Each turn re-encodes the whole conversation (the image goes into the first human turn,
as in training) and generates the answer with a fresh KV cache: simple, and the
prefill of a short conversation costs little next to the answer's decode steps.
"""

from __future__ import annotations

from typing import Optional, TextIO

import jax
import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.infer.generate import GenerationConfig, generate, left_pad, until_stop
from moe_vlm.infer.load import InferenceModel
from moe_vlm.infer.vqa import bucket

EXIT_WORDS = ("exit", "quit")


class ChatSession:
  """The conversation so far, and `ask` to extend it by one question and its answer."""

  def __init__(self, im: InferenceModel, config: GenerationConfig, *,
               image: Optional[images_lib.ImageInput] = None, seed: int = 0):
    if im.template == "plain":
      raise ValueError("this model uses the 'plain' captioning template (stage 1), which "
                       "has no turns to chat in; use a stage 2 or 3 model")
    self.im = im
    self.config = config
    self.has_image = image is not None
    self.pixels = im.image(image)[None]
    self.rng = jax.random.key(seed)
    self.turns: list[dict[str, str]] = []

  def ask(self, text: str) -> str:
    """Answers `text` given the previous turns; both join the conversation."""
    value = text
    if self.has_image and not self.turns:
      value = templates.IMAGE_PLACEHOLDER + "\n" + text
    question = {"from": templates.HUMAN, "value": value}
    prompt = self.im.encode(self.turns + [question])
    # Buckets of 128 tokens: a growing conversation recompiles only now and then.
    ids, mask = left_pad([prompt], self.im.pad_id, bucket(len(prompt), 128))
    tokens = generate(self.im.model, ids, mask, self.pixels, self.config,
                      rng=jax.random.fold_in(self.rng, len(self.turns)))
    answer = self.im.decode(until_stop(np.asarray(tokens), self.config.eos_ids)[0])
    self.turns += [question, {"from": templates.GPT, "value": answer}]
    return answer


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO) -> int:
  """Reads questions line by line until `exit`/`quit` or EOF; returns the turns answered."""
  answered = 0
  while True:
    stdout.write("USER: ")
    stdout.flush()
    line = stdin.readline()
    if not line:  # EOF
      stdout.write("\n")
      break
    text = line.strip()
    if text.lower() in EXIT_WORDS:
      break
    if not text:
      continue
    stdout.write(f"ASSISTANT: {session.ask(text)}\n")
    stdout.flush()
    answered += 1
  return answered
