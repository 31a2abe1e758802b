"""Where pretrained weights come from: the Hugging Face hub cache that open_clip and timm
download into, looked up cache first, so a cluster can pre-stage weights and a machine without
network never waits on hub retries. What is cached is loaded with the hub in offline mode;
what is missing is fetched only when the hub answers a short probe; otherwise the error says
which file of which hub repository to put into which cache directory.

lfm_ray.model (open_clip) and lfm_ray.backbones (timm) both build through `cache_first`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from lfm_ray.errors import LfmError
from lfm_ray.safe_load import refused_name

# A `pretrained` value with one of these endings (or a path separator) is a file, not a tag.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith(("~", "."))
            or pretrained.lower().endswith(WEIGHT_SUFFIXES))



@dataclass(frozen=True)
class HubFiles:
    """Files of one hub repository a build needs; each entry lists interchangeable names,
    the one open_clip is configured with first, then the .safetensors twin it prefers when
    the repository has one."""

    repo: str
    needed: tuple[tuple[str, ...], ...]


def hub_cache(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def missing_files(hub: HubFiles, cache_dir: str | None) -> list[tuple[str, ...]]:
    from huggingface_hub import try_to_load_from_cache

    return [names for names in hub.needed
            if not any(isinstance(try_to_load_from_cache(hub.repo, n, cache_dir=cache_dir), str)
                       for n in names)]


def env_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub (or the proxy in front of it) accepts a connection within timeout_s.

    huggingface_hub retries a failed request for about half a minute; this probe, bounded
    as a whole (name lookup included, hence the thread), decides in at most timeout_s."""
    import socket

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode: cached files are served without an etag request.

    The flag is read at call time by huggingface_hub, so flipping the module constant works
    after import (the environment variable would not)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def weights_from_cache_only() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block: weights come from the local cache only, so a report or
    `lfm-ray data` never starts a download (build_clip reads the variable when it runs)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def not_cached(exc: BaseException) -> bool:
    """Whether exc (or what caused it) is the hub saying a file is not in the local cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def load_failure_reason(exc: BaseException) -> str:
    """One line saying why a build failed; torch's own messages for a weights file that is
    not one, holds objects (refused: loading them could run code) or belongs to another
    model are multi-line and give advice that does not apply, so they are summarised."""
    import pickle

    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or message.startswith("Weights only load failed"):
        name = refused_name(message)
        if name is not None:
            return (f"the file names {name}; a weights file holds only tensors, and loading "
                    "anything else could run code, so it is refused")
        return "it is not a PyTorch weights file"
    if "Error(s) in loading state_dict" in message:
        return _state_dict_mismatch(message)
    if isinstance(exc, (KeyError, EOFError)) or "PytorchStreamReader" in message \
            or "invalid load key" in message or "Invalid magic number" in message:
        return f"it is not a PyTorch weights file ({type(exc).__name__}: {message[:80]})"
    text = message.strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _state_dict_mismatch(message: str) -> str:
    """'its tensors do not fit this model: 3 missing (e.g. 'x'), ...' from torch's message."""
    import re

    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, message)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]!r})" if keys else label)
    sizes = re.findall(r"size mismatch for ([^:]+):", message)
    if sizes:
        parts.append(f"{len(sizes)} of another shape (e.g. {sizes[0]!r})")
    detail = ", ".join(parts) or "its keys differ"
    return f"its tensors do not fit this model ({detail}); is it the weights of another model?"


def weights_missing_error(name: str, pretrained: str | None, hub: HubFiles,
                     missing: list[tuple[str, ...]], cache_dir: str | None) -> LfmError:
    """Where open_clip looks for the weights, and the two ways to put them there."""
    cache = hub_cache(cache_dir)
    wanted = " and ".join(names[0] + (f" (or {' or '.join(names[1:])})" if names[1:] else "")
                          for names in missing)
    folder = f"{cache}/models--{hub.repo.replace('/', '--')}/snapshots/<revision>/"
    what = f"the weights of {name}/{pretrained}" if pretrained else f"the files of the model {name}"
    get = " ".join(["hf download", hub.repo, *(names[0] for names in missing)])
    local = ("or pass a local weights file as pretrained (--pretrained /path/to/weights.pt)"
             if pretrained else "or give a local folder holding them as local-dir:/path")
    return LfmError(
        f"{what} are not cached and the Hugging Face hub cannot be reached"
        f"{' (HF_HUB_OFFLINE is set)' if env_offline() else ''}; open_clip looks for "
        f"{wanted} of the hub repository {hub.repo} in the cache {cache} (as {folder}); on a "
        f"machine with network access run `{get} --cache-dir {cache}` and copy that cache "
        f"folder here, {local}"
    )


def cache_first(build: Callable[[], Any], what: str) -> Any:
    """build() with the hub offline; if it lacks a file that is not cached, once more online
    when the hub answers. Other failures are user-facing load errors."""
    try:
        with hub_offline():
            return build()
    except LfmError:
        raise
    except ImportError as exc:
        raise LfmError(f"{what} needs a package that is not installed: {load_failure_reason(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - open_clip raises plain exceptions
        if not not_cached(exc):
            raise LfmError(f"{what} could not be loaded: {load_failure_reason(exc)}") from None
        if env_offline() or not hub_reachable():
            raise LfmError(f"{what} needs files from the Hugging Face hub that are not in "
                           f"its cache, and the hub cannot be reached: {load_failure_reason(exc)}") from None
    try:
        return build()
    except Exception as exc:  # noqa: BLE001
        raise LfmError(f"{what} could not be loaded: {load_failure_reason(exc)}") from None
