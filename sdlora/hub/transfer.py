"""Share a run on the Hugging Face Hub: push it as one commit, push checkpoints in the background, pull adapters.

All traffic goes through huggingface_hub (`HfApi.create_repo`, `create_commit`, `hf_hub_download`), so the token
is whatever huggingface_hub finds (`hf auth login` or `HF_TOKEN`); sdlora never reads, prints or stores it. A push
reads the run folder and writes nothing to it: the card is built in memory with the repo id in its snippets, and the
config it uploads is a copy with local paths cut to their final names.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import sdlora
from sdlora.config import dump_config
from sdlora.config.names import RepoIdError, check_repo_id, is_repo_id
from sdlora.errors import UserError
from sdlora.hub import card
from sdlora.training.folder import RunFolder

log = logging.getLogger(__name__)

PREFERRED_ADAPTER = "pytorch_lora_weights.safetensors"


class HubError(UserError, RuntimeError):
    """A push or pull that failed; the message names the repo, what failed and what to do."""


def _check_repo_id(repo_id: str) -> str:
    try:
        return check_repo_id(repo_id)
    except RepoIdError as exc:
        raise HubError(str(exc)) from None


def _api(endpoint: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx; both transports' errors are network errors
        import httpx2 as transport
    except ImportError:
        import httpx as transport
    return (HfHubHTTPError, OfflineModeIsEnabled, transport.HTTPError, OSError)


def _reason(exc: BaseException) -> str:
    # First line only: huggingface_hub appends request ids and server bodies that help no one here.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Push


@dataclass
class UploadPlan:
    """Exactly what one push commits: (path in repo, local file) pairs plus the texts built in memory."""

    repo_id: str
    run_dir: Path
    files: list[tuple[str, Path]]
    card_text: str
    config_text: str
    name: str  # output.name of the run, for the commit message

    @property
    def texts(self) -> dict[str, str]:
        folder = RunFolder(self.run_dir)
        return {folder.card.name: self.card_text, folder.config.name: self.config_text}

    @property
    def paths(self) -> list[str]:
        return sorted([*self.texts, *(path for path, _ in self.files)])

    def describe(self) -> str:
        sizes = {path: local.stat().st_size for path, local in self.files}
        sizes.update({path: len(text.encode("utf-8")) for path, text in self.texts.items()})
        lines = [f"{self.repo_id}: {len(sizes)} files in one commit"]
        lines += [f"  {path}  ({sizes[path]:,} bytes)" for path in self.paths]
        return "\n".join(lines)


def plan_upload(run_dir: str | Path, repo_id: str) -> UploadPlan:
    """Adapter file(s) and samples as they are in the run folder; README.md freshly built; config.yaml as a copy
    with every local path cut to its final name (the run folder's own copy keeps full paths for resuming)."""
    run_dir = Path(run_dir)
    _check_repo_id(repo_id)
    facts = card.gather(run_dir)
    text = str(card.card_for(facts, repo_id=repo_id))
    files = [(p.name, p) for p in card.adapter_files(run_dir)]
    files += [(p.relative_to(run_dir).as_posix(), p) for p in card.sample_files(run_dir)]
    return UploadPlan(repo_id, run_dir, files, text, dump_config(facts.config, public=True), facts.config.output.name)


def _commit(api, repo_id: str, private: bool, operations: list, message: str) -> str:
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except _network_errors() as exc:
        raise HubError(
            f"push to {repo_id}: cannot create or reach the repository at {api.endpoint} ({_reason(exc)}). "
            "Check the repo id and your login (hf auth login, or HF_TOKEN)"
        ) from None
    try:
        info = api.create_commit(repo_id, operations=operations, commit_message=message)
    except _network_errors() as exc:
        raise HubError(
            f"push to {repo_id}: the upload failed ({_reason(exc)}); nothing was committed and the local files are "
            "unchanged. Run the same command again to retry"
        ) from None
    return str(info.commit_url)


def push(run_dir: str | Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Create the repo if needed and upload the run in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    plan = plan_upload(run_dir, repo_id)
    operations = [CommitOperationAdd(path, text.encode("utf-8")) for path, text in plan.texts.items()]
    operations += [CommitOperationAdd(path, str(local)) for path, local in plan.files]
    url = _commit(_api(endpoint), repo_id, private, operations, f"Upload {plan.name} LoRA (sdlora)")
    log.info("pushed %d files to %s", len(plan.paths), repo_id)
    return url


def push_folder(folder: Path, repo_id: str, path_in_repo: str, private: bool = False,
                endpoint: str | None = None) -> str:
    """Upload every file of `folder` under `path_in_repo` in one commit (checkpoints)."""
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(f"{path_in_repo}/{p.relative_to(folder).as_posix()}", str(p)) for p in files]
    return _commit(_api(endpoint), repo_id, private, operations, f"Upload {path_in_repo} (sdlora)")


class CheckpointPusher:
    """Uploads checkpoints from a worker thread so the training loop never waits on the network.

    `submit` hard-links the checkpoint's files into a private staging folder (checkpoint rotation may delete the
    original while it uploads) and returns at once. At most `max_pending` uploads wait; beyond that a checkpoint is
    skipped with a warning rather than letting the queue, or the loop, grow. Failures are logged, never raised.
    """

    def __init__(self, run_dir: Path, repo_id: str, private: bool = False, endpoint: str | None = None,
                 max_pending: int = 2):
        self.run_dir, self.repo_id, self.private, self.endpoint = Path(run_dir), _check_repo_id(repo_id), private, endpoint
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.pushed: list[str] = []
        self.failed: list[str] = []
        self._thread = threading.Thread(target=self._work, name="sdlora-hub-push", daemon=True)
        self._thread.start()

    def _stage(self, folder: Path) -> Path:
        staging = Path(tempfile.mkdtemp(prefix=".sdlora-push-", dir=self.run_dir.parent))
        for source in sorted(p for p in folder.rglob("*") if p.is_file()):
            target = staging / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.hardlink_to(source)
            except OSError:
                shutil.copy2(source, target)
        return staging

    def submit(self, checkpoint: Path) -> bool:
        """Queue a checkpoint folder for upload; False when the queue is full and it was skipped."""
        if self._queue.full():
            log.warning("hub: upload queue full, %s is not pushed (the next checkpoint will be)", checkpoint.name)
            return False
        staging = self._stage(Path(checkpoint))
        self._queue.put_nowait(("folder", staging, f"checkpoints/{Path(checkpoint).name}"))
        return True

    def submit_run(self) -> None:
        """Queue the finished run (adapter, card, samples, config), after any pending checkpoints."""
        self._queue.put(("run", self.run_dir, None), timeout=60)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            kind, path, path_in_repo = job
            label = path_in_repo or "the finished run"
            try:
                if kind == "run":
                    push(path, self.repo_id, self.private, self.endpoint)
                else:
                    push_folder(path, self.repo_id, path_in_repo, self.private, self.endpoint)
                self.pushed.append(label)
                log.info("hub: pushed %s to %s", label, self.repo_id)
            except Exception as exc:  # a failed upload must never take the training run down with it
                self.failed.append(label)
                log.warning("hub: %s not pushed: %s", label, exc)
            finally:
                if kind == "folder":
                    shutil.rmtree(path, ignore_errors=True)
                self._queue.task_done()

    def close(self, timeout: float = 600.0) -> bool:
        """Wait (at most `timeout` s) for queued uploads; True when all finished."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        if not done:
            log.warning("hub: uploads still running after %.0f s; run `%s` to finish",
                        timeout, sdlora.command_line("push", str(self.run_dir), self.repo_id))
        return done


# ---------------------------------------------------------------------------------------------------------------
# Pull


def parse_hub_source(source: str) -> tuple[str, str | None] | None:
    """`user/repo` or `user/repo:file.safetensors` -> (repo_id, filename); None when it is not a hub reference."""
    repo_id, sep, filename = source.partition(":")
    if not is_repo_id(repo_id) or (sep and not filename):
        return None
    if not sep and repo_id.endswith(".safetensors"):
        return None  # `folder/file.safetensors` is a local path that does not exist, not a repo
    return repo_id, filename or None


def _choose_adapter(api, repo_id: str) -> str:
    try:
        files = [f.path for f in api.list_repo_tree(repo_id) if getattr(f, "size", None) is not None]
    except _network_errors() as exc:
        raise HubError(f"--lora {repo_id}: cannot list the repository at {api.endpoint} ({_reason(exc)})") from None
    adapters = sorted((f for f in files if f.endswith(".safetensors")), key=lambda name: (len(name), name))
    if not adapters:
        raise HubError(f"--lora {repo_id}: the repository has no top-level .safetensors file")
    choice = PREFERRED_ADAPTER if PREFERRED_ADAPTER in adapters else adapters[0]
    if len(adapters) > 1:
        log.info("%s holds %s; using %s (name one with %s:FILE)", repo_id, ", ".join(adapters), choice, repo_id)
    return choice


def resolve_adapter(source: str, endpoint: str | None = None, revision: str | None = None) -> str:
    """A local adapter path for `source`: an existing local path as is, else a hub file downloaded into the
    normal huggingface_hub cache (a second call reuses it)."""
    if Path(source).exists():
        return source
    parsed = parse_hub_source(source)
    if parsed is None:
        return source  # not a hub reference: the reader reports the missing file
    from huggingface_hub import hf_hub_download

    repo_id, filename = parsed
    filename = filename or _choose_adapter(_api(endpoint), repo_id)
    try:
        return hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint)
    except _network_errors() as exc:
        raise HubError(f"--lora {source}: cannot download {filename} from {repo_id} ({_reason(exc)})") from None
