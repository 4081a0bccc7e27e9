"""The MoE-LLaVA variant configs start from HF checkpoints on disk through the importer."""

import json

import numpy as np
import pytest
import torch
import transformers

from configs import moe_llava
from moe_vlm import experiment
from moe_vlm.convert import hf
from moe_vlm.data import synthetic, tokenizer as tokenizer_lib
from moe_vlm.train import loop


def test_variants_match_the_paper_settings():
  for variant in moe_llava.VARIANTS:
    c = moe_llava.get_config(variant)
    s1, s2, s3 = c.stages.stage1, c.stages.stage2, c.stages.stage3
    assert (s1.train, s1.template, s1.batch_size, s1.learning_rate) == (
        "projector", "plain", 256, 1e-3)
    assert (s2.train, s2.batch_size, s2.learning_rate) == ("projector_llm", 128, 2e-5)
    assert (s3.train, s3.batch_size, s3.learning_rate) == ("moe_layers", 128, 2e-5)
    assert all(s.warmup_ratio == 0.03 and s.weight_decay == 0.0 and s.epochs == 1
               for s in (s1, s2, s3))
    assert len(s2.data.split(",")) == 5
    m = experiment.settings_of(c).moe
    assert (m.num_experts, m.top_k, m.moe_mode, m.capacity_factor, m.eval_capacity_factor,
            m.aux_loss_coef) == (4, 2, "sparse", 1.5, 2.0, 0.01)
    assert c.data.max_length == 2048 and c.model.text.dtype == "bfloat16"
  assert moe_llava.get_config("phi2_siglip").data.normalization == "siglip"
  with pytest.raises(ValueError, match="expected one of"):
    moe_llava.get_config("llama70b")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  torch.manual_seed(0)
  phi = transformers.PhiForCausalLM(transformers.PhiConfig(
      vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4))
  phi.save_pretrained(root / "phi-2")
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=99),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=28, patch_size=14),
      projection_dim=16))
  clip.save_pretrained(root / "clip")
  data = root / "data"
  synthetic.generate(str(data), num_images=40, image_size=28, seed=0)
  tokenizer_lib.train_tokenizer(synthetic.corpus(str(data)), str(data / "tokenizer"))
  return root, phi, clip


def test_phi2_variant_loads_hf_checkpoints_and_trains(checkpoints, tmp_path):
  root, phi, clip = checkpoints
  c = moe_llava.get_config("phi2")
  c.init.update(hf_vision=str(root / "clip"), hf_llm=str(root / "phi-2"))
  c.data.update(dir=str(root / "data"), tokenizer=str(root / "data" / "tokenizer"),
                max_length=128, worker_count=0)
  for k, f in ((1, "stage1.json"), (2, "stage2.json,stage3.json"), (3, "stage3.json")):
    c.stages[f"stage{k}"].update(data=f, batch_size=8, steps=2, epochs=0)
  c.log_every = 1
  c.model.text.attention_causal_blocks = 2  # an execution setting config.json lacks
  exp = experiment.Experiment(c, str(tmp_path))
  cfg = exp.dense_config
  assert cfg.text.family == "phi" and cfg.text.parallel_residual and cfg.text.remat == "full"
  assert cfg.text.attention_causal_blocks == 2
  assert cfg.vision.variant == "clip" and cfg.num_image_tokens == 4
  assert cfg.text.vocab_size == 640
  params = loop.initial_params(exp, exp.mesh())
  want_llm = hf.import_text(phi.state_dict(), phi.config)
  for name, value in hf.flat_params(want_llm).items():
    np.testing.assert_array_equal(params[f"llm.{name}"], np.asarray(value[...]))
  want_vision = clip.vision_model.state_dict()
  np.testing.assert_array_equal(params["vision.pos_embedding"],
                                want_vision["embeddings.position_embedding.weight"].numpy())
  loop.train(c, str(tmp_path), stages=(1, 2))
  assert exp.has_final(1) and exp.has_final(2) and not exp.has_final(3)
  lines = [json.loads(l) for l in open(tmp_path / "stage2" / "metrics.jsonl")]
  assert len(lines) == 2 and all(np.isfinite(l["loss"]) for l in lines)
  # Stage 2 read both files of its comma-separated list. The variant packs its rows
  # (data.packing="first_fit"): 2 steps of 8 rows hold more than 16 samples.
  summary = json.load(open(tmp_path / "stage2" / "bad_samples.json"))
  assert summary["samples"] > 16 and not summary["bad"], summary


def test_image_token_is_added_in_a_spare_embedding_row(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              eos_token="</s>")
  assert experiment.ensure_image_token(fast, vocab_size=8) == 3
  assert fast.convert_tokens_to_ids("<image>") == 3
  with pytest.raises(ValueError, match="embedding rows"):
    fast2 = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    experiment.ensure_image_token(fast2, vocab_size=3)


def test_architecture_fields_beside_a_checkpoint_are_refused(checkpoints, tmp_path):
  root, _, _ = checkpoints
  c = moe_llava.get_config("phi2")
  c.init.update(hf_vision=str(root / "clip"), hf_llm=str(root / "phi-2"))
  c.data.update(dir=str(root / "data"), tokenizer=str(root / "data" / "tokenizer"))
  c.model.text.num_layers = 7  # would be silently ignored: the checkpoint has 2
  with pytest.raises(experiment.ConfigError, match="model.text.num_layers"):
    _ = experiment.Experiment(c, str(tmp_path)).dense_config
