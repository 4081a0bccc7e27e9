"""The paper's benchmarks (moe_vlm.eval.benchmarks): each scorer on small fixtures written in
the benchmark's released layout, against scores computed by hand."""

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from moe_vlm.eval import metrics, questions as questions_lib
from moe_vlm.eval.benchmarks import (TASKS, AnswerFileError, gqa, mmbench, mme, row,
                                     score_answer_file, sqa, textvqa)
from moe_vlm.eval.questions import QuestionFileError

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _write(path, obj):
  with open(path, "w") as f:
    if isinstance(obj, str):
      f.write(obj)
    else:
      json.dump(obj, f)
  return str(path)


def _answers_file(path, questions, texts, model_id="elsewhere"):
  questions_lib.write_jsonl(str(path), questions_lib.answer_records(questions, texts, model_id))
  return str(path)


def test_registry_names_every_paper_benchmark():
  assert set(TASKS) == {"gqa", "sqa", "textvqa", "vizwiz", "mme", "mmbench", "mmvet", "pope",
                        "vqav2"}
  assert {k for k, _ in row.COLUMNS} == set(TASKS)
  assert all(b.name == k and b.description for k, b in TASKS.items())
  assert [k for k, b in TASKS.items() if not b.has_metric] == ["mmvet"]


# ------------------------------------------------------------------ GQA

GQA_RELEASED = {
    "q1": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "isBalanced": True,
           "types": {"structural": "verify", "semantic": "attr"}},
    "q2": {"imageId": "n1", "question": "Is the cup on the left or right?", "answer": "left",
           "isBalanced": True, "types": {"structural": "choose"}},
    "q3": {"imageId": "n2", "question": "What animal is it?", "answer": "dog",
           "isBalanced": True, "types": {"structural": "query"}},
    "q4": {"imageId": "n2", "question": "What is he wearing?", "answer": "t-shirt",
           "isBalanced": True, "types": {"structural": "query"}},
    "q5": {"imageId": "n3", "question": "Are there both cars and buses?", "answer": "no",
           "isBalanced": True, "types": {"structural": "logical"}},
    "q6": {"imageId": "n3", "question": "Unbalanced?", "answer": "yes", "isBalanced": False,
           "types": {"structural": "verify"}},
}
# (prediction, right?) in q1..q5 order
GQA_PREDICTIONS = [("Yes.", True), ("LEFT...", True), ("The dog", False), ("T-shirt.", True),
                   ("no, there are not", False)]


def test_gqa_released_questions_prompts_normalisation_and_binary_open(tmp_path):
  bench = TASKS["gqa"]
  path = _write(tmp_path / "testdev_balanced_questions.json", GQA_RELEASED)
  qs = bench.load_questions(path)
  assert [q.question_id for q in qs] == ["q1", "q2", "q3", "q4", "q5"]  # q6 is unbalanced
  assert qs[0].text == f"Is the sky blue?\n{SHORT}" and qs[0].image == "n1.jpg"
  assert qs[0].answers == ("yes",) and qs[2].category == "query"
  preds = [p for p, _ in GQA_PREDICTIONS]
  assert [gqa.prediction(p) for p in preds] == ["yes", "left", "the dog", "t-shirt",
                                                "no, there are not"]
  # LLaVA's GQA processing keeps articles, unlike the VQA normalisation.
  assert metrics.exact_match("The dog", "dog") and gqa.prediction("The dog") != "dog"
  got = bench.score(qs, preds)
  assert got["overall"] == {"accuracy": pytest.approx(60.0), "n": 5}
  assert got["binary"] == {"accuracy": pytest.approx(200 / 3), "n": 3}  # q1 q2 q5
  assert got["open"] == {"accuracy": pytest.approx(50.0), "n": 2}  # q3 q4
  assert got["headline"] == pytest.approx(60.0)
  assert got["categories"]["verify"]["accuracy"] == pytest.approx(100.0)
  json.dumps(got)
  [out] = bench.write_submission(qs, preds, str(tmp_path / "sub"))
  assert os.path.basename(out) == "testdev_balanced_predictions.json"
  with open(out) as f:
    assert json.load(f) == [{"questionId": "q1", "prediction": "yes"},
                            {"questionId": "q2", "prediction": "left"},
                            {"questionId": "q3", "prediction": "the dog"},
                            {"questionId": "q4", "prediction": "t-shirt"},
                            {"questionId": "q5", "prediction": "no, there are not"}]
  assert "GQA" in bench.markdown(got) and "| all | 5 | 60.00 |" in bench.markdown(got)


def test_gqa_llava_jsonl_takes_answers_from_the_release(tmp_path):
  released = _write(tmp_path / "testdev_balanced_questions.json", GQA_RELEASED)
  llava = _write(tmp_path / "llava_gqa_testdev_balanced.jsonl", "".join(
      json.dumps({"question_id": qid, "image": "n1.jpg", "text": f"question {qid}\n{SHORT}",
                  "category": "default"}) + "\n" for qid in ("q2", "q3")))
  qs = TASKS["gqa"].load_questions(llava, annotations=released)
  assert [(q.question_id, q.answers, q.category) for q in qs] == [
      ("q2", ("left",), "choose"), ("q3", ("dog",), "query")]
  assert qs[0].text == f"question q2\n{SHORT}"
  bad = _write(tmp_path / "bad.jsonl", json.dumps({"question_id": "q9", "text": "x"}) + "\n")
  with pytest.raises(QuestionFileError, match=r"testdev_balanced_questions.json: no question 'q9'"):
    TASKS["gqa"].load_questions(bad, annotations=released)
  broken = dict(GQA_RELEASED, q7={"question": "no image?", "imageId": 7})
  with pytest.raises(QuestionFileError, match=r"\['q7'\]: 'imageId' is 7"):
    TASKS["gqa"].load_questions(_write(tmp_path / "broken.json", broken))


# ------------------------------------------------------------------ ScienceQA

def _problem(question, choices, answer, image=None, hint="", subject="natural science",
             split="test"):
  return {"question": question, "choices": choices, "answer": answer, "hint": hint,
          "image": image, "subject": subject, "split": split, "lecture": "", "solution": ""}


SQA_PROBLEMS = {
    "1": _problem("Which is a mammal?", ["frog", "dog", "snake", "trout"], 1, "image.png"),
    "2": _problem("Which word is a noun?", ["cat", "run"], 0, None,
                  hint="Read  the words.", subject="language science"),
    "3": _problem("Which planet is shown?", ["Mercury", "Venus", "Earth", "Mars", "Jupiter",
                                             "Saturn"], 5, "image.png"),
    "4": _problem("Which is a solid?", ["air", "steam", "juice", "water", "rock"], 4, "image.png"),
    "6": _problem("Which state is highlighted?", ["Ohio", "Utah", "Iowa"], 2, "image.png",
                  subject="social science"),
    "9": _problem("A validation question?", ["a", "b"], 0, None, split="val"),
}
# (answer, letter read, right?): "3" needs the 6th letter, F; "4" names two letters
SQA_ANSWERS = {"1": ("B", "B", True), "2": ("The answer is A.", "A", True),
               "3": ("F", "F", True), "4": ("The answer is E. The answer is D.", None, False),
               "6": ("D", None, False)}


def test_sqa_letters_beyond_d_img_accuracy_and_llava_answer_file(tmp_path):
  bench = TASKS["sqa"]
  path = _write(tmp_path / "problems.json", SQA_PROBLEMS)
  _write(tmp_path / "pid_splits.json", {"test": ["1", "2", "3", "4", "6"], "val": ["9"]})
  qs = bench.load_questions(path)
  assert [q.question_id for q in qs] == ["1", "2", "3", "4", "6"]
  assert qs[0].text == ("Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) dog "
                        f"(C) snake (D) trout\n{LETTER}")
  assert qs[1].text.startswith("Context: Read the words.\n")  # double spaces collapsed
  assert qs[0].image == "1/image.png" and qs[1].image is None
  assert qs[2].answers == ("F",) and len(qs[2].choices) == 6 and qs[3].answers == ("E",)
  answers = [SQA_ANSWERS[q.question_id][0] for q in qs]
  assert [sqa.choice(a, len(q.choices)) for q, a in zip(qs, answers)] == [
      SQA_ANSWERS[q.question_id][1] for q in qs]
  # eval_science_qa only knows A-E: F must be read from the question's own 6 options.
  assert sqa.choice("F", 6) == "F" and sqa.choice("F", 5) is None
  assert sqa.choice("E. rock", 5) == "E" and sqa.choice("E.rock", 5) is None
  got = bench.score(qs, answers)
  assert got["overall"] == {"accuracy": pytest.approx(60.0), "n": 5, "correct": 3}
  assert got["img"] == {"accuracy": pytest.approx(50.0), "n": 4, "correct": 2}  # 1 3 4 6
  assert got["headline"] == pytest.approx(50.0) and got["unparsed"] == 2
  assert got["categories"]["social science"]["accuracy"] == 0.0
  json.dumps(got)
  [out] = bench.write_submission(qs, answers, str(tmp_path / "sub"))
  with open(out) as f:
    lines = [json.loads(line) for line in f]
  assert [r["question_id"] for r in lines] == ["1", "2", "3", "4", "6"]
  assert lines[0]["prompt"] == f"<image>\n{qs[0].text}" and lines[1]["prompt"] == qs[1].text
  assert lines[2]["text"] == "F"

  # LLaVA's llava_test_CQM-A.json (image placeholder at the end of the human turn) gives
  # the same prompts, with answers from the problems.json beside it.
  llava = [{"id": q.question_id, **({"image": q.image} if q.image else {}),
            "conversations": [{"from": "human", "value": q.text[:-len(LETTER) - 1] +
                               ("\n<image>" if q.image else "")},
                              {"from": "gpt", "value": "B"}]} for q in qs]
  from_llava = bench.load_questions(_write(tmp_path / "llava_test_CQM-A.json", llava))
  assert [(q.text, q.answers, q.choices, q.image) for q in from_llava] == [
      (q.text, q.answers, q.choices, q.image) for q in qs]


# ------------------------------------------------------------------ TextVQA

TEXTVQA_RELEASED = {"dataset_name": "textvqa", "data": [
    {"question_id": 101, "image_id": "img1", "question": "what brand is the phone?",
     "answers": ["nokia", "Nokia,"] + ["samsung"] * 8},
    {"question_id": 102, "image_id": "img1", "question": "what drink is shown?",
     "answers": ["coca cola"] * 2 + ["coca-cola"] + ["coke"] * 7},
]}


def test_textvqa_evalai_processing_and_leave_one_out(tmp_path):
  bench = TASKS["textvqa"]
  path = _write(tmp_path / "TextVQA_0.5.1_val.json", TEXTVQA_RELEASED)
  qs = bench.load_questions(path)
  assert qs[0].text == f"what brand is the phone?\n{SHORT}" and qs[0].image == "img1.jpg"
  # "NOKIA." matches 2 of 10 ("Nokia," loses its comma): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  assert textvqa.accuracy("NOKIA.", qs[0].answers) == pytest.approx(0.6)
  # "Coca-Cola" -> "coca cola" matches 3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
  assert textvqa.accuracy("Coca-Cola", qs[1].answers) == pytest.approx(0.9)
  got = bench.score(qs, ["NOKIA.", "Coca-Cola"])
  assert got["overall"] == {"accuracy": pytest.approx(75.0), "n": 2}
  paths = bench.write_submission(qs, ["NOKIA.", "Coca-Cola"], str(tmp_path / "sub"))
  with open(paths[0]) as f:  # eval_textvqa.py's layout: question_id is the image id
    assert [json.loads(l)["question_id"] for l in f] == ["img1", "img1"]
  with open(paths[1]) as f:
    assert json.load(f) == [{"question_id": 101, "answer": "nokia"},
                            {"question_id": 102, "answer": "coca cola"}]

  # OCR tokens, and LLaVA's JSONL whose question_id is the image id (repeated).
  ocr = _write(tmp_path / "ocr.json",
               {"data": [{"image_id": "img1", "ocr_tokens": ["NOKIA", "3310"]}]})
  with_ocr = bench.load_questions(path, ocr=ocr)
  assert with_ocr[0].text == ("what brand is the phone?\nReference OCR token: NOKIA, 3310\n"
                              f"{SHORT}")
  assert textvqa.question_of(with_ocr[0].text) == "what brand is the phone?"
  llava = _write(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", "".join(
      json.dumps({"question_id": "img1", "image": "img1.jpg", "text": q.text}) + "\n"
      for q in reversed(with_ocr)))
  from_llava = bench.load_questions(llava, annotations=path)
  assert [q.answers for q in from_llava] == [qs[1].answers, qs[0].answers]
  answers = _write(tmp_path / "answers.jsonl", "".join(
      json.dumps({"question_id": "img1", "prompt": q.text, "text": a}) + "\n"
      for q, a in zip(with_ocr, ["NOKIA.", "Coca-Cola"])))
  scored = score_answer_file("textvqa", llava, answers, annotations=path)
  assert scored["overall"]["accuracy"] == pytest.approx(75.0)


# ------------------------------------------------------------------ VizWiz

VIZWIZ_VAL = [
    {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "unanswerable",
     "answerable": 0, "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
    {"image": "VizWiz_val_00000001.jpg", "question": "What color is it?", "answer_type": "other",
     "answerable": 1, "answers": [{"answer": "unanswerable"}] * 2 + [{"answer": "red"}] * 8},
    {"image": "VizWiz_val_00000002.jpg", "question": "Is it on?", "answer_type": "yes/no",
     "answerable": 1, "answers": [{"answer": "yes"}] * 10},
]


def test_vizwiz_unanswerable_and_submission(tmp_path):
  bench = TASKS["vizwiz"]
  qs = bench.load_questions(_write(tmp_path / "val.json", VIZWIZ_VAL))
  assert qs[0].text == ("What is this?\nWhen the provided information is insufficient, respond "
                        f"with 'Unanswerable'.\n{SHORT}")
  assert [q.question_id for q in qs] == [0, 1, 2] and qs[1].answers[0] == "unanswerable"
  preds = ["Unanswerable.", "unanswerable", "No"]
  got = bench.score(qs, preds)
  # 1.0 (all ten said so), (2 * 1/3 + 8 * 2/3) / 10 = 0.6, 0.0
  assert got["overall"] == {"accuracy": pytest.approx(160 / 3), "n": 3}
  assert got["categories"] == {"other": {"accuracy": pytest.approx(60.0), "n": 1},
                               "unanswerable": {"accuracy": pytest.approx(100.0), "n": 1},
                               "yes/no": {"accuracy": 0.0, "n": 1}}
  [out] = bench.write_submission(qs, preds, str(tmp_path / "sub"))
  with open(out) as f:
    assert json.load(f) == [{"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
                            {"image": "VizWiz_val_00000001.jpg", "answer": "unanswerable"},
                            {"image": "VizWiz_val_00000002.jpg", "answer": "no"}]
  test = [{k: v for k, v in r.items() if k in ("image", "question")} for r in VIZWIZ_VAL]
  test_qs = bench.load_questions(_write(tmp_path / "test.json", test))
  assert bench.write_submission(test_qs, preds, str(tmp_path / "test_sub"))
  with pytest.raises(QuestionFileError, match="VizWiz: 3 of 3 questions have no answers"):
    bench.score(test_qs, preds)


# ------------------------------------------------------------------ MME

MME_RELEASE = {  # subtask -> image -> [(question, answer)]; artwork has the images/ layout
    "existence": {"1.jpg": [("Is there a dog in this image? Please answer yes or no.", "Yes"),
                            ("Is there a cat in this image? Please answer yes or no.", "No")],
                  "2.png": [("Is there a car in this image? Please answer yes or no.", "Yes"),
                            ("Is there a bus in this image?  Please answer yes or no.", "No")]},
    "artwork": {"10.jpg": [("Is this artwork created by Monet? Please answer yes or no.", "Yes"),
                           ("Is this artwork created by Goya? Please answer yes or no.", "No")]},
    "code_reasoning": {"0020.png": [("Is a python code shown? Please answer yes or no.", "Yes"),
                                    ("Is a c++ code shown? Please answer yes or no.", "No")]},
}
# answers in release order; existence: 2/4 right, 1 of 2 images fully right -> 50 + 50;
# artwork: "The artwork ..." reads as "other" -> 50 + 0; code_reasoning: "yes, it is" is yes,
# "Nope" is no -> 100 + 100.
MME_ANSWERS = ["Yes", "No", "No, there is not", "Yes", "The artwork is by Monet.", "No",
               "yes, it is", "Nope"]


def _mme_release(root):
  for subtask, images in MME_RELEASE.items():
    folder = os.path.join(root, subtask)
    image_dir = os.path.join(folder, "images") if subtask == "artwork" else folder
    qa_dir = os.path.join(folder, "questions_answers_YN") if subtask == "artwork" else folder
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(qa_dir, exist_ok=True)
    for image, pairs in images.items():
      open(os.path.join(image_dir, image), "wb").write(b"not read by the loader")
      _write(os.path.join(qa_dir, os.path.splitext(image)[0] + ".txt"),
             "".join(f"{q}\t{a}\n" for q, a in pairs))
  return str(root)


def test_mme_acc_plus_pairs_subtask_scores_and_totals(tmp_path):
  bench = TASKS["mme"]
  root = _mme_release(tmp_path / "MME_Benchmark_release_version")
  qs = bench.load_questions(root)
  assert [q.question_id for q in qs][:2] == ["artwork/images/10.jpg"] * 2  # LLaVA-style ids
  by_subtask = {s: [q for q in qs if q.category == s] for s in MME_RELEASE}
  qs = [q for s in MME_RELEASE for q in by_subtask[s]]  # the fixture's order
  assert qs[3].text == f"Is there a bus in this image?\n{SHORT}"  # double space dropped
  assert qs[3].label == "no" and qs[3].image == "existence/2.png"
  assert qs[3].meta["question"] == "Is there a bus in this image?  Please answer yes or no."
  assert [mme.yes_no(a) for a in MME_ANSWERS] == ["yes", "no", "no", "yes", "other", "no",
                                                  "yes", "no"]
  got = bench.score(qs, MME_ANSWERS)
  ex, art, code = (got["subtasks"][s] for s in ("existence", "artwork", "code_reasoning"))
  assert (ex["acc"], ex["acc_plus"], ex["score"]) == (50.0, 50.0, 100.0)
  assert (art["acc"], art["acc_plus"], art["score"], art["other"]) == (50.0, 0.0, 50.0, 1)
  assert (code["acc"], code["acc_plus"], code["score"]) == (100.0, 100.0, 200.0)
  assert ex["images"] == 2 and ex["questions"] == 4
  assert got["perception"]["score"] == 150.0 and got["cognition"]["score"] == 200.0
  assert got["headline"] == 150.0 and "count" in got["perception"]["missing"]
  # acc+ pairs the questions by image, not by position: this order scores the same, where
  # the eval tool's consecutive pairs would be (1.jpg Q1, 2.png Q1), (1.jpg Q2, 2.png Q2),
  # each with one wrong answer: existence acc+ 0.
  order = [7, 0, 4, 2, 6, 1, 5, 3]
  assert bench.score([qs[i] for i in order], [MME_ANSWERS[i] for i in order]) == got
  paths = bench.write_submission(qs, MME_ANSWERS, str(tmp_path / "sub"))
  assert sorted(os.path.basename(p) for p in paths) == ["artwork.txt", "code_reasoning.txt",
                                                        "existence.txt"]
  with open(os.path.join(tmp_path, "sub", "mme", "existence.txt")) as f:
    assert f.read() == (
        "1.jpg\tIs there a dog in this image? Please answer yes or no.\tYes\tYes\n"
        "1.jpg\tIs there a cat in this image? Please answer yes or no.\tNo\tNo\n"
        "2.png\tIs there a car in this image? Please answer yes or no.\tYes\tNo, there is not\n"
        "2.png\tIs there a bus in this image?  Please answer yes or no.\tNo\tYes\n")

  # An answer file made elsewhere, in another order: ids repeat, so (id, prompt) match.
  answers = _answers_file(tmp_path / "answers.jsonl", [qs[i] for i in order],
                          [MME_ANSWERS[i] for i in order])
  scored = score_answer_file("mme", root, answers)
  assert scored["perception"]["score"] == 150.0 and scored["missing_answers"] == 0
  # LLaVA's llava_mme.jsonl, labels from the release folder.
  llava = _write(tmp_path / "llava_mme.jsonl", json.dumps(
      {"question_id": "existence/2.png", "image": "existence/2.png",
       "text": f"Is there a bus in this image?\n{SHORT}", "category": "existence"}) + "\n")
  [q] = bench.load_questions(llava, annotations=root)
  assert (q.label, q.category, q.meta["answer"]) == ("no", "existence", "No")


# ------------------------------------------------------------------ MMBench

def _png_base64(color):
  buf = io.BytesIO()
  Image.new("RGB", (4, 4), color).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
               "source", "l2-category", "comment", "split"]


def _mmb_row(index, question, hint, options, answer, category, image):
  options = list(options) + ["nan"] * (4 - len(options))
  return [str(index), question, hint, *options, answer, category, image, "src", "l2-" + category,
          "nan", "dev"]


HINT = "Look at the sky."


def _mmbench_tsv(path):
  img0, img2 = _png_base64("red"), _png_base64("blue")
  rows = [
      # index 0: four options, every rotation answered right
      _mmb_row(0, "What is written?", "nan", ["cat", "dog", "cow", "pig"], "A", "ocr", img0),
      _mmb_row(1000000, "What is written?", "nan", ["dog", "cow", "pig", "cat"], "D", "ocr", "0"),
      _mmb_row(2000000, "What is written?", "nan", ["cow", "pig", "cat", "dog"], "C", "ocr", img0),
      _mmb_row(3000000, "What is written?", "nan", ["pig", "cat", "dog", "cow"], "B", "ocr", "0"),
      # index 1: two options; the rotation's answer disagrees with the original's
      _mmb_row(1, "Is it open?", "", ["yes", "no"], "B", "ocr", img0),
      _mmb_row(1000001, "Is it open?", "", ["no", "yes"], "A", "ocr", img0),
      # index 2: three options and a hint
      _mmb_row(2, "What color?", HINT, ["red", "green", "blue"], "C", "scene", img2),
      _mmb_row(1000002, "What color?", HINT, ["green", "blue", "red"], "B", "scene", img2),
      _mmb_row(2000002, "What color?", HINT, ["blue", "red", "green"], "A", "scene", img2),
  ]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(MMB_COLUMNS)
    writer.writerows(rows)
  return str(path)


# per row: answer, letter read, right?
MMB_ANSWERS = [("A", "A", True), ("D", "D", True), ("C.", "C", True), ("(B) cat", "B", True),
               ("B", "B", True), ("B", "B", False),  # index 1: same letter, rotation wrong
               ("The answer is C.", "C", True), ("blue", "B", True), ("A", "A", True)]


def test_mmbench_circular_evaluation_images_and_submission(tmp_path):
  bench = TASKS["mmbench"]
  path = _mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv")
  qs = bench.load_questions(path)
  assert [q.question_id for q in qs] == [0, 1000000, 2000000, 3000000, 1, 1000001, 2, 1000002,
                                         2000002]
  assert qs[6].text == ("Look at the sky.\nWhat color?\nA. red\nB. green\nC. blue\n" + LETTER)
  assert qs[4].text == f"Is it open?\nA. yes\nB. no\n{LETTER}" and qs[4].choices == ("yes", "no")
  assert qs[1].image == qs[0].image and qs[0].image.startswith(str(tmp_path))  # "0" -> row 0's
  with Image.open(qs[6].image) as im:
    assert im.getpixel((0, 0)) == (0, 0, 255)
  with Image.open(qs[0].image) as im:
    assert im.getpixel((0, 0)) == (255, 0, 0)
  assert len(bench.load_questions(path, limit=2)) == 2
  answers = [a for a, _, _ in MMB_ANSWERS]
  assert [mmbench.infer_letter(a, q.choices) for a, q in zip(answers, qs)] == [
      l for _, l, _ in MMB_ANSWERS]
  got = bench.score(qs, answers)
  # Groups 0 and 2 right, group 1 wrong although its original row is right.
  assert got["overall"]["accuracy"] == pytest.approx(200 / 3) and got["overall"]["n"] == 3
  assert got["overall"]["plain_accuracy"] == pytest.approx(100.0)
  assert got["overall"]["rows"] == 9 and got["headline"] == pytest.approx(200 / 3)
  assert got["categories"] == {"ocr": {"accuracy": pytest.approx(50.0), "n": 2},
                               "scene": {"accuracy": pytest.approx(100.0), "n": 1}}
  assert got["l2_categories"]["l2-ocr"]["n"] == 2
  # Fixing the rotation's answer makes all three right.
  fixed = answers[:5] + ["A"] + answers[6:]
  assert bench.score(qs, fixed)["overall"]["accuracy"] == pytest.approx(100.0)
  [out] = bench.write_submission(qs, answers, str(tmp_path / "sub"))
  with open(out, newline="") as f:
    table = list(csv.reader(f, delimiter="\t"))
  assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
  assert table[2] == ["1000000", "What is written?", "dog", "cow", "pig", "cat", "D", "D", "dev"]
  assert len(table) == 10


def test_mmbench_malformed_tsv_names_file_and_field(tmp_path):
  bench = TASKS["mmbench"]
  no_index = tmp_path / "no_index.tsv"
  no_index.write_text("question\tA\tB\nq\ta\tb\n")
  with pytest.raises(QuestionFileError, match=r"no_index.tsv: no 'index' column"):
    bench.load_questions(str(no_index))
  bad_answer = tmp_path / "bad_answer.tsv"
  bad_answer.write_text("index\tquestion\tA\tB\tanswer\n0\tq\ta\tb\tC\n")
  with pytest.raises(QuestionFileError, match=r"bad_answer.tsv:2: 'answer' is 'C'"):
    bench.load_questions(str(bad_answer))
  bad_image = tmp_path / "bad_image.tsv"
  bad_image.write_text("index\tquestion\tA\tB\timage\n0\tq\ta\tb\t%%%\n")
  with pytest.raises(QuestionFileError, match=r"bad_image.tsv:2: 'image' is not base64"):
    bench.load_questions(str(bad_image))


# ------------------------------------------------------------------ MM-Vet, POPE, VQAv2

def test_mmvet_answer_file_for_the_grader(tmp_path):
  bench = TASKS["mmvet"]
  released = {"v1_0": {"imagename": "v1_0.png", "question": "What is x?", "answer": "3",
                       "capability": ["ocr", "math"]},
              "v1_1": {"imagename": "v1_1.jpg", "question": "Who is it?", "answer": "Bob",
                       "capability": ["rec"]}}
  qs = bench.load_questions(_write(tmp_path / "mm-vet.json", released))
  assert [(q.question_id, q.text, q.image, q.category) for q in qs] == [
      (0, "What is x?", "v1_0.png", "ocr,math"), (1, "Who is it?", "v1_1.jpg", "rec")]
  [out] = bench.write_submission(qs, ["x = 3", "Bob"], str(tmp_path / "sub"))
  with open(out) as f:
    assert json.load(f) == {"v1_0": "x = 3", "v1_1": "Bob"}
  assert bench.score(qs, ["x = 3", "Bob"])["headline"] is None


def test_pope_headline_is_the_mean_f1_over_categories(tmp_path):
  bench = TASKS["pope"]
  rows = [("random", "yes", "Yes"), ("random", "no", "No"),       # F1 100
          ("popular", "yes", "Yes"), ("popular", "no", "Yes"),    # P 1/2, R 1: F1 66.7
          ("adversarial", "yes", "No"), ("adversarial", "yes", "Yes")]  # P 1, R 1/2: 66.7
  path = _write(tmp_path / "llava_pope_test.jsonl", "".join(
      json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a cat?", "label": l,
                  "category": c}) + "\n" for i, (c, l, _) in enumerate(rows)))
  qs = bench.load_questions(path)
  got = bench.score(qs, [a for _, _, a in rows])
  assert got["headline"] == pytest.approx((100 + 200 / 3 + 200 / 3) / 3)
  assert got["overall"]["f1"] == pytest.approx(75.0)  # pooled: P 3/4, R 3/4
  assert bench.write_submission(qs, [a for _, _, a in rows], str(tmp_path)) == []
  assert "| random | 2 |" in bench.markdown(got)


def test_vqav2_submission_uses_evalai_processing(tmp_path):
  bench = TASKS["vqav2"]
  path = _write(tmp_path / "llava_vqav2.jsonl", "".join(
      json.dumps({"question_id": qid, "image": "x.jpg", "text": "How many?", "answers": [a] * 3})
      + "\n" for qid, a in ((5, "2"), (6, "dog"))))
  qs = bench.load_questions(path)
  [out] = bench.write_submission(qs, ["Two.", "A Dog's"], str(tmp_path / "sub"))
  with open(out) as f:
    assert json.load(f) == [{"question_id": 5, "answer": "2"},
                            {"question_id": 6, "answer": "dog 's"}]
  # tasks.score_vqa's official metric: 3 of 3 references, leave-one-out -> 2/3; "cat" -> 0.
  assert bench.score(qs, ["Two.", "cat"])["headline"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------ answer files


def test_score_answer_file_matching_and_errors(tmp_path):
  path = _write(tmp_path / "testdev_balanced_questions.json", GQA_RELEASED)
  qs = TASKS["gqa"].load_questions(path)
  preds = [p for p, _ in GQA_PREDICTIONS]
  records = questions_lib.answer_records(qs, preds, "m")[::-1]  # another order
  records.append({"question_id": "q99", "text": "extra"})
  answers = _write(tmp_path / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in records))
  got = score_answer_file("gqa", path, answers)
  assert got["overall"]["accuracy"] == pytest.approx(60.0)
  assert (got["unmatched_answers"], got["missing_answers"], got["task"]) == (1, 0, "gqa")

  short = _write(tmp_path / "short.jsonl", "".join(json.dumps(r) + "\n" for r in records[:3]))
  with pytest.raises(AnswerFileError, match=r"short.jsonl: no answer to 2 of 5 questions"):
    score_answer_file("gqa", path, short)
  partial = score_answer_file("gqa", path, short, missing="wrong")  # q1, q2 unanswered
  assert partial["overall"]["accuracy"] == pytest.approx(20.0) and partial["missing_answers"] == 2
  twice = _write(tmp_path / "twice.jsonl", json.dumps({"question_id": "q1", "text": "yes"}) +
                 "\n" + json.dumps({"question_id": "q1", "text": "no"}) + "\n")
  with pytest.raises(AnswerFileError, match=r"twice.jsonl:2: another answer to question 'q1'"):
    score_answer_file("gqa", path, twice)
  not_json = _write(tmp_path / "not_json.jsonl", json.dumps({"question_id": "q1", "text": "y"}) +
                    "\n{oops\n")
  with pytest.raises(AnswerFileError, match=r"not_json.jsonl:2 is not JSON"):
    score_answer_file("gqa", path, not_json)
  no_text = _write(tmp_path / "no_text.jsonl", json.dumps({"question_id": "q1", "answer": "y"}))
  with pytest.raises(AnswerFileError, match=r"no_text.jsonl:1: 'text' is None"):
    score_answer_file("gqa", path, no_text)
  with pytest.raises(ValueError, match="task='ok_vqa'"):
    score_answer_file("ok_vqa", path, answers)


# ------------------------------------------------------------------ the paper row


def test_paper_row_from_results_files(tmp_path):
  results = {
      "vqav2": {"task": "vqa", "overall": {"accuracy": 76.71, "n": 10}, "categories": {}},
      "pope": {"task": "pope", "overall": {"f1": 80.0},
               "categories": {"adversarial": {"f1": 85.4}, "popular": {"f1": 87.7},
                              "random": {"f1": 88.0}}},
      "gqa": {"task": "gqa", "headline": 61.46},
      "mme": {"task": "mme", "headline": 1291.62},
      "mmvet": {"task": "mmvet", "headline": None},
  }
  for column, r in results.items():
    os.makedirs(tmp_path / column)
    _write(tmp_path / column / "results.json", r)
  found = row.results_in(str(tmp_path))
  assert sorted(found) == sorted(results)
  table = row.paper_row(row.load_results(found), "ours", published=["LLaVA-1.5-7B"])
  assert table == (
      "| model | VQAv2 | GQA | VizWiz | SQA-IMG | TextVQA | POPE | MME | MMBench | MM-Vet |\n"
      "|---|---|---|---|---|---|---|---|---|---|\n"
      "| LLaVA-1.5-7B | 78.5 | 62.0 | 50.0 | 66.8 | 58.2 | 85.9 | 1510.7 | 64.3 | 30.5 |\n"
      "| ours | 76.7 | 61.5 | - | - | - | 87.0 | 1291.6 | - | - |\n")
  assert row.paper_row({}, "nothing", with_header=False) == "| nothing |" + " - |" * 9 + "\n"
  with pytest.raises(ValueError, match="unknown result columns"):
    row.paper_row({"gqa_testdev": {}}, "x")
  with pytest.raises(FileNotFoundError, match="sqa: no results file"):
    row.load_results({"sqa": str(tmp_path / "sqa.json")})
