"""`moe-vlm convert to-hf | from-hf`: our checkpoints <-> PyTorch checkpoint directories.

  moe-vlm convert to-hf --workdir DIR [--config CFG] [--stage 3] --out OUT_DIR
      [--layout auto|llava|moe_llava] [--dtype bfloat16] [--tokenizer DIR]
  moe-vlm convert to-hf --ckpt CKPT_DIR --out OUT_DIR        (a from-hf output)
  moe-vlm convert from-hf --hf DIR --out CKPT_DIR [--image_token_id N] [--image_tower DIR]

to-hf reads `<workdir>/stage<k>/final`; the model config is rebuilt as training built it,
from the experiment config (`--config`, else the `config.json` that `train` wrote into
the workdir) and its tokenizer, or read from a VLMConfig JSON (`--vlm_config`).
from-hf writes CKPT_DIR/params (flat params, Orbax), CKPT_DIR/moe_vlm_config.json and
CKPT_DIR/tokenizer/. A released MoE-LLaVA directory converts as it is, offline: the
vision tower from the weights' own copy, the image on a reserved embedding row (its
tokenizer has no `<image>`), the tokenizer files kept (moe_vlm/convert/released.py).
Layouts and files: moe_vlm/convert/export.py.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "to-hf: experiment config (default: "
                                "<workdir>/config.json)", lock_config=True)
flags.DEFINE_string("workdir", None, "to-hf: the training workdir")
flags.DEFINE_integer("stage", 3, "to-hf: which stage's final parameters")
flags.DEFINE_string("ckpt", None, "to-hf: a from-hf output directory instead of a workdir")
flags.DEFINE_string("vlm_config", None, "to-hf: a VLMConfig JSON instead of the experiment "
                    "config")
flags.DEFINE_string("tokenizer", None, "to-hf: tokenizer directory (default: the experiment's)")
flags.DEFINE_enum("layout", "auto", ["auto", "llava", "moe_llava", "qwen2_vl"],
                  "to-hf: output layout")
flags.DEFINE_string("dtype", None, "to-hf: cast the weights (bfloat16, float16, float32; "
                    "default: as they are, or as the source directory had them); from-hf: "
                    "the parameters' dtype (default float32)")
flags.DEFINE_string("normalization", None, "to-hf: image mean/std set (clip, siglip)")
flags.DEFINE_string("mm_image_tower", None, "to-hf, moe_llava: the vision tower name written "
                    "to config.json (default: the source's, else the hub name of a known "
                    "tower, else <out>/image_tower, absolute)")
flags.DEFINE_integer("image_token_id", None, "from-hf: the embedding row that stands for the "
                     "image in prompts, for checkpoints whose tokenizer has no <image> "
                     "(default: <image>'s id, else the row after the tokenizer's last id)")
flags.DEFINE_string("image_tower", None, "from-hf, MoE-LLaVA: a local vision tower directory "
                    "(default: mm_image_tower if it is a local directory, else the copy of the "
                    "tower in the weights)")
flags.DEFINE_bool("drop_lm_head_bias", False, "to-hf, llava: drop a non-zero lm_head bias")
flags.DEFINE_string("hf", None, "from-hf: the directory to import")
flags.DEFINE_string("out", None, "output directory (written under a temporary name, "
                    "renamed when complete)")
flags.DEFINE_bool("overwrite", False, "replace --out if it exists and is not empty")


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("to-hf", "from-hf"):
    raise app.UsageError("usage: moe-vlm convert to-hf|from-hf [flags]")
  if not FLAGS.out:
    raise app.UsageError("convert needs --out")
  from moe_vlm.commands.common import start
  start()
  from moe_vlm.convert import export
  if argv[1] == "from-hf":
    if not FLAGS.hf:
      raise app.UsageError("from-hf needs --hf DIR")
    export.from_hf(FLAGS.hf, FLAGS.out, dtype=FLAGS.dtype or "float32",
                   image_token_id=FLAGS.image_token_id, image_tower=FLAGS.image_tower,
                   overwrite=FLAGS.overwrite)
    _say(f"wrote {FLAGS.out}/params and {FLAGS.out}/{export.CONFIG_FILE}")
    return
  if not (FLAGS.workdir or FLAGS.ckpt):
    raise app.UsageError("to-hf needs --workdir (or --ckpt)")
  layout = export.to_hf(FLAGS.out, workdir=FLAGS.workdir, stage=FLAGS.stage,
                        config=FLAGS.config, vlm_config=FLAGS.vlm_config, ckpt=FLAGS.ckpt,
                        tokenizer=FLAGS.tokenizer, normalization=FLAGS.normalization,
                        layout=FLAGS.layout, dtype=FLAGS.dtype,
                        mm_image_tower=FLAGS.mm_image_tower,
                        drop_lm_head_bias=FLAGS.drop_lm_head_bias, overwrite=FLAGS.overwrite)
  _say(f"wrote {FLAGS.out} ({layout} layout)")


def _say(text: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(text)
