"""Export to transformers / MoE-LLaVA directories and import back (moe_vlm.convert.export).

Checked here:
1. `LlavaForConditionalGeneration.from_pretrained(out)` (plain transformers) loads the
   export with no missing / unexpected tensors, in exactly the tensors `save_pretrained`
   writes, and matches our logits (1e-4, fp32) and greedy tokens: a dense Llama + CLIP
   model, a Llama-style MoE (Qwen2-MoE, qkv_bias=False, MoE layers 0 and 2 of 3, capacity
   config compared with our dropless path) and a tied Qwen2-style MoE with SigLIP;
2. JAX -> HF -> JAX is bit-exact (every parameter, and the VLMConfig) for those, a bf16
   model, and MoE-LLaVA's layout (Phi-2 and StableLM MoE);
3. the moe_llava layout's files: config.json with the `moe` dict and `mm_*` keys,
   DeepSpeed key names, the tower's copy in the weights, a vision tower directory
   transformers loads (released checkpoints: tests/test_released.py);
4. tokenizer + processor files; layout choice and refusals;
5. `moe-vlm convert to-hf` / `from-hf` end to end on a tiny workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402

from moe_vlm.convert import export, hf  # noqa: E402
from moe_vlm.infer.generate import greedy_generate  # noqa: E402
from moe_vlm.models.config import ConfigError, MoEConfig, TextConfig, VisionConfig  # noqa: E402
from moe_vlm.models.config import VLMConfig  # noqa: E402
from moe_vlm.models.vlm import VLM  # noqa: E402
from tests import tiny  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGLIP = dataclasses.replace(tiny.VISION, variant="siglip", activation="gelu_pytorch_tanh",
                             norm_eps=1e-6)
MOE = MoEConfig(num_experts=4, top_k=2, moe_layers_idx=(0, 2), dispatch="capacity",
                capacity_factor=1.0, expert_intermediate_size=24)
STABLELM = TextConfig(family="stablelm", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=2, num_kv_heads=1, norm="layer", norm_eps=1e-5,
                      mlp="gated", qkv_bias=True, partial_rotary_factor=0.25)


def _vlm(text: TextConfig, vision: VisionConfig = tiny.VISION, **kw) -> VLMConfig:
  return VLMConfig(vision=vision, text=text, image_token_id=tiny.IMAGE_TOKEN, **kw)


CASES = {
    # vocab 320 and <image> = 4: the tokenizer trained below fits it.
    "dense_llama_clip": lambda: VLMConfig(
        vision=tiny.VISION, text=dataclasses.replace(tiny.LLAMA, vocab_size=320),
        image_token_id=4),
    "moe_llama_clip": lambda: _vlm(dataclasses.replace(tiny.LLAMA, num_layers=3, moe=MOE)),
    "moe_qwen2_siglip_tied": lambda: _vlm(
        dataclasses.replace(tiny.LLAMA, family="qwen2", num_layers=3, qkv_bias=True,
                            tie_embeddings=True, moe=MOE), SIGLIP),
    "dense_bf16": lambda: _vlm(
        dataclasses.replace(tiny.LLAMA, num_layers=2, param_dtype="bfloat16"),
        dataclasses.replace(tiny.VISION, param_dtype="bfloat16")),
    "moe_phi_clip": lambda: _vlm(dataclasses.replace(tiny.PHI, moe=MoEConfig())),
    "moe_stablelm_siglip": lambda: _vlm(
        dataclasses.replace(STABLELM, moe=MoEConfig(moe_mode="dense", top_k=1,
                                                    renormalize=False)), SIGLIP),
}
LLAVA_CASES = ["dense_llama_clip", "moe_llama_clip", "moe_qwen2_siglip_tied"]


def _randomize(model: VLM, seed: int) -> VLM:
  """O(0.1) weights and ~1 norm scales (zero biases and unit scales would hide mix-ups)."""
  rng = np.random.RandomState(seed)
  for path, var in hf.flat_params(model).items():
    base = 1.0 if path.endswith(".scale") else 0.0
    value = base + 0.1 * rng.randn(*var.shape)
    var[...] = jnp.asarray(value, var.dtype)
  return model


@functools.lru_cache(maxsize=None)
def case_model(name: str) -> VLM:
  return _randomize(VLM(CASES[name](), rngs=nnx.Rngs(0)), seed=len(name))


@functools.lru_cache(maxsize=None)
def tokenizer_dir(tmp_root: str) -> str:
  from moe_vlm.data import tokenizer as tokenizer_lib
  path = os.path.join(tmp_root, "tokenizer")
  texts = ["a red circle left of a blue square", "what colour is the shape? red",
           "is there a triangle in the image? no"] * 20
  tokenizer_lib.train_tokenizer(texts, path, vocab_size=300)
  return path


@functools.lru_cache(maxsize=None)
def exported(name: str, tmp_root: str) -> str:
  out = os.path.join(tmp_root, name)
  tok = tokenizer_dir(tmp_root) if name == "dense_llama_clip" else None
  export.export_vlm(case_model(name), out, tokenizer=tok)
  return out


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("export"))


def _params(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v[...]) for k, v in hf.flat_params(model).items()}


def _disk(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  out = {}
  for name in os.listdir(path):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(path, name), "np") as f:
        for k in f.keys():
          t = f.get_slice(k)
          out[k] = (tuple(t.get_shape()), t.get_dtype())
  return out


def _inputs(cfg: VLMConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Two rows of 12 tokens with the image at different offsets; NCHW pixels."""
  rng = np.random.RandomState(seed)
  low = 5 if cfg.image_token_id == 4 else 0
  ids = rng.randint(low, min(cfg.text.vocab_size, 300) - 1, size=(2, 12))
  ids[ids == cfg.image_token_id] = low
  p = cfg.num_image_tokens
  for row in range(2):
    ids[row, 1 + 2 * row:1 + 2 * row + p] = cfg.image_token_id
  size = cfg.vision.image_size
  return ids, rng.randn(2, 3, size, size).astype(np.float32)


@nnx.jit
def _forward(model, ids, pixels):
  return model(ids, pixels, dispatch="dropless")[0]


def _hf_greedy(hf_model, ids: np.ndarray, pixels: np.ndarray, steps: int) -> np.ndarray:
  """Greedy decoding by full recomputation (no cache), like ours."""
  ids = torch.from_numpy(ids)
  with torch.no_grad():
    for _ in range(steps):
      logits = hf_model(input_ids=ids, pixel_values=torch.from_numpy(pixels),
                        use_cache=False).logits
      ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
  return ids[:, -steps:].numpy()


# ---------------------------------------------------- 1. transformers loads it


@pytest.mark.parametrize("name", LLAVA_CASES)
def test_llava_export_matches_transformers(name, tmp_root, tmp_path):
  model = case_model(name)
  cfg = model.cfg
  out = exported(name, tmp_root)
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "llava"
  hf_model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  hf_model.eval()
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  # The files hold exactly what transformers' own save_pretrained writes (names, shapes,
  # dtypes): the on-disk layout, not the in-memory one.
  hf_model.save_pretrained(str(tmp_path / "resaved"))
  assert _disk(out) == _disk(str(tmp_path / "resaved"))

  ids, px = _inputs(cfg, seed=1)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px)).logits
  ours = _forward(model, jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)))
  assert float(np.max(np.abs(np.asarray(ours) - ref.numpy()))) < TOL

  steps = 4
  want = _hf_greedy(hf_model, ids, px, steps)
  got = greedy_generate(model, list(ids), px.transpose(0, 2, 3, 1), pad_id=0, eos_id=-1,
                        max_new_tokens=steps, prompt_length=ids.shape[1])
  np.testing.assert_array_equal(np.asarray(got), want)

  text = hf_model.config.text_config
  if cfg.text.moe is None:
    assert text.model_type == "llama"
    return
  assert text.model_type == "qwen2_moe"
  assert (text.decoder_sparse_step, text.mlp_only_layers) == (1, [1])
  assert (text.shared_expert_intermediate_size, text.norm_topk_prob) == (0, True)
  assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, 24)
  assert text.qkv_bias == cfg.text.qkv_bias
  assert text.tie_word_embeddings == cfg.text.tie_embeddings
  if cfg.text.tie_embeddings:
    assert hf_model.lm_head.weight.data_ptr() == \
        hf_model.model.language_model.embed_tokens.weight.data_ptr()


def test_tokenizer_processor_and_generation_config(tmp_root):
  cfg = case_model("dense_llama_clip").cfg
  out = exported("dense_llama_clip", tmp_root)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  original = transformers.AutoTokenizer.from_pretrained(tokenizer_dir(tmp_root))
  assert tok.get_vocab() == original.get_vocab()
  assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_id
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert gen["eos_token_id"] == original.eos_token_id
  # The processor expands <image> to the model's image tokens and normalises as we do.
  from PIL import Image
  from moe_vlm.data import images as images_lib
  image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (28, 28, 3), np.uint8))
  processor = transformers.AutoProcessor.from_pretrained(out)
  batch = processor(text="<image>\nwhat colour?", images=image, return_tensors="np")
  assert int((batch["input_ids"] == cfg.image_token_id).sum()) == cfg.num_image_tokens
  ours = images_lib.load_and_transform(image, image_size=28, normalization="clip")
  np.testing.assert_allclose(batch["pixel_values"][0].transpose(1, 2, 0), ours, atol=1e-5)


# --------------------------------------------------------- 2. exact round trips


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact(name, tmp_root):
  model = case_model(name)
  out = exported(name, tmp_root)
  layout = "llava" if name in LLAVA_CASES or name == "dense_bf16" else "moe_llava"
  assert json.load(open(os.path.join(out, "config.json")))["model_type"].startswith(
      "llava" if layout == "llava" else "moe_llava_")
  back = export.import_vlm(out)
  assert back.cfg == model.cfg
  want, got = _params(model), _params(back)
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


def test_import_without_our_config_reads_the_hf_config(tmp_root, tmp_path):
  """Without moe_vlm_config.json the architecture still comes back from config.json
  alone; the routing knobs are those of the target (dropless for transformers,
  DeepSpeed's capacity from the `moe` dict for MoE-LLaVA)."""
  for name, dispatch in (("moe_qwen2_siglip_tied", "dropless"), ("moe_phi_clip", "capacity")):
    plain = str(tmp_path / name)
    shutil.copytree(exported(name, tmp_root), plain)
    os.remove(os.path.join(plain, export.CONFIG_FILE))
    cfg = case_model(name).cfg
    back = export.import_vlm(plain)
    assert export._architecture(back.cfg) == export._architecture(cfg)  # pylint: disable=protected-access
    assert back.cfg.text.moe.dispatch == dispatch
    for k, v in _params(case_model(name)).items():
      assert np.array_equal(_params(back)[k], v), k


# ---------------------------------------------------- 3. the moe_llava layout


def test_moe_llava_layout_files(tmp_root):
  model = case_model("moe_phi_clip")
  out = exported("moe_phi_clip", tmp_root)
  config = json.load(open(os.path.join(out, "config.json")))
  tower = os.path.join(out, export.IMAGE_TOWER_DIR)
  assert config["model_type"] == "moe_llava_phi"
  assert config["architectures"] == ["MoELLaVAPhiForCausalLM"]
  assert config["moe"] == dict(
      moe_enable=True, moe_mode="sparse", moe_layers_idx=[0, 2], num_experts=[4, 4],
      ep_size=1, top_k_experts=2, capacity_factor=1.5, eval_capacity_factor=2.0,
      min_capacity=0, use_residual=False, router_aux_loss_coef=0.01,
      train_modules=["fc1", "fc2", "wg"])
  assert config["mm_image_tower"] == os.path.abspath(tower)
  assert (config["mm_hidden_size"], config["mm_vision_select_layer"]) == (32, -2)
  assert (config["mm_vision_select_feature"], config["image_projector_type"]) == \
      ("patch", "mlp2x_gelu")
  assert (config["image_aspect_ratio"], config["mm_use_im_patch_token"]) == ("pad", False)
  assert (config["partial_rotary_factor"], config["hidden_size"]) == (0.5, 32)

  keys = _disk(out)
  d = "model.layers.0.mlp.deepspeed_moe"
  assert keys[f"{d}.gate.wg.weight"][0] == (4, 32)
  assert keys[f"{d}.experts.deepspeed_experts.3.fc1.weight"][0] == (64, 32)
  assert keys[f"{d}.experts.deepspeed_experts.3.fc2.bias"][0] == (32,)
  assert "model.layers.1.mlp.fc1.weight" in keys and "model.layers.3.mlp.fc2.bias" in keys
  assert not any(k.startswith("model.layers.1.mlp.deepspeed_moe") for k in keys)
  assert keys["model.mm_projector.image_spatial_proj.0.weight"][0] == (32, 32)
  assert "model.mm_projector.image_spatial_proj.2.bias" in keys
  assert "lm_head.bias" in keys and "model.final_layernorm.weight" in keys
  # The tower's copy beside the LLM, as the released checkpoints carry it (from-hf reads it
  # when mm_image_tower is not a local directory); this tiny tower is no hub tower, so it
  # is also a directory that mm_image_tower names.
  copy = {k[len("model.image_tower.image_tower."):]: v for k, v in keys.items()
          if k.startswith("model.image_tower.")}
  assert copy == _disk(tower) and all(k.startswith("vision_model.") for k in copy)

  # The tower directory is a plain CLIPVisionModel checkpoint with its processor.
  vision, info = transformers.CLIPVisionModel.from_pretrained(tower, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys")), info
  assert all(k.startswith("vision_model.") for k in _disk(tower))  # transformers 4.x names
  assert transformers.AutoImageProcessor.from_pretrained(tower).crop_size["height"] == 28
  px = np.random.RandomState(3).randn(2, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    ref = vision.eval()(pixel_values=torch.from_numpy(px), output_hidden_states=True)
  ours = model.vision.features(jnp.asarray(px.transpose(0, 2, 3, 1)), -2)
  assert float(np.max(np.abs(np.asarray(ours) - ref.hidden_states[-2].numpy()))) < TOL


# ------------------------------------------------- 4. layout choice, refusals


def test_layout_choice_and_refusals(tmp_path):
  assert export.resolve_layout(CASES["moe_llama_clip"]()) == "llava"
  assert export.resolve_layout(CASES["dense_llama_clip"]()) == "llava"
  assert export.resolve_layout(CASES["moe_phi_clip"]()) == "moe_llava"
  assert export.resolve_layout(CASES["moe_stablelm_siglip"]()) == "moe_llava"
  with pytest.raises(ConfigError, match="Qwen2MoeConfig"):
    hf.vlm_config_to_hf(CASES["moe_phi_clip"]())
  # Phi's lm_head bias has no place in LLaVA: refused unless dropped on purpose.
  phi = _randomize(VLM(_vlm(dataclasses.replace(tiny.PHI, num_layers=1)), rngs=nnx.Rngs(0)), 1)
  with pytest.raises(hf.ConversionError, match="lm_head bias"):
    export.export_vlm(phi, str(tmp_path / "phi"), layout="llava")
  export.export_vlm(phi, str(tmp_path / "phi"), layout="llava", drop_lm_head_bias=True)
  back = export.import_vlm(str(tmp_path / "phi"))
  assert not back.cfg.text.lm_head_bias and back.cfg.text.family == "phi"
  # DeepSpeed has no unnormalised top-2.
  bad = _vlm(dataclasses.replace(tiny.PHI, moe=MoEConfig(renormalize=False)))
  with pytest.raises(ConfigError, match="top-2"):
    export.moe_llava_config(bad, "tower", {})


# ---------------------------------------------------- 5. the convert command


def _run(*args: str) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "moe_vlm", "convert", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_convert_command_end_to_end(tmp_root, tmp_path):
  """A stage-3 workdir of configs/synthetic_tiny.py -> to-hf -> from-hf -> same params."""
  from configs import synthetic_tiny
  from moe_vlm.data import tokenizer as tokenizer_lib
  from moe_vlm.models.params import ParamCodec
  from moe_vlm import checkpoint as ckpt_lib
  from moe_vlm import experiment

  tok = tokenizer_dir(tmp_root)
  # The experiment file, shrunk (both here and on the command line) to keep the test fast.
  overrides = {"data.tokenizer": tok, "model.text.hidden_size": 32,
               "model.text.intermediate_size": 64, "model.text.num_layers": 2,
               "model.vision.hidden_size": 32, "model.vision.intermediate_size": 64,
               "model.vision.num_layers": 2, "model.vision.image_size": 16}
  c = synthetic_tiny.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    functools.reduce(getattr, parents, c)[leaf] = value
  cfg = experiment.stage_model_config(
      c, experiment.model_config(c, tokenizer_lib.load_tokenizer(tok)), 3)
  model = _randomize(VLM(cfg, rngs=nnx.Rngs(0)), seed=5)
  params = ckpt_lib.to_host(ParamCodec(model).flatten(model))
  wd, out, ckpt = (str(tmp_path / n) for n in ("wd", "hf", "ckpt"))
  ckpt_lib.save_params(os.path.join(wd, "stage3", "final"), params)

  stdout = _run("to-hf", f"--workdir={wd}", f"--config={ROOT}/configs/synthetic_tiny.py",
                *[f"--config.{k}={v}" for k, v in overrides.items()], f"--out={out}")
  assert "llava layout" in stdout
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
  assert hf_model.config.text_config.model_type == "qwen2_moe"
  assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>") == \
      cfg.image_token_id

  _run("from-hf", f"--hf={out}", f"--out={ckpt}")
  assert export.load_config(os.path.join(ckpt, export.CONFIG_FILE)) == cfg
  assert os.path.exists(os.path.join(ckpt, "tokenizer", "tokenizer.json"))
  got = ckpt_lib.to_host(experiment.load_params(os.path.join(ckpt, "params"), cfg))
  for k, v in params.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k

  # The library entry points behind the command: a converted checkpoint exports to the
  # same tensors, and so does a workdir whose only config is the config.json of `train`.
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  for source in (dict(ckpt=ckpt), dict(workdir=wd)):
    again = str(tmp_path / f"hf_{next(iter(source))}")
    assert export.to_hf(again, **source) == "llava"
    want, got = hf.load_safetensors(out), hf.load_safetensors(again)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert os.path.exists(os.path.join(again, "tokenizer.json"))

  # Inference straight from the converted checkpoint answers as the workdir does.
  from PIL import Image
  from moe_vlm.infer import load as load_lib
  from moe_vlm.infer.generate import generate, left_pad
  image = str(tmp_path / "img.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), np.uint8)).save(image)
  from_wd = load_lib.load(wd, 3, c)
  from_ckpt = load_lib.load_checkpoint(ckpt, template=from_wd.template)
  assert from_ckpt.cfg == from_wd.cfg
  np.testing.assert_allclose(from_ckpt.image(image), from_wd.image(image), atol=1e-6)
  turn = [{"from": "human", "value": "<image>\nWhat shape is it?"}]
  prompt = from_wd.encode(turn)
  np.testing.assert_array_equal(from_ckpt.encode(turn), prompt)
  ids, mask = left_pad([prompt], from_wd.pad_id, len(prompt))
  answers = [np.asarray(generate(im.model, ids, mask, im.image(image)[None], max_new_tokens=4))
             for im in (from_wd, from_ckpt)]
  np.testing.assert_array_equal(*answers)
  # The chat command on the checkpoint (stdin: one question, then exit).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  chat = subprocess.run([sys.executable, "-m", "moe_vlm", "chat", f"--ckpt={ckpt}",
                         f"--image={image}", "--max_new_tokens=3",
                         f"--template={from_wd.template}"],
                        cwd=ROOT, env=env, input="What shape is it?\nexit\n",
                        capture_output=True, text=True, timeout=300)
  assert chat.returncode == 0, chat.stderr[-3000:]
  assert chat.stdout.count("ASSISTANT:") == 1
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    load_lib.load_checkpoint(wd)
  # A tokenizer that is not the model's is named at load, before any generation.
  from tokenizers import Tokenizer, models
  foreign = str(tmp_path / "foreign_tok")
  vocab = {"<unk>": 0, "</s>": 1, "<image>": 2, "a": 3}
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
      unk_token="<unk>", eos_token="</s>").save_pretrained(foreign)
  assert cfg.image_token_id != 2
  with pytest.raises(load_lib.TokenizerMismatch, match="maps <image> to 2"):
    load_lib.load_checkpoint(ckpt, tokenizer=foreign, template=from_wd.template)


def test_sharded_export_loads_everywhere(tmp_path):
  """Past `max_shard_bytes` the tensors go to shards + an index; re-exporting into the
  same directory leaves no stale shard behind."""
  model = case_model("moe_llama_clip")
  out = str(tmp_path / "sharded")
  export.export_vlm(model, out, max_shard_bytes=20_000)
  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(files) > 2 and "model.safetensors.index.json" in os.listdir(out)
  _, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  back = export.import_vlm(out)
  for k, v in _params(model).items():
    assert np.array_equal(_params(back)[k], v), k
  # A non-empty output directory is kept as it is unless the call says to replace it.
  from moe_vlm.files import OutputExistsError
  with pytest.raises(OutputExistsError, match="--overwrite"):
    export.export_vlm(model, out)
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == files
  export.export_vlm(model, out, overwrite=True)
  assert sorted(f for f in os.listdir(out) if f.startswith("model")) == ["model.safetensors"]
