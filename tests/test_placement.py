"""Parameters are created, imported and upcycled straight onto their shardings.

On 8 simulated devices with fsdp=8, every parameter after random init, HF import and
upcycling is sharded as its logical axes say: `.sharding` is the declared one and each
device holds only its slice (no whole copy left anywhere), and the values equal the
unsharded computation's.
"""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moe_vlm.convert import hf
from moe_vlm.models.config import MoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement
from moe_vlm.train.upcycle import upcycle, upcycle_params
from tests.tiny import LLAMA, VISION, vlm_config

CFG = vlm_config(dataclasses.replace(LLAMA, vocab_size=128))
MOE = MoEConfig(num_experts=4, top_k=2)


def assert_placed_as_declared(params, cfg, mesh):
  """Each array has the sharding its logical axes give, and no device holds more."""
  codec = placement.abstract_codec(cfg)
  want = mesh_lib.param_shardings(codec.logical_axes, codec.shapes, mesh)
  assert set(params) == set(want)
  split = 0
  for name, x in params.items():
    assert x.sharding.is_equivalent_to(want[name], x.ndim), (name, x.sharding, want[name])
    spec = want[name].spec
    expected = tuple(n // mesh_lib.axis_size(mesh, spec[d] if d < len(spec) else None)
                     for d, n in enumerate(x.shape))
    assert {s.data.shape for s in x.addressable_shards} == {expected}, name
    split += expected != x.shape
  return split


def test_init_creates_every_parameter_on_its_shards():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
  params = placement.init_params(CFG, mesh, seed=3)
  # Every parameter with an `embed` dimension is split 8 ways (most of the model).
  assert assert_placed_as_declared(params, CFG, mesh) > len(params) // 2
  model = VLM(CFG, rngs=nnx.Rngs(3))
  want = ParamCodec(model).flatten(model)
  for name, value in want.items():  # the same model as an unsharded init (to float ulps)
    np.testing.assert_allclose(np.asarray(params[name]), np.asarray(value), rtol=1e-6,
                               atol=1e-7, err_msg=name)
  some = placement.init_params(CFG, mesh, seed=3, names=["projector.linear_1.kernel"])
  assert list(some) == ["projector.linear_1.kernel"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2))
  llm.save_pretrained(root / "llama")
  tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=28, patch_size=14))
  tower.save_pretrained(root / "clip")
  return root, llm, tower


def test_hf_import_reads_each_tensor_onto_its_shards(hf_dirs):
  root, llm, tower = hf_dirs
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
  cfg = dataclasses.replace(CFG, vision=dataclasses.replace(
      VISION, activation=tower.config.hidden_act))
  codec = placement.abstract_codec(cfg)
  shardings = placement.shardings(cfg, mesh)
  params = {**hf.import_pretrained_params(str(root / "llama"), cfg, "llm", codec.shapes,
                                          shardings),
            **hf.import_pretrained_params(str(root / "clip"), cfg, "vision", codec.shapes,
                                          shardings)}
  rest = placement.init_params(cfg, mesh, 0, [n for n in codec.names if n not in params])
  assert assert_placed_as_declared({**params, **rest}, cfg, mesh) > 20
  want = hf.flat_params(hf.import_text(llm.state_dict(), llm.config))
  for name, value in want.items():
    np.testing.assert_array_equal(np.asarray(params[f"llm.{name}"]), np.asarray(value[...]))
  np.testing.assert_array_equal(
      np.asarray(params["vision.pos_embedding"]),
      tower.state_dict()["embeddings.position_embedding.weight"].numpy())


def test_upcycling_runs_onto_the_expert_sharded_layout():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "expert": 4})
  dense = placement.init_params(CFG, mesh, seed=1)
  host = {n: np.asarray(v) for n, v in dense.items()}
  moe_params = upcycle_params(dense, CFG, MOE, seed=5, mesh=mesh)
  moe_cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, moe=MOE))
  assert assert_placed_as_declared(moe_params, moe_cfg, mesh) > 0
  experts = moe_params["llm.layers.0.mlp.experts.wo"]
  assert {s.data.shape[0] for s in experts.addressable_shards} == {1}  # 1 of 4 experts
  # The same parameters as upcycling the model on one device.
  model = upcycle(ParamCodec.abstract(lambda: VLM(CFG, rngs=nnx.Rngs(0))).merge(host), MOE,
                  seed=5)
  for name, value in ParamCodec(model).flatten(model).items():
    np.testing.assert_array_equal(np.asarray(moe_params[name]), np.asarray(value),
                                  err_msg=name)


def test_mesh_reports_the_axes_that_cross_processes():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  assert mesh_lib.axes_across_processes(mesh) == ()  # one process here
  assert mesh_lib.describe(mesh) == ("data=2 fsdp=4 model=1 expert=1 "
                                     "(across processes: none)")
  with pytest.raises(mesh_lib.MeshError, match="process groups"):
    mesh_lib.make_mesh({"data": 2, "fsdp": 4}, dcn={"fsdp": 2})
