"""Never lose a user's files, never waste a run: bad input fails before any model work and
leaves an existing answers file byte-identical; `<image>` where no image goes is refused."""

import io
import json
import os
import stat

import pytest
from flax import nnx

from configs import synthetic_tiny
from moe_vlm.infer import vqa
from moe_vlm.infer.generate import GenerationConfig
from moe_vlm.infer.load import InferenceModel
from moe_vlm.models.vlm import VLM
from moe_vlm.experiment import Experiment

USER_ANSWERS = b'{"question_id": "old", "text": "the user\'s earlier answers"}\nkeep me\n'


def _tiny_config():
  c = synthetic_tiny.get_config()
  c.update_from_flattened_dict({
      "model.vision.hidden_size": 32, "model.vision.intermediate_size": 64,
      "model.vision.num_layers": 1, "model.vision.num_heads": 2,
      "model.text.hidden_size": 32, "model.text.intermediate_size": 64,
      "model.text.num_layers": 2, "model.text.num_heads": 2, "model.text.num_kv_heads": 1,
      "data.num_images": 4})
  return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A stage-2 (dense) model with random weights, its tokenizer and the synthetic images."""
  workdir = str(tmp_path_factory.mktemp("safe"))
  c = _tiny_config()
  exp = Experiment(c, workdir)
  exp.prepare_data()
  data_dir, tokenizer, cfg = exp.data_dir, exp.tokenizer, exp.model_config(2)
  im = InferenceModel(model=VLM(cfg, rngs=nnx.Rngs(0)), cfg=cfg, tokenizer=tokenizer,
                      template=c.stages.stage2.template, normalization=c.data.normalization)
  images = os.path.join(data_dir, "images")
  return im, images, sorted(os.listdir(images))


class NoModel:
  """Stands in for the model where the input is bad: any use of it fails the test."""

  def __getattr__(self, name):
    raise AssertionError(f"model work (im.{name}) before the questions were checked")


def _config(im):
  return GenerationConfig(max_new_tokens=2, eos_ids=im.stop_ids, pad_id=im.pad_id)


def _files(tmp_path, questions, answers_content=USER_ANSWERS):
  qpath = tmp_path / "questions.jsonl"
  qpath.write_text("".join((q if isinstance(q, str) else json.dumps(q)) + "\n"
                           for q in questions))
  apath = tmp_path / "out" / "answers.jsonl"
  apath.parent.mkdir(exist_ok=True)
  if answers_content is not None:
    apath.write_bytes(answers_content)
  return str(qpath), str(apath)


def _answer(im, qpath, apath, images, **kw):
  return vqa.answer_file(im, qpath, apath, config=_config(im) if isinstance(im, InferenceModel)
                         else GenerationConfig(max_new_tokens=2), model_id="tiny",
                         image_folder=images, **kw)


def _untouched(apath):
  with open(apath, "rb") as f:
    assert f.read() == USER_ANSWERS
  leftovers = sorted(set(os.listdir(os.path.dirname(apath))) - {"answers.jsonl"})
  assert not leftovers, leftovers  # no temporary file left behind


# ------------------------------------------------------------------ generate: bad input


def test_missing_image_fails_first_and_keeps_the_answers_file(tiny, tmp_path):
  # The reported failure: the first question is fine, the second names a missing image.
  # With batches of one, the old code rewrote the answers file with q0's answer and then
  # failed on q1 (and with any batch size had already emptied it).
  im, images, names = tiny
  qpath, apath = _files(tmp_path, [
      {"question_id": "q0", "image": names[0], "text": "What shape is shown?"},
      {"question_id": "q1", "image": "no_such_image.png", "text": "What colour is it?"}])
  with pytest.raises(vqa.QuestionError) as e:
    _answer(im, qpath, apath, images, batch_size=1)
  message = str(e.value)
  assert "'q1'" in message and os.path.join(images, "no_such_image.png") in message
  assert "q0" not in message
  _untouched(apath)
  # ... and the check needs no model at all: it runs before any model work.
  with pytest.raises(vqa.QuestionError, match="no_such_image.png"):
    _answer(NoModel(), qpath, apath, images, batch_size=1)
  _untouched(apath)


def test_non_string_text_fails_first_and_keeps_the_answers_file(tiny, tmp_path):
  im, images, names = tiny
  qpath, apath = _files(tmp_path, [
      {"question_id": "q0", "image": names[0], "text": "What shape is shown?"},
      {"question_id": 7, "image": names[1], "text": 5}])
  for model in (NoModel(), im):
    with pytest.raises(vqa.QuestionError) as e:
      _answer(model, qpath, apath, images, batch_size=1)
    message = str(e.value)
    assert "questions.jsonl:2" in message and "question_id 7" in message
    assert '"text" is a int (5)' in message
    _untouched(apath)


def test_unreadable_image_and_bad_lines_are_all_named(tiny, tmp_path):
  _, images, names = tiny
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  qpath, apath = _files(tmp_path, [
      {"question_id": "a", "image": str(broken), "text": "What is it?"},
      {"question_id": "b", "image": "gone.jpg", "text": "And this?"},
      {"question_id": "c", "image": names[0], "text": "Fine."}])
  with pytest.raises(vqa.QuestionError) as e:
    _answer(NoModel(), qpath, apath, images)
  message = str(e.value)
  assert "2 questions whose image cannot be used" in message
  assert f"'a': image {broken}: cannot decode" in message
  assert f"'b': image {os.path.join(images, 'gone.jpg')}: image file not found" in message
  _untouched(apath)

  qpath, apath = _files(tmp_path, [
      "not json", '["a", "list"]', {"text": "no id"}, {"question_id": "d"},
      {"question_id": True, "text": "bool id"}, {"question_id": "e", "text": "x", "image": 3}])
  with pytest.raises(vqa.QuestionError) as e:
    _answer(NoModel(), qpath, apath, images)
  message = str(e.value)
  for expected in ("questions.jsonl:1: not JSON", "questions.jsonl:2: is a JSON list",
                   "questions.jsonl:3: lacks 'question_id'",
                   "questions.jsonl:4 (question_id 'd'): lacks 'text'",
                   "questions.jsonl:5 (question_id True): \"question_id\" is a bool",
                   "questions.jsonl:6 (question_id 'e'): \"image\" is a int"):
    assert expected in message, (expected, message)
  _untouched(apath)

  qpath, apath = _files(tmp_path, [])
  with pytest.raises(vqa.QuestionError, match="holds no questions"):
    _answer(NoModel(), qpath, apath, images)
  _untouched(apath)


def test_answers_path_equal_to_the_questions_file_is_refused(tiny, tmp_path):
  _, images, names = tiny
  qpath, _ = _files(tmp_path, [{"question_id": "q0", "image": names[0], "text": "Hi?"}])
  before = open(qpath, "rb").read()
  with pytest.raises(vqa.QuestionError, match="is the questions file"):
    _answer(NoModel(), qpath, qpath, images)
  assert open(qpath, "rb").read() == before


# ------------------------------------------------------------------ generate: the writes


def test_answers_replace_the_file_only_when_complete(tiny, tmp_path, monkeypatch):
  im, images, names = tiny
  questions = [{"question_id": f"q{i}", "image": names[i], "text": "What shape is shown?"}
               for i in range(3)] + [{"question_id": "t", "text": "Say hello."}]
  qpath, apath = _files(tmp_path, questions)
  os.chmod(apath, 0o640)

  # A failure in the middle of generation (here the second batch) keeps the old file.
  real_generate, calls = vqa.generate, []

  def failing_generate(*args, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("device lost")
    return real_generate(*args, **kw)

  monkeypatch.setattr(vqa, "generate", failing_generate)
  # An existing answers file is replaced only when asked (checked before model work).
  with pytest.raises(vqa.OutputExistsError, match="--overwrite"):
    _answer(im, qpath, apath, images, batch_size=2)
  assert not calls
  _untouched(apath)
  with pytest.raises(RuntimeError, match="device lost"):
    _answer(im, qpath, apath, images, batch_size=2, overwrite=True)
  assert len(calls) == 2  # the first batch's answers were written, to the temporary file
  _untouched(apath)
  monkeypatch.undo()

  assert _answer(im, qpath, apath, images, batch_size=2, overwrite=True) == 4
  lines = [json.loads(l) for l in open(apath)]
  assert [l["question_id"] for l in lines] == ["q0", "q1", "q2", "t"]
  assert all(l["model_id"] == "tiny" and isinstance(l["text"], str) for l in lines)
  assert stat.S_IMODE(os.stat(apath).st_mode) == 0o640  # the replaced file's permissions
  assert os.listdir(os.path.dirname(apath)) == ["answers.jsonl"]

  # A new answers file in a new directory.
  fresh = str(tmp_path / "new" / "dir" / "answers.jsonl")
  assert _answer(im, qpath, fresh, images, batch_size=4) == 4
  assert len(open(fresh).readlines()) == 4


# ------------------------------------------------------------------ <image> where none goes


def test_text_only_question_with_image_placeholder_is_refused(tiny, tmp_path):
  _, images, names = tiny
  qpath, apath = _files(tmp_path, [
      {"question_id": "ok", "image": names[0], "text": "<image>\nWhat shape is shown?"},
      {"question_id": "blank", "text": "<image>\nWhat is in the picture?"},
      {"question_id": "empty", "image": "", "text": "Describe <image> please."}])
  with pytest.raises(vqa.QuestionError) as e:
    _answer(NoModel(), qpath, apath, images)
  message = str(e.value)
  assert "2 bad question lines" in message
  assert "(question_id 'blank'): \"text\" contains <image> but the question has no" in message
  assert "(question_id 'empty'): \"text\" contains <image>" in message
  _untouched(apath)
  # The programmatic path refuses it too, instead of encoding blank-pixel image tokens.
  with pytest.raises(vqa.QuestionError, match="without an image contains <image>"):
    vqa.question_turns("<image>\nWhat is it?", has_image=False)
  assert vqa.question_turns("What is it?", has_image=True)[0]["value"] == "<image>\nWhat is it?"


@pytest.fixture(scope="module")
def chat_config(tiny):
  im = tiny[0]
  return GenerationConfig(max_new_tokens=2, eos_ids=im.stop_ids, pad_id=im.pad_id)


def test_chat_refuses_image_placeholder_in_a_later_turn_and_goes_on(tiny, chat_config):
  from moe_vlm.infer.chat import ChatSession, TurnError, run_chat
  im, images, names = tiny
  session = ChatSession(im, chat_config, image=os.path.join(images, names[0]))
  session.ask("What shape is it?")
  turns, fed = [dict(t) for t in session.turns], list(session._fed)  # pylint: disable=protected-access
  with pytest.raises(TurnError, match="only be in the first question"):
    session.ask("<image>\nAnd now this one?")
  assert session.turns == turns and session._fed == fed  # pylint: disable=protected-access

  out = io.StringIO()
  n = run_chat(session, io.StringIO("Look at <image> again.\nAnd its colour?\nexit\n"), out)
  assert n == 1  # the refused turn is not counted; the next one is answered
  text = out.getvalue()
  assert "(not asked: <image> can only be in the first question" in text
  assert text.count("ASSISTANT:") == 1
  assert len(session.turns) == 4 and session.turns[2]["value"] == "And its colour?"
  assert sum("<image>" in t["value"] for t in session.turns) == 1


def test_chat_first_turn_may_place_the_image_itself(tiny, chat_config):
  from moe_vlm.infer.chat import ChatSession
  im, images, names = tiny
  session = ChatSession(im, chat_config, image=os.path.join(images, names[1]))
  session.ask("<image>\nWhat shape is it?")
  assert session.turns[0]["value"] == "<image>\nWhat shape is it?"  # not a second <image>
  n_image = int((session.im.encode(session.turns[:1]) == im.cfg.image_token_id).sum())
  assert n_image == im.cfg.num_image_tokens


def test_text_only_chat_refuses_image_placeholder(tiny, chat_config):
  from moe_vlm.infer.chat import ChatSession, TurnError, run_chat
  im, _, _ = tiny
  session = ChatSession(im, chat_config)  # no image
  with pytest.raises(TurnError, match="this chat has no image"):
    session.ask("<image>\nWhat is in the picture?")
  assert session.turns == [] and session.last is None
  out = io.StringIO()
  assert run_chat(session, io.StringIO("Describe <image>.\nSay hello.\n"), out) == 1
  assert "(not asked: this chat has no image" in out.getvalue()
  assert [t["value"] for t in session.turns[::2]] == ["Say hello."]
