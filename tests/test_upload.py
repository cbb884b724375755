import os
import subprocess
import sys

import pytest
from conftest import ROOT, load_script
from huggingface_hub import CommitInfo

from model.cli import run_cli

upload = load_script("scripts/upload.py")

SHARED = ["final/hparams.yaml", "final/lora.safetensors", "hparams.yaml", "metrics.csv", "tensorboard/events.out"]
CHECKPOINTS = ["step-000002/hparams.yaml", "step-000002/lora.safetensors", "step-000002/training_state.pt"]


@pytest.fixture
def run_dir(tmp_path):
    """A finished LoRA run as finetune/lora.py leaves it, plus an unfinished save and a stray .git."""
    files = {name: 100 + 7 * i for i, name in enumerate(SHARED + CHECKPOINTS)}
    files.update({".step-000004.tmp/training_state.pt": 50, ".git/config": 10})
    files["final/lora.safetensors"] = 3 * 2**20 + 12345
    run = tmp_path / "run"
    for name, size in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"x" * size)
    return run


class NoHub:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a dry run must not contact the Hub")


def listed(stdout: str) -> list[tuple[str, str]]:
    """(size, path) per line of the dry run's listing."""
    return [tuple(line.strip().rsplit("  ", 1)) for line in stdout.splitlines()]


@pytest.mark.parametrize("include_checkpoints", [False, True])
def test_dry_run_lists_exactly_the_files_that_would_go_up(run_dir, include_checkpoints, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    upload.upload(run_dir, "me/run", include_checkpoints=include_checkpoints, dry_run=True)
    out, err = capsys.readouterr()
    expected = SHARED + (CHECKPOINTS if include_checkpoints else [])
    assert [name for _, name in listed(out)] == sorted(expected)
    sizes = {name: size for size, name in listed(out)}
    assert sizes["final/lora.safetensors"] == "3.0 MB"
    assert sizes["hparams.yaml"] == f"{(run_dir / 'hparams.yaml').stat().st_size} B"
    assert f"in {len(expected)} files" in err and "nothing was uploaded" in err


def test_dry_run_leaves_out_dotfiles_temp_files_partial_checkpoints_and_outside_symlinks(run_dir, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the folder")
    (run_dir / ".env").write_text("HF_TOKEN=hf_secret")
    (run_dir / "final" / ".lora.safetensors.abc123.tmp").write_bytes(b"half")
    (run_dir / ".metrics.csv.x1.tmp").write_text("step\n")
    (run_dir / ".forge.lock").write_text("host 1\n")
    (run_dir / "notes.txt.tmp").write_text("scratch")
    (run_dir / "stolen.txt").symlink_to(secret)
    (run_dir / "outside").symlink_to(tmp_path, target_is_directory=True)
    (run_dir / "final" / "alias.yaml").symlink_to(run_dir / "hparams.yaml")  # inside: it belongs
    partial = run_dir / "step-000004"  # a checkpoint copied without its training state
    partial.mkdir()
    (partial / "lora.safetensors").write_bytes(b"x")
    for include_checkpoints in (False, True):
        upload.upload(run_dir, "me/run", include_checkpoints=include_checkpoints, dry_run=True)
        names = [name for _, name in listed(capsys.readouterr().out)]
        assert names == sorted(SHARED + ["final/alias.yaml"] + (CHECKPOINTS if include_checkpoints else []))


def test_upload_creates_the_repo_and_sends_what_the_dry_run_lists(run_dir, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeHub:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_commit(self, **kwargs):
            calls.append(("create_commit", kwargs))
            return CommitInfo(commit_url="https://huggingface.co/me/run/commit/0123abc", commit_message="m",
                              commit_description="", oid="0123abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    upload.upload(run_dir, "me/run", private=True)
    out, err = capsys.readouterr()
    assert [call[0] for call in calls] == ["init", "create_repo", "create_commit"]
    assert calls[0] == ("init", "hf_from_env")
    assert calls[1] == ("create_repo", "me/run", {"private": True, "exist_ok": True})
    sent = calls[2][1]
    assert sent["repo_id"] == "me/run" and sent["repo_type"] == "model"
    assert sent["commit_message"] == "Upload run with Forge"
    # the commit holds exactly the files the listing showed, each read from its own path
    operations = sent["operations"]
    assert [op.path_in_repo for op in operations] == [name for _, name in listed(out)] == SHARED
    assert all(op.path_or_fileobj == str(run_dir / op.path_in_repo) for op in operations)
    assert "Uploaded 5 files (3.0 MB) to https://huggingface.co/me/run/commit/0123abc" in err


def test_a_refused_upload_is_an_error_not_a_success(run_dir, monkeypatch, capsys):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    class ReadOnlyToken:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def create_commit(self, **kwargs):
            response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/models/me/run"))
            raise HfHubHTTPError("403 Forbidden", response=response)

    monkeypatch.setattr(huggingface_hub, "HfApi", ReadOnlyToken)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(upload.upload, ["--folder", str(run_dir), "--repo_id", "me/run", "--token", "hf_read"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "error: The Hub refused the upload to me/run (HTTP 403): pass a token with write access" in err
    assert "Uploaded" not in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--folder", "{tmp}/nothing"], "nothing is not a directory"),
    (["--repo_id", "just-a-name"], "--repo_id must look like ORG/NAME, got 'just-a-name'"),
    (["--repo_id", "me/bad name"], "--repo_id 'me/bad name' is not a valid Hub repo id"),
    (["--folder", "{tmp}/empty"], "has no files to upload"),
])
def test_bad_input_is_one_error_line(run_dir, tmp_path, args, message, capsys):
    (tmp_path / "empty" / "step-000001").mkdir(parents=True)
    (tmp_path / "empty" / "step-000001" / "training_state.pt").write_bytes(b"x")
    defaults = {"--folder": str(run_dir), "--repo_id": "me/run"}
    given = dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2])))
    argv = [part for flag, value in {**defaults, **given}.items() for part in (flag, value)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(upload.upload, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.strip().splitlines() == [err.strip().splitlines()[0]] and err.startswith("error: ")
    assert message in err


def test_offline_is_a_clear_error(run_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_dummy")
    result = subprocess.run([sys.executable, str(ROOT / "scripts/upload.py"), "--folder", str(run_dir),
                             "--repo_id", "me/run"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "error: Could not reach the Hugging Face Hub to upload to me/run" in result.stderr
    assert "Nothing was uploaded" in result.stderr
    assert "Traceback" not in result.stderr and "Uploaded" not in result.stderr
