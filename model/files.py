"""Atomic file writers: every output a script publishes appears complete or not at all, readable like any file
the user writes. The bottom layer: imports nothing from Forge.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file


def publish_file(tmp: Path | str, path: Path) -> None:
    """Rename a finished temporary file onto its destination, readable like any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            fp.write(text)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: Optional[dict] = None) -> None:
    """Write to a temporary file in the same directory, then rename: a killed run never leaves a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: Path | str) -> None:
    """`torch.save` through a temporary file and a rename (for tensors and lists of them: load with
    `weights_only=True`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.save names the archive's root folder after the file it writes to; through a buffer it is always
    # "archive", so the same object gives the same bytes whatever the temporary file is called.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(buffer.getbuffer())
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_figure(fig, path: Path | str, dpi: int = 110) -> None:
    """Save a matplotlib figure as a PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def check_out_dir(out_dir: Path) -> None:
    """A new output directory: it must not exist yet, or be empty."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out_dir")


def publish_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished output directory into place (an empty `out_dir` is replaced), with the permissions of a
    directory the user made (mkdtemp's are private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    if out_dir.exists():
        out_dir.rmdir()
    tmp_dir.rename(out_dir)


@contextmanager
def staged_dir(output_dir: Path | str) -> Iterator[Path]:
    """A folder to write an export into, built beside `output_dir` and moved into place when the block ends without
    an error (into an existing `output_dir`, file by file): never a half-written export. The folder has the
    permissions of one the user made (mkdtemp's are private)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    try:
        yield tmp_dir
        if output_dir.exists():
            for item in tmp_dir.iterdir():
                item.replace(output_dir / item.name)
        else:
            tmp_dir.rename(output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
