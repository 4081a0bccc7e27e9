"""The embedded default data set: coloured shapes on a grid, in LLaVA format.

Everything is generated locally and deterministically from a seed, so the three-stage
recipe (captions -> instructions -> MoE instructions) and its evaluation run with no
download. A scene is 1-3 objects, each a (colour, shape) pair in its own grid cell;
shapes and colours are distinct within a scene, so every question below has exactly
one correct single-word answer:

  count     "How many shapes are in the image?"        -> "2"
  color     "What color is the circle?"                -> "red"
  position  "Where is the red shape?"                  -> "top-left"
  exist     "Is there a blue triangle in the image?"   -> "yes" / "no"

Negatives for `exist` follow POPE (Li et al. 2023): random (any absent object),
popular (the most frequent objects in the training scenes that are absent) and
adversarial (absent objects sharing a shape or colour with a present one, ranked by how
often they co-occur with the present objects in training). Objects are drawn with
skewed frequencies so "popular" means something.

Files written under out_dir:
  images/NNNNN.png  the images (train and eval images are different files with
                    different pixels)
  stage1.json       captions, one per train image (`plain` template: human "<image>")
  stage2.json       descriptions + single-turn QA + a few text-only samples
  stage3.json       QA, some multi-turn, + a few text-only samples
  eval.json         one question of each type per held-out image, with `answer`, `type`
  pope.json         POPE yes/no questions on held-out images, with `label`, `category`
  scenes.json       the scene description of every image (ground truth)
  meta.json         counts and the generator's settings
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator

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
QUESTION_TYPES = ("count", "color", "position", "exist")
POPE_CATEGORIES = ("random", "popular", "adversarial")
COLOR_MIXING = {("red", "yellow"): "orange", ("blue", "yellow"): "green",
                ("red", "blue"): "purple", ("red", "white"): "pink",
                ("black", "white"): "gray", ("blue", "white"): "cyan"}
SIDES = {"triangle": "3", "square": "4", "diamond": "4"}


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


# ---------------------------------------------------------------------------------
# Scenes and images


def sample_scene(rng: np.random.Generator, *, image_size: int, grid: int = 2) -> Scene:
  """1-3 objects with distinct shapes, colours and cells; centre/size jittered."""
  if grid not in POSITIONS:
    raise ValueError(f"grid must be one of {sorted(POSITIONS)}, got {grid}")
  cell = image_size / grid
  if cell < 6:
    raise ValueError(f"image_size={image_size} is too small for a {grid}x{grid} grid "
                     "(need at least 6 pixels per cell)")
  n = int(rng.integers(1, 4))
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
class _Stats:
  """Training-set object statistics for POPE negative sampling."""
  freq: collections.Counter
  cooc: collections.Counter

  @classmethod
  def from_scenes(cls, scenes) -> "_Stats":
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


def negatives(scene: Scene, k: int, category: str, rng: np.random.Generator,
              stats: _Stats) -> list[tuple[str, str]]:
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


def make_question(scene: Scene, qtype: str, rng: np.random.Generator,
                  stats: _Stats) -> tuple[str, str]:
  """(question, answer) of one type, answerable from the scene alone."""
  if qtype == "count":
    return "How many shapes are in the image?", str(len(scene))
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


# ---------------------------------------------------------------------------------
# The data set


def _image_name(i: int) -> str:
  return f"images/{i:05d}.png"


def generate(out_dir: str, *, num_images: int = 1000, image_size: int = 32, seed: int = 0,
             eval_fraction: float = 0.1, grid: int = 2, text_only_fraction: float = 0.05,
             multi_turn_fraction: float = 0.3) -> dict[str, Any]:
  """Writes the data set (see module docstring) and returns meta.json's content."""
  if num_images < 2:
    raise ValueError(f"num_images must be at least 2, got {num_images}")
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  num_eval = max(1, int(round(num_images * eval_fraction)))
  if num_eval >= num_images:
    raise ValueError(f"eval_fraction={eval_fraction} leaves no training images")
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

  # Scenes: one stream for all images; the eval split is a seeded subset. An eval
  # image whose pixels equal a train image's is redrawn so the splits never share an
  # image, not even by content.
  scene_rng = np.random.default_rng([seed, 0])
  scenes = [sample_scene(scene_rng, image_size=image_size, grid=grid) for _ in range(num_images)]
  eval_ids = set(np.random.default_rng([seed, 1]).choice(num_images, num_eval, replace=False)
                 .tolist())
  train_ids = [i for i in range(num_images) if i not in eval_ids]
  pixels = {}
  train_hashes = set()
  for i in train_ids:
    pixels[i] = render_scene(scenes[i], image_size)
    train_hashes.add(hashlib.sha1(pixels[i].tobytes()).hexdigest())
  for i in sorted(eval_ids):
    while True:
      pixels[i] = render_scene(scenes[i], image_size)
      if hashlib.sha1(pixels[i].tobytes()).hexdigest() not in train_hashes:
        break
      scenes[i] = sample_scene(scene_rng, image_size=image_size, grid=grid)
  for i in range(num_images):
    Image.fromarray(pixels[i]).save(os.path.join(out_dir, _image_name(i)), compress_level=1)

  stats = _Stats.from_scenes(scenes[i] for i in train_ids)
  out: dict[str, list[dict[str, Any]]] = {}

  # Stage 1: captions (plain template).
  out["stage1"] = [{"id": f"s1-{i}", "image": _image_name(i), "conversations": [
      {"from": "human", "value": IMAGE_PLACEHOLDER},
      {"from": "gpt", "value": caption(scenes[i])}]} for i in train_ids]

  def text_only(rng, prefix, n):
    return [{"id": f"{prefix}-text-{j}", "conversations": _turns([text_only_sample(rng)],
                                                                 False)} for j in range(n)]

  n_text = int(round(len(train_ids) * text_only_fraction))
  # Stage 2: descriptions and single-turn QA.
  rng = np.random.default_rng([seed, 2])
  stage2 = []
  for i in train_ids:
    if rng.random() < 0.4:
      q = ("Describe the image.", "What do you see in this picture?")[int(rng.integers(2))]
      conv = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"},
              {"from": "gpt", "value": description(scenes[i])}]
    else:
      qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
      conv = _turns([make_question(scenes[i], qtype, rng, stats)], True)
    stage2.append({"id": f"s2-{i}", "image": _image_name(i), "conversations": conv})
  stage2 += text_only(rng, "s2", n_text)
  out["stage2"] = [stage2[j] for j in rng.permutation(len(stage2))]

  # Stage 3: QA, some multi-turn over different question types.
  rng = np.random.default_rng([seed, 3])
  stage3 = []
  for i in train_ids:
    turns = int(rng.integers(2, 4)) if rng.random() < multi_turn_fraction else 1
    qtypes = rng.choice(len(QUESTION_TYPES), turns, replace=False)
    pairs = [make_question(scenes[i], QUESTION_TYPES[t], rng, stats) for t in qtypes]
    stage3.append({"id": f"s3-{i}", "image": _image_name(i),
                   "conversations": _turns(pairs, True)})
  stage3 += text_only(rng, "s3", n_text)
  out["stage3"] = [stage3[j] for j in rng.permutation(len(stage3))]

  # Held-out evaluation: one question of each type per eval image.
  rng = np.random.default_rng([seed, 4])
  out["eval"] = []
  for i in sorted(eval_ids):
    for qtype in QUESTION_TYPES:
      q, a = make_question(scenes[i], qtype, rng, stats)
      out["eval"].append({"id": f"eval-{i}-{qtype}", "image": _image_name(i), "question": q,
                          "answer": a, "type": qtype,
                          "conversations": _turns([(q, a)], True)})

  # POPE: per image and category, every present object (yes) and as many negatives (no).
  rng = np.random.default_rng([seed, 5])
  out["pope"] = []
  for i in sorted(eval_ids):
    scene = scenes[i]
    for category in POPE_CATEGORIES:
      asked = [((o.color, o.shape), "yes") for o in scene]
      asked += [(o, "no") for o in negatives(scene, len(scene), category, rng, stats)]
      for j, ((color, shape), label) in enumerate(asked):
        q = exist_question(color, shape)
        out["pope"].append({"id": f"pope-{i}-{category}-{j}", "image": _image_name(i),
                            "question": q, "label": label, "category": category,
                            "object": f"{color} {shape}",
                            "conversations": _turns([(q, label)], True)})

  for name, records in out.items():
    _write_json(os.path.join(out_dir, f"{name}.json"), records)
  _write_json(os.path.join(out_dir, "scenes.json"), {
      _image_name(i): {"split": "eval" if i in eval_ids else "train",
                       "objects": [vars(o) for o in scenes[i]]}
      for i in range(num_images)})
  meta = {"seed": seed, "num_images": num_images, "image_size": image_size, "grid": grid,
          "eval_fraction": eval_fraction, "num_train_images": len(train_ids),
          "num_eval_images": num_eval, "counts": {k: len(v) for k, v in out.items()},
          "shapes": list(SHAPES), "colors": list(COLORS), "positions": list(POSITIONS[grid]),
          "popular_objects": [" ".join(o) for o in stats.popular()]}
  _write_json(os.path.join(out_dir, "meta.json"), meta)
  return meta


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, separators=(",", ":")))  # one-shot C encoder: fast


def corpus(data_dir: str) -> Iterator[str]:
  """Every text of a generated data set plus the template strings: the tokenizer's
  training corpus."""
  # The template's fixed strings occur in every sample: repeat them so BPE merges them.
  for _ in range(50):
    yield MOE_LLAVA_SYSTEM + " USER: ASSISTANT:"
  for name in ("stage1", "stage2", "stage3", "eval", "pope"):
    path = os.path.join(data_dir, f"{name}.json")
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      for record in json.load(f):
        for turn in record["conversations"]:
          yield turn["value"].replace(IMAGE_PLACEHOLDER, "")
