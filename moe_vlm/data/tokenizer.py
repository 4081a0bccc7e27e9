"""A small byte-level BPE tokenizer trained locally, and offline tokenizer loading.

The synthetic data set needs a tokenizer that exists without any download. Byte-level
BPE (GPT-2 / Phi-2 style) round-trips every string exactly, keeps leading spaces on
words ("Ġred") like the byte-level tokenizers of MoE-LLaVA's backbones, and never
produces unknown tokens. It is saved in HF format so the rest of the code treats it
like any `AutoTokenizer` checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)


def train_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int = 512,
                    min_frequency: int = 2) -> Any:
  """Trains byte-level BPE on `texts`, saves it to `out_dir` and returns it (HF fast).

  Special tokens get ids 0..4 in the order <unk>, <s>, </s>, <pad>, <image>; `<image>`
  is registered as a special token so no text can be split into it, but callers still
  insert its id themselves (see templates.py).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet + special "
                     f"tokens ({256 + len(SPECIAL_TOKENS)})")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS,
                               eos_token=EOS, pad_token=PAD, extra_special_tokens=[IMAGE])
  os.makedirs(out_dir, exist_ok=True)
  hf.save_pretrained(out_dir)
  return hf


def load_tokenizer(path: str) -> Any:
  """Loads a tokenizer from a LOCAL directory (no hub access, no remote code): an HF
  tokenizer, or the tiktoken tokenizers of StableLM-2 (`arcade100k.tiktoken`) and Qwen-1
  (`qwen.tiktoken`), which need remote code in transformers and are read here through
  the `tiktoken` package (`moe_vlm.data.tiktoken_tokenizer`).

  Raises FileNotFoundError naming the path when it is not a directory with tokenizer
  files, rather than letting transformers treat it as a hub repo id.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from moe_vlm.data import tiktoken_tokenizer  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path} (only local "
                            "directories are supported)")
  spec = tiktoken_tokenizer.find_spec(path)
  if spec is not None:
    tokenizer = tiktoken_tokenizer.TiktokenTokenizer(path, spec)
    if tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer at {path} has no eos token; the templates need one")
    return tokenizer
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
  if not any(os.path.exists(os.path.join(path, n)) for n in names):
    raise FileNotFoundError(f"{path} holds no tokenizer files; expected one of {names} "
                            "or a tiktoken rank file (arcade100k.tiktoken, qwen.tiktoken)")
  try:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                              trust_remote_code=False)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: transformers cannot load this tokenizer without remote "
                     f"code ({e}). Supported without it: transformers' own tokenizer "
                     "classes, and the tiktoken files arcade100k.tiktoken (StableLM-2) and "
                     "qwen.tiktoken (Qwen-1); pass another tokenizer directory "
                     "(--tokenizer DIR)") from None
  if tokenizer.eos_token_id is None:
    raise ValueError(f"tokenizer at {path} has no eos token; the templates need one")
  return tokenizer


def image_token_id(tokenizer: Any, token: str = IMAGE) -> int:
  """Id of `<image>` in the tokenizer's vocabulary (error if it is not a single token)."""
  ids = tokenizer.convert_tokens_to_ids([token])
  if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
    raise ValueError(f"tokenizer has no {token!r} token; add it or pass image_token_id")
  return int(ids[0])
