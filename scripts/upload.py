"""Push a fine-tuning run or a checkpoint directory to the Hugging Face Hub.

    python scripts/upload.py --folder out/lora/my-run --repo_id my-org/smollm2-tasks-lora --dry_run true
    python scripts/upload.py --folder out/lora/my-run --repo_id my-org/smollm2-tasks-lora --private true

The repo is created if it does not exist, then the folder goes up in one commit. Resumable checkpoints (`step-*/`,
`training_state.pt`) and unfinished saves (`.step-*.tmp/`) stay behind unless `--include_checkpoints true`: a run
shares as its hparams.yaml, metrics.csv and final/. `--dry_run true` lists the files and sizes that would go up and
contacts no one. Needs a token with write access: `--token`, $HF_TOKEN or `huggingface-cli login`.
"""

import os
import sys
from pathlib import Path
from typing import Optional

from model.cli import run_cli

# fnmatch patterns on paths relative to --folder ("*" also matches "/"). Unfinished saves never go up; resumable
# checkpoints only on request.
ALWAYS_IGNORED = [".step-*.tmp/*", "*/.step-*.tmp/*"]
CHECKPOINT_PATTERNS = ["step-*/*", "*/step-*/*", "training_state.pt", "*/training_state.pt"]


def ignore_patterns(include_checkpoints: bool) -> list[str]:
    return ALWAYS_IGNORED + ([] if include_checkpoints else CHECKPOINT_PATTERNS)


def files_to_upload(folder: Path, include_checkpoints: bool) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of each file `upload_folder` will send, selected exactly as it
    selects them: the same patterns, plus the Hub client's own ignores (.git, its cache)."""
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    patterns = ignore_patterns(include_checkpoints) + DEFAULT_IGNORE_PATTERNS
    return [(name, files[name].stat().st_size) for name in filter_repo_objects(files, ignore_patterns=patterns)]


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

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(token=token or os.getenv("HF_TOKEN"))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder, repo_id=repo_id, ignore_patterns=ignore_patterns(include_checkpoints),
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
