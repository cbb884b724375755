"""Push a fine-tuning run or a checkpoint directory to the Hugging Face Hub.

    python scripts/upload.py --folder out/lora/my-run --repo_id my-org/smollm2-tasks-lora --dry_run true
    python scripts/upload.py --folder out/lora/my-run --repo_id my-org/smollm2-tasks-lora --private true

The repo is created if it does not exist, then the folder goes up in one commit. What does not belong to the model
never goes: dotfiles and dot-directories (.env, .git, unfinished saves `.step-*.tmp/`), temporary files (*.tmp),
symlinks that lead out of the folder, and partial checkpoints. Resumable checkpoints (`step-*/`, `training_state.pt`)
stay behind unless `--include_checkpoints true`: a run shares as its hparams.yaml, metrics.csv and final/. `--dry_run true` lists the files and sizes that would go up and
contacts no one. Needs a token with write access: `--token`, $HF_TOKEN or `huggingface-cli login`.
"""

import os
import sys
from pathlib import Path
from typing import Optional

from model.cli import run_cli

# Resumable checkpoints: only on request, and only complete ones (a step-*/ without its training_state.pt is a
# partial copy).
CHECKPOINT_PARTS = ("training_state.pt",)


def _skipped(name: str, include_checkpoints: bool, complete_steps: set[str]) -> bool:
    """Whether the file `name` (relative to the folder) stays behind: dotfiles and dot-directories (.env, .git,
    .cache, unfinished saves .step-*.tmp/, the run's lock), temporary files, and checkpoints unless asked for."""
    parts = name.split("/")
    if any(part.startswith(".") for part in parts) or parts[-1].endswith((".tmp", ".part", ".incomplete", "~")):
        return True
    step = next((part for part in parts[:-1] if part.startswith("step-")), None)
    if step is not None:
        return not include_checkpoints or "/".join(parts[:parts.index(step) + 1]) not in complete_steps
    return parts[-1] in CHECKPOINT_PARTS and not include_checkpoints


def files_to_upload(folder: Path, include_checkpoints: bool) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of each file that belongs to the model, exactly what is sent: no
    dotfiles, temporary files or partial checkpoints, and no symlink that leads out of the folder."""
    root = folder.resolve()
    found: dict[str, Path] = {}
    for directory, subdirs, names in os.walk(folder):  # does not descend into symlinked directories
        subdirs.sort()
        for name in sorted(names):
            path = Path(directory) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                continue
            if path.is_file():
                found[path.relative_to(folder).as_posix()] = path
    complete_steps = {name.rsplit("/", 1)[0] for name in found
                      if name.endswith("/training_state.pt") and name.rsplit("/", 2)[-2].startswith("step-")}
    return [(name, path.stat().st_size) for name, path in sorted(found.items())
            if not _skipped(name, include_checkpoints, complete_steps)]


def upload(
    folder: Path,
    repo_id: str,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    include_checkpoints: bool = False,
    dry_run: bool = False,
) -> None:
    """Upload `folder` to the model repo `repo_id`, creating the repo if needed.

    Args:
        folder: A run's output directory (or its final/), or a checkpoint directory.
        repo_id: "ORG/NAME" (or "USER/NAME") of the model repo on the Hub.
        private: Create the repo as private (an existing repo keeps its visibility).
        token: A Hugging Face token with write access (default: $HF_TOKEN, else the one saved by
            `huggingface-cli login`).
        commit_message: The commit's message (default: "Upload <folder name> with Forge").
        include_checkpoints: Also upload the resumable step-*/ checkpoints and training_state.pt files.
        dry_run: List the files that would be uploaded, with their sizes, and upload nothing.
    """
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--folder {folder} is not a directory: pass a run's --out_dir or a checkpoint directory")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo_id must look like ORG/NAME, got {repo_id!r}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"--repo_id {repo_id!r} is not a valid Hub repo id: {e}") from None
    files = files_to_upload(folder, include_checkpoints)
    if not files:
        raise ValueError(f"{folder} has no files to upload (checkpoints are skipped: --include_checkpoints true)")
    total = sum(size for _, size in files)
    for name, size in files:
        print(f"{_size(size):>10}  {name}")
    print(f"{_size(total):>10}  in {len(files)} files", file=sys.stderr)
    if dry_run:
        print(f"Dry run: nothing was uploaded to {repo_id}", file=sys.stderr)
        return

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(token=token or os.getenv("HF_TOKEN"))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # exactly the listed files, one commit
        commit = api.create_commit(
            repo_id=repo_id, repo_type="model",
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name, _ in files],
            commit_message=commit_message or f"Upload {folder.resolve().name} with Forge",
        )
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id} does not exist and could not be created with this token") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise ValueError(
                f"The Hub refused the upload to {repo_id} (HTTP {status}): pass a token with write access to it"
                " (--token, HF_TOKEN or `huggingface-cli login`)."
            ) from None
        raise ValueError(f"The Hub rejected the upload to {repo_id}: {e}") from None
    except Exception as e:  # network errors come from several libraries (httpx, requests, huggingface_hub)
        raise ValueError(
            f"Could not reach the Hugging Face Hub to upload to {repo_id} ({type(e).__name__}: {e}). Nothing was"
            " uploaded; check the connection (and that HF_HUB_OFFLINE is not set), then run the command again."
        ) from None
    print(f"Uploaded {len(files)} files ({_size(total)}) to {commit.commit_url}", file=sys.stderr)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


if __name__ == "__main__":
    run_cli(upload)
