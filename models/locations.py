"""Where a recipe's model name points: a local folder or a Hugging Face hub id, and failing early when it is neither.

Imports neither torch nor transformers, so the recipe schema can check paths at config time.
"""

from __future__ import annotations

import os
from pathlib import Path

_HUB_PROBE_TIMEOUT_S = 5.0


class ModelNotFoundError(FileNotFoundError):
    """A model name is neither a local folder nor a reachable hub model; the message names the recipe key."""


def looks_like_path(value: str) -> bool:
    """Whether a model name can only mean a local folder. Hub ids are `name` or `org/name` and never start with
    `.`, so a value starting with `.`, `/` or `~`, ending in `/`, holding a backslash, or with more than one `/` is
    a path (`runs/x` is ambiguous: a folder when it exists, else a hub id)."""
    return value.startswith((".", "/", "~")) or value.endswith("/") or "\\" in value or value.count("/") > 1


def local_folder(value: str, base_dir: str | os.PathLike[str] | None = None) -> Path:
    """`value` as a folder: `~` expanded, a relative one under `base_dir` (default: the working directory)."""
    return Path(base_dir or os.getcwd()) / Path(value).expanduser()


def check_model_path(key: str, value: str | None, base_dir: str | os.PathLike[str] | None = None) -> None:
    """Refuse a path-like model name (see `looks_like_path`) that is not an existing folder, naming the key, the
    value and the directory a relative one was resolved against (a recipe run from another folder)."""
    if value is None or not looks_like_path(value):
        return
    folder = local_folder(value, base_dir)
    if folder.is_dir():
        return
    what = "is a file, not a model folder" if folder.exists() else "does not exist"
    where = ""
    if not Path(value).expanduser().is_absolute():
        where = f" (a relative path is resolved against the working directory, {base_dir or os.getcwd()})"
    raise ModelNotFoundError(f"{key} = {value!r}: the folder {os.path.abspath(folder)!r} {what}{where}")


def check_hub_model(key: str, repo_id: str) -> None:
    """Fail in one line, within seconds, when the hub id `repo_id` can be neither read from the local hub cache
    nor fetched (offline mode, no network, no such repository), instead of transformers' minute of retries.
    A cached model passes without asking the hub; other hub answers (gated, rate-limited) are left to transformers."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    prefix = f"{key} = {repo_id!r}: no local folder {str(local_folder(repo_id))!r}, so it is a hub id"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{prefix}, and it is not in the hub cache while HF_HUB_OFFLINE is set")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=_HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{prefix}, and the hub has no such model (or it is private)") from None
    except HfHubHTTPError:
        return
    except Exception as error:  # no network, DNS, proxy, timeout: the hub cannot be reached from here
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise ModelNotFoundError(f"{prefix}, the hub cannot be reached ({reason}) and it is not cached") from None
