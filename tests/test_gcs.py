"""gs:// workdirs against a local GCS emulator (no network, no credentials).

Every layer that touches a `gs://` workdir is pointed at an in-process emulator
(`gcp-storage-emulator`, JSON API over HTTP on localhost):
- etils.epath -> fsspec -> gcsfs (directories, JSON files, metrics.jsonl, Orbax metadata):
  `STORAGE_EMULATOR_HOST`;
- Orbax array data -> tensorstore's `gcs` kvstore: `TENSORSTORE_GCS_HTTP_URL` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a dummy bearer token, no credential lookup);
- tensorboardX event files -> google-cloud-storage: `STORAGE_EMULATOR_HOST`.
The emulator lacks two pieces of GCS that tensorstore's OCDBT manifest updates rely on
(object generations on reads, `ifGenerationMatch` / `ifGenerationNotMatch`
preconditions); `_with_generations` adds them. What no emulator shows: IAM (permission
errors), real latency and throughput; see README "Running on TPU".
"""

import gc
import json
import logging
import os
import struct
from http import HTTPStatus

import numpy as np
import pytest

# gcsfs's experimental zonal/HNS layer asks the Storage Control API (gRPC, real Google
# endpoints, credentials) for every bucket's layout; the emulator has no such API.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
_WHY = "gs:// tests need the dev extras: pip install gcp-storage-emulator gcsfs google-cloud-storage"
emulator_server = pytest.importorskip("gcp_storage_emulator.server", reason=_WHY)
pytest.importorskip("gcsfs", reason=_WHY)
gcs_storage = pytest.importorskip("google.cloud.storage", reason=_WHY)

import jax  # noqa: E402
import portpicker  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gcp_storage_emulator.exceptions import NotFound  # noqa: E402
from gcp_storage_emulator.handlers import objects as emulator_objects  # noqa: E402

from configs import synthetic_tiny  # noqa: E402
from moe_vlm.parallel import mesh as mesh_lib  # noqa: E402
from moe_vlm import checkpoint as ckpt_lib  # noqa: E402
from moe_vlm.train import loop  # noqa: E402

BUCKET = "moe-vlm-test"


def _with_generations(handlers):
  """Wraps the emulator's object handlers with GCS's generation semantics: downloads
  carry `x-goog-generation` (tensorstore reads an object's generation from it, and
  rejects the conditional write that follows without it) and honour the preconditions;
  uploads honour `ifGenerationMatch` (0: the object must not exist). Returns an undo."""
  get, download, insert = (emulator_objects.get, emulator_objects.download,
                           emulator_objects.insert)

  def generation(storage, bucket, name):
    try:
      return storage.get_file_obj(bucket, name)["generation"]
    except NotFound:
      return None

  def failed(request, gen, *, reads):
    match = request.query.get("ifGenerationMatch")
    if match and (gen or "0") != match[0]:
      return HTTPStatus.PRECONDITION_FAILED
    not_match = request.query.get("ifGenerationNotMatch")
    if reads and not_match and gen is not None and gen == not_match[0]:
      return HTTPStatus.NOT_MODIFIED
    return None

  def checked_download(request, response, storage, *args, **kwargs):
    gen = generation(storage, request.params["bucket_name"], request.params["object_id"])
    status = failed(request, gen, reads=True)
    if status:
      response.status = status
      return None
    if gen is not None:
      response["x-goog-generation"] = gen
    return download(request, response, storage, *args, **kwargs)

  def checked_get(request, response, storage, *args, **kwargs):
    if request.query.get("alt", [""])[0] == "media":
      return checked_download(request, response, storage, *args, **kwargs)
    return get(request, response, storage, *args, **kwargs)

  def checked_insert(request, response, storage, *args, **kwargs):
    kind = request.query.get("uploadType", [""])[0]
    name = (request.query["name"][0] if kind == "media" and "name" in request.query else
            request.data["meta"].get("name") if kind == "multipart" else None)
    if name is not None:
      status = failed(request, generation(storage, request.params["bucket_name"], name),
                      reads=False)
      if status:
        response.status = status
        return None
    return insert(request, response, storage, *args, **kwargs)

  swaps = {get: checked_get, download: checked_download, insert: checked_insert}
  changed = []
  for _, by_method in handlers:
    for method, fn in list(by_method.items()):
      if fn in swaps:
        by_method[method] = swaps[fn]
        changed.append((by_method, method, fn))

  def undo():
    for by_method, method, fn in changed:
      by_method[method] = fn
  return undo


@pytest.fixture(scope="module")
def gcs():
  """A running emulator with one bucket; the env points every GCS client at it."""
  port = portpicker.pick_unused_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=BUCKET)
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are normal
  undo = _with_generations(emulator_server.HANDLERS)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
             GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token")
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  client = gcs_storage.Client()  # anonymous, on the emulator (STORAGE_EMULATOR_HOST)
  try:
    yield client
  finally:
    # tensorboardX keeps every SummaryWriter alive in an atexit hook, and its GCS writer
    # uploads the whole event file once more when collected at exit, after this server
    # is gone (two minutes of retries). The loop closed them (uploaded) already.
    from tensorboardX import record_writer
    for obj in gc.get_objects():
      if type(obj) is record_writer.GCSRecordWriter:  # noqa: E721  (no torch lazy attrs)
        obj.flush = lambda: None
    server.stop()
    undo()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def blobs(client, prefix):
  """Object names under gs://BUCKET/prefix as the server holds them (not via gcsfs)."""
  return sorted(b.name[len(prefix):] for b in client.list_blobs(BUCKET, prefix=prefix))


def read_json(client, name):
  return json.loads(client.bucket(BUCKET).blob(name).download_as_bytes())


def event_scalars(data: bytes) -> dict[str, dict[int, float]]:
  """tag -> {step: value} from a TFRecord file of tensorboard Event protos."""
  from tensorboardX.proto import event_pb2
  out, pos = {}, 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4  # length, its crc, the record, its crc
    for v in event.summary.value:
      out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_train_state_checkpoints_keep_n_and_reshard_on_gcs(gcs):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  state = {"w": put(np.arange(32.0, dtype=np.float32).reshape(8, 4), P("fsdp", None)),
           "step": put(np.int32(0), P())}
  ckpts = ckpt_lib.StageCheckpoints(f"gs://{BUCKET}/unit/checkpoints", keep=2,
                                    async_save=True)
  for step in (1, 2, 3):
    ckpts.save(step, jax.tree.map(lambda x: x * step, state), {"data_iter": {"pos": step}})
  ckpts.wait()
  assert ckpts.latest_step() == 3
  steps = {n.split("/")[0] for n in blobs(gcs, "unit/checkpoints/")}
  assert steps == {"2", "3"}  # keep=2 deleted step 1 on the bucket
  # Restore onto another layout (rows over data, not fsdp): Orbax reshards on read.
  target = {"w": NamedSharding(mesh, P("data", None)), "step": NamedSharding(mesh, P())}
  restored, extras = ckpts.restore(state, target)
  ckpts.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), 3 * np.asarray(state["w"]))
  assert restored["w"].sharding.spec == P("data", None) and int(restored["step"]) == 0
  assert extras == {"data_iter": {"pos": 3}}

  params = {"llm.a": np.arange(6, dtype=np.float32).reshape(2, 3), "llm.b": np.ones(4, np.int32)}
  final = f"gs://{BUCKET}/unit/final"
  assert not ckpt_lib.has_params(final)
  ckpt_lib.save_params(final, params)
  assert ckpt_lib.has_params(final) and "_METADATA" in blobs(gcs, "unit/final/")
  back = ckpt_lib.load_params(final, params)
  for k, v in params.items():
    np.testing.assert_array_equal(back[k], v)


def tiny_config(data_dir):
  c = synthetic_tiny.get_config()
  c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
  c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1)
  # The data set and tokenizer stay on local disk (what launch/setup.sh --sync does).
  c.data.update(dir=data_dir, num_images=40, max_length=64)
  c.vision_pretrain.steps = 0
  c.stages.stage1.update(steps=4, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
  c.mesh.update(data=2, fsdp=2, expert=2)
  c.checkpoint.update(every_steps=2, keep=2, async_save=True)
  c.log_every = 1
  return c


def test_training_run_logs_checkpoints_and_resumes_on_gcs(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land here
  c = tiny_config(str(tmp_path / "data"))
  workdir = f"gs://{BUCKET}/run"
  # Killed after step 3: the step-2 checkpoint (state, data position, counters) is on GCS.
  loop.train(c, workdir, stages=(1,), stop_after=3)
  assert {n.split("/")[0] for n in blobs(gcs, "run/stage1/checkpoints/")} == {"2"}
  metrics = gcs.bucket(BUCKET).blob("run/stage1/metrics.jsonl")
  killed = [json.loads(l) for l in metrics.download_as_text().splitlines()]
  assert [l["step"] for l in killed] == [1, 2, 3]
  exp = loop.train(c, workdir, stages=(1,))  # resumes from gs://.../checkpoints/2
  final = {k: np.asarray(v) for k, v in exp.load_params(1).items()}

  assert not os.path.exists(tmp_path / "gs:")
  lines = [json.loads(l) for l in
           gcs.bucket(BUCKET).blob("run/stage1/metrics.jsonl").download_as_text().splitlines()]
  # Step 3 was lost in the kill and redone: its line is replaced, not repeated.
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  # Same state and same batch after the restore: the redone step has the same loss.
  np.testing.assert_allclose(lines[2]["loss"], killed[2]["loss"], rtol=1e-5)
  assert read_json(gcs, "run/stage1/bad_samples.json")["samples"] == 4 * 8  # counters restored
  assert read_json(gcs, "run/config.json")["stages"]["stage1"]["steps"] == 4
  assert {n.split("/")[0] for n in blobs(gcs, "run/stage1/checkpoints/")} == {"2", "4"}

  # TensorBoard events (two runs, two files) carry the same losses as metrics.jsonl.
  events = [n for n in blobs(gcs, "run/stage1/tb/") if "tfevents" in n]
  assert len(events) == 2
  logged = {}
  for name in events:
    data = gcs.bucket(BUCKET).blob("run/stage1/tb/" + name).download_as_bytes()
    for step, value in event_scalars(data).get("loss", {}).items():
      logged.setdefault(step, []).append(value)
  assert sorted(logged) == [1, 2, 3, 4]
  for l in lines:
    assert any(np.isclose(v, l["loss"], rtol=1e-6) for v in logged[l["step"]]), l

  # The stage's final parameters: a finished stage is skipped and its params come back
  # from the bucket, equal to what the run ended with.
  assert "_METADATA" in blobs(gcs, "run/stage1/final/")
  again = loop.train(c, workdir, stages=(1,)).load_params(1, exp.mesh())
  assert set(again) == set(final)
  for k, v in final.items():
    np.testing.assert_array_equal(np.asarray(again[k]), v)
