"""Conversation templates: LLaVA records -> token ids with an answer-only loss mask.

Templates (the `template` argument):
  plain     Stage 1 (projector pre-training): `<image>{caption}<eos>`. The human text is
            dropped, as in LLaVA's `preprocess_plain`; loss on caption + eos. (The
            reference ends the caption with its plain separator "\\n"; we end it with
            eos so a stage-1 model learns where a caption stops.)
  phi, stablelm, qwen
            MoE-LLaVA's chat template (SeparatorStyle.TWO, sep " ", sep2 = eos):
            `{system} USER: <image>\\n{q} ASSISTANT: {a}<eos>USER: {q2} ASSISTANT: {a2}<eos>`.
            The three names are one template; they exist so configs can name the
            backbone as the reference scripts do (`--version phi` ...).
  hf_chat   The tokenizer's own `apply_chat_template`, rendered turn by turn so only the
            assistant content and the end-of-turn marker that closes it are labelled.

Token layout rules shared by all templates:
  * `<image>` is never given to the tokenizer: text is split around it and the
    placeholder becomes `num_image_tokens` copies of `image_token_id`, which is what
    the model (`moe_vlm.models.vlm`) expects. As in LLaVA, a human turn's `<image>` is
    moved to the front of that turn, followed by "\\n".
  * Each run of text between image tokens / eos ids is tokenized in ONE call and the
    answer spans are found by character offsets, so BPE merges are exactly those of
    the whole string; a token is labelled when its last character lies in an answer.
  * `loss_mask[t] = 1` means token t is a training target (the HF "labels" convention:
    the trainer predicts token t from position t - 1, i.e. shifts the mask by one).
  * `router_mask[t] = 1` marks the first user turn's content: its image tokens and its
    text, without the role header before it or the end-of-turn marker and assistant
    header after it (no system prompt either). Awaker2.5-VL's instance router averages
    its gate input over this span (the release's `prompt_pos`: from the image start to
    the end of the first user turn). `hf_chat` finds the content in the rendered
    template; a template that does not render it verbatim marks the whole first prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
MOE_LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MOE_LLAVA_TEMPLATES = ("phi", "stablelm", "qwen")
TEMPLATES = ("plain",) + MOE_LLAVA_TEMPLATES + ("hf_chat",)


class ConversationError(ValueError):
  """A record's `conversations` field does not have the LLaVA structure."""


class ImageTruncatedError(ValueError):
  """max_length would cut through the image tokens: the sample cannot be used."""


@dataclasses.dataclass(frozen=True)
class EncodedSample:
  """One tokenized conversation, right-padded to max_length (all arrays int32 [L])."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  truncated: bool
  num_tokens: int  # real (non-pad) tokens after truncation
  num_image_tokens: int  # image placeholder ids placed (0 for text-only)
  router_mask: Optional[np.ndarray] = None  # the first user turn's content (see above)


# ---------------------------------------------------------------------------------
# Validation


def validate_conversations(conversations: Any, *, field: str = "conversations",
                           allow_open_turn: bool = False) -> list[dict[str, str]]:
  """Checks the LLaVA structure and returns the turns as plain {"from", "value"} dicts.

  Turns must alternate human/gpt starting with human, every value a string, at most
  one human turn holding `<image>` (one image per sample) and no gpt turn holding it.
  A trailing human turn is allowed only with allow_open_turn (generation prompts).
  """
  if not isinstance(conversations, (list, tuple)):
    raise ConversationError(f"{field} is a {type(conversations).__name__}; expected a "
                            "list of {'from': 'human'|'gpt', 'value': str} turns")
  if not conversations:
    raise ConversationError(f"{field} is empty; expected at least one human/gpt pair")
  turns = []
  images = 0
  for i, turn in enumerate(conversations):
    where = f"{field}[{i}]"
    if not isinstance(turn, dict):
      raise ConversationError(f"{where} is a {type(turn).__name__}; expected a dict with "
                              "'from' and 'value'")
    expected = HUMAN if i % 2 == 0 else GPT
    role = turn.get("from")
    if role != expected:
      raise ConversationError(f"{where}['from'] is {role!r}; expected {expected!r} "
                              "(turns alternate human/gpt, starting with human)")
    value = turn.get("value")
    if not isinstance(value, str):
      raise ConversationError(f"{where}['value'] is a {type(value).__name__}; expected str")
    if IMAGE_PLACEHOLDER in value:
      if role == GPT:
        raise ConversationError(f"{where}['value'] (a gpt turn) contains {IMAGE_PLACEHOLDER}")
      if value.count(IMAGE_PLACEHOLDER) > 1:
        raise ConversationError(f"{where}['value'] has {value.count(IMAGE_PLACEHOLDER)} "
                                f"{IMAGE_PLACEHOLDER} placeholders; expected at most one "
                                "(one image per sample)")
      images += 1
    turns.append({"from": role, "value": value})
  if images > 1:
    raise ConversationError(f"{field} has {IMAGE_PLACEHOLDER} in {images} human turns; "
                            "expected at most one (one image per sample)")
  if len(turns) % 2 and not allow_open_turn:
    raise ConversationError(f"{field} ends with a human turn; expected it to end with "
                            "the gpt answer")
  if not len(turns) % 2 and allow_open_turn:
    raise ConversationError(f"{field} ends with a gpt turn; a generation prompt must end "
                            "with the human turn to answer")
  return turns


def has_image_placeholder(conversations: Sequence[dict[str, str]]) -> bool:
  return any(IMAGE_PLACEHOLDER in t["value"] for t in conversations if t["from"] == HUMAN)


def ensure_image_placeholder(conversations: Sequence[dict[str, str]]) -> list[dict[str, str]]:
  """Puts `<image>` in the first human turn if no turn has it (records with an image
  but no placeholder would otherwise silently train without their image)."""
  turns = [dict(t) for t in conversations]
  if not has_image_placeholder(turns):
    turns[0]["value"] = IMAGE_PLACEHOLDER + "\n" + turns[0]["value"]
  return turns


def _image_first(value: str) -> tuple[bool, str]:
  """LLaVA's `preprocess_multimodal`: strip `<image>` and report it (goes first)."""
  if IMAGE_PLACEHOLDER not in value:
    return False, value
  return True, value.replace(IMAGE_PLACEHOLDER, "").strip()


# ---------------------------------------------------------------------------------
# Rendering: conversations -> segments
#
# A segment is ("text", str, is_target), ("image", None, False) or ("eos", None, True),
# optionally with a 4th element: True when it lies in the router span (see the module
# docstring).


def _render_plain(turns, open_turn):
  if len(turns) > 2:
    raise ConversationError(f"the plain template takes one human/gpt pair; got {len(turns)} "
                            "turns")
  segments = []
  if IMAGE_PLACEHOLDER in turns[0]["value"]:
    segments.append(("image", None, False, True))
  if not open_turn:
    segments += [("text", turns[1]["value"], True), ("eos", None, True)]
  return segments


def _render_moe_llava(turns, open_turn, system=MOE_LLAVA_SYSTEM):
  segments = [("text", system + " ", False)]
  for k in range(0, len(turns), 2):
    image, question = _image_first(turns[k]["value"])
    first = k == 0  # the router span: the first user turn's content
    if image:
      segments += [("text", "USER: ", False), ("image", None, False, first),
                   ("text", "\n" + question, False, first), ("text", " ASSISTANT:", False)]
    else:
      segments += [("text", "USER: ", False), ("text", question, False, first),
                   ("text", " ASSISTANT:", False)]
    if k + 1 < len(turns):
      segments += [("text", " " + turns[k + 1]["value"], True), ("eos", None, True)]
  return segments


def _render_hf_chat(turns, open_turn, tokenizer):
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("template 'hf_chat' needs a tokenizer with a chat_template; this "
                     "tokenizer has none (use 'phi' / 'plain')")
  messages = []
  for t in turns:
    if t["from"] == HUMAN:
      image, question = _image_first(t["value"])
      content = IMAGE_PLACEHOLDER + "\n" + question if image else question
      messages.append({"role": "user", "content": content})
    else:
      messages.append({"role": "assistant", "content": t["value"]})

  def render(msgs, generation_prompt):
    return tokenizer.apply_chat_template(msgs, tokenize=False,
                                         add_generation_prompt=generation_prompt)

  pieces = []  # (text, is_target, in the router span)
  done = ""
  for k in range(0, len(messages), 2):
    prompt = render(messages[:k + 1], True)
    if not prompt.startswith(done):
      raise ValueError(f"the tokenizer's chat template is not incremental (turn {k // 2}'s "
                       "prompt does not extend the previous turns); use 'phi' instead")
    new = prompt[len(done):]
    content = messages[k]["content"]
    at = new.rfind(content) if k == 0 and content else -1
    if k == 0 and at < 0:  # not rendered verbatim: the whole first prompt
      pieces.append((new, False, True))
    elif k == 0:
      pieces += [(new[:at], False, False), (content, False, True),
                 (new[at + len(content):], False, False)]
    else:
      pieces.append((new, False, False))
    done = prompt
    if k + 1 < len(messages):
      full = render(messages[:k + 2], False)
      if not full.startswith(prompt):
        raise ValueError(f"the tokenizer's chat template is not incremental (turn {k // 2}'s "
                         "answer does not extend its prompt); use 'phi' instead")
      answer = full[len(prompt):]
      target = answer.rstrip()  # content + end-of-turn marker; trailing newline is prompt
      pieces += [(target, True, False), (answer[len(target):], False, False)]
      done = full
  segments = []
  for text, target, router in pieces:
    parts = text.split(IMAGE_PLACEHOLDER)
    for j, part in enumerate(parts):
      if j:
        segments.append(("image", None, False, router))
      segments.append(("text", part, target, router))
  return segments


def render_segments(conversations: Sequence[dict[str, str]], template: str, tokenizer: Any,
                    *, open_turn: bool = False) -> list[tuple[str, Optional[str], bool]]:
  """Conversation (already validated) -> list of (kind, text, is_target) segments."""
  if template == "plain":
    return _render_plain(conversations, open_turn)
  if template in MOE_LLAVA_TEMPLATES:
    return _render_moe_llava(conversations, open_turn)
  if template == "hf_chat":
    return _render_hf_chat(conversations, open_turn, tokenizer)
  raise ValueError(f"unknown conversation template {template!r}; expected one of {TEMPLATES}")


# ---------------------------------------------------------------------------------
# Tokenization


def _encode_text_run(tokenizer, pieces: list[tuple[str, bool, bool]]
                     ) -> tuple[list[int], list[int], list[int]]:
  """Tokenizes consecutive text pieces (text, is_target, in_router_span) as one string;
  labels tokens ending in a target, and marks those ending in the router span."""
  text = "".join(p for p, _, _ in pieces)
  if not text:
    return [], [], []
  if getattr(tokenizer, "is_fast", False):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    is_target = np.zeros(len(text) + 1, bool)
    is_router = np.zeros(len(text) + 1, bool)
    pos = 0
    for piece, target, router in pieces:
      is_target[pos:pos + len(piece)] = target
      is_router[pos:pos + len(piece)] = router
      pos += len(piece)
    ids = list(enc["input_ids"])
    labels, routers = [], []
    for start, end in enc["offset_mapping"]:
      labels.append(int(is_target[max(end - 1, start, 0)]))
      routers.append(int(is_router[max(end - 1, start, 0)]))
    return ids, labels, routers
  # Slow tokenizers have no offsets: tokenize piece by piece (merges cannot cross a
  # prompt/answer boundary, which only matters for exotic tokenizers).
  ids, labels, routers = [], [], []
  for piece, target, router in pieces:
    if piece:
      piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
      ids += piece_ids
      labels += [int(target)] * len(piece_ids)
      routers += [int(router)] * len(piece_ids)
  return ids, labels, routers


def _segments_to_ids(segments, tokenizer, *, num_image_tokens: int, image_token_id: int,
                     add_bos: bool) -> tuple[list[int], list[int], int, list[int]]:
  """-> (ids, labels, image_start or -1, router span flags)."""
  ids: list[int] = []
  labels: list[int] = []
  routers: list[int] = []
  image_start = -1
  if add_bos:
    if tokenizer.bos_token_id is None:
      raise ValueError("add_bos=True but the tokenizer has no bos token")
    ids.append(tokenizer.bos_token_id)
    labels.append(0)
    routers.append(0)
  run: list[tuple[str, bool, bool]] = []

  def flush():
    run_ids, run_labels, run_routers = _encode_text_run(tokenizer, run)
    ids.extend(run_ids)
    labels.extend(run_labels)
    routers.extend(run_routers)
    run.clear()

  for kind, text, target, *rest in segments:
    router = bool(rest and rest[0])
    if kind == "text":
      run.append((text, target, router))
      continue
    flush()
    if kind == "image":
      image_start = len(ids)
      ids.extend([image_token_id] * num_image_tokens)
      labels.extend([0] * num_image_tokens)
      routers.extend([int(router)] * num_image_tokens)
    elif kind == "eos":
      if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the templates need one")
      ids.append(tokenizer.eos_token_id)
      labels.append(int(target))
      routers.append(int(router))
    else:
      raise AssertionError(kind)
  flush()
  expected = num_image_tokens if image_start >= 0 else 0
  if ids.count(image_token_id) != expected:
    raise ConversationError(f"the text itself tokenizes to the image token id "
                            f"{image_token_id}; image tokens may only come from "
                            f"{IMAGE_PLACEHOLDER}")
  return ids, labels, image_start, routers


def pad_id(tokenizer: Any) -> int:
  """Pad id: the tokenizer's pad, else unk (MoE-LLaVA's choice), else eos, else 0."""
  for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  return 0


def tokenize_conversation(conversations: Any, tokenizer: Any, template: str, *,
                          num_image_tokens: int, image_token_id: int, max_length: int,
                          add_bos: bool = False) -> EncodedSample:
  """LLaVA `conversations` -> EncodedSample padded/truncated to max_length.

  Raises ConversationError for a malformed conversation and ImageTruncatedError when
  max_length would cut through the image tokens (the caller skips and counts both).
  Truncation elsewhere keeps the first max_length tokens and sets `truncated`.
  add_bos prepends the tokenizer's bos (Llama-style backbones; MoE-LLaVA's Phi,
  StableLM and Qwen prompts have none).
  """
  if max_length <= 0:
    raise ValueError(f"max_length must be positive, got {max_length}")
  turns = validate_conversations(conversations)
  segments = render_segments(turns, template, tokenizer)
  ids, labels, image_start, routers = _segments_to_ids(
      segments, tokenizer, num_image_tokens=num_image_tokens,
      image_token_id=image_token_id, add_bos=add_bos)
  truncated = len(ids) > max_length
  if image_start >= 0 and image_start + num_image_tokens > max_length:
    raise ImageTruncatedError(
        f"max_length={max_length} cuts through the image tokens (positions {image_start}"
        f"..{image_start + num_image_tokens - 1} of {len(ids)}); sample skipped")
  ids, labels, routers = ids[:max_length], labels[:max_length], routers[:max_length]
  n = len(ids)
  input_ids = np.full(max_length, pad_id(tokenizer), np.int32)
  input_ids[:n] = ids
  attention_mask = np.zeros(max_length, np.int32)
  attention_mask[:n] = 1
  loss_mask = np.zeros(max_length, np.int32)
  loss_mask[:n] = labels
  router_mask = np.zeros(max_length, np.int32)
  router_mask[:n] = routers
  return EncodedSample(input_ids=input_ids, attention_mask=attention_mask,
                       loss_mask=loss_mask, truncated=truncated, num_tokens=n,
                       num_image_tokens=num_image_tokens if image_start >= 0 else 0,
                       router_mask=router_mask)


def encode_prompt(conversations: Any, tokenizer: Any, template: str, *,
                  num_image_tokens: int, image_token_id: int, add_bos: bool = False,
                  with_router_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Generation prompt: conversations ending with a human turn -> int32 ids that end
  where the assistant's answer should begin (e.g. "... ASSISTANT:"). Unpadded. With
  `with_router_mask`, (ids, router_mask): the router span as training marks it."""
  turns = validate_conversations(conversations, allow_open_turn=True)
  segments = render_segments(turns, template, tokenizer, open_turn=True)
  ids, _, _, routers = _segments_to_ids(segments, tokenizer,
                                        num_image_tokens=num_image_tokens,
                                        image_token_id=image_token_id, add_bos=add_bos)
  ids = np.asarray(ids, np.int32)
  return (ids, np.asarray(routers, np.int32)) if with_router_mask else ids
