"""The embedded default data set: coloured shapes on a grid, generated per sample index.

Every training sample is a pure function of (seed, stream, index): its scene, its
pixels and its questions are drawn from a random generator seeded with those numbers,
so a source has no files, as many samples as the stages consume, and returns the same
sample for the same index after a restart (resume stays exact). A scene is 1-3 objects,
each a (colour, shape) pair in its own grid cell; shapes and colours are distinct within
a scene, so every question has exactly one correct single-word answer, computed from
the drawn scene:

  count     "How many shapes are in the image?"                    -> "2"
  color     "What color is the circle?"                            -> "red"
  position  "Where is the red shape?"                              -> "top-left"
  exist     "Is there a blue triangle in the image?"               -> "yes" / "no"
  relation  "Is the red circle to the left of the blue square?"    -> "yes" / "no"

Negatives for `exist` follow POPE (Li et al. 2023): random (any absent object),
popular (the most frequent objects of the training distribution that are absent) and
adversarial (absent objects sharing a shape or colour with a present one, ranked by how
often they co-occur with the present objects). Objects are drawn with skewed
frequencies so "popular" means something.

Train and evaluation images never coincide: an image belongs to the evaluation split
when a hash of its pixels falls in one bucket of `EVAL_BUCKETS`, and each split redraws
a scene until its pixels fall on its own side. Evaluation images are a separate index
range (`split="eval"`), written to the data dir as files with their questions.

Mixes (what a stage's `data` names when `data.kind="synthetic"`):
  captions   `plain` template: human "<image>", gpt the caption (stage 1, and the
             vision tower's pre-training)
  instruct   descriptions + single-turn QA + a few text-only samples (stage 2)
  qa         QA, some multi-turn, + a few text-only samples (stage 3)

Files `generate` writes under out_dir:
  images/eval-NNNNN.png  the held-out images
  eval.json        one question of each type per held-out image, with `answer`, `type`
  pope.json        POPE yes/no questions per held-out image, with `label`, `category`
  scenes.json      the scene of every written image (ground truth)
  meta.json        counts and the generator's settings
  and, with num_images > 0, a LLaVA-JSON export of the first num_images samples of each
  mix: stage1.json (captions), stage2.json (instruct), stage3.json (qa) with
  images/<mix>-NNNNN.png (for `data.kind="llava_json"` runs and inspection).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import zlib
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from moe_vlm.data.templates import IMAGE_PLACEHOLDER, MOE_LLAVA_SYSTEM

SHAPES = ("square", "circle", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUND = (30, 30, 30)
# Skewed object frequencies: gives POPE's "popular" negatives a meaning.
_SHAPE_P = np.array([0.35, 0.3, 0.2, 0.15])
_COLOR_P = np.array([0.28, 0.22, 0.17, 0.14, 0.11, 0.08])
POSITIONS = {
    2: ("top-left", "top-right", "bottom-left", "bottom-right"),
    3: ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom",
        "bottom-right"),
}
_PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
           "right": "on the right", "center": "in the center"}
NUMBER_WORDS = ("zero", "one", "two", "three")
SHORT_ANSWER = "Answer with a single word."
QUESTION_TYPES = ("count", "color", "position", "exist", "relation")
POPE_CATEGORIES = ("random", "popular", "adversarial")
RELATIONS = ("to the left of", "to the right of", "above", "below")
MIXES = ("captions", "instruct", "qa")
# The LLaVA-JSON export's file names of the mixes.
MIX_FILES = {"captions": "stage1.json", "instruct": "stage2.json", "qa": "stage3.json"}
SPLITS = ("train", "eval")
EVAL_BUCKETS = 16  # 1 in 16 possible images is reserved for evaluation
COLOR_MIXING = {("red", "yellow"): "orange", ("blue", "yellow"): "green",
                ("red", "blue"): "purple", ("red", "white"): "pink",
                ("black", "white"): "gray", ("blue", "white"): "cyan"}
SIDES = {"triangle": "3", "square": "4", "diamond": "4"}
TEXT_ONLY_FRACTION = 0.05
DESCRIPTION_FRACTION = 0.35  # of `instruct`
MULTI_TURN_FRACTION = 0.3    # of `qa`
# Streams of random numbers (the second seed word): one per purpose, so e.g. the
# questions of eval image j never share a generator with training sample j.
_SAMPLE, _STATS, _CORPUS, _EVAL_QA, _EVAL_POPE = 3, 101, 102, 103, 104
_SPLIT_TAG = {"train": 1, "eval": 2}


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  position: str
  cx: int
  cy: int
  r: int

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"


Scene = tuple[Obj, ...]


def row_col(position: str) -> tuple[int, int]:
  """Grid row and column of a position name (0 = top / left, 2 = bottom / right; the
  middle row and column of a 3x3 grid are 1; a 2x2 grid uses 0 and 2)."""
  row = 0 if "top" in position else 2 if "bottom" in position else 1
  col = 0 if "left" in position else 2 if "right" in position else 1
  return row, col


# ---------------------------------------------------------------------------------
# Scenes and images


def sample_scene(rng: np.random.Generator, *, image_size: int, grid: int = 2,
                 max_objects: int = 3) -> Scene:
  """1-max_objects objects with distinct shapes, colours and cells; centre/size jittered."""
  if grid not in POSITIONS:
    raise ValueError(f"grid must be one of {sorted(POSITIONS)}, got {grid}")
  cell = image_size / grid
  if cell < 6:
    raise ValueError(f"image_size={image_size} is too small for a {grid}x{grid} grid "
                     "(need at least 6 pixels per cell)")
  n = int(rng.integers(1, max_objects + 1))
  shapes = rng.choice(len(SHAPES), n, replace=False, p=_SHAPE_P)
  colors = rng.choice(len(COLORS), n, replace=False, p=_COLOR_P)
  cells = rng.choice(grid * grid, n, replace=False)
  color_names = list(COLORS)
  objs = []
  for s, c, k in zip(shapes, colors, cells):
    row, col = divmod(int(k), grid)
    jitter = max(1, int(cell * 0.06))
    r = int(cell * rng.uniform(0.28, 0.36))
    cx = int((col + 0.5) * cell) + int(rng.integers(-jitter, jitter + 1))
    cy = int((row + 0.5) * cell) + int(rng.integers(-jitter, jitter + 1))
    objs.append(Obj(SHAPES[s], color_names[c], POSITIONS[grid][k], cx, cy, max(r, 2)))
  return tuple(sorted(objs, key=lambda o: POSITIONS[grid].index(o.position)))


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
  """Scene -> uint8 [image_size, image_size, 3]. The centre pixel of every object has
  exactly the object's colour (tests rely on it)."""
  image = Image.new("RGB", (image_size, image_size), BACKGROUND)
  draw = ImageDraw.Draw(image)
  for o in scene:
    fill = COLORS[o.color]
    x, y, r = o.cx, o.cy, o.r
    if o.shape == "square":
      draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "circle":
      draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "triangle":
      draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif o.shape == "diamond":
      draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
      raise ValueError(f"unknown shape {o.shape!r}")
  return np.asarray(image)


def split_of(pixels: np.ndarray) -> str:
  """"eval" for the 1 in EVAL_BUCKETS images whose pixel hash falls in bucket 0."""
  digest = hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).digest()
  return "eval" if int.from_bytes(digest[:4], "little") % EVAL_BUCKETS == 0 else "train"


def draw_image(seed: int, split: str, stream: int, index: int, *, image_size: int,
               grid: int = 2) -> tuple[Scene, np.ndarray]:
  """The scene and pixels of image `index` of a split's `stream`: scenes are drawn from
  one generator until the pixels belong to `split` (see `split_of`)."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")
  rng = np.random.default_rng([seed, _SPLIT_TAG[split], stream, index])
  while True:
    scene = sample_scene(rng, image_size=image_size, grid=grid)
    pixels = render_scene(scene, image_size)
    if split_of(pixels) == split:
      return scene, pixels


def _place(position: str) -> str:
  if "-" in position:  # "top-left" -> "at the top left"
    return "at the " + position.replace("-", " ")
  return _PHRASE[position]


def caption(scene: Scene) -> str:
  """"a red circle at the top left and a blue square on the right"."""
  parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.name} {_place(o.position)}"
           for o in scene]
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def description(scene: Scene) -> str:
  n = len(scene)
  noun = "shape" if n == 1 else "shapes"
  return f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun}: {caption(scene)}."


# ---------------------------------------------------------------------------------
# Questions


def _object_pool() -> list[tuple[str, str]]:
  return [(c, s) for c in COLORS for s in SHAPES]


@dataclasses.dataclass
class Stats:
  """Object statistics of the training distribution, for POPE negative sampling."""
  freq: collections.Counter
  cooc: collections.Counter

  @classmethod
  def from_scenes(cls, scenes) -> "Stats":
    freq, cooc = collections.Counter(), collections.Counter()
    for scene in scenes:
      objs = [(o.color, o.shape) for o in scene]
      freq.update(objs)
      for a in objs:
        for b in objs:
          if a != b:
            cooc[(a, b)] += 1
    return cls(freq, cooc)

  def popular(self) -> list[tuple[str, str]]:
    pool = _object_pool()
    return sorted(pool, key=lambda o: (-self.freq[o], pool.index(o)))


@functools.lru_cache(maxsize=8)
def stats(seed: int, grid: int = 2, n: int = 4000) -> Stats:
  """The statistics of a fixed sample of n scenes (the training distribution's)."""
  rng = np.random.default_rng([seed, _STATS])
  return Stats.from_scenes(sample_scene(rng, image_size=32, grid=grid) for _ in range(n))


def negatives(scene: Scene, k: int, category: str, rng: np.random.Generator,
              stats: Stats) -> list[tuple[str, str]]:
  """k (colour, shape) pairs absent from the scene, POPE-style."""
  present = {(o.color, o.shape) for o in scene}
  absent = [o for o in _object_pool() if o not in present]
  if category == "random":
    idx = rng.choice(len(absent), k, replace=False)
    return [absent[i] for i in idx]
  if category == "popular":
    return [o for o in stats.popular() if o not in present][:k]
  if category == "adversarial":
    shapes = {s for _, s in present}
    colors = {c for c, _ in present}
    tiebreak = rng.permutation(len(absent))

    def score(i):
      c, s = absent[i]
      similar = 2 * (s in shapes) + (c in colors)
      cooc = sum(stats.cooc[((c, s), p)] for p in present)
      return (-similar, -cooc, tiebreak[i])

    return [absent[i] for i in sorted(range(len(absent)), key=score)[:k]]
  raise ValueError(f"unknown POPE category {category!r}; expected one of {POPE_CATEGORIES}")


def exist_question(color: str, shape: str) -> str:
  return f"Is there a {color} {shape} in the image?"


def relation_holds(a: Obj, relation: str, b: Obj) -> bool:
  """Whether `a` is `relation` `b`: left of / right of compare grid columns, above /
  below compare grid rows."""
  (ra, ca), (rb, cb) = row_col(a.position), row_col(b.position)
  return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb,
          "below": ra > rb}[relation]


def make_question(scene: Scene, qtype: str, rng: np.random.Generator,
                  stats: Stats) -> tuple[str, str]:
  """(question, answer) of one type, answerable from the scene alone. `relation` needs
  two objects: on a one-object scene it asks `exist` instead."""
  if qtype == "count":
    return "How many shapes are in the image?", str(len(scene))
  if qtype == "relation" and len(scene) < 2:
    qtype = "exist"
  if qtype == "relation":
    i, j = rng.choice(len(scene), 2, replace=False)
    a, b = scene[int(i)], scene[int(j)]
    true = [r for r in RELATIONS if relation_holds(a, r, b)]
    false = [r for r in RELATIONS if r not in true]
    pool = true if (rng.random() < 0.5 and true) or not false else false
    relation = pool[int(rng.integers(len(pool)))]
    return (f"Is the {a.name} {relation} the {b.name}?",
            "yes" if relation_holds(a, relation, b) else "no")
  obj = scene[int(rng.integers(len(scene)))]
  if qtype == "color":
    return f"What color is the {obj.shape}?", obj.color
  if qtype == "position":
    return f"Where is the {obj.color} shape?", obj.position
  if qtype == "exist":
    if rng.random() < 0.5:
      return exist_question(obj.color, obj.shape), "yes"
    category = POPE_CATEGORIES[int(rng.integers(3))]
    color, shape = negatives(scene, 1, category, rng, stats)[0]
    return exist_question(color, shape), "no"
  raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def text_only_sample(rng: np.random.Generator) -> tuple[str, str]:
  """A short fact with a single-word answer (keeps the LLM's text ability exercised,
  like the NLP data MoE-LLaVA mixes into stages 2 and 3)."""
  kind = int(rng.integers(3))
  if kind == 0:
    a, b = (int(x) for x in rng.integers(0, 10, 2))
    if rng.random() < 0.5 or a < b:
      return f"What is {a} plus {b}?", str(a + b)
    return f"What is {a} minus {b}?", str(a - b)
  if kind == 1:
    (x, y), z = list(COLOR_MIXING.items())[int(rng.integers(len(COLOR_MIXING)))]
    return f"What color do you get by mixing {x} and {y}?", z
  shape = list(SIDES)[int(rng.integers(len(SIDES)))]
  return f"How many sides does a {shape} have?", SIDES[shape]


def _turns(pairs, image: bool) -> list[dict[str, str]]:
  turns = []
  for i, (q, a) in enumerate(pairs):
    q = f"{q}\n{SHORT_ANSWER}" if a is not None else q
    if i == 0 and image:
      q = f"{IMAGE_PLACEHOLDER}\n{q}"
    turns.append({"from": "human", "value": q})
    turns.append({"from": "gpt", "value": a})
  return turns


def conversation(mix: str, scene: Scene, rng: np.random.Generator,
                 stats: Stats) -> list[dict[str, str]]:
  """The turns of one image sample of `mix` about `scene`."""
  if mix == "captions":
    return [{"from": "human", "value": IMAGE_PLACEHOLDER},
            {"from": "gpt", "value": caption(scene)}]
  if mix == "instruct":
    if rng.random() < DESCRIPTION_FRACTION:
      q = ("Describe the image.", "What do you see in this picture?")[int(rng.integers(2))]
      return [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"},
              {"from": "gpt", "value": description(scene)}]
    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    return _turns([make_question(scene, qtype, rng, stats)], True)
  if mix == "qa":
    turns = int(rng.integers(2, 4)) if rng.random() < MULTI_TURN_FRACTION else 1
    qtypes = rng.choice(len(QUESTION_TYPES), turns, replace=False)
    return _turns([make_question(scene, QUESTION_TYPES[t], rng, stats) for t in qtypes],
                  True)
  raise ValueError(f"unknown synthetic mix {mix!r}; expected one of {MIXES}")


# ---------------------------------------------------------------------------------
# The training source


def stream_of(mix: str, salt: int = 0) -> int:
  """A stable stream number per (mix, salt): stages draw different images."""
  return zlib.crc32(mix.encode()) % 100_000 * 100 + salt


class SyntheticSource:
  """Samples of one mix as a grain random-access source, computed from the index.

  Record i: {"id", "image": uint8 [S, S, 3] or None (text-only), "conversations"},
  a pure function of (seed, stream, i); images come from the training split only.
  `sample(i)` also returns the scene (None for text-only samples).
  """

  def __init__(self, mix: str, num_samples: int, *, seed: int = 0, image_size: int = 32,
               grid: int = 2, stream: Optional[int] = None,
               text_only_fraction: Optional[float] = None):
    if mix not in MIXES:
      raise ValueError(f"unknown synthetic mix {mix!r}; expected one of {MIXES}")
    if num_samples < 1:
      raise ValueError(f"num_samples must be positive, got {num_samples}")
    self.mix, self.num_samples, self.seed = mix, int(num_samples), int(seed)
    self.image_size, self.grid = int(image_size), int(grid)
    self.stream = stream_of(mix) if stream is None else int(stream)
    if text_only_fraction is None:
      text_only_fraction = 0.0 if mix == "captions" else TEXT_ONLY_FRACTION
    self.text_only_fraction = float(text_only_fraction)
    self.skipped: dict[str, int] = {}  # nothing is malformed (the loop reads this)

  def __len__(self) -> int:
    return self.num_samples

  def sample(self, index: int) -> tuple[Optional[Scene], dict[str, Any]]:
    index = int(index)
    if not 0 <= index < self.num_samples:
      raise IndexError(f"index {index} out of range({self.num_samples})")
    rng = np.random.default_rng([self.seed, _SAMPLE, self.stream, index])
    record_id = f"{self.mix}-{index}"
    if rng.random() < self.text_only_fraction:
      return None, {"id": record_id, "image": None,
                    "conversations": _turns([text_only_sample(rng)], False)}
    scene, pixels = draw_image(self.seed, "train", self.stream, index,
                               image_size=self.image_size, grid=self.grid)
    conv = conversation(self.mix, scene, rng, stats(self.seed, self.grid))
    return scene, {"id": record_id, "image": pixels, "conversations": conv}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.sample(index)[1]

  def __repr__(self) -> str:
    return (f"SyntheticSource({self.mix!r}, {self.num_samples} samples, seed={self.seed}, "
            f"stream={self.stream})")


# ---------------------------------------------------------------------------------
# Held-out evaluation files (and an optional LLaVA-JSON export of the training mixes)


def _image_name(prefix: str, i: int) -> str:
  return f"images/{prefix}-{i:05d}.png"


def eval_records(seed: int, num_eval_images: int, *, image_size: int = 32, grid: int = 2
                 ) -> tuple[dict[str, Scene], dict[str, np.ndarray], list[dict], list[dict]]:
  """(scenes, pixels, eval questions, POPE questions) of the held-out images, by name."""
  st = stats(seed, grid)
  scenes, pixels, qa, pope = {}, {}, [], []
  for j in range(num_eval_images):
    name = _image_name("eval", j)
    scene, px = draw_image(seed, "eval", 0, j, image_size=image_size, grid=grid)
    scenes[name], pixels[name] = scene, px
    rng = np.random.default_rng([seed, _EVAL_QA, j])
    for qtype in QUESTION_TYPES:
      if qtype == "relation" and len(scene) < 2:
        continue  # one object: nothing to relate
      q, a = make_question(scene, qtype, rng, st)
      qa.append({"id": f"eval-{j}-{qtype}", "image": name, "question": q, "answer": a,
                 "type": qtype, "conversations": _turns([(q, a)], True)})
    # POPE: per category, every present object (yes) and as many negatives (no).
    rng = np.random.default_rng([seed, _EVAL_POPE, j])
    for category in POPE_CATEGORIES:
      asked = [((o.color, o.shape), "yes") for o in scene]
      asked += [(o, "no") for o in negatives(scene, len(scene), category, rng, st)]
      for i, ((color, shape), label) in enumerate(asked):
        q = exist_question(color, shape)
        pope.append({"id": f"pope-{j}-{category}-{i}", "image": name, "question": q,
                     "label": label, "category": category, "object": f"{color} {shape}",
                     "conversations": _turns([(q, label)], True)})
  return scenes, pixels, qa, pope


def generate(out_dir: str, *, num_eval_images: int = 150, num_images: int = 0,
             image_size: int = 32, seed: int = 0, grid: int = 2) -> dict[str, Any]:
  """Writes the held-out evaluation set (and, with num_images > 0, the first
  num_images samples of each training mix as LLaVA JSON) under out_dir; returns
  meta.json's content. See the module docstring for the files."""
  if num_eval_images < 1:
    raise ValueError(f"num_eval_images must be positive, got {num_eval_images}")
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  scenes, pixels, qa, pope = eval_records(seed, num_eval_images, image_size=image_size,
                                          grid=grid)
  split = {name: "eval" for name in scenes}
  files = {"eval": qa, "pope": pope}
  for mix in MIXES if num_images else ():
    source = SyntheticSource(mix, num_images, seed=seed, image_size=image_size, grid=grid)
    records = []
    for i in range(num_images):
      scene, record = source.sample(i)
      if scene is not None:
        name = _image_name(mix, i)
        scenes[name], pixels[name], split[name] = scene, record["image"], "train"
        record = dict(record, image=name)
      else:
        record = {k: v for k, v in record.items() if k != "image"}
      records.append(record)
    files[MIX_FILES[mix][:-len(".json")]] = records
  for name, px in pixels.items():
    Image.fromarray(px).save(os.path.join(out_dir, name), compress_level=1)
  for name, records in files.items():
    _write_json(os.path.join(out_dir, f"{name}.json"), records)
  _write_json(os.path.join(out_dir, "scenes.json"), {
      name: {"split": split[name], "objects": [vars(o) for o in scene]}
      for name, scene in scenes.items()})
  meta = {"seed": seed, "image_size": image_size, "grid": grid,
          "num_eval_images": num_eval_images, "num_images": num_images,
          "eval_buckets": EVAL_BUCKETS, "counts": {k: len(v) for k, v in files.items()},
          "shapes": list(SHAPES), "colors": list(COLORS), "positions": list(POSITIONS[grid]),
          "popular_objects": [" ".join(o) for o in stats(seed, grid).popular()]}
  _write_json(os.path.join(out_dir, "meta.json"), meta)
  return meta


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, separators=(",", ":")))  # one-shot C encoder: fast


def corpus(data_dir: Optional[str] = None, *, seed: int = 0, grid: int = 2,
           samples_per_mix: int = 3000) -> Iterator[str]:
  """The tokenizer's training corpus: the template strings, the text of
  `samples_per_mix` samples of every mix (questions and answers of every kind), and
  the texts of the data dir's JSON files. A data dir's meta.json sets seed and grid."""
  meta_path = os.path.join(data_dir, "meta.json") if data_dir else ""
  if meta_path and os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    seed, grid = meta.get("seed", seed), meta.get("grid", grid)
  # The template's fixed strings occur in every sample: repeat them so BPE merges them.
  for _ in range(50):
    yield MOE_LLAVA_SYSTEM + " USER: ASSISTANT:"
  st = stats(seed, grid)
  rng = np.random.default_rng([seed, _CORPUS])
  for mix in MIXES:  # text only: scenes without pixels
    for _ in range(samples_per_mix):
      if mix != "captions" and rng.random() < TEXT_ONLY_FRACTION:
        turns = _turns([text_only_sample(rng)], False)
      else:
        turns = conversation(mix, sample_scene(rng, image_size=32, grid=grid), rng, st)
      for turn in turns:
        yield turn["value"].replace(IMAGE_PLACEHOLDER, "")
  for name in ("stage1", "stage2", "stage3", "eval", "pope"):
    path = os.path.join(data_dir, f"{name}.json") if data_dir else ""
    if not path or not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      for record in json.load(f):
        for turn in record["conversations"]:
          yield turn["value"].replace(IMAGE_PLACEHOLDER, "")
