"""Hugging Face model ids resolved from the local hub cache only: loralego never downloads anything.

``owner/name`` (optionally ``@revision``) becomes the cached snapshot folder, exactly the folder
``huggingface_hub.snapshot_download(..., local_files_only=True)`` returns. The cache location is read from
the environment at call time (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default), so a
change of ``HF_HOME`` after import is honoured. A local path of the same spelling always wins.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name as the Hub spells repo ids (letters, digits, '-', '_', '.'), one optional '@revision'.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]{1,200})?$")


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and ".." not in spec and not spec.endswith((".safetensors", ".json", ".bin"))


def cache_dir() -> str | None:
    """The hub cache folder the environment names now, or None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older name of the same setting
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_cached(spec: str) -> Path | None:
    """The cached snapshot folder of model id ``spec`` (``owner/name[@revision]``), or None if it is not a
    model id or not in the local cache (or huggingface_hub is not installed)."""
    if not looks_like_repo_id(spec):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    repo_id, _, revision = spec.partition("@")
    try:
        folder = snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache_dir(), local_files_only=True, repo_type="model"
        )
    except Exception:  # not cached, incomplete, invalid id: all mean "not available offline"
        return None
    path = Path(str(folder))
    return path if path.is_dir() else None


def describe_cache() -> str:
    """Where the lookup looked, for the error message of a path that is neither on disk nor cached."""
    folder = cache_dir()
    if folder is None:
        try:
            from huggingface_hub import constants
        except ImportError:
            return "huggingface_hub is not installed"
        folder = constants.HF_HUB_CACHE
    return f"hub cache {folder}"
