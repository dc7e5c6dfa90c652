"""Downloading a model from the Hugging Face hub, checked before the first byte and after the last.

huggingface_hub does the transfer and everything a user already configures for it: the token
(HF_TOKEN or `hf auth login`), the endpoint (HF_ENDPOINT), the standard cache (HF_HOME /
HF_HUB_CACHE) or a plain folder, retries that resume a broken connection with a range request,
and files finished by an earlier run left alone. Around it this module adds what a
160 GB download needs: the file list with sizes and hashes first, a refusal before anything is
written when the disk cannot hold what is missing, every file checked against the size and hash
the hub reports (a mismatch is fetched again, once), and one-line errors.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, get_session, hf_raise_for_status
from huggingface_hub.utils import logging as hub_logging
from tqdm import tqdm

from .config import Qwen3NextConfig
from .errors import Qwen3NextError, UsageError
from .quant.convert import Conversion, check_output
from .quant.int4 import DEFAULT_GROUP
from .quant.policy import Policy
from .weights import CheckpointReader, check_free_space, format_bytes

_API_TIMEOUT = 30.0  # seconds for the file-list call; transfers use huggingface_hub's own timeouts
_HASH_CHUNK = 8 * 2**20
_MAX_HEADER = 100 * 2**20  # safetensors caps headers at 100 MB
_FIRST_RANGE = 512 * 2**10  # bytes asked for first: Qwen3-Next-80B's shard headers should be ~200 kB
_RESUME_HINT = "run the command again to resume (finished files are kept)"


class HubError(Qwen3NextError):
    """The hub refused or failed a request, or a download cannot be completed or stored."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo revision as the hub lists it."""

    path: str
    size: int
    blob_id: str  # the git blob id: sha1 of b"blob <size>\0" + content (what plain git files are checked with)
    sha256: str | None  # LFS files (the weights): the hub reports their content's sha256


@dataclass(frozen=True)
class Listing:
    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def list_files(repo_id: str, revision: str | None = None, include: Sequence[str] = (),
               exclude: Sequence[str] = ()) -> Listing:
    """The files of `repo_id` at `revision` that the patterns select, with the sizes and hashes the hub reports."""
    with _hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=_API_TIMEOUT)
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=list(include) or None,
                                        ignore_patterns=list(exclude) or None, key=lambda s: s.rfilename))
    if not siblings and (include or exclude):
        chosen = " ".join([*(f"--include {p!r}" for p in include), *(f"--exclude {p!r}" for p in exclude)])
        raise UsageError(f"{repo_id}: no file matches {chosen}")
    if not siblings:
        raise HubError(f"{repo_id}: the repository has no files")
    if any(s.size is None or s.blob_id is None for s in siblings):
        raise HubError(f"{repo_id}: the hub did not report file sizes and hashes (is HF_ENDPOINT a hub?)")
    files = tuple(sorted((RemoteFile(s.rfilename, s.size, s.blob_id, s.lfs.sha256 if s.lfs else None)
                          for s in siblings), key=lambda f: f.path))
    return Listing(repo_id, revision, info.sha, files)


def download(repo_id: str, revision: str | None = None, out: str | Path | None = None, include: Sequence[str] = (),
             exclude: Sequence[str] = (), quiet: bool = False) -> Path:
    """Fetch a repo revision into `out` (a plain folder) or, when None, the Hugging Face cache; returns the
    folder holding the files (in the cache, the revision's snapshot folder)."""
    listing = list_files(repo_id, revision, include, exclude)
    out = Path(out).expanduser() if out is not None else None
    dest = out or Path(constants.HF_HUB_CACHE)
    where = f"--out {dest}" if out else f"the Hugging Face cache {dest} (HF_HUB_CACHE moves it)"
    with _hub_errors(repo_id, revision, where), _hub_logs(quiet):
        _check_space(listing, out, dest, where, quiet)
        _ensure_writable(dest)
        paths = _fetch_verified(listing, out, quiet)
    first = listing.files[0]
    return paths[first].parents[len(PurePosixPath(first.path).parts) - 1]


def download_quantized(repo_id: str, bits: int, out: str | Path, revision: str | None = None,
                       include: Sequence[str] = (), exclude: Sequence[str] = (), quiet: bool = False,
                       force: bool = False, group: int | None = None) -> Path:
    """Fetch a repo and quantize it on the way: each weight shard is converted as soon as it has arrived
    (and been verified), then deleted, so the disk holds the quantized model plus a shard or two in flight.

    The shard headers come first, by range requests, so the whole conversion is planned (and every
    tensor checked) before any weight is downloaded. Interrupted, it resumes: finished output shards
    are kept, and only the source shards still needed are fetched again.
    """
    out = Path(out).expanduser()
    fetch_dir = out.parent / f".{out.name}.download"
    listing = list_files(repo_id, revision, include, exclude)
    shards = [f for f in listing.files if f.path.endswith(".safetensors")]
    if not shards:
        raise HubError(f"{repo_id}: has no .safetensors weights to quantize")
    where = f"--out {out}"
    say = (lambda message: None) if quiet else (lambda message: print(f"qwen3next: {message}", file=sys.stderr))
    with _hub_errors(repo_id, revision, where), _hub_logs(quiet):
        _ensure_writable(out.parent)
        check_output(out, force)
        _fetch_verified(replace(listing, files=tuple(f for f in listing.files if f not in shards)), fetch_dir, quiet)
        pending = {f.path: f for f in shards if not _is_complete(fetch_dir / f.path, f)}
        headers = _fetch_headers(listing, pending.values())
        config = Qwen3NextConfig.from_file(fetch_dir)
        with CheckpointReader(fetch_dir, prefetched=headers) as reader:
            job = Conversion(fetch_dir, out, reader, config, Policy(bits), group or DEFAULT_GROUP, False, say,
                             source_sizes={f.path: f.size for f in shards})
            _check_source_space(job, shards, fetch_dir, where)
            needs = [{reader.file_of(name).relative_to(fetch_dir).as_posix() for item in shard.items
                      for name in item.source_names()} for shard in job.plan.shards]
            with job.progress_bar(not quiet) as bar:
                for i, shard in enumerate(job.plan.shards):
                    if shard in job.todo:
                        wanted = tuple(f for f in shards if f.path in needs[i])
                        _fetch_verified(replace(listing, files=wanted), fetch_dir, quiet)
                    job.convert(shard, bar.update)
                    still_needed = set().union(*(needs[j] for j, later in enumerate(job.plan.shards)
                                                 if j > i and later in job.todo))
                    for f in shards:
                        if f.path not in still_needed:
                            (fetch_dir / f.path).unlink(missing_ok=True)
        job.finish(force)
        shutil.rmtree(fetch_dir)
    return out


def _check_source_space(job: Conversion, shards: list[RemoteFile], fetch_dir: Path, where: str) -> None:
    """The quantized output still to write plus the two largest source shards (the most held at once)."""
    needed = sum(s.size for s in job.todo) + sum(sorted((f.size for f in shards), reverse=True)[:2])
    check_free_space(fetch_dir, needed, where, "quantizing while downloading needs about")


def _fetch_headers(listing: Listing, files: Iterable[RemoteFile]) -> dict[str, tuple[bytes, int]]:
    """Shard name -> (header bytes, file size), as CheckpointReader's `prefetched` takes them.

    Not huggingface_hub's get_safetensors_metadata: it returns parsed headers without the header
    length, so the tensors' file offsets (and the check that they fit in the file) would be lost;
    docs/architecture.md has the comparison.
    """
    return {f.path: (_fetch_header(listing, f), f.size) for f in files}


def _fetch_header(listing: Listing, f: RemoteFile) -> bytes:
    """A remote safetensors file's first 8 + header-length bytes: one range request, two if the header is long."""
    url = hf_hub_url(listing.repo_id, f.path, revision=listing.commit)
    session, headers = get_session(), build_hf_headers()

    def fetch(first: int, last: int) -> bytes:
        response = session.get(url, headers={**headers, "Range": f"bytes={first}-{last}"}, timeout=_API_TIMEOUT)
        hf_raise_for_status(response)
        return response.content[:last - first + 1]

    data = fetch(0, min(f.size, _FIRST_RANGE) - 1)
    length = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    if not 0 < length <= min(f.size - 8, _MAX_HEADER):
        raise HubError(f"{listing.repo_id}: {f.path} does not start with a safetensors header")
    if len(data) < 8 + length:
        data += fetch(len(data), 7 + length)
    return data[:8 + length]


def _check_space(listing: Listing, out: Path | None, dest: Path, where: str, quiet: bool) -> None:
    """Refuse before writing anything when the files not yet here do not fit."""
    missing = [f for f in listing.files if not _is_complete(_local_copy(listing, f, out), f)]
    needed = sum(f.size for f in missing)
    free = check_free_space(dest, needed, where, f"{listing.repo_id} needs",
                            f" more ({len(missing)} of {len(listing.files)} files)")
    _say(quiet, f"{listing.repo_id} at {listing.commit[:12]}: {len(listing.files)} files, "
                f"{format_bytes(listing.total_bytes)}; {len(missing)} to fetch ({format_bytes(needed)}), "
                f"{format_bytes(free)} free")


def _fetch_verified(listing: Listing, out: Path | None, quiet: bool) -> dict[RemoteFile, Path]:
    """Download every file, check each against the hub's size and hash, and fetch a mismatch once more."""
    bar = _NoBar if quiet else None

    def fetch(f: RemoteFile, again: bool = False) -> Path:
        return Path(hf_hub_download(listing.repo_id, f.path, revision=listing.revision, local_dir=out,
                                    force_download=again, tqdm_class=bar))

    paths = {f: fetch(f) for f in listing.files}
    bad = _mismatched(paths, quiet)
    for f in bad:
        _say(quiet, f"{f.path}: does not match the size and hash the hub reports; fetching it again")
        paths[f] = fetch(f, again=True)
    still_bad = _mismatched({f: paths[f] for f in bad}, quiet)
    for f in still_bad:
        _remove(paths[f])
    if still_bad:
        names = ", ".join(f.path for f in still_bad)
        raise HubError(f"{listing.repo_id}: {names} still differ(s) from the hub's size and hash after a second "
                       "download (removed); the hub or the connection is corrupting data")
    return paths


def _local_copy(listing: Listing, f: RemoteFile, out: Path | None) -> Path | None:
    """Where a finished earlier download of `f` would be, without asking the hub."""
    if out is not None:
        return out / f.path
    cached = try_to_load_from_cache(listing.repo_id, f.path, revision=listing.commit)
    return Path(cached) if isinstance(cached, str) else None


def _is_complete(path: Path | None, f: RemoteFile) -> bool:
    return path is not None and path.is_file() and path.stat().st_size == f.size


def _mismatched(paths: dict[RemoteFile, Path], quiet: bool) -> list[RemoteFile]:
    """The files whose size or hash differs from what the hub reports (sha256 for LFS files, else the git blob id)."""
    bad = []
    with tqdm(total=sum(f.size for f in paths), desc="verifying", unit="B", unit_scale=True, disable=quiet,
              leave=False, delay=1.0) as bar:
        for f, path in paths.items():
            if path.stat().st_size != f.size:
                bad.append(f)
                bar.update(f.size)
                continue
            digest = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)
            with open(path, "rb") as stream:
                while chunk := stream.read(_HASH_CHUNK):
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != (f.sha256 or f.blob_id):
                bad.append(f)
    return bad


def _remove(path: Path) -> None:
    """Delete a bad file; in the cache also the blob its snapshot link points at, so no later run trusts it."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _ensure_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"qwen3next: {message}", file=sys.stderr)


class _NoBar(tqdm):
    """huggingface_hub's progress bars under --quiet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


@contextmanager
def _hub_logs(quiet: bool) -> Iterator[None]:
    """Under --quiet, huggingface_hub's own warnings (retries, resumes) stay off stderr too."""
    level = hub_logging.get_verbosity()
    if quiet:
        hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, where: str = "") -> Iterator[None]:
    """Turn what huggingface_hub and the OS raise into one-line errors naming the repo, revision or folder."""
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{repo_id}: gated repository: accept its terms at {endpoint}/{repo_id}, then log in "
                       "(HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repository on {endpoint} (if it is private, log in: HF_TOKEN or "
                       "`hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r} (a branch, tag or commit id)") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise HubError(f"{repo_id}: access denied (HTTP {status}): check HF_TOKEN or `hf auth login`") from None
        raise HubError(f"{repo_id}: the hub answered HTTP {status} ({exc.response.reason_phrase}); {_RESUME_HINT}") from None
    except HFValidationError:
        raise UsageError(f"{repo_id!r} is not a hub repository id (like Qwen/Qwen3-Next-80B-A3B-Instruct)") from None
    except OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set: downloads are disabled") from None
    except (httpx2.TransportError, LocalEntryNotFoundError) as exc:
        cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
        raise HubError(f"no connection to the hub at {endpoint} ({type(cause).__name__}: {_first_line(cause)}); "
                       f"check the network or HF_ENDPOINT, then {_RESUME_HINT}") from None
    except OSError as exc:
        raise HubError(_disk_message(exc, where, repo_id)) from None


def _disk_message(exc: OSError, where: str, repo_id: str) -> str:
    reason = exc.strerror or _first_line(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: the disk is full ({reason}); free some space, then {_RESUME_HINT}"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: cannot write there ({reason})"
    if exc.errno == errno.EEXIST:
        return f"{where}: exists and is not a folder"
    if exc.errno == errno.ENOTDIR:
        return f"{where}: a part of that path is a file, not a folder"
    return f"{repo_id}: download failed ({reason}); {_RESUME_HINT}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
