"""Conversion output in object storage (`--out s3://bucket/path`, or any remote Streaming writes to).

The shards of a split go through Streaming's own writer, MDSWriter(out=(local staging folder, remote)),
which uploads each shard as it is finished and the index at the end; the manifest is uploaded last of all,
so a conversion that fails midway leaves no manifest and no loader accepts the partial output.
Credentials come only from the environment, as Streaming's clients read them (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY or a profile, and S3_ENDPOINT_URL for an S3-compatible server).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from composer_dlm.data.errors import DataError, first_line


def is_remote(out: str) -> bool:
    """Whether `out` names object storage (`s3://`, `gs://`, `oci://`, ...) rather than a local folder."""
    return "://" in out and not out.startswith("file://")


def writer_out(folder: Path, out: str) -> str | tuple[str, str]:
    """MDSWriter's `out` for the split written into local `folder`: the folder, or (folder, remote split)."""
    return (str(folder), _split_url(out, folder)) if is_remote(out) else str(folder)


def _split_url(out: str, folder: Path) -> str:
    """Where the split written into local ``folder`` goes under the remote ``out``."""
    return f"{out.rstrip('/')}/{folder.name}"


@contextmanager
def remote_staging() -> Iterator[Path]:
    """A local folder to stage the shards in while they upload; removed afterwards, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="composer-dlm-upload-") as tmp:
        yield Path(tmp) / "out"


def check_remote_out(out: str, overwrite: bool) -> None:
    """Refuse a remote output that cannot be reached (no bucket, no credentials) or that already holds files,
    unless `overwrite`, before any work."""
    from streaming.base.storage import CloudUploader

    with tempfile.TemporaryDirectory() as tmp:
        try:
            existing = CloudUploader.get((tmp, out), keep_local=True).list_objects() or []
        except NotImplementedError:  # a store whose uploader cannot list: nothing to check
            existing = []
        except Exception as e:  # the cloud clients raise their own error types
            raise DataError(
                f"cannot write to {out} ({first_line(e)}); check that the bucket exists and the credentials in the "
                "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, S3_ENDPOINT_URL for an S3-compatible "
                "server)"
            ) from None
    if existing and not overwrite:
        raise DataError(
            f"output {out} already holds {len(existing)} files (e.g. {existing[0]}); pass --overwrite to replace "
            "them, or choose another --out"
        )


def upload_manifest(folder: Path, out: str, filename: str) -> None:
    """Upload `folder/filename` to `out/<split>/filename` with Streaming's uploader (the split's last file)."""
    from streaming.base.storage import CloudUploader

    remote = _split_url(out, folder)
    with tempfile.TemporaryDirectory() as tmp:  # the uploader wants a folder of its own
        try:
            uploader = CloudUploader.get((tmp, remote), keep_local=True)
            shutil.copy(folder / filename, Path(tmp) / filename)
            uploader.upload_file(filename)
        except Exception as e:  # the cloud clients raise their own error types
            raise DataError(
                f"could not upload {filename} to {remote} ({first_line(e)}); check the bucket and credentials"
            ) from e
