"""Hub model references in pool configs: ``hf://<org>/<name>`` or ``hf://<org>/<name>@<revision>`` as a
pool's ``base:`` or a task's ``expert:``, turned into local directories before the pool loads.

With the hub off (``HF_HUB_OFFLINE``, on unless the user exports ``HF_HUB_OFFLINE=0``: train.py)
a reference is only looked up in the local Hugging Face cache (``snapshot_download(local_files_only=True)``).
With the hub on, every reference is first asked of the hub (does the repo, and its revision, exist?) and
only then downloaded (``snapshot_download``), so a wrong name in the last expert is reported before the
first model is downloaded; a hub that cannot be reached falls back to the cache. Every problem is one
``PoolError`` that names the pool key, the repo and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PoolError

PREFIX = "hf://"
# weights of other frameworks, which a PyTorch pool never reads: not downloaded
IGNORE_PATTERNS = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.mlmodel", "*.gguf", "onnx/*",
                   "openvino/*", "coreml/*", "flax_model*", "tf_model*", "rust_model*"]

log = logging.getLogger("adamerge")


@dataclass
class HubRef:
    """One ``hf://`` reference of a pool: where it is written (``pool.base``, ``pool.tasks.<t>.expert``)."""

    key: str
    repo_id: str
    revision: str | None = None
    commit: str | None = None  # the hub's commit for ``revision`` when it was asked (hub on and reachable)
    path: str | None = None  # the local snapshot directory, once resolved

    @property
    def text(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")

    def fix(self) -> str:
        return f"or set {self.key} to a local copy (a save_pretrained directory)"


def is_hub_ref(value) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse(key: str, value: str) -> HubRef:
    """The repo id and revision of ``hf://<org>/<name>[@<revision>]``; a PoolError naming ``key`` otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = value[len(PREFIX):].partition("@")
    try:
        if at and not revision:
            raise HFValidationError("no revision after '@'")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PoolError(f"{key}: {value!r} is not a hub model reference ({e}); write hf://<org>/<name> or "
                        "hf://<org>/<name>@<revision>") from e
    return HubRef(key, repo_id, revision or None)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises when the hub cannot be reached (HfHubHTTPError is an OSError)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):  # the HTTP client of the installed huggingface_hub
        try:
            errors.append(__import__(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _cached(ref: HubRef) -> str | None:
    """The snapshot directory of ``ref`` in the local HF cache, or None (a partial snapshot: a PoolError)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True,
                                 ignore_patterns=IGNORE_PATTERNS)
    except IncompleteSnapshotError as e:
        raise PoolError(f"{ref.key}: hub model {ref.text} is only partly in the local Hugging Face cache "
                        f"({_one_line(e.__cause__ or e, 120)}); complete the download with a hub connection "
                        f"(HF_HUB_OFFLINE=0), {ref.fix()}") from e
    except LocalEntryNotFoundError:
        return None


def _ask_hub(ref: HubRef) -> None:
    """Set ``ref.commit`` from the hub; a PoolError when the repo or revision does not exist (or is not
    ours to read). Network errors propagate: the caller falls back to the cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError as e:
        raise PoolError(f"{ref.key}: hub model {ref.text} is gated: accept its terms on the hub and log in "
                        f"(hf auth login, or HF_TOKEN), {ref.fix()}") from e
    except RepositoryNotFoundError as e:
        raise PoolError(f"{ref.key}: hub model {ref.repo_id} does not exist on the hub (or is private: log in "
                        f"with hf auth login, or set HF_TOKEN); fix the name, {ref.fix()}") from e
    except RevisionNotFoundError as e:
        raise PoolError(f"{ref.key}: hub model {ref.repo_id} has no revision {ref.revision!r}; fix the "
                        f"revision after '@', {ref.fix()}") from e
    ref.commit = info.sha


def resolve(values: dict[str, object], before_download: Callable[[], None] | None = None) -> dict[str, HubRef]:
    """``{pool key: value}`` → ``{pool key: HubRef with its local path}`` for the ``hf://`` values among them.

    All references are checked before any is downloaded; the first problem is raised as one PoolError
    (naming the other references that have one too). ``before_download`` runs once all are found and
    before the first download (the pool's cheap checks: a typo there should not cost a download)."""
    refs = [parse(k, v) for k, v in values.items() if is_hub_ref(v)]
    if not refs:
        return {}
    from huggingface_hub import constants

    offline = constants.is_offline_mode()
    cache = constants.HF_HUB_CACHE
    unreachable: BaseException | None = None  # the hub's first network error: later refs use the cache only
    problems: list[PoolError] = []
    for ref in refs:
        try:
            if not offline and unreachable is None:
                try:
                    _ask_hub(ref)
                    continue
                except _network_errors() as e:  # not a PoolError (a ValueError): the hub is out of reach
                    unreachable = e
            ref.path = _cached(ref)
            if ref.path is not None:
                continue
            if offline:
                raise PoolError(f"{ref.key}: hub model {ref.text} is not in the local Hugging Face cache ({cache}) "
                                "and the hub is off (HF_HUB_OFFLINE=1, adamerge's default); export "
                                f"HF_HUB_OFFLINE=0 with a hub connection to download it, {ref.fix()}")
            raise PoolError(f"{ref.key}: hub model {ref.text} cannot be downloaded: the hub cannot be reached "
                            f"({_one_line(unreachable)}) and the model is not in the local Hugging Face cache "
                            f"({cache}); check the connection (proxy, HF_ENDPOINT), {ref.fix()}")
        except PoolError as e:
            problems.append(e)
    if problems:
        more = problems[1:]
        also = (f" ({len(more)} more hub reference{'s' if len(more) > 1 else ''} of this pool fail"
                f"{'' if len(more) > 1 else 's'} too: {', '.join(str(p).split(':', 1)[0] for p in more)})"
                if more else "")
        raise PoolError(f"{problems[0]}{also}") from problems[0].__cause__
    pending = [r for r in refs if r.path is None]  # found on the hub: download (or find in the cache)
    if pending and before_download is not None:
        before_download()
    for ref in pending:
        ref.path = _download(ref)
    return {r.key: r for r in refs}


def _download(ref: HubRef) -> str:
    from huggingface_hub import snapshot_download

    log.info("%s: %s (commit %s) from the hub into the local cache", ref.key, ref.text, ref.commit)
    try:
        # the revision as written (not the commit): the cache then records refs/<revision> (main), which a
        # later run with the hub off looks up
        return snapshot_download(ref.repo_id, revision=ref.revision, ignore_patterns=IGNORE_PATTERNS)
    except _network_errors() as e:
        raise PoolError(f"{ref.key}: downloading hub model {ref.text} failed ({_one_line(e)}); run again to "
                        f"resume the download, {ref.fix()}") from e


def describe(ref: HubRef) -> str:
    """How an export's model card names a hub model: the reference and the commit it resolved to."""
    return f"{ref.text} (commit {Path(ref.path).name})" if ref.path else ref.text


def check_push_target(repo_id: str) -> None:
    """``export.push_to_hub=<org/name>``: a ConfigError before any work when the name is not a repo id, the hub
    is off, or it cannot be reached or does not know this user (a token is needed to upload)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..errors import ConfigError

    where = f"export.push_to_hub={repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{where}: not a hub repo id ({e}); write <org>/<name>") from e
    if constants.is_offline_mode():
        raise ConfigError(f"{where}: the hub is off (HF_HUB_OFFLINE=1, adamerge's default); export HF_HUB_OFFLINE=0 "
                          "with a hub connection and a token (hf auth login), or drop the key")
    try:
        HfApi().whoami()
    except _network_errors() as e:
        raise ConfigError(f"{where}: cannot upload: {_one_line(e)}; check the hub connection and log in "
                          "(hf auth login, or HF_TOKEN), or drop the key") from e


def push_export(repo_id: str, export_dir: str) -> str:
    """Upload the export directory to the model repo ``repo_id`` (created if missing); the repo's URL."""
    from huggingface_hub import HfApi, constants

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=export_dir, repo_type="model", commit_message="adamerge export")
    return f"{constants.ENDPOINT}/{repo_id}"
