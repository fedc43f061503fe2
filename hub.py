"""Where a preset's weights are read from, without waiting on a network that is not there (not
in the paper).

models.load_vlm and models.load_dm (and so extract.py, train.py, evaluate.py, runs.py) ask
weights_source first. With a local folder (--model-path, --dm-path), with HF_HUB_OFFLINE=1, or
with the weights already in the hub cache, the loaders read local files only. Otherwise one
request with a short timeout (PROBE_SECONDS, no retries) asks the hub for the preset's first
file; when it fails, one error says what to do (the preset, the hub id, the local-folder flag,
the `hf download` command) instead of the hub client's retries (32 s to more than 150 s).

    python -c "import hub; print(hub.offline())"   # True under HF_HUB_OFFLINE=1
    python -c "import hub; print(hub.cached('Qwen/Qwen2-VL-7B-Instruct', 'config.json'))"
"""
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

# seconds the one request to the hub may take (connect and answer) before loading gives up
PROBE_SECONDS = 5


def offline():
    """True when HF_HUB_OFFLINE is set to a true value ("1", "ON", "YES", "TRUE"), as the hub
    client reads it; read at every call, so a process may set it after import."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def cached(hub_id, marker):
    """True when `marker` (a file of the repo, e.g. config.json) is in the local hub cache."""
    return isinstance(huggingface_hub.try_to_load_from_cache(hub_id, marker), str)


def how_to_get(flag, name, hub_id, folder_flag):
    """The advice of every loading error: the hub id, how to pre-download it, the folder flag."""
    return (f"{flag} {name} is {hub_id} on the Hugging Face hub. On a machine with network access "
            f"run `hf download {hub_id} --local-dir DIR` (gated models: `hf auth login` first), "
            f"then pass {folder_flag} DIR; or fill the hub cache (the same command without "
            f"--local-dir, with HF_HOME set as here) and run with HF_HUB_OFFLINE=1")


def weights_source(flag, name, hub_id, path, marker="config.json", folder_flag="--model-path"):
    """(source, local_files_only) for a preset's loader: `path` when given (local files only);
    else the hub id, local files only when HF_HUB_OFFLINE=1 or `marker` is cached. Otherwise one
    request of at most PROBE_SECONDS for `marker`; a failure raises SystemExit naming the preset
    (`flag` `name`), the hub id, `folder_flag` and `hf download`.

    path: a local folder (--model-path, --dm-path, a run's model/), refused when it is not one."""
    if path is not None:
        if not Path(path).is_dir():
            advice = how_to_get(flag, name, hub_id, folder_flag)
            raise SystemExit(f"{flag} {name}: {folder_flag} {path!r} is not a folder; give the "
                             f"folder that save_pretrained wrote. {advice}")
        return path, True
    if offline() or cached(hub_id, marker):
        return hub_id, True
    advice = how_to_get(flag, name, hub_id, folder_flag)
    try:
        url = huggingface_hub.hf_hub_url(hub_id, marker)
        huggingface_hub.get_hf_file_metadata(url, timeout=PROBE_SECONDS)
    except GatedRepoError:
        raise SystemExit(f"{flag} {name}: {hub_id} is gated: accept its licence on the hub page, "
                         f"log in (`hf auth login`) and retry. {advice}") from None
    except HfHubHTTPError as err:
        answer = str(err).splitlines()[0]
        raise SystemExit(f"{flag} {name}: the hub answered {answer!r} for {hub_id}. "
                         f"{advice}") from None
    except Exception as err:  # noqa: BLE001 -- refused, reset, DNS failure, timeout, proxy
        endpoint = huggingface_hub.constants.ENDPOINT
        raise SystemExit(f"{flag} {name}: the hub ({endpoint}) cannot be reached "
                         f"({type(err).__name__}: {str(err)[:120]}) and {hub_id} is not in the "
                         f"local cache. {advice}") from None
    return hub_id, False


def load_error(flag, name, source, err, hub_id, folder_flag="--model-path"):
    """The SystemExit of a loader that failed on `source` (a folder, or a hub id read through the
    cache): what it read, the loader's error, what to do."""
    if Path(str(source)).is_dir():
        where = f"folder {source!r}"
    else:
        where = f"{source} (hub cache {huggingface_hub.constants.HF_HUB_CACHE})"
    if hub_id:
        advice = how_to_get(flag, name, hub_id, folder_flag)
    else:
        advice = f"pass {folder_flag} DIR (a save_pretrained folder)"
    first_line = str(err).splitlines()[0][:200]
    return SystemExit(f"could not load {flag} {name} from {where} ({type(err).__name__}: "
                      f"{first_line}). {advice}")
