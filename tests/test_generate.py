"""KV-cache generation: equals full recomputation, batching, stopping, sampling, commands."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic_tiny
from moe_vlm.infer import load as load_lib
from moe_vlm.infer.chat import ChatSession, run_chat
from moe_vlm.infer.generate import (GenerationConfig, generate, greedy_generate, left_pad,
                                    until_stop)
from moe_vlm.infer.sampling import sample_tokens, top_p_filter
from moe_vlm.models.config import MoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm import checkpoint as ckpt_lib
from moe_vlm.experiment import Experiment
from tests.tiny import IMAGE_TOKEN, LLAMA, PHI, vlm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 5  # tokens generated per row in the model-level tests

# Dense Llama (GQA); Phi MoE (parallel residual, partial rotary, biases) whose config
# says "capacity": generation must route dropless regardless.
MODELS = {"dense": vlm_config(LLAMA),
          "moe": vlm_config(PHI, MoEConfig(num_experts=4, top_k=2, dispatch="capacity"))}


_built = {}


def _model(name):
  if name not in _built:
    _built[name] = VLM(MODELS[name], rngs=nnx.Rngs(0))
  return _built[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
  return _model(request.param)


@pytest.fixture(scope="module")
def dense():
  return _model("dense")


# Most tests below call `generate` with the shapes and static settings of `_run`, so the
# whole module compiles few programs (each costs seconds on CPU).
def _run(model, ids, mask, pixels, **kw):
  tokens, logits = generate(model, ids, mask, pixels, max_new_tokens=NEW, return_logits=True,
                            **kw)
  return np.asarray(tokens), np.asarray(logits)


def _prompts(model, text_lengths=(2, 9, 6), images=(True, True, False), seed=0):
  """Prompts of lengths 8, 15, 8 (rows 0 and 2 padded in a batch: one program serves
  both alone); rows with an image hold its placeholders mid-prompt."""
  rng = np.random.default_rng(seed)
  p = model.cfg.num_image_tokens
  prompts = []
  for n, has_image in zip(text_lengths, images):
    text = rng.integers(1, IMAGE_TOKEN, size=n + 2)
    middle = [IMAGE_TOKEN] * p if has_image else []
    prompts.append(np.concatenate([text[:2], middle, text[2:]]).astype(np.int32))
  pixels = rng.normal(size=(len(prompts), 28, 28, 3)).astype(np.float32)
  return prompts, pixels


def _batch(model):
  prompts, pixels = _prompts(model)
  ids, mask = left_pad(prompts, 0, max(len(p) for p in prompts))
  return prompts, ids, mask, pixels


@nnx.jit
def _full_logits(model, ids, pixels, mask):
  return model(ids, pixels, mask, dispatch="dropless")[0]


def _recompute(model, ids, mask, pixels, tokens):
  """Logits for every generated position by one causal forward over prompt + tokens
  (causality makes position t's logits those of re-running the prefix up to t)."""
  seq = np.concatenate([ids, tokens], axis=1)[:, :-1]
  seq_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)[:, :-1]
  logits = _full_logits(model, jnp.asarray(seq), jnp.asarray(pixels), jnp.asarray(seq_mask))
  return np.asarray(logits)[:, ids.shape[1] - 1:]


def _argmax_without_placeholder(logits):
  logits = logits.copy()
  logits[..., IMAGE_TOKEN] = -np.inf  # generation never emits the image placeholder
  return logits.argmax(-1)


# ------------------------------------------------------------------ model level


def test_kv_cache_matches_full_recomputation(model):
  _, ids, mask, pixels = _batch(model)
  tokens, logits = _run(model, ids, mask, pixels)
  want = _recompute(model, ids, mask, pixels, tokens)
  assert logits.shape == want.shape == (3, NEW, model.cfg.text.vocab_size)
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(tokens, _argmax_without_placeholder(want))


def test_batched_left_padded_equals_one_by_one():
  moe = _model("moe")  # dropless routing: a row's tokens do not depend on its neighbours
  prompts, ids, mask, pixels = _batch(moe)
  batched, _ = _run(moe, ids, mask, pixels)
  assert not mask[0, 0] and not mask[2, 0]
  for row in (0, 2):  # the padded rows: image + text, and text only
    prompt = prompts[row]
    alone = generate(moe, prompt[None], np.ones((1, len(prompt)), np.int32),
                     pixels[row:row + 1], max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(alone)[0], batched[row], err_msg=f"row {row}")


def test_stop_tokens_end_rows_and_the_loop(dense):
  _, ids, mask, pixels = _batch(dense)
  base, _ = _run(dense, ids, mask, pixels)
  pad = 0
  stop = {int(base[0, 2])}
  got, _ = _run(dense, ids, mask, pixels, eos_ids=stop, pad_id=pad)
  for row in range(len(base)):
    hits = [t for t in range(NEW) if base[row, t] in stop]
    end = hits[0] + 1 if hits else NEW  # the stop token is kept, pad follows
    np.testing.assert_array_equal(got[row, :end], base[row, :end])
    assert np.all(got[row, end:] == pad)
  assert until_stop(got, stop)[0] == base[0, :list(base[0]).index(base[0, 2])].tolist()
  # Every row stops at its first token: the loop exits before any decode step.
  firsts = set(base[:, 0].tolist())
  tokens, logits = _run(dense, ids, mask, pixels, eos_ids=firsts, pad_id=pad)
  np.testing.assert_array_equal(tokens[:, 0], base[:, 0])
  assert np.all(tokens[:, 1:] == pad)
  assert np.all(logits[:, 1:] == 0)  # steps never run


def test_greedy_generate_keeps_its_contract(dense):
  prompts, ids, mask, pixels = _batch(dense)
  full, _ = _run(dense, ids, mask, pixels)
  eos = int(full[1, 3])
  out = greedy_generate(dense, prompts, pixels, pad_id=0, eos_id=eos, max_new_tokens=NEW,
                        prompt_length=ids.shape[1])
  assert out == until_stop(full, (eos,))
  assert len(out[1]) <= 3 and all(eos not in o for o in out)


def test_top_p_to_zero_is_greedy_and_sampling_is_reproducible(dense):
  _, ids, mask, pixels = _batch(dense)
  greedy, _ = _run(dense, ids, mask, pixels)
  sample = lambda key, top_p: np.asarray(generate(
      dense, ids, mask, pixels, max_new_tokens=NEW, temperature=1.0, top_p=top_p,
      rng=jax.random.key(key)))
  np.testing.assert_array_equal(sample(3, 1e-6), greedy)
  a, b, c = sample(7, 0.95), sample(7, 0.95), sample(8, 0.95)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)  # 15 draws at temperature 1 from a random model
  assert not np.any(a == IMAGE_TOKEN)


def test_sampling_functions():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
  assert kept(1e-9) == [False, True, False, False]
  assert kept(0.6) == [False, True, False, True]
  assert kept(0.9) == [False, True, True, True]
  assert kept(1.0) == [True, True, True, True]
  key = jax.random.key(0)
  wide = jnp.tile(logits, (4096, 1))
  draws = np.asarray(sample_tokens(wide, key, 1.0))
  np.testing.assert_array_equal(draws, np.asarray(sample_tokens(wide, key, 1.0)))
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4096, [0.05, 0.5, 0.15, 0.3],
                             atol=0.03)
  assert set(np.asarray(sample_tokens(wide, key, 1.0, 0.6)).tolist()) == {1, 3}
  np.testing.assert_array_equal(sample_tokens(wide, key, 1e-4), 1)  # cold -> argmax


def test_bad_inputs_raise(dense):
  _, ids, mask, pixels = _batch(dense)
  right_padded = mask[:, ::-1]
  with pytest.raises(ValueError, match="left-padded"):
    generate(dense, ids, right_padded, pixels, max_new_tokens=2)
  with pytest.raises(ValueError, match="pixel_values is None"):
    generate(dense, ids, mask, None, max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    GenerationConfig(top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    GenerationConfig(max_new_tokens=0)
  assert GenerationConfig(eos_ids=[5, 2, 5]).eos_ids == (2, 5)


# ------------------------------------------------------------- commands on a workdir


def _tiny_overrides():
  return {"model.vision.hidden_size": 32, "model.vision.intermediate_size": 64,
          "model.vision.num_layers": 2, "model.vision.num_heads": 2,
          "model.text.hidden_size": 32, "model.text.intermediate_size": 64,
          "model.text.num_layers": 2, "model.text.num_heads": 2,
          "model.text.num_kv_heads": 1, "data.num_images": 8}


def _tiny_config():
  c = synthetic_tiny.get_config()
  c.update_from_flattened_dict(_tiny_overrides())
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Synthetic data + tokenizer, and random stage-3 params saved where training would."""
  workdir = str(tmp_path_factory.mktemp("gen"))
  c = _tiny_config()
  exp = Experiment(c, workdir)
  exp.prepare_data()
  model = VLM(exp.model_config(3), rngs=nnx.Rngs(3))
  ckpt_lib.save_params(os.path.join(workdir, "stage3", "final"),
                       ckpt_lib.to_host(ParamCodec(model).flatten(model)))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(c.to_json_best_effort()), f)
  return c, workdir


def _image_paths(workdir, n):
  images = os.path.join(workdir, "data", "images")
  return sorted(os.listdir(images))[:n]


def test_generate_command_writes_one_answer_per_question(workdir):
  c, wd = workdir
  names = _image_paths(wd, 2)
  questions = os.path.join(wd, "questions.jsonl")
  with open(questions, "w") as f:
    for i, q in enumerate([{"image": names[0], "text": "What shape is shown?"},
                           {"image": names[1], "text": "<image>\nWhat colour is it?"},
                           {"text": "Say hello."}]):
      f.write(json.dumps({"question_id": f"q{i}", **q}) + "\n")
  answers = os.path.join(wd, "out", "answers.jsonl")
  cmd = [sys.executable, "-m", "moe_vlm", "generate", "--workdir", wd, "--stage", "3",
         "--config", os.path.join(ROOT, "configs", "synthetic_tiny.py"),
         "--questions", questions, "--answers", answers,
         "--image_folder", os.path.join(wd, "data", "images"), "--batch_size", "2",
         "--max_new_tokens", "4"]
  cmd += [f"--config.{k}={v}" for k, v in _tiny_overrides().items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in open(answers)]
  assert [l["question_id"] for l in lines] == ["q0", "q1", "q2"]
  assert lines[1]["prompt"] == "<image>\nWhat colour is it?"
  for l in lines:
    assert set(l) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert isinstance(l["text"], str) and l["model_id"].endswith("/stage3")
  assert len({l["answer_id"] for l in lines}) == 3


def test_chat_answers_each_turn_and_exits(workdir):
  _, wd = workdir
  im = load_lib.load(wd, stage=3)  # no config given: the workdir's config.json
  assert im.cfg.text.moe is not None and im.template == "phi"
  config = GenerationConfig(max_new_tokens=3, eos_ids=im.stop_ids, pad_id=im.pad_id)
  image = os.path.join(wd, "data", "images", _image_paths(wd, 1)[0])
  session = ChatSession(im, config, image=image)
  out = io.StringIO()
  n = run_chat(session, io.StringIO("What shape is it?\n\nAnd its colour?\nexit\nignored\n"),
               out)
  assert n == 2
  assert out.getvalue().count("ASSISTANT:") == 2
  assert [t["from"] for t in session.turns] == ["human", "gpt"] * 2
  assert session.turns[0]["value"].startswith("<image>\n")
  assert "<image>" not in session.turns[2]["value"]  # the image goes in the first turn only
  # EOF ends the loop too (here a third turn of the same conversation).
  assert run_chat(session, io.StringIO("Is it big?"), io.StringIO()) == 1
  assert len(session.turns) == 6


# ------------------------------------------------------------------ sharded generation


@pytest.mark.parametrize("shape", [dict(data=2, model=2, expert=2), dict(fsdp=2, model=4)])
def test_sharded_generation_equals_single_device(shape):
  from moe_vlm.infer.generate import shard_model
  from moe_vlm.parallel.mesh import make_mesh

  model = _model("moe")
  prompts, pixels = _prompts(model, text_lengths=(2, 9, 6, 3), images=(True, True, False, True))
  ids, mask = left_pad(prompts, 0, max(len(p) for p in prompts))
  want_tokens, want_logits = _run(model, ids, mask, pixels)
  mesh = make_mesh(shape)
  sharded = shard_model(model, mesh)
  experts = sharded.llm.layers[0].mlp.experts.wo[...]
  assert len(experts.sharding.device_set) == 8  # the weights really are spread out
  tokens, logits = generate(sharded, ids, mask, pixels, max_new_tokens=NEW,
                            return_logits=True, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ chat KV-cache reuse


def test_chat_reuses_the_cache_and_answers_as_a_fresh_prefill(workdir, monkeypatch):
  from moe_vlm.infer import chat as chat_lib

  _, wd = workdir
  im = load_lib.load(wd, stage=3)
  # Small cache steps so the conversation outgrows its cache and the cache is copied.
  monkeypatch.setattr(chat_lib, "CACHE_STEP", 64)
  config = GenerationConfig(max_new_tokens=6, eos_ids=im.stop_ids, pad_id=im.pad_id)
  image = os.path.join(wd, "data", "images", _image_paths(wd, 1)[0])
  reuse = ChatSession(im, config, image=image)
  fresh = ChatSession(im, config, image=image, reuse_cache=False)
  lengths = []
  for i, q in enumerate(["What shape is it?", "And its colour?", "Where is it?",
                         "Is it big or small, and is there anything else?"]):
    assert reuse.ask(q) == fresh.ask(q)
    assert reuse.last.generated == fresh.last.generated
    assert fresh.last.prefilled == fresh.last.prompt_tokens  # no reuse: all prefilled
    if i:
      # Only the new turn's tokens (plus what re-tokenising the answer changed).
      assert reuse.last.prefilled < reuse.last.prompt_tokens - im.cfg.num_image_tokens
    lengths.append(reuse._cache.length)  # pylint: disable=protected-access
  assert lengths[-1] > lengths[0]  # it grew, and the copied slots still served


def test_shared_prefix():
  from moe_vlm.infer.chat import shared_prefix
  assert shared_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
  assert shared_prefix([1, 2], [1, 2, 3]) == 2
  assert shared_prefix([], [1]) == 0
  assert shared_prefix([7], [1]) == 0
