"""One config schema: the experiment blocks are derived from the dataclasses, so every
field can be set on the command line, and a wrong name, type or value is named before
anything runs."""

import dataclasses
import os

import pytest
from configs import moe_llava, synthetic_tiny, variants
from moe_vlm import schema
from moe_vlm.models.config import ConfigError, LoRAMoEConfig, MoEConfig, TextConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_PARSE = """
import dataclasses, json, sys
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "", lock_config=True)

def main(_):
  from moe_vlm import schema
  print(json.dumps(dataclasses.asdict(schema.parse(flags.FLAGS.config))))

app.run(main)
"""


def parse_flags(*argv, config="configs/synthetic_tiny.py"):
  """The settings `moe-vlm train --config CONFIG ARGV` would train with (the same absl /
  ml_collections flag parsing, in a fresh interpreter)."""
  import json
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _PARSE, f"--config={os.path.join(ROOT, config)}",
                        *argv], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def names(cls, without=()):
  return {f.name for f in dataclasses.fields(cls)} - set(without)


@pytest.mark.parametrize("c", [synthetic_tiny.get_config(), moe_llava.get_config("qwen"),
                               *[variants.get_config(v) for v in variants.VARIANTS]])
def test_shipped_configs_carry_every_field_and_parse(c):
  assert set(c.moe) == names(MoEConfig)
  assert set(c.model.text) == names(TextConfig, ("moe", "lora_moe"))
  for k in (1, 2, 3):
    assert set(c.stages[f"stage{k}"]) == names(schema.StageSettings)
  assert set(c) == names(schema.ExperimentConfig)
  parsed = schema.parse(c)
  if parsed.lora_moe is not None:
    assert set(c.lora_moe) == names(LoRAMoEConfig)


def test_any_field_can_be_set_on_the_command_line():
  s = parse_flags("--config.moe.ep_impl=shard_map", "--config.moe.group_size=4",
                  "--config.moe.moe_layers_idx=(0, 2)", "--config.mesh.dcn.fsdp=2",
                  "--config.model.text.head_dim=32", "--config.stages.stage3.grad_accum=2")
  assert s["moe"]["ep_impl"] == "shard_map" and s["moe"]["group_size"] == 4
  assert s["moe"]["moe_layers_idx"] == [0, 2] and s["mesh"]["dcn"]["fsdp"] == 2
  assert s["model"]["text"]["head_dim"] == 32 and s["stages"]["stage3"]["grad_accum"] == 2


def test_a_misspelt_field_is_refused_by_the_command_line():
  with pytest.raises(RuntimeError, match="topk"):
    parse_flags("--config.moe.topk=2")


@pytest.mark.parametrize("field, value, message", [
    ("moe.dispatch", "dropped", "moe.dispatch='dropped': expected one of 'capacity', 'dropless'"),
    ("moe.top_k", "2", "moe.top_k='2': expected an integer"),
    ("stages.stage1.steps", -5, "stages.stage1.steps=-5: expected >= 0"),
    ("stages.stage2.learning_rate", -1e-3, "stages.stage2.learning_rate=-0.001: expected > 0"),
    ("stages.stage3.batch_size", 0, "stages.stage3.batch_size=0: expected >= 1"),
    ("stages.stage1.warmup_ratio", 1.5, "stages.stage1.warmup_ratio=1.5: expected 0..1"),
    ("stages.stage2.template", "vicuna", "stages.stage2.template='vicuna'"),
    ("data.max_bad_fraction", 2.0, "data.max_bad_fraction=2.0: expected 0..1"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps=0: expected >= 1"),
    ("log_every", 0, "log_every=0: expected >= 1"),
])
def test_bad_values_are_named(field, value, message):
  import json
  # As a config.json (or any plain data) would carry them: the ConfigDict itself
  # already refuses a value of another type than its field's.
  c = json.loads(synthetic_tiny.get_config().to_json_best_effort())
  *parents, leaf = field.split(".")
  block = c
  for p in parents:
    block = block[p]
  block[leaf] = value
  with pytest.raises(ConfigError) as e:
    schema.parse(c)
  assert message in str(e.value)


def test_unknown_fields_and_zero_length_stages_are_named():
  c = synthetic_tiny.get_config()
  c.moe.unlock()
  c.moe.topk = 2
  with pytest.raises(ConfigError, match=r"moe: unknown fields \['topk'\]"):
    schema.parse(c)
  c = synthetic_tiny.get_config()
  c.stages.stage2.update(steps=0, epochs=0)
  with pytest.raises(ConfigError, match="stages.stage2: steps=0 and epochs=0"):
    schema.parse(c)
  c = synthetic_tiny.get_config()
  c.stages.stage2.update(batch_size=32, grad_accum=3)
  with pytest.raises(ConfigError, match="not divisible by stages.stage2.grad_accum=3"):
    schema.parse(c)


def test_config_json_reads_back_as_the_same_settings():
  import json
  import ml_collections
  for c in (synthetic_tiny.get_config(), variants.get_config("awaker"),
            variants.get_config("perceiver")):
    again = ml_collections.ConfigDict(json.loads(c.to_json_best_effort()))
    assert schema.parse(again) == schema.parse(c)
