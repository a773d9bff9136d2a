"""Workdirs on object storage (`--workdir=gs://bucket/run`, issue 16).

The end-to-end test trains, resumes and reads back a run in a real GCS API served on loopback by
gcp-storage-emulator: every workdir file goes through epath (gcsfs pointed at the emulator by
STORAGE_EMULATOR_HOST), and orbax's arrays through tensorstore's own gcs driver (pointed at it
by TENSORSTORE_GCS_HTTP_URL). No network and no credentials are used.
"""

import importlib.util
import json
import os
import re
import sys
import urllib.parse

import pytest
from conftest import free_port, launch_here

from maskax.training import paths, runs

SMOKE = "--config=experiments/example_regression.py:smoke"
BUCKET = "maskax-test"  # GCS bucket names have 3 characters or more


@pytest.fixture
def no_gcsfs(monkeypatch):
  """gcsfs (and TensorFlow, whose gfile would serve gs:// instead) as if not installed."""
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # find_spec() -> None, import -> ImportError
  monkeypatch.setitem(sys.modules, "tensorflow", None)


def test_a_gs_workdir_without_its_backend_fails_naming_the_package(no_gcsfs, tmp_path):
  with pytest.raises(ValueError) as e:
    runs.check_workdir("gs://bucket/run")
  assert str(e.value) == (
    "--workdir=gs://bucket/run: gs:// workdirs need the gcsfs package (pip install gcsfs)."
  )
  runs.check_workdir(str(tmp_path / "run"))  # a local path needs nothing
  runs.check_workdir("runs/local")


def test_the_launcher_stops_at_start_with_one_line(no_gcsfs, tmp_path):
  proc = launch_here(SMOKE, "--workdir=gs://bucket/run", cwd=tmp_path)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
    "error: --workdir=gs://bucket/run: gs:// workdirs need the gcsfs package (pip install gcsfs)."
  ], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []  # no local folder named `gs:`, nothing written


@pytest.mark.parametrize(
  "url, expected",
  [
    ("s3://bucket/run", "s3:// workdirs are not supported: orbax writes checkpoint arrays"),
    ("az://container/run", "az:// workdirs are not supported"),
    ("ftp://host/run", "unknown scheme ftp:// (workdirs may be local paths or gs://)"),
  ],
)
def test_schemes_that_cannot_hold_a_run_are_refused_at_start(url, expected):
  with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    runs.check_workdir(url)


def test_paths_keep_urls_whole():
  assert paths.absolute("gs://b/run") == "gs://b/run"  # not $PWD/gs:/b/run
  assert paths.absolute("run") == os.path.abspath("run")
  assert paths.scheme("GS://b/x") == "gs" and paths.scheme("/tmp/x") is None
  assert os.fspath(paths.as_path("gs://b/run") / "metrics.jsonl") == "gs://b/run/metrics.jsonl"


def _emulator_missing() -> str | None:
  for module in ("gcsfs", "gcp_storage_emulator"):
    if importlib.util.find_spec(module) is None:
      return f"{module} is not installed (pip install -r requirements-dev.txt)"
  return None


def _object_of(path: str) -> tuple[str, str] | None:
  """`(bucket, object)` a JSON-API request path (and query) names, else None."""
  url = urllib.parse.urlparse(path)
  match = re.fullmatch(r"(?:/storage/v1)?/b/([^/]+)/o/(.+)", url.path)
  if match:
    return match[1], urllib.parse.unquote(match[2])
  name = urllib.parse.parse_qs(url.query).get("name")
  match = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", url.path)
  return (match[1], name[0]) if match and name else None


def _patch_emulator(monkeypatch):
  """What tensorstore needs of GCS and gcp-storage-emulator lacks: generation preconditions
  (`ifGenerationMatch` -> 412, `ifGenerationNotMatch` -> 304; OCDBT commits its manifest with
  them) and the `x-goog-generation` header of a download. Without them tensorstore fails at
  random with "Malformed StorageGeneration" when it revalidates a cached manifest."""
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def generation(storage, bucket, name) -> str:
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"  # GCS's generation of an absent object

  handle = emulator.Router.handle

  def handle_with_preconditions(router, method):
    request = router._request_handler
    target = _object_of(request.path)
    query = urllib.parse.parse_qs(urllib.parse.urlparse(request.path).query)
    if target is not None:
      current = generation(request.storage, *target)
      status = None
      if "ifGenerationMatch" in query and query["ifGenerationMatch"][0] != current:
        status = 412
      elif "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"][0] == current:
        status = 304
      if status is not None:
        request.rfile.read(int(request.headers.get("Content-Length") or 0))
        request.send_response(status)
        request.send_header("Content-Length", "0")
        request.end_headers()
        return
    handle(router, method)

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      bucket, name = request.params["bucket_name"], request.params["object_id"]
      response["x-goog-generation"] = generation(storage, bucket, name)

  monkeypatch.setattr(emulator.Router, "handle", handle_with_preconditions)
  monkeypatch.setattr(objects, "download", download_with_generation)


@pytest.fixture
def gcs(monkeypatch):
  """A GCS API on loopback (in this process) with bucket BUCKET; gcsfs and tensorstore pointed
  at it. Yields `gs://BUCKET`."""
  from gcp_storage_emulator.server import create_server

  _patch_emulator(monkeypatch)
  port = free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  try:
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (and so epath)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's arrays
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "dummy")  # tensorstore: no credentials
    # gcsfs asks the Storage Control gRPC API for the bucket's layout, which the emulator does
    # not serve: each try would wait a minute before falling back to plain GCS.
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # epath and fsspec keep one gcsfs instance per process: a fresh one sees this port.
    import gcsfs
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield f"gs://{BUCKET}"
  finally:
    server.stop()


@pytest.mark.slow
@pytest.mark.skipif(_emulator_missing() is not None, reason=str(_emulator_missing()))
def test_a_run_trains_resumes_and_reads_back_on_gcs(gcs, tmp_path):
  workdir = f"{gcs}/runs/example"
  args = (SMOKE, f"--workdir={workdir}", "--config.train.steps=4")
  first = launch_here(*args, cwd=tmp_path, check=True)
  assert "is not locked" in first.stderr  # the lock's explicit warning for a URL
  second = launch_here(*args[:2], "--config.train.steps=6", cwd=tmp_path, check=True)
  assert "resumed at step 4" in second.stderr, second.stderr[-3000:]
  assert os.listdir(tmp_path) == []  # nothing went to a local folder named `gs:`

  root = paths.as_path(workdir)
  names = {p.name for p in root.iterdir()}
  assert {"config.json", "topology.json", "metrics.jsonl", "final.json", "checkpoints"} <= names
  assert any(n.startswith("events.out.tfevents.") for n in names), names
  assert json.loads((root / "config.json").read_text())["train"]["steps"] == 6
  records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]  # appended across the resume
  assert json.loads((root / "final.json").read_text())["step"] == 6
  steps = sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 6, steps

  # The checkpoint reads back through the same path layer, verified against its checksums.
  from maskax.training import restore

  trained = restore.restore_params(workdir)
  assert trained.step == 6 and trained.config["train"]["steps"] == 6
  # A save killed half-way on GCS leaves a numbered folder without orbax's commit marker: it is
  # not the newest checkpoint, for a restore, a sweep or the resume check alike.
  (root / "checkpoints" / "8" / "state" / "partial").write_text("torn")
  assert paths.committed_steps(f"{workdir}/checkpoints")[-1] == 6
  assert restore.restore_params(workdir).step == 6
  # The report reads and writes the run's files through it too.
  from maskax.ablation import report

  assert report.main([workdir]) == 0
  assert (root / "results.png").read_bytes().startswith(b"\x89PNG")
