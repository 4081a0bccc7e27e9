"""Files users keep: the streamed safetensors writer and lazy reader, and output
directories that are replaced only when complete and only when asked."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from moe_vlm import files
from moe_vlm.convert import hf, safetensors_io


def tensors():
  rng = np.random.default_rng(0)
  return {"a.weight": rng.normal(size=(7, 5)).astype(np.float32),
          "b.bias": rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
          "c.ids": np.arange(12, dtype=np.int64).reshape(3, 4),
          "d.mask": np.array([True, False, True]),
          "e.empty": np.zeros((0, 4), np.float16)}


def test_streamed_files_read_back_with_the_reference_reader(tmp_path):
  want = tensors()
  names = safetensors_io.write(iter(want.items()), str(tmp_path / "one"), 2**30)
  assert names == ["model.safetensors"]
  got = load_file(str(tmp_path / "one" / "model.safetensors"))  # the safetensors package
  lazy = safetensors_io.read(str(tmp_path / "one" / "model.safetensors"))
  for name, value in want.items():
    assert got[name].dtype == value.dtype and lazy[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value)
    np.testing.assert_array_equal(lazy[name], value)
  assert not [f for f in os.listdir(tmp_path / "one") if f.startswith(".")]  # no scratch


def test_shards_and_index_past_the_size_limit(tmp_path):
  want = tensors()
  out = str(tmp_path / "sharded")
  names = safetensors_io.write(want, out, max_shard_bytes=100)
  assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
  index = json.load(open(os.path.join(out, safetensors_io.INDEX_FILE)))
  assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(names)
  got = hf.load_safetensors(out)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value)


def test_a_truncated_file_is_named(tmp_path):
  out = str(tmp_path / "ckpt")
  safetensors_io.write(tensors(), out, 2**30)
  path = os.path.join(out, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-40])
  with pytest.raises(hf.ConversionError, match=r"model.safetensors: tensor .* \(truncated"):
    hf.load_safetensors(out)
  open(path, "wb").write(data[:5])
  with pytest.raises(hf.ConversionError, match="model.safetensors: not a valid safetensors"):
    hf.load_safetensors(out)


def test_output_dir_keeps_a_users_files_unless_asked(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "mine.txt").write_text("keep me")
  with pytest.raises(files.OutputExistsError, match="--overwrite"):
    with files.output_dir(str(out)) as tmp:
      pass
  assert (out / "mine.txt").read_text() == "keep me"
  # A failure half-way leaves the old directory as it was, and no partial one.
  with pytest.raises(RuntimeError):
    with files.output_dir(str(out), overwrite=True) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").write("half")
      raise RuntimeError("killed")
  assert os.listdir(out) == ["mine.txt"] and not os.path.exists(f"{out}.partial")
  with files.output_dir(str(out), overwrite=True) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("whole")
  assert os.listdir(out) == ["new.txt"]


def test_a_training_workdir_is_never_an_output(tmp_path):
  (tmp_path / "stage1").mkdir()
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(files.OutputExistsError, match="training workdir"):
    files.check_output_dir(str(tmp_path), overwrite=True)
