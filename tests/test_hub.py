"""Loading without network (hub.py): local files only where they suffice, else one short request
and one clear error. Each test runs the loaders in a subprocess whose hub endpoint is a local
socket (HF_ENDPOINT), whose HF_HOME is a temporary folder and whose HF_HUB_OFFLINE is unset, so
that the hub client's own configuration is the one it reads at import.
Run: python -m pytest -q tests/test_hub.py
"""
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import models

ROOT = Path(models.__file__).resolve().parent

# Each case loads a preset and prints one JSON line: seconds, the error (None if it loaded), the
# model class; HF_HUB_OFFLINE is set inside for the cases named "offline ..." (hub.offline reads it
# at every call).
SCRIPT = r"""
import json, os, sys, time
import models
for case, kind, name in json.loads(sys.argv[1]):
    if case.startswith("offline"):
        os.environ["HF_HUB_OFFLINE"] = "1"
    start, error, loaded = time.perf_counter(), None, None
    try:
        loaded = models.load_vlm(name)[0] if kind == "vlm" else models.load_dm(name)["unet"]
    except SystemExit as err:
        error = str(err)
    os.environ.pop("HF_HUB_OFFLINE", None)
    print(json.dumps(dict(case=case, seconds=time.perf_counter() - start, error=error,
                          loaded=type(loaded).__name__)), flush=True)
"""


def serve(answer):
    """A local socket standing in for an unreachable hub: answer="close" reads each request and
    drops the connection unanswered (as a reset one), answer="silent" reads it and never replies
    (a black hole). Returns (endpoint URL, the paths requested so far that ask for a model: the
    hub client's own once-a-day registry of agent harnesses, fetched while it builds its request
    headers, is left out)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    seen, held = [], []

    def loop():
        while True:
            conn, _ = server.accept()
            request = conn.recv(4096).split(b"\r\n")[0]  # b"HEAD /org/name/resolve/... HTTP/1.1"
            path = request.decode(errors="replace")
            if "/api/agent-harnesses" not in path:
                seen.append(path)
            conn.close() if answer == "close" else held.append(conn)
    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", seen


def run_cases(cases, endpoint, home):
    """Run SCRIPT on `cases` in a fresh process (hub endpoint, HF_HOME, no HF_HUB_OFFLINE)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}


def fill_cache(home, hub_id, model, processor):
    """Write (model, processor) into HF_HOME's hub cache as `hf download hub_id` lays it out:
    models--org--name/snapshots/<commit>/ and refs/main naming the commit."""
    repo = Path(home) / "hub" / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    model.save_pretrained(repo / "snapshots" / commit)
    processor.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_unreachable_hub_fails_fast_with_one_request_each(tmp_path):
    """Network unreachable, nothing cached, HF_HUB_OFFLINE unset: each loader makes one request
    and fails in well under 15 s (the hub client's retries took 27 s to over 150 s), with an error
    that names the preset's hub id, the local-folder flag and `hf download`. A preset in the cache
    loads with no request at all; with HF_HUB_OFFLINE=1 nothing is requested either."""
    endpoint, seen = serve("close")
    hub_id = models.PRESETS["qwen2vl"]["hub_id"]
    fill_cache(tmp_path, hub_id, *models.tiny_qwen2vl())
    cases = [("vlm", "vlm", "llama32"), ("dm", "dm", "sd14"), ("cached", "vlm", "qwen2vl"),
             ("offline idefics", "vlm", "idefics")]
    got = run_cases(cases, endpoint, tmp_path)
    # one request for llama32, one for sd14; none for the cached or offline ones
    asked = (("llama32", "config.json"), ("sd14", "unet/config.json"))
    assert sorted(seen) == sorted(f"HEAD /{models.PRESETS[n]['hub_id']}/resolve/main/{f} HTTP/1.1"
                                  for n, f in asked)
    for case, flag in (("vlm", "--model-path"), ("dm", "--dm-path")):
        name = dict((c, n) for c, _, n in cases)[case]
        error = got[case]["error"]
        assert got[case]["seconds"] < 15 and error is not None
        assert models.PRESETS[name]["hub_id"] in error and flag in error and "hf download" in error
        assert "cannot be reached" in error
    cached = got["cached"]
    assert cached["error"] is None and cached["loaded"] == "Qwen2VLForConditionalGeneration"
    assert cached["seconds"] < 15
    offline = got["offline idefics"]
    assert offline["seconds"] < 15 and "HuggingFaceM4/idefics-9b-instruct" in offline["error"]
    assert "hub cache" in offline["error"] and "hf download" in offline["error"]


def test_silent_hub_fails_after_the_probe_timeout(tmp_path):
    """A hub that accepts the connection and never answers: one request, given up after
    hub.PROBE_SECONDS (5 s), not after the client's retries."""
    import hub
    endpoint, seen = serve("silent")
    got = run_cases([("silent", "vlm", "qwen2vl")], endpoint, tmp_path)["silent"]
    assert len(seen) == 1 and got["error"] is not None and "cannot be reached" in got["error"]
    assert hub.PROBE_SECONDS - 0.5 < got["seconds"] < hub.PROBE_SECONDS + 5
