"""`moe-vlm <command> --help` lists that command's own flags with their descriptions."""

import os
import subprocess
import sys

import pytest

from moe_vlm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# command -> (flags it must list, a description that must appear with them)
EXPECTED = {
    "train": (["workdir", "stage", "config", "report"], "where checkpoints, logs and reports go"),
    # generate and chat also list the shared inference flags (moe_vlm.commands.infer_flags)
    "generate": (["questions", "answers", "image_folder", "batch_size", "workdir", "ckpt",
                  "max_new_tokens", "temperature"], "JSONL output, one answer a line"),
    "chat": (["image", "workdir", "ckpt", "stage", "temperature", "top_p"],
             "the image to talk about"),
    "eval": (["task", "questions", "out", "workdir", "image_root", "routing"],
             "benchmark kind"),
    "convert": (["out", "layout", "hf", "ckpt", "dtype"], "to-hf: output layout"),
}


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "moe_vlm", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_every_command_has_expectations():
  assert set(EXPECTED) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_lists_the_commands_flags(command):
  names, description = EXPECTED[command]
  proc = _run(command, "--help")
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, out
  for name in names:
    assert f"--{name}:" in out or f"--[no]{name}:" in out, (name, out)
  assert description in out, out
  # the command's own docstring heads the help, not `python -m moe_vlm`'s
  assert f"moe-vlm {command}" in out, out


def test_help_does_not_list_other_commands_flags():
  out = _run("train", "--help").stdout
  assert "--questions" not in out and "--layout" not in out, out


def test_usage_error_lists_the_commands_flags():
  proc = _run("train")
  assert proc.returncode != 0
  assert "train needs --config and --workdir" in proc.stderr
  assert "--workdir:" in proc.stderr and "--stage:" in proc.stderr, proc.stderr


def test_no_command_prints_the_command_list():
  proc = _run()
  assert proc.returncode == 2
  for command in cli.COMMANDS:
    assert command in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.stages.stage1.steps=-5", "stages.stage1.steps=-5: expected >= 0"),
    ("--config.stages.stage2.learning_rate=-0.001",
     "stages.stage2.learning_rate=-0.001: expected > 0"),
])
def test_train_refuses_bad_settings_before_writing_anything(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = _run("train", f"--config={ROOT}/configs/synthetic_tiny.py", f"--workdir={workdir}",
              override)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert not workdir.exists()
