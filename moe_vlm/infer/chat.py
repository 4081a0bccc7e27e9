"""Multi-turn chat about one image, in the model's conversation template.

Each turn re-encodes the whole conversation (the image goes into the first human turn,
as in training), but only the tokens the KV cache does not already hold are prefilled:
the cache keeps every token fed so far, and a new turn reuses the longest prefix it
shares with them (the earlier turns, usually) and overwrites the rest. Causal attention
makes that exact: a slot's keys and values depend only on the tokens before it. When
the template re-tokenises an answer differently from the tokens generated, the shared
prefix simply ends earlier.

`<image>` typed by the user is refused with a TurnError (the conversation is unchanged):
the image goes into the first turn only, and a chat without an image has none to show.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from moe_vlm.data import images as images_lib
from moe_vlm.data import templates
from moe_vlm.infer.generate import (GenerationConfig, extend, init_cache, left_pad,
                                    until_stop)
from moe_vlm.infer.load import InferenceModel
from moe_vlm.infer.vqa import bucket
from moe_vlm.models.layers import KVCache

EXIT_WORDS = ("exit", "quit")
# New prompt tokens are padded to a multiple of this, and the cache grows in steps of
# CACHE_STEP slots: a growing conversation recompiles only now and then.
PROMPT_STEP = 32
CACHE_STEP = 256


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common prefix of two token sequences."""
  n = min(len(a), len(b))
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if diff.size else n


class TurnError(ValueError):
  """A question the conversation cannot take; it was not added and nothing changed."""


@dataclasses.dataclass
class TurnStats:
  """What the last turn cost: prompt tokens, and how many of them were prefilled."""

  prompt_tokens: int
  prefilled: int
  generated: list[int]


class ChatSession:
  """The conversation so far, and `ask` to extend it by one question and its answer."""

  def __init__(self, im: InferenceModel, config: GenerationConfig, *,
               image: Optional[images_lib.ImageInput] = None, seed: int = 0,
               reuse_cache: bool = True):
    if im.template == "plain":
      raise ValueError("this model uses the 'plain' captioning template (stage 1), which "
                       "has no turns to chat in; use a stage 2 or 3 model")
    self.im = im
    self.config = config
    self.reuse_cache = reuse_cache
    self.has_image = image is not None
    self.image = image
    self.pixels = im.image(image)[None]
    grid = im.grid(image)  # Qwen2-VL's patch grid (None for square-image towers)
    self.grid = None if grid is None else grid[None]
    self.rng = jax.random.key(seed)
    self.turns: list[dict[str, str]] = []
    self.last: Optional[TurnStats] = None
    # The cache, the tokens it holds (in order), the slot of each, and slot validity.
    self._cache: Optional[KVCache] = None
    self._fed: list[int] = []
    self._slots: list[int] = []
    self._valid = np.zeros((1, 0), np.int32)

  def _reusable(self, prompt: np.ndarray) -> int:
    """How many leading prompt tokens the cache already holds (at least one token is
    always prefilled: its logits pick the first answer token)."""
    if not self.reuse_cache or self._cache is None:
      return 0
    common = min(shared_prefix(self._fed, prompt.tolist()), len(prompt) - 1)
    image = np.flatnonzero(prompt == self.im.cfg.image_token_id)
    if image.size and common < image[-1] + 1:
      # An image's placeholders are prefilled together with its pixels, never split.
      common = min(common, int(image[0]))
      if self.im.cfg.vision.native:  # M-RoPE: an image only in a prefill from slot 0
        common = 0
    return common

  def _cache_for(self, start: int, needed: int) -> KVCache:
    """A cache of at least `needed` slots whose first `start` slots are the current ones."""
    length = bucket(needed, CACHE_STEP)
    if self._cache is None or start == 0:
      cache = init_cache(self.im.cfg.text, 1, length)
    elif self._cache.length < needed:
      grow = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, 0), (0, 0)))
      cache = self._cache._replace(k=grow(self._cache.k), v=grow(self._cache.v))
    else:
      cache = self._cache
    return cache._replace(index=jnp.asarray(start, jnp.int32))

  def _generate(self, prompt: np.ndarray, rng: jax.Array) -> list[int]:
    """Prefills what the cache lacks of `prompt`, decodes, records the new cache, and
    returns the answer's tokens (up to, excluding, the stop token)."""
    n = self.config.max_new_tokens
    common = self._reusable(prompt)
    start = self._slots[common - 1] + 1 if common else 0
    delta = prompt[common:]
    ids, pad_mask = left_pad([delta], self.im.pad_id, bucket(len(delta), PROMPT_STEP))
    cache = self._cache_for(start, start + ids.shape[1] + n)
    valid = np.ones((1, cache.length), np.int32)  # generated slots: valid from the start
    valid[:, :start] = self._valid[:, :start]
    valid[:, start:start + ids.shape[1]] = pad_mask
    with_image = np.any(delta == self.im.cfg.image_token_id)
    pixels = self.pixels if with_image else None
    self._cache = None  # donated to `extend`
    tokens, _, self._cache = extend(self.im.model, cache, valid, ids, pixels, self.config,
                                    rng=rng, image_grid_thw=self.grid if with_image else None)
    tokens = np.asarray(tokens)[0].tolist()
    answer = until_stop([tokens], self.config.eos_ids)[0]
    steps = min(len(answer) + 1, n)  # through the stop token, or all n
    # The decode loop feeds every generated token but the last one into the cache.
    fed = tokens[:steps - 1]
    first = start + ids.shape[1] - len(delta)
    self._fed = prompt.tolist() + fed
    self._slots = (self._slots[:common] + list(range(first, first + len(delta)))
                   + list(range(start + ids.shape[1], start + ids.shape[1] + len(fed))))
    self._valid = valid
    self.last = TurnStats(len(prompt), len(delta), tokens[:steps])
    return answer

  def check_question(self, text: str) -> None:
    """Raises TurnError for a question that would misplace the image: `<image>` in a
    later turn (the image sits in the first turn only), or in a chat without an image
    (the model would see blank pixels)."""
    if templates.IMAGE_PLACEHOLDER not in text:
      return
    if not self.has_image:
      raise TurnError(f"this chat has no image (start it with --image), so "
                      f"{templates.IMAGE_PLACEHOLDER} cannot be used; ask without it")
    if self.turns:
      raise TurnError(f"{templates.IMAGE_PLACEHOLDER} can only be in the first question: "
                      "the image is already part of this conversation; ask without it")

  def ask(self, text: str) -> str:
    """Answers `text` given the previous turns; both join the conversation. A question
    refused by `check_question` raises TurnError and leaves the conversation unchanged."""
    self.check_question(text)
    value = text
    if self.has_image and not self.turns:
      turn = {"from": templates.HUMAN, "value": text}
      value = templates.ensure_image_placeholder([turn])[0]["value"]
    question = {"from": templates.HUMAN, "value": value}
    prompt = np.asarray(self.im.encode(self.turns + [question], image=self.image), np.int32)
    answer = self.im.decode(self._generate(prompt, jax.random.fold_in(self.rng,
                                                                      len(self.turns))))
    self.turns += [question, {"from": templates.GPT, "value": answer}]
    return answer


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO) -> int:
  """Reads questions line by line until `exit`/`quit` or EOF; returns the turns answered.
  A refused question (TurnError) gets its reason printed and the chat continues."""
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
    try:
      answer = session.ask(text)
    except TurnError as e:  # refused before any change: the conversation goes on
      stdout.write(f"(not asked: {e})\n")
      stdout.flush()
      continue
    stdout.write(f"ASSISTANT: {answer}\n")
    stdout.flush()
    answered += 1
  return answered
