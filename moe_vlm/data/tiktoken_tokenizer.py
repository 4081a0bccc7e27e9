"""The tiktoken tokenizers of MoE-LLaVA's StableLM (Arcade100k) and Qwen-1 backbones,
without their remote code.

Both ship as a rank file (`arcade100k.tiktoken`, `qwen.tiktoken`: base64 token, rank per
line) plus a Python tokenizer class that transformers runs only with
`trust_remote_code`. What that class does is small and fixed, so we do it here with the
`tiktoken` package itself (the library the original classes call), which gives the
original ids by construction:

  ids = Encoding(pat_str, mergeable_ranks=<file>, special_tokens=<fixed table>)
            .encode(unicodedata.normalize("NFC", text), allowed_special="all")

The split pattern and the special-token tables below are those of the original classes
(`tokenization_arcade100k.Arcade100kTokenizer`, `tokenization_qwen.QWenTokenizer`), as
data. `TiktokenTokenizer` offers the part of the transformers tokenizer interface this
package uses (call with offsets, decode, special-token ids, `len`, `save_pretrained`,
which copies the original files unchanged).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import unicodedata
from typing import Any, Iterable, Optional, Sequence

_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
            r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class TiktokenSpec:
  """What the original tokenizer class fixes besides its rank file."""

  name: str
  file: str  # the rank file's name
  tokenizer_class: str  # as tokenizer_config.json names the original class
  special_tokens: tuple[str, ...]
  special_start: int  # id of the first special token
  # The original asserts len(ranks) + len(specials) + gap == n_vocab (Arcade100k leaves
  # id 100256 unused).
  gap: int
  # Set by the original class itself, whatever the files say (Arcade100k: eos = pad =
  # <|endoftext|>).
  fixed: tuple[tuple[str, str], ...] = ()

  def specials(self) -> dict[str, int]:
    return {t: self.special_start + i for i, t in enumerate(self.special_tokens)}


ARCADE100K = TiktokenSpec(
    name="arcade100k", file="arcade100k.tiktoken", tokenizer_class="Arcade100kTokenizer",
    special_tokens=(
        (ENDOFTEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
         "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
         "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>",
         "<reponame>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>")
        + tuple(f"<|reg{i}|>" for i in range(8)) + ("<|extra0|>",)),
    special_start=100257, gap=1, fixed=(("eos_token", ENDOFTEXT), ("pad_token", ENDOFTEXT)))

QWEN = TiktokenSpec(
    name="qwen", file="qwen.tiktoken", tokenizer_class="QWenTokenizer",
    special_tokens=(ENDOFTEXT, "<|im_start|>", "<|im_end|>")
    + tuple(f"<|extra_{i}|>" for i in range(205)),
    special_start=151643, gap=0)

SPECS = (ARCADE100K, QWEN)


class TiktokenError(ValueError):
  """A tiktoken tokenizer directory this module cannot read exactly as the original."""


def find_spec(path: str) -> Optional[TiktokenSpec]:
  """The spec whose rank file `path` holds (or whose class tokenizer_config.json names)."""
  for spec in SPECS:
    if os.path.exists(os.path.join(path, spec.file)):
      return spec
  cls = _read_json(os.path.join(path, "tokenizer_config.json")).get("tokenizer_class")
  for spec in SPECS:
    if cls == spec.tokenizer_class:
      raise TiktokenError(f"{path}: tokenizer_config.json names {cls} but {spec.file} is "
                          f"missing; copy {spec.file} from the original checkpoint into {path}")
  return None


def load_ranks(file: str) -> dict[bytes, int]:
  """A tiktoken rank file: `<base64 token> <rank>` per line."""
  with open(file, "rb") as f:
    lines = f.read().splitlines()
  try:
    return {base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in lines if line)}
  except ValueError as e:
    raise TiktokenError(f"{file}: not a tiktoken rank file ({e})") from None


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_content(value: Any) -> Optional[str]:
  if isinstance(value, dict):  # an AddedToken dict
    return value.get("content")
  return value


class TiktokenTokenizer:
  """A tiktoken rank file + the original class's fixed tables (see module docstring)."""

  is_fast = True  # offsets are available (templates tokenize whole runs with them)
  chat_template = None
  padding_side = "right"

  def __init__(self, path: str, spec: TiktokenSpec):
    import tiktoken

    self.path, self.spec = os.path.abspath(path), spec
    ranks = load_ranks(os.path.join(path, spec.file))
    self._specials = spec.specials()
    self._enc = tiktoken.Encoding(spec.name, pat_str=_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens=self._specials)
    if len(ranks) + len(self._specials) + spec.gap != self._enc.n_vocab:
      raise TiktokenError(
          f"{os.path.join(path, spec.file)}: {len(ranks)} ranks + {len(self._specials)} "
          f"special tokens (from id {spec.special_start}) do not make the {spec.name} "
          f"vocabulary the original {spec.tokenizer_class} asserts; not a {spec.name} file")
    self._n_vocab = self._enc.n_vocab
    self._added: dict[str, int] = {}  # ids we reserve past the vocabulary (`<image>`)
    self._decoder = {i: t for t, i in ranks.items()}
    # Special-token names: tokenizer_config.json, then special_tokens_map.json, then what
    # the original class fixes itself.
    roles = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _token_content(_read_json(os.path.join(path, name)).get(role))
        if value is not None:
          roles.setdefault(role, value)
    roles.update(dict(spec.fixed))
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
      token = roles.get(role)
      if token is not None and token not in self._specials:
        raise TiktokenError(f"{path}: {role}={token!r} is not a special token of "
                            f"{spec.name}")
      setattr(self, role, token)

  # -- ids of the special roles
  def _id(self, token: Optional[str]) -> Optional[int]:
    return None if token is None else self._specials.get(token, self._added.get(token))

  @property
  def bos_token_id(self) -> Optional[int]:
    return self._id(self.bos_token)

  @property
  def eos_token_id(self) -> Optional[int]:
    return self._id(self.eos_token)

  @property
  def unk_token_id(self) -> Optional[int]:
    return self._id(self.unk_token)

  @property
  def pad_token_id(self) -> Optional[int]:
    return self._id(self.pad_token)

  def __len__(self) -> int:
    return self._n_vocab + len(self._added)

  @property
  def vocab_size(self) -> int:
    return self._n_vocab

  # -- encoding
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens  # the originals add none
    return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

  def __call__(self, text: str, add_special_tokens: bool = True,
               return_offsets_mapping: bool = False, **kw: Any) -> dict[str, Any]:
    if kw:
      raise TypeError(f"TiktokenTokenizer does not take {sorted(kw)}")
    ids = self.encode(text, add_special_tokens)
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    if return_offsets_mapping:
      out["offset_mapping"] = self._offsets(ids, len(text))
    return out

  def _offsets(self, ids: Sequence[int], length: int) -> list[tuple[int, int]]:
    """(start, end) character spans of the tokens in the NFC-normalised text (equal to
    the text unless normalisation changed it; clipped to its length)."""
    if not ids:
      return []
    _, starts = self._enc.decode_with_offsets(list(ids))
    ends = list(starts[1:]) + [max(length, starts[-1])]
    return [(min(s, length), min(max(e, s), length)) for s, e in zip(starts, ends)]

  # -- decoding
  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
    ids = [int(i) for i in ids]
    if skip_special_tokens:  # as the originals: every id from the first special on goes
      ids = [i for i in ids if i < self.spec.special_start]
    ids = [i for i in ids if i < self._n_vocab and (i in self._decoder or
                                                     i >= self.spec.special_start)]
    return self._enc.decode(ids, errors="replace")

  # -- vocabulary
  def get_vocab(self) -> dict[str, int]:
    """Special and reserved tokens by name (the byte tokens have no str names)."""
    return {**self._specials, **self._added}

  def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
    if isinstance(tokens, str):
      return self.get_vocab().get(tokens)
    return [self.get_vocab().get(t) for t in tokens]

  def add_special_tokens(self, tokens: dict[str, Any], **_: Any) -> int:
    """Reserves ids past the vocabulary for new special tokens (training's `<image>`):
    the encoder never produces them, so text can never turn into one."""
    added = 0
    for token in tokens.get("additional_special_tokens", ()):
      token = _token_content(token)
      if token not in self.get_vocab():
        self._added[token] = len(self)
        added += 1
    unknown = set(tokens) - {"additional_special_tokens"}
    if unknown:
      raise TiktokenError(f"cannot set {sorted(unknown)} on the {self.spec.name} tokenizer")
    return added

  def save_pretrained(self, out_dir: str) -> None:
    """Copies the original tokenizer files (what MoE-LLaVA's loader reads) unchanged."""
    os.makedirs(out_dir, exist_ok=True)
    for name in tokenizer_files(self.path):
      shutil.copy2(os.path.join(self.path, name), os.path.join(out_dir, name))

  def __repr__(self) -> str:
    return f"TiktokenTokenizer({self.spec.name}, {self.path}, n_vocab={self._n_vocab})"


def tokenizer_files(path: str) -> list[str]:
  """The files of a tiktoken tokenizer directory that belong to its tokenizer: the rank
  file, the JSON configs, and the tokenizer module that tokenizer_config.json's auto_map
  names (copied as a file, never imported)."""
  names = [s.file for s in SPECS] + ["tokenizer_config.json", "special_tokens_map.json",
                                     "added_tokens.json"]
  auto_map = _read_json(os.path.join(path, "tokenizer_config.json")).get("auto_map") or {}
  for value in auto_map.values():
    for ref in (value if isinstance(value, list) else [value]):
      if isinstance(ref, str) and "." in ref:
        names.append(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
  return [n for n in dict.fromkeys(names) if os.path.isfile(os.path.join(path, n))]
