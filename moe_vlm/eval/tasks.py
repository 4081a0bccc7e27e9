"""Benchmark tasks: answer a question file, score it, write LLaVA-layout outputs.

  pope     accuracy / precision / recall / F1 / yes-ratio, overall and per category
  vqa      VQA accuracy after the official answer normalisation, overall and per category
  routing  answers only, for the routing analysis (no labels needed)

Any task can also write the routing analysis of the answered samples (`routing=True`):
the routing pass covers each prompt plus the answer the model generated, as the paper's
figures do.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from moe_vlm import files
from moe_vlm.eval import benchmarks
from moe_vlm.eval import metrics, questions as questions_lib, routing as routing_lib, runner
from moe_vlm.eval.questions import Question
from moe_vlm.infer.generate import left_pad
from moe_vlm.infer.load import InferenceModel

# Our own layouts (pope, vqa: one JSONL of questions with labels / answers), the
# routing analysis, and the paper's benchmarks from their released files
# (`moe_vlm.eval.benchmarks`: gqa, sqa, textvqa, vizwiz, mme, mmbench, mmvet, vqav2).
OWN_TASKS = ("pope", "vqa", "routing")
TASKS = OWN_TASKS + tuple(n for n in benchmarks.TASKS if n not in OWN_TASKS)


def benchmark(task: str) -> Optional[benchmarks.Benchmark]:
  """The paper benchmark behind `task`, or None for our own layouts."""
  return None if task in OWN_TASKS else benchmarks.get(task)


def load_task_questions(task: str, path: str, limit: int = 0,
                        **load_kw: Any) -> list[Question]:
  """A task's questions: a paper benchmark's released files (with the prompts LLaVA-1.5
  asks; `load_kw` such as annotations= / image_dir= go to its loader), else our JSONL."""
  bench = benchmark(task)
  if bench is None:
    if load_kw:
      raise ValueError(f"--task {task} reads one question file; {sorted(load_kw)} apply to "
                       "the paper benchmarks only")
    return questions_lib.load_questions(path, limit)
  accepted = inspect.signature(bench.load_questions).parameters
  unknown = sorted(k for k in load_kw if k not in accepted)
  if unknown:
    raise ValueError(f"--task {task} takes no {unknown}; its loader reads "
                     f"{sorted(k for k in accepted if k not in ('self', 'path', 'limit'))}")
  return bench.load_questions(path, limit=limit, **load_kw)


# ------------------------------------------------------------------ scoring


def _pope_entry(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
  c = metrics.pope_confusion(predictions, labels)
  return {**metrics.metrics_from_confusion(c), **dataclasses.asdict(c), "n": c.n}


def score_pope(questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Any]:
  """{"overall": {...}, "categories": {name: {...}}}: each with accuracy, precision,
  recall, f1, yes_ratio (percent) and the tp/fp/fn/tn counts."""
  missing = [q.question_id for q in questions if q.label is None]
  if missing:
    raise questions_lib.QuestionFileError(
        f"{len(missing)} POPE questions have no 'label' (first: {missing[0]!r})")
  labels = [q.label for q in questions]
  out = {"overall": _pope_entry(answers, labels), "categories": {}}
  for cat in sorted({q.category for q in questions if q.category is not None}):
    idx = [i for i, q in enumerate(questions) if q.category == cat]
    out["categories"][cat] = _pope_entry([answers[i] for i in idx], [labels[i] for i in idx])
  return out


def score_vqa(questions: Sequence[Question], answers: Sequence[str], *,
              leave_one_out: bool = True) -> dict[str, Any]:
  """{"overall": {"accuracy", "n"}, "categories": {...}}, accuracy in percent."""
  missing = [q.question_id for q in questions if not q.answers]
  if missing:
    raise questions_lib.QuestionFileError(
        f"{len(missing)} VQA questions have no 'answer'/'answers' (first: {missing[0]!r})")
  scores = [metrics.vqa_accuracy(a, q.answers, leave_one_out=leave_one_out)
            for q, a in zip(questions, answers)]
  entry = lambda s: {"accuracy": 100 * float(np.mean(s)), "n": len(s)}
  by_cat = collections.defaultdict(list)
  for q, s in zip(questions, scores):
    if q.category is not None:
      by_cat[q.category].append(s)
  return {"overall": entry(scores), "categories": {k: entry(v) for k, v in sorted(by_cat.items())},
          "per_question": scores}


def results_markdown(results: dict[str, Any]) -> str:
  task = results["task"]
  lines = [f"## {task.upper()}: {results['model_id']} on {os.path.basename(results['questions'])}",
           ""]
  rows = [("all", results["overall"])] + list(results["categories"].items())
  if task == "pope":
    lines += ["| split | questions | accuracy | precision | recall | F1 | yes-ratio |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {m['n']} | {m['accuracy']:.1f} | {m['precision']:.1f} | "
              f"{m['recall']:.1f} | {m['f1']:.1f} | {m['yes_ratio']:.1f} |" for name, m in rows]
  elif task == "vqa":
    lines += [f"VQA accuracy ({results['metric']}).", "",
              "| split | questions | accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {m['n']} | {m['accuracy']:.2f} |" for name, m in rows]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ running


@dataclasses.dataclass(frozen=True)
class Settings:
  task: str
  image_root: str
  batch_size: int
  max_new_tokens: int
  model_id: str
  routing: bool = False  # also write the routing analysis (MoE models)
  plots: bool = True  # routing PNGs
  num_path_tokens: int = 4  # per modality, in routing.json / routing_paths.png
  leave_one_out: bool = True  # VQA accuracy: the official averaging over annotators


def _routing_hook(counter: routing_lib.RoutingCounter, pad_id: int, max_new_tokens: int):
  """on_batch: route each prompt followed by its generated answer."""
  def on_batch(batch: runner.Batch) -> None:
    seqs = []
    for prompt, new in zip(batch.prompts, batch.new_tokens):
      if counter.image_token_id in new:  # a stray image id would count as an image token
        new = new[:new.index(counter.image_token_id)]
      seqs.append(np.concatenate([prompt, np.asarray(new, np.int32)]))
    ids, mask = left_pad(seqs, pad_id, batch.prompt_length + max_new_tokens)
    counter.add(ids, batch.pixels, mask, rows=batch.size, grids=batch.grids)
  return on_batch


def run(im: InferenceModel, questions: Sequence[Question], settings: Settings, out_dir: str,
        *, questions_path: str = "", extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Answers, scores and writes answers.jsonl, results.json, results.md (+ routing.*)."""
  if settings.task not in TASKS:
    raise ValueError(f"task={settings.task!r}: expected one of {TASKS}")
  os.makedirs(out_dir, exist_ok=True)
  counter = None
  if settings.routing or settings.task == "routing":
    if im.cfg.text.moe is None:
      raise routing_lib.NoMoEError("routing analysis needs an MoE model (stage 3); this "
                                   "stage is dense")
    counter = routing_lib.RoutingCounter(
        im.model, image_token_id=im.cfg.image_token_id, num_examples=settings.num_path_tokens,
        token_text=lambda t: im.tokenizer.decode([t]), mesh=im.mesh)
  hook = (_routing_hook(counter, im.pad_id, settings.max_new_tokens)
          if counter is not None else None)
  answers = runner.answer(im, questions, image_root=settings.image_root,
                          batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                          on_batch=hook)
  answers_path = os.path.join(out_dir, "answers.jsonl")
  results: dict[str, Any] = {"task": settings.task, "model_id": settings.model_id,
                             "questions": questions_path, "num_questions": len(questions),
                             "answers": answers_path, **(extra or {})}
  bench = benchmark(settings.task)
  if bench is not None:
    results.update(bench.score(questions, answers))
  elif settings.task == "pope":
    results.update(score_pope(questions, answers))
  elif settings.task == "vqa":
    scored = score_vqa(questions, answers, leave_one_out=settings.leave_one_out)
    scored.pop("per_question")
    results.update(scored, metric=("official VQA: min(#matches/3, 1) averaged over "
                                   "leave-one-annotator-out subsets" if settings.leave_one_out
                                   else "min(#matches/3, 1)"))
  if jax.process_index() != 0:  # every process answered (one sharded model); 0 writes
    return results
  questions_lib.write_jsonl(answers_path,
                            questions_lib.answer_records(questions, answers, settings.model_id))
  if bench is not None:  # the files LLaVA's scripts submit / convert
    results["submission"] = bench.write_submission(questions, answers, out_dir)
  if counter is not None:
    results["routing"] = routing_lib.write(counter.stats, out_dir, plots=settings.plots)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  md = (bench.markdown(results) if bench is not None else
        results_markdown(results) if settings.task != "routing" else "")
  if counter is not None:
    with open(results["routing"]["markdown"]) as f:
      md += ("\n" if md else "") + "### Routing\n\n" + f.read()
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md)
  return results


def evaluate_workdir(workdir: Optional[str], *, task: str, questions_path: str, out_dir: str,
                     config: Optional[ml_collections.ConfigDict] = None, stage: int = 3,
                     ckpt: Optional[str] = None, image_root: Optional[str] = None,
                     template: Optional[str] = None, prompt_suffix: str = "",
                     batch_size: int = 0, max_new_tokens: int = 0, max_examples: int = 0,
                     model_id: Optional[str] = None, routing: bool = False,
                     plots: bool = True, path_tokens: int = 4, leave_one_out: bool = True,
                     overwrite: bool = False,
                     load_kw: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """`moe-vlm eval` as a function: loads stage `stage` of a workdir (or the converted
  checkpoint `ckpt`) and runs `task`.

  config defaults to <workdir>/config.json; image_root to the config's image folder or
  data directory (a checkpoint: the questions' folder); batch_size / max_new_tokens (0)
  to the config's eval settings (a checkpoint: 8 and 16). The questions and `out_dir`
  (non-empty: only with `overwrite`) are checked before the model loads, and the files
  are written only once every answer is in.
  """
  from moe_vlm.experiment import Experiment
  from moe_vlm.infer import load

  if (workdir is None) == (ckpt is None):
    raise ValueError("evaluate a training workdir or a converted checkpoint (ckpt), one")
  files.check_output_dir(os.path.abspath(out_dir), overwrite)
  questions = load_task_questions(task, questions_path, max_examples, **(load_kw or {}))
  if ckpt:
    im = load.load_checkpoint(ckpt, template=template)
    defaults = dict(image_root=os.path.dirname(os.path.abspath(questions_path)),
                    batch_size=8, max_new_tokens=16,
                    model_id=os.path.basename(os.path.abspath(ckpt)))
    extra = {"ckpt": ckpt}
  else:
    exp = Experiment.from_workdir(workdir, config)
    im = load.load(workdir, stage, exp.config)
    if template:
      im = dataclasses.replace(im, template=template)
    e = exp.settings.eval
    defaults = dict(image_root=exp.image_root, batch_size=e.batch_size,
                    max_new_tokens=e.max_new_tokens,
                    model_id=f"{os.path.basename(os.path.abspath(workdir))}/stage{stage}")
    extra = {"stage": stage, "workdir": workdir}
  if prompt_suffix:
    questions = [dataclasses.replace(q, text=f"{q.text}\n{prompt_suffix}") for q in questions]
  settings = Settings(
      task=task, image_root=image_root or defaults["image_root"],
      batch_size=batch_size or defaults["batch_size"],
      max_new_tokens=max_new_tokens or defaults["max_new_tokens"],
      model_id=model_id or defaults["model_id"],
      routing=routing, plots=plots, num_path_tokens=path_tokens, leave_one_out=leave_one_out)
  return run(im, questions, settings, out_dir, questions_path=questions_path, extra=extra)


# ------------------------------------------------------------ answers made elsewhere


def score_file(task: str, questions_path: str, answers_path: str, out_dir: str, *,
               overwrite: bool = False, **load_kw: Any) -> dict[str, Any]:
  """Scores an answers JSONL made anywhere (ours, or LLaVA's model_vqa output) against a
  paper benchmark's files; writes results.json and results.md to `out_dir`."""
  bench = benchmark(task)
  if bench is None:
    raise ValueError(f"--task {task}: scoring an answer file works for the paper "
                     f"benchmarks ({', '.join(benchmarks.TASKS)})")
  files.check_output_dir(os.path.abspath(out_dir), overwrite)
  results = benchmarks.score_answer_file(task, questions_path, answers_path, **load_kw)
  os.makedirs(out_dir, exist_ok=True)
  files.write_json(os.path.join(out_dir, "results.json"), results)
  files.write_text(os.path.join(out_dir, "results.md"), bench.markdown(results))
  return results


def paper_row(root: str, model: str) -> str:
  """The paper's results row from `<root>/<task>/results.json` (one directory per
  benchmark, as `moe-vlm eval --out <root>/<task>` writes them), beside MoE-LLaVA's
  published rows; written to `<root>/paper_row.md`."""
  row = benchmarks.row
  found = row.results_in(root)
  if not found:
    raise FileNotFoundError(f"no <task>/results.json under {root}; expected folders named "
                            f"{', '.join(k for k, _ in row.COLUMNS)}")
  md = row.paper_row(row.load_results(found), model, published=tuple(row.PUBLISHED))
  files.write_text(os.path.join(root, "paper_row.md"), md)
  return md
