"""Data side: templates/masks, images, sources, bad samples, synthetic set, pipeline."""

import collections
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moe_vlm.data import images as images_lib
from moe_vlm.data import llava, pipeline, synthetic, templates
from moe_vlm.data import tokenizer as tokenizer_lib

NUM_IMAGE_TOKENS = 5
SYS = templates.MOE_LLAVA_SYSTEM


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(out, num_images=200, num_eval_images=50, image_size=32, seed=0)
  return out


@pytest.fixture(scope="module")
def tok_dir(data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  tokenizer_lib.train_tokenizer(synthetic.corpus(data_dir), out, vocab_size=512)
  return out


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tokenizer_lib.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def image_id(tok):
  return tokenizer_lib.image_token_id(tok)


def _encode(tok, image_id, conversations, template="phi", max_length=256):
  return templates.tokenize_conversation(
      conversations, tok, template, num_image_tokens=NUM_IMAGE_TOKENS,
      image_token_id=image_id, max_length=max_length)


def _runs(mask, n):
  """[(is_target, start, end)] contiguous runs of mask[:n]."""
  runs, start = [], 0
  for t in range(1, n + 1):
    if t == n or mask[t] != mask[start]:
      runs.append((bool(mask[start]), start, t))
      start = t
  return runs


def _reference_ids(tok, image_id, text):
  """Independent construction: tokenize the WHOLE prompt string in one call (special
  tokens `<image>` and `</s>` come out as single ids), then expand the image id."""
  ids = tok(text, add_special_tokens=False)["input_ids"]
  out = []
  for i in ids:
    out += [image_id] * NUM_IMAGE_TOKENS if i == image_id else [i]
  return out


def _check_masks(tok, image_id, enc, full_text, prompts, answers):
  n = enc.num_tokens
  ids = enc.input_ids[:n].tolist()
  assert ids == _reference_ids(tok, image_id, full_text)
  assert enc.attention_mask[:n].all() and not enc.attention_mask[n:].any()
  assert not enc.loss_mask[n:].any()
  assert (enc.input_ids[n:] == tok.pad_token_id).all()
  runs = _runs(enc.loss_mask, n)
  got_prompts = [tok.decode(ids[s:e]) for target, s, e in runs if not target]
  got_answers = [tok.decode(ids[s:e]) for target, s, e in runs if target]
  assert got_prompts == prompts
  assert got_answers == answers
  # Image tokens: exactly NUM_IMAGE_TOKENS, contiguous, never labelled.
  pos = np.flatnonzero(enc.input_ids == image_id)
  if len(pos):
    assert len(pos) == NUM_IMAGE_TOKENS and np.all(np.diff(pos) == 1)
    assert not enc.loss_mask[pos].any()


# ---------------------------------------------------------------------------------
# Templates


def test_plain_template_masks_caption_and_eos(tok, image_id):
  caption = "a red circle at the top left and a blue square at the bottom right"
  conv = [{"from": "human", "value": "<image>\nignored question"},
          {"from": "gpt", "value": caption}]
  enc = _encode(tok, image_id, conv, "plain", max_length=64)
  _check_masks(tok, image_id, enc, "<image>" + caption + "</s>",
               prompts=["<image>" * NUM_IMAGE_TOKENS], answers=[caption + "</s>"])
  assert enc.input_ids[:NUM_IMAGE_TOKENS].tolist() == [image_id] * NUM_IMAGE_TOKENS
  assert not enc.truncated and enc.num_image_tokens == NUM_IMAGE_TOKENS


def test_moe_llava_template_single_turn(tok, image_id):
  q, a = "What color is the circle?", "red"
  conv = [{"from": "human", "value": f"{q}\n<image>"}, {"from": "gpt", "value": a}]
  enc = _encode(tok, image_id, conv)
  # `<image>` moves to the front of the turn, as in LLaVA.
  img = "<image>" * NUM_IMAGE_TOKENS
  _check_masks(tok, image_id, enc, f"{SYS} USER: <image>\n{q} ASSISTANT: {a}</s>",
               prompts=[f"{SYS} USER: {img}\n{q} ASSISTANT:"], answers=[f" {a}</s>"])
  prefix = tok(f"{SYS} USER: ", add_special_tokens=False)["input_ids"]
  assert enc.input_ids[len(prefix):len(prefix) + NUM_IMAGE_TOKENS].tolist() == (
      [image_id] * NUM_IMAGE_TOKENS)


def test_moe_llava_template_multi_turn(tok, image_id):
  qa = [("How many shapes are in the image?", "3"), ("Where is the red shape?", "top-left"),
        ("Is there a blue triangle in the image?", "no")]
  conv = []
  for i, (q, a) in enumerate(qa):
    conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
             {"from": "gpt", "value": a}]
  for template in templates.MOE_LLAVA_TEMPLATES:
    enc = _encode(tok, image_id, conv, template)
    img = "<image>" * NUM_IMAGE_TOKENS
    full = f"{SYS} USER: <image>\n{qa[0][0]} ASSISTANT: {qa[0][1]}</s>" + "".join(
        f"USER: {q} ASSISTANT: {a}</s>" for q, a in qa[1:])
    prompts = [f"{SYS} USER: {img}\n{qa[0][0]} ASSISTANT:"] + [
        f"USER: {q} ASSISTANT:" for q, _ in qa[1:]]
    _check_masks(tok, image_id, enc, full, prompts, [f" {a}</s>" for _, a in qa])


def test_text_only_conversation_has_no_image_tokens(tok, image_id):
  conv = [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]
  enc = _encode(tok, image_id, conv)
  _check_masks(tok, image_id, enc, f"{SYS} USER: What is 2 plus 3? ASSISTANT: 5</s>",
               prompts=[f"{SYS} USER: What is 2 plus 3? ASSISTANT:"], answers=[" 5</s>"])
  assert enc.num_image_tokens == 0


def test_hf_chat_template_labels_only_assistant_content(tok_dir, image_id):
  tok = tokenizer_lib.load_tokenizer(tok_dir)  # own copy: we set a chat template
  tok.chat_template = (
      "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
  conv = [{"from": "human", "value": "<image>\nWhat color is the square?"},
          {"from": "gpt", "value": "green"},
          {"from": "human", "value": "Where is the green shape?"},
          {"from": "gpt", "value": "bottom-right"}]
  enc = _encode(tok, image_id, conv, "hf_chat")
  img = "<image>" * NUM_IMAGE_TOKENS
  full = ("<s>user\n<image>\nWhat color is the square?</s>\n<s>assistant\ngreen</s>\n"
          "<s>user\nWhere is the green shape?</s>\n<s>assistant\nbottom-right</s>\n")
  _check_masks(tok, image_id, enc, full,
               prompts=[f"<s>user\n{img}\nWhat color is the square?</s>\n<s>assistant\n",
                        "\n<s>user\nWhere is the green shape?</s>\n<s>assistant\n", "\n"],
               answers=["green</s>", "bottom-right</s>"])


def test_encode_prompt_is_the_training_prefix(tok, image_id):
  conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
          {"from": "gpt", "value": "red"}]
  enc = _encode(tok, image_id, conv)
  prompt = templates.encode_prompt(conv[:1], tok, "phi", num_image_tokens=NUM_IMAGE_TOKENS,
                                   image_token_id=image_id)
  first_target = int(np.argmax(enc.loss_mask))
  assert prompt.tolist() == enc.input_ids[:first_target].tolist()
  assert tok.decode(prompt[-3:]).endswith("ASSISTANT:")


def test_truncation_is_flagged(tok, image_id):
  conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
          {"from": "gpt", "value": "a red circle at the top left and a blue square"}]
  full = _encode(tok, image_id, conv)
  n = full.num_tokens - 3
  enc = _encode(tok, image_id, conv, max_length=n)
  assert enc.truncated and not full.truncated and enc.num_tokens == n
  np.testing.assert_array_equal(enc.input_ids, full.input_ids[:n])
  np.testing.assert_array_equal(enc.loss_mask, full.loss_mask[:n])
  assert enc.attention_mask.all()


def test_truncation_through_image_tokens_is_a_bad_sample(tok, image_id):
  conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
          {"from": "gpt", "value": "red"}]
  prefix = len(tok(f"{SYS} USER: ", add_special_tokens=False)["input_ids"])
  with pytest.raises(templates.ImageTruncatedError, match="cuts through the image"):
    _encode(tok, image_id, conv, max_length=prefix + NUM_IMAGE_TOKENS - 1)
  # Exactly fitting the image tokens is fine (truncated, no answer left).
  enc = _encode(tok, image_id, conv, max_length=prefix + NUM_IMAGE_TOKENS)
  assert enc.truncated and not enc.loss_mask.any()


@pytest.mark.parametrize("conversations, match", [
    ("hello", r"conversations is a str; expected a list"),
    ([], r"conversations is empty"),
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}],
     r"conversations\[0\]\['from'\] is 'gpt'; expected 'human'"),
    ([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}],
     r"conversations\[1\]\['from'\] is 'human'; expected 'gpt'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}],
     r"conversations\[0\]\['value'\] is a int; expected str"),
    ([{"from": "human", "value": "x"}], r"ends with a human turn"),
    ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "<image>c"}, {"from": "gpt", "value": "d"}],
     r"<image> in 2 human turns"),
    (["x", "y"], r"conversations\[0\] is a str; expected a dict"),
])
def test_malformed_conversations_raise_naming_the_field(tok, image_id, conversations, match):
  with pytest.raises(templates.ConversationError, match=match):
    _encode(tok, image_id, conversations)


# ---------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("norm", ["clip", "siglip"])
@pytest.mark.parametrize("width, height", [(6, 3), (3, 6), (5, 2)])
def test_pad_to_square_and_normalise_match_numpy(norm, width, height):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  side = max(width, height)
  got = images_lib.transform_image(Image.fromarray(pixels), image_size=side,
                                   normalization=norm)
  mean = np.array(images_lib.NORMALIZATIONS[norm].mean)
  std = np.array(images_lib.NORMALIZATIONS[norm].std)
  canvas = np.empty((side, side, 3), np.float64)
  canvas[:] = np.floor(mean * 255)  # LLaVA: tuple(int(x * 255) for x in mean)
  top, left = (side - height) // 2, (side - width) // 2
  canvas[top:top + height, left:left + width] = pixels
  want = (canvas / 255.0 - mean) / std
  assert got.shape == (side, side, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_resize_is_bicubic_and_padding_is_near_zero():
  pixels = np.full((4, 12, 3), 255, np.uint8)
  got = images_lib.transform_image(Image.fromarray(pixels), image_size=24)
  padded = images_lib.expand_to_square(Image.fromarray(pixels),
                                       images_lib.NORMALIZATIONS["clip"].background)
  want = np.asarray(padded.resize((24, 24), Image.Resampling.BICUBIC), np.float32) / 255
  norm = images_lib.NORMALIZATIONS["clip"]
  np.testing.assert_allclose(got, (want - norm.mean) / norm.std, atol=1e-5)
  assert np.abs(got[0, 0]).max() < 0.02  # mean-coloured padding ~ 0 after normalising


def test_image_errors_are_typed(tmp_path):
  with pytest.raises(images_lib.MissingImageError, match="not found"):
    images_lib.load_image(str(tmp_path / "nope.png"))
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  with pytest.raises(images_lib.UnreadableImageError, match="bad.png"):
    images_lib.load_image(str(bad))
  with pytest.raises(ValueError, match="unknown image normalization"):
    images_lib.get_normalization("imagenet")


# ---------------------------------------------------------------------------------
# Sources, bad samples and the pipeline


def _write_png(path, size=(10, 7), color=(200, 10, 10)):
  Image.new("RGB", size, color).save(path)


def _bad_data(tmp_path):
  os.makedirs(tmp_path / "img", exist_ok=True)
  _write_png(tmp_path / "img" / "good.png")
  good_bytes = (tmp_path / "img" / "good.png").read_bytes()
  (tmp_path / "img" / "corrupt.png").write_bytes(good_bytes[:len(good_bytes) // 2])
  qa = lambda q: [{"from": "human", "value": f"<image>\n{q}"},  # noqa: E731
                  {"from": "gpt", "value": "red"}]
  records = [
      {"id": "good", "image": "img/good.png", "conversations": qa("What color?")},
      {"id": "corrupt", "image": "img/corrupt.png", "conversations": qa("What color?")},
      {"id": "missing", "image": "img/missing.png", "conversations": qa("What color?")},
      {"id": "text", "conversations": [{"from": "human", "value": "What is 1 plus 1?"},
                                       {"from": "gpt", "value": "2"}]},
      {"id": "no-image-for-placeholder", "conversations": qa("What color?")},
      {"id": "long", "image": "img/good.png",
       "conversations": [{"from": "human", "value": "Describe it. " * 40 + "<image>"},
                         {"from": "gpt", "value": "red"}]},
      # Malformed: dropped and counted at load time.
      {"id": "str", "image": "img/good.png", "conversations": "What color? red"},
      {"id": "order", "conversations": [{"from": "gpt", "value": "red"},
                                        {"from": "human", "value": "What color?"}]},
      {"id": "nofield", "image": "img/good.png"},
      ["not", "a", "dict"],
      {"id": "multi", "image": ["img/good.png", "img/good.png"], "conversations": qa("x")},
  ]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(records))
  return str(path)


def _config(image_id, template="phi", max_length=96):
  return pipeline.PreprocessConfig(template=template, max_length=max_length,
                                   num_image_tokens=NUM_IMAGE_TOKENS,
                                   image_token_id=image_id, image_size=16)


def test_bad_records_are_skipped_and_counted(tmp_path, tok, image_id):
  source = llava.LlavaJsonSource(_bad_data(tmp_path))
  assert source.skipped == {llava.BAD_CONVERSATIONS: 3, llava.NOT_A_DICT: 1,
                            llava.BAD_IMAGE_FIELD: 1}
  assert len(source) == 6 and source.num_skipped == 5
  assert any("record 7" in msg and "expected 'human'" in msg for _, msg in source.errors)

  # The long prompt puts the image past max_length (the `<image>` is moved to the
  # front of its turn, but the system prompt alone leaves too little room at 40).
  ds = pipeline.make_pipeline(source, pipeline.Preprocess(tok, _config(image_id, max_length=40)),
                              batch_size=6, seed=0, shuffle=False, num_epochs=1)
  batches = list(ds)
  assert len(batches) == 1
  batch = batches[0]
  reasons = dict(zip([source[i]["id"] for i in range(len(source))], batch["bad_reason"]))
  assert reasons == {"good": pipeline.OK, "corrupt": pipeline.UNREADABLE_IMAGE,
                     "missing": pipeline.MISSING_IMAGE, "text": pipeline.OK,
                     "no-image-for-placeholder": pipeline.MALFORMED_CONVERSATION,
                     "long": pipeline.OK}
  assert pipeline.summarize_bad(batch) == {
      "ok": 3, "missing_image": 1, "unreadable_image": 1, "malformed_conversation": 1,
      "image_truncated": 0}
  bad = batch["ok"] == 0
  assert not batch["attention_mask"][bad].any() and not batch["loss_mask"][bad].any()
  assert not batch["pixel_values"][bad].any() and not batch["has_image"][bad].any()
  assert batch["has_image"].tolist() == [1, 0, 0, 0, 0, 1]
  assert not batch["pixel_values"][3].any()  # text-only row
  assert (batch["input_ids"][0] == image_id).sum() == NUM_IMAGE_TOKENS


def test_image_truncation_in_pipeline_gives_bad_reason(tmp_path, tok, image_id):
  source = llava.LlavaJsonSource(_bad_data(tmp_path))
  record = source[0]
  prefix = len(tok(f"{SYS} USER: ", add_special_tokens=False)["input_ids"])
  out = pipeline.preprocess(record, tok, _config(image_id, max_length=prefix + 2))
  assert out["ok"] == 0 and out["bad_reason"] == pipeline.IMAGE_TRUNCATED
  assert out["truncated"] == 1 and not out["attention_mask"].any()
  out = pipeline.preprocess(record, tok, _config(image_id, max_length=prefix + 8))
  assert out["ok"] == 1 and out["truncated"] == 1


class _FakeTfds:
  """The random-access interface of `tfds.data_source(...)`: len + getitem -> dict."""

  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


def test_tfds_source(tmp_path, tok, image_id):
  _write_png(tmp_path / "a.png")
  png = (tmp_path / "a.png").read_bytes()
  conv = json.dumps([{"from": "human", "value": "<image>\nWhat color?"},
                     {"from": "gpt", "value": "red"}]).encode()
  text = json.dumps([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "2"}])
  array = np.asarray(Image.open(tmp_path / "a.png"))  # the same image, decoded
  fake = _FakeTfds([
      {"id": b"bytes", "image": png, "conversations": conv},
      {"id": b"array", "image": array, "conversations": conv},
      {"id": b"text", "image": b"", "conversations": text},
      {"id": b"badjson", "image": png, "conversations": b"[{not json"},
      {"id": b"corrupt", "image": png[:20], "conversations": conv},
  ])
  source = llava.TfdsSource(fake)
  assert len(source) == 5 and source[0]["id"] == "bytes" and source[2]["image"] is None
  assert "error" in source[3]
  cfg = _config(image_id)
  out = [pipeline.preprocess(source[i], tok, cfg) for i in range(len(source))]
  assert [int(o["bad_reason"]) for o in out] == [
      pipeline.OK, pipeline.OK, pipeline.OK, pipeline.MALFORMED_CONVERSATION,
      pipeline.UNREADABLE_IMAGE]
  np.testing.assert_array_equal(out[0]["pixel_values"], out[1]["pixel_values"])
  assert out[2]["has_image"] == 0 and out[0]["has_image"] == 1


def test_processes_load_their_rows_of_the_same_global_batches():
  """Global batch t holds the same samples for any number of processes; each process
  loads only its rows of it (here 3 processes of 2 rows, the rows interleaved as a
  mesh whose batch axis crosses processes can ask)."""
  whole = [b.tolist() for b in pipeline.make_pipeline(
      list(range(30)), None, batch_size=6, seed=7, num_epochs=1)]
  assert len(whole) == 5 and sorted(sum(whole, [])) == list(range(30))
  assert sum(whole, []) != list(range(30))  # shuffled
  rows = [(0, 3), (1, 4), (2, 5)]
  parts = [[b.tolist() for b in pipeline.make_pipeline(
      list(range(30)), None, batch_size=6, seed=7, num_epochs=1, rows=r)] for r in rows]
  for t, batch in enumerate(whole):
    for r, part in zip(rows, parts):
      assert part[t] == [batch[i] for i in r]
  seen = []

  def record(x):
    seen.append(x)
    return x

  list(pipeline.make_pipeline(list(range(30)), record, batch_size=6, seed=7, num_epochs=1,
                              rows=(0, 3), read_threads=1))
  assert sorted(seen) == sorted(x for b in whole for x in (b[0], b[3]))  # nothing else read
  with pytest.raises(ValueError, match="rows"):
    pipeline.make_pipeline(list(range(4)), None, batch_size=2, seed=0, rows=(2,))


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_epochs_reshuffle_and_cover(data_dir):
  ds = pipeline.make_pipeline(list(range(12)), None, batch_size=4, seed=3, num_epochs=2)
  out = [b.tolist() for b in ds]
  first, second = sum(out[:3], []), sum(out[3:], [])
  assert sorted(first) == sorted(second) == list(range(12)) and first != second


@pytest.mark.parametrize("worker_count", [0, 2])
def test_checkpointed_iterator_resumes_exactly(data_dir, tok, image_id, worker_count):
  stage3 = llava.LlavaJsonSource(os.path.join(data_dir, "stage3.json"))
  # 40 records (a list is a valid source) so the resumed stretch crosses an epoch.
  source = [stage3[i] for i in range(40)]
  ds = pipeline.make_pipeline(source, pipeline.Preprocess(tok, _config(image_id)),
                              batch_size=8, seed=1, num_epochs=None, worker_count=worker_count,
                              read_threads=2)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  json.dumps(state)  # checkpointable as JSON
  expected = _take(it, 4)
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected)
  assert all(b["ok"].all() for b in expected)
  if not worker_count:  # the check has teeth: a fresh iterator starts elsewhere
    assert not np.array_equal(next(iter(ds))["input_ids"], expected[0]["input_ids"])
  if worker_count:
    it.close()
    resumed.close()


# ---------------------------------------------------------------------------------
# Synthetic data and tokenizer


def _load(data_dir, name):
  with open(os.path.join(data_dir, f"{name}.json")) as f:
    return json.load(f)


def _md5(path):
  return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_synthetic_files_are_deterministic(tmp_path):
  a, b, c = (str(tmp_path / x) for x in "abc")
  meta = synthetic.generate(a, num_images=20, num_eval_images=10, seed=5)
  synthetic.generate(b, num_images=20, num_eval_images=10, seed=5)
  synthetic.generate(c, num_images=20, num_eval_images=10, seed=6)
  files = sorted(os.listdir(a)) + ["images/" + f for f in sorted(os.listdir(f"{a}/images"))]
  for f in files:
    if os.path.isfile(os.path.join(a, f)):
      assert _md5(os.path.join(a, f)) == _md5(os.path.join(b, f)), f
  assert _md5(f"{a}/stage3.json") != _md5(f"{c}/stage3.json")
  assert _md5(f"{a}/eval.json") != _md5(f"{c}/eval.json")
  assert meta["counts"]["stage1"] == 20 and meta["num_eval_images"] == 10
  # Without num_images only the held-out set is written: training data is computed.
  d = str(tmp_path / "d")
  synthetic.generate(d, num_eval_images=4)
  assert not os.path.exists(f"{d}/stage1.json") and os.path.exists(f"{d}/pope.json")


def _digest_records(source, n):
  h = hashlib.md5()
  for i in range(n):
    r = source[i]
    h.update(json.dumps(r["conversations"]).encode())
    if r["image"] is not None:
      h.update(r["image"].tobytes())
  return h.hexdigest()


def test_synthetic_source_same_index_same_sample_after_a_restart():
  source = synthetic.SyntheticSource("qa", 10_000, seed=3)
  here = _digest_records(source, 40)
  # A fresh interpreter (a restarted run) computes the same samples from the index alone.
  code = ("from moe_vlm.data import synthetic; from tests.test_data import _digest_records; "
          "print(_digest_records(synthetic.SyntheticSource('qa', 10_000, seed=3), 40))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=root), check=True)
  assert out.stdout.strip().splitlines()[-1] == here
  # Random access: any order, any repetition, the same record.
  assert _digest_records(source, 40) == here
  np.testing.assert_array_equal(source[7]["image"], synthetic.SyntheticSource(
      "qa", 8, seed=3)[7]["image"])
  # Another seed, mix or stream draws other samples.
  assert _digest_records(synthetic.SyntheticSource("qa", 40, seed=4), 40) != here
  other = synthetic.SyntheticSource("qa", 40, seed=3, stream=synthetic.stream_of("qa", 1))
  assert _digest_records(other, 40) != here
  with pytest.raises(IndexError):
    source[10_000]
  with pytest.raises(ValueError, match="mix"):
    synthetic.SyntheticSource("stage1.json", 4)


def test_synthetic_source_resumes_exactly_in_the_pipeline(tok, image_id):
  source = synthetic.SyntheticSource("instruct", 64, seed=0)
  ds = pipeline.make_pipeline(source, pipeline.Preprocess(tok, _config(image_id)),
                              batch_size=8, seed=1, num_epochs=None, read_threads=2)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 8)  # crosses an epoch of the 64 samples
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 8), expected)
  assert all(b["ok"].all() for b in expected)
  assert any(b["has_image"].all() for b in expected)


def _pixel_digest(pixels):
  return hashlib.md5(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def test_training_and_evaluation_images_never_coincide(data_dir):
  scenes = _load(data_dir, "scenes")
  held = {r["image"] for n in ("eval", "pope") for r in _load(data_dir, n)}
  assert held and all(scenes[i]["split"] == "eval" for i in held)
  held_pixels = {_pixel_digest(np.asarray(Image.open(os.path.join(data_dir, i))))
                 for i in held}
  # Every image a stage can draw (any mix, stream, index) lies on the training side of
  # the pixel-hash split, every held-out image on the other: they cannot coincide.
  train_pixels = set()
  for mix in synthetic.MIXES:
    for k in (0, 1, 2, 3):
      source = synthetic.SyntheticSource(mix, 400, seed=0, stream=synthetic.stream_of(mix, k))
      for i in range(0, 400, 4):
        image = source[i]["image"]
        if image is not None:
          assert synthetic.split_of(image) == "train"
          train_pixels.add(_pixel_digest(image))
  for i in held:
    assert synthetic.split_of(np.asarray(Image.open(os.path.join(data_dir, i)))) == "eval"
  assert len(train_pixels) > 1000 and not train_pixels & held_pixels
  # The exported training files are training images too.
  exported = {r["image"] for n in ("stage1", "stage2", "stage3") for r in _load(data_dir, n)
              if "image" in r}
  assert exported and not exported & held
  assert all(scenes[i]["split"] == "train" for i in exported)


def _derive_answer(question, objects):
  """Answers from the scene description, independently of the generator's code."""
  def cell(o):  # (row, column) from the position's words
    p = o["position"]
    return (0 if "top" in p else 2 if "bottom" in p else 1,
            0 if "left" in p else 2 if "right" in p else 1)

  def named(color, shape):
    return next(o for o in objects if (o["color"], o["shape"]) == (color, shape))

  if question.startswith("How many shapes"):
    return "count", str(len(objects))
  if m := re.match(r"What color is the (\w+)\?", question):
    return "color", next(o["color"] for o in objects if o["shape"] == m[1])
  if m := re.match(r"Where is the (\w+) shape\?", question):
    return "position", next(o["position"] for o in objects if o["color"] == m[1])
  if m := re.match(r"Is there a (\w+) (\w+) in the image\?", question):
    present = any((o["color"], o["shape"]) == (m[1], m[2]) for o in objects)
    return "exist", "yes" if present else "no"
  if m := re.match(r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) "
                   r"the (\w+) (\w+)\?", question):
    (ra, ca), (rb, cb) = cell(named(m[1], m[2])), cell(named(m[4], m[5]))
    holds = {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb,
             "below": ra > rb}[m[3]]
    return "relation", "yes" if holds else "no"
  raise AssertionError(question)


def _check_scene_pixels(objects, pixels):
  """The scene describes the pixels: each object's centre has its colour, and no other
  object colour is drawn."""
  colors = {o["color"] for o in objects}
  for o in objects:
    assert tuple(pixels[o["cy"], o["cx"]]) == synthetic.COLORS[o["color"]]
  for name, rgb in synthetic.COLORS.items():
    if name not in colors:
      assert not np.all(pixels == rgb, axis=-1).any()


def test_every_answer_is_computed_from_the_drawn_scene(data_dir):
  kinds = collections.Counter()
  answers = collections.defaultdict(set)

  def check(question, answer, objects):
    kind, want = _derive_answer(question, objects)
    assert want == answer, (question, objects)
    kinds[kind] += 1
    answers[kind].add(answer)

  for mix in synthetic.MIXES:
    source = synthetic.SyntheticSource(mix, 600, seed=1)
    for i in range(600):
      scene, r = source.sample(i)
      conv = r["conversations"]
      if scene is None:  # text-only
        assert r["image"] is None and "<image>" not in conv[0]["value"]
        continue
      objects = [dataclasses.asdict(o) for o in scene]
      _check_scene_pixels(objects, r["image"])
      for h, g in zip(conv[::2], conv[1::2]):
        q = h["value"].replace("<image>", "").strip().split("\n")[0]
        if mix == "captions":
          assert q == ""
          for o in objects:  # the caption names exactly the scene's objects
            assert (f"{o['color']} {o['shape']} {synthetic._place(o['position'])}"
                    in g["value"])
          assert g["value"].count(" at the ") + g["value"].count(" on the ") + \
              g["value"].count(" in the ") == len(objects)
        elif q.startswith(("Describe", "What do you see")):
          assert g["value"].startswith("There ")
        else:
          check(q, g["value"], objects)
  scenes = _load(data_dir, "scenes")
  for name in ("stage2", "stage3", "eval"):
    for r in _load(data_dir, name):
      if "image" not in r:
        continue
      objects = scenes[r["image"]]["objects"]
      conv = r["conversations"]
      for h, g in zip(conv[::2], conv[1::2]):
        q = h["value"].replace("<image>\n", "").split("\n")[0]
        if not q.startswith(("Describe", "What do you see")):
          check(q, g["value"], objects)
      if name == "eval":
        assert r["answer"] == conv[1]["value"] and r["type"] in synthetic.QUESTION_TYPES
        assert _derive_answer(r["question"], objects)[0] == r["type"]
  for name, scene in list(scenes.items())[:80]:
    _check_scene_pixels(scene["objects"], np.asarray(Image.open(os.path.join(data_dir, name))))
  assert set(kinds) == set(synthetic.QUESTION_TYPES) and min(kinds.values()) > 100, kinds
  for kind in ("exist", "relation"):  # both answers occur, about equally often
    assert answers[kind] == {"yes", "no"}
  eval_types = collections.Counter(r["type"] for r in _load(data_dir, "eval"))
  assert set(eval_types) == set(synthetic.QUESTION_TYPES) and eval_types["color"] == 50


def test_pope_is_balanced_and_its_negatives_are_absent(data_dir):
  scenes = _load(data_dir, "scenes")
  meta = _load(data_dir, "meta")
  pope = _load(data_dir, "pope")
  assert {r["category"] for r in pope} == set(synthetic.POPE_CATEGORIES)
  for cat in synthetic.POPE_CATEGORIES:
    labels = [r["label"] for r in pope if r["category"] == cat]
    assert labels.count("yes") == labels.count("no") > 50
  for r in pope:
    objects = scenes[r["image"]]["objects"]
    color, shape = r["object"].split()
    present = {(o["color"], o["shape"]) for o in objects}
    assert ((color, shape) in present) == (r["label"] == "yes")
    assert _derive_answer(r["question"], objects) == ("exist", r["label"])
    if r["label"] == "no":
      if r["category"] == "adversarial":
        assert shape in {s for _, s in present} or color in {c for c, _ in present}
      if r["category"] == "popular":
        absent = [p for p in meta["popular_objects"] if tuple(p.split()) not in present]
        assert r["object"] in absent[:len(objects)]
  # "popular" follows the skewed object frequencies of the training distribution.
  assert meta["popular_objects"][0] == "red square"


def test_tokenizer_round_trips_synthetic_texts(data_dir, tok, tok_dir):
  from transformers import AutoTokenizer
  auto = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  assert auto.pad_token == "<pad>" and auto.eos_token == "</s>" and auto.bos_token == "<s>"
  assert auto.unk_token == "<unk>" and tokenizer_lib.image_token_id(auto) == 4
  texts = list(synthetic.corpus(data_dir))
  assert len(texts) > 1000
  for text in texts[:: max(1, len(texts) // 500)] + ["Zebra & 42 unseen wörds!"]:
    ids = auto(text, add_special_tokens=False)["input_ids"]
    assert auto.decode(ids) == text
    assert 4 not in ids  # text never turns into the image token
  assert auto("<image>", add_special_tokens=False)["input_ids"] == [4]
  with pytest.raises(FileNotFoundError, match="only local"):
    tokenizer_lib.load_tokenizer("some-org/some-model")
