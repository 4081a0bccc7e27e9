"""Flags shared by the inference commands (`generate`, `chat`): which trained model
(a training workdir, or a converted checkpoint), and how to decode. Defined once here so both command modules can be imported together."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file the workdir was trained with (default: "
    "the workdir's config.json)", lock_config=True)
flags.DEFINE_string("workdir", None, "training workdir holding stage<k>/final")
flags.DEFINE_integer("stage", 3, "which stage's final parameters to load (1, 2 or 3)")
flags.DEFINE_string("ckpt", None, "instead of --workdir: a converted checkpoint directory "
                    "(`moe-vlm convert from-hf` output)")
flags.DEFINE_string("template", None, "--ckpt: conversation template (default: MoE-LLaVA's "
                    "for the LLM family, else the tokenizer's chat template)")
flags.DEFINE_string("tokenizer", None, "--ckpt: tokenizer directory (default: <ckpt>/tokenizer)")
flags.DEFINE_string("mesh", None, "generate on a device mesh, e.g. 'data=-1' or "
                    "'data=2,model=4' (axes data, fsdp, model, expert)")
flags.DEFINE_integer("max_new_tokens", 128, "most tokens generated per answer")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise the sampling temperature")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (with temperature > 0)")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling")


def load_model():
  """The InferenceModel named by --workdir/--stage/--config or --ckpt, placed on --mesh."""
  if (FLAGS.workdir is None) == (FLAGS.ckpt is None):
    raise app.UsageError("give exactly one of --workdir (a training workdir) and --ckpt (a "
                         "converted checkpoint)")
  from moe_vlm.commands.common import start
  start()
  from moe_vlm.infer import load
  # The parameters are restored straight onto the mesh (default: one device; several
  # processes: the training mesh, or FSDP over all devices for a converted checkpoint).
  mesh = device_mesh()
  if FLAGS.ckpt:
    return load.load_checkpoint(FLAGS.ckpt, template=FLAGS.template,
                                tokenizer=FLAGS.tokenizer, mesh=mesh)
  return load.load(FLAGS.workdir, FLAGS.stage, FLAGS.config, mesh=mesh)


def device_mesh():
  """--mesh as a Mesh, or None."""
  if not FLAGS.mesh:
    return None
  from moe_vlm.parallel import mesh as mesh_lib
  try:
    shape = {k.strip(): int(v) for k, v in (part.split("=") for part in FLAGS.mesh.split(","))}
  except ValueError:
    raise app.UsageError(f"--mesh={FLAGS.mesh!r}: expected axis=size pairs separated by "
                         "commas, e.g. 'data=2,model=4'") from None
  return mesh_lib.make_mesh(shape)


def model_name() -> str:
  """Default model_id of answer files: <workdir>/stage<k>, or the checkpoint's name."""
  import os
  if FLAGS.ckpt:
    return os.path.basename(os.path.abspath(FLAGS.ckpt))
  return f"{os.path.basename(os.path.abspath(FLAGS.workdir))}/stage{FLAGS.stage}"


def generation_config(im):
  """Decoding settings from the flags, stopping on the model's stop tokens."""
  from moe_vlm.infer.generate import GenerationConfig
  return GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, eos_ids=im.stop_ids,
                          temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                          pad_id=im.pad_id)
