"""The vision tower's pre-training: the stand-in for CLIP's, run before stage 1.

MoE-LLaVA starts from a pretrained CLIP (or SigLIP) tower and keeps it frozen through
the three stages. A randomly initialised tower, frozen, gives the stages little to read,
so with `vision_pretrain.steps > 0` (on by default only in configs/synthetic_tiny.py)
the trainer first teaches the tower to see: it captions the training images (the
`plain` template: image tokens, then the caption) through a throwaway decoder, the
LLM's architecture with `vision_pretrain.decoder_layers` layers behind a fresh
`mlp2x_gelu` projector, every parameter trained. Captioning is a pre-training objective
for vision encoders on a par with CLIP's contrastive one (CapPa, Tschannen et al. 2023),
and it needs nothing beyond the VLM and trainer we have. Stage 1 then takes only the
tower (`vision.*`); the decoder and projector are dropped.

It runs as "stage 0" of the trainer (`loop.run_stage`), so it is checkpointed, resumed
and logged like a stage, in `<workdir>/vision_pretrain/` (checkpoints/, final/, tb/,
metrics.jsonl), and the tower alone is saved to `vision_pretrain/tower/`. A finished
pre-training (tower/ present) is reused on a rerun. With
pretrained towers (`init.hf_vision`, `init.hf_llava`: configs/moe_llava.py) it is off,
and the schema refuses to turn it on.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

from moe_vlm import checkpoint as ckpt_lib
from moe_vlm.experiment import PRETRAIN, Experiment
from moe_vlm.models.params import Params
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.parallel import placement

log = logging.getLogger("moe_vlm")

TOWER = "vision."


def check(exp: Experiment, mesh: jax.sharding.Mesh) -> None:
  """The pre-training's settings against the mesh and data, before anything trains.
  Raises loop.StageSettingsError naming the `vision_pretrain` field."""
  from moe_vlm.data import synthetic
  from moe_vlm.train import loop
  s, settings = exp.settings.vision_pretrain, exp.settings
  try:
    ways = mesh_lib.axis_size(mesh, mesh_lib.BATCH_AXES)
    if s.batch_size % ways or s.batch_size % jax.process_count():
      raise mesh_lib.MeshError(
          f"vision_pretrain.batch_size={s.batch_size} is not divisible by data x fsdp x "
          f"expert = {ways} and the {jax.process_count()} processes")
    cfg = exp.model_config(PRETRAIN)
    mesh_lib.check_model_fits_mesh(cfg, mesh, s.batch_size)
    placement.shardings(cfg, mesh)
    loop.step_config(settings.moe, s.stage(), 1).head_capacity(settings.data.max_length)
    if settings.data.kind == "synthetic" and s.data not in synthetic.MIXES:
      raise ValueError(f"vision_pretrain.data={s.data!r}: with data.kind='synthetic' it "
                       f"is one of the mixes {synthetic.MIXES} (captions)")
    if settings.data.kind == "llava_json":
      missing = [p for p in loop.stage_files(s.data, exp.data_dir) if not os.path.exists(p)]
      if missing:
        raise FileNotFoundError(f"vision_pretrain.data: {missing} not found "
                                f"(data.dir={exp.data_dir})")
  except (ValueError, FileNotFoundError) as e:
    raise loop.StageSettingsError(f"vision pre-training: {e}") from e


def tower_dir(exp: Experiment) -> str:
  """`<workdir>/vision_pretrain/tower`: the pretrained tower's parameters alone (what
  stage 1 reads; unlike final/, it does not depend on the decoder's architecture)."""
  return os.path.join(exp.stage_dir(PRETRAIN), "tower")


def run(exp: Experiment, mesh: jax.sharding.Mesh, *, stop_after: Optional[int] = None) -> bool:
  """Pre-trains the tower, or reuses a finished pre-training (its `tower/`); returns
  False when `stop_after` ended it early."""
  from moe_vlm.train import loop
  if ckpt_lib.has_params(tower_dir(exp)):
    log.info("vision pre-training already finished (%s); reusing its tower", tower_dir(exp))
    return True
  cfg = exp.model_config(PRETRAIN)
  params = loop.run_stage(PRETRAIN, exp, mesh,
                          lambda: placement.init_params(cfg, mesh, exp.settings.seed),
                          stop_after=stop_after)
  if params is None:
    return False
  ckpt_lib.save_params(tower_dir(exp), {n: v for n, v in params.items()
                                        if n.startswith(TOWER)})
  return True


def tower(exp: Experiment, mesh: jax.sharding.Mesh) -> Params:
  """The pretrained tower's parameters (`vision.*`) from `vision_pretrain/tower`, each
  restored onto its sharding in the stage model."""
  directory = tower_dir(exp)
  if not ckpt_lib.has_params(directory):
    raise FileNotFoundError(f"{directory} holds no parameters: the vision pre-training "
                            "(vision_pretrain.steps > 0) has not finished")
  codec = placement.abstract_codec(exp.dense_config)
  shardings = placement.shardings(exp.dense_config, mesh)
  names = [n for n in codec.names if n.startswith(TOWER)]
  return ckpt_lib.load_params(directory, {n: codec.shapes[n] for n in names},
                              {n: shardings[n] for n in names})
