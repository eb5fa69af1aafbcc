"""Model files from a URL or a hub id (LLM_MODEL_URL: `https://...`, or `hf://<owner>/<repo>/<file>` for a
file on the Hugging Face hub, or on the mirror HF_ENDPOINT names): downloaded with progress in the log,
retried, verified against LLM_MODEL_CHECKSUM, and kept in LLM_MODELS_DIR.

A file already there (and matching the checksum, when one is given) is used without any network, so an
offline machine serves what it has cached and says exactly which file is missing otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)
CHUNK = 1 << 20
FALLBACK_NAME = "model.gguf"  # for a URL whose path names no file


class DownloadError(Exception):
    pass


@dataclass(frozen=True)
class ModelDownload:
    url: str
    target: Path
    checksum: str | None = None  # "sha256:<hex>"
    timeout: float = 30.0  # seconds to connect, and at most between two chunks
    retries: int = 3

    @classmethod
    def into(cls, models_dir: Path, url: str, **options) -> "ModelDownload":
        url = hub_url(url)
        target = models_dir / file_name(url)
        # The name is one plain component already; resolving also refuses one that is a link out of the folder.
        if not target.resolve().is_relative_to(models_dir.resolve()):
            raise DownloadError(f"{url} names a file outside {models_dir}")
        return cls(url=url, target=target, **options)

    def ensure(self) -> Path:
        """The verified local file, downloading it if needed (blocking: call it in a thread)."""
        expected = self._expected_digest()
        cached = self.target.is_file()
        if cached and (expected is None or _sha256(self.target) == expected):
            return self.target
        state = "does not match its checksum (LLM_MODEL_CHECKSUM)" if cached else "is not cached"
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DownloadError(f"{self.target} {state} and HF_HUB_OFFLINE=1 forbids fetching {self.url}")
        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1), wait=wait_exponential(multiplier=0.5, max=8),
            retry=retry_if_exception_type((httpx.HTTPError, DownloadError)), reraise=True,
        )  # fmt: skip
        try:
            for attempt in retrying:
                with attempt:
                    self._fetch(expected, attempt.retry_state.attempt_number)
        except (httpx.HTTPError, DownloadError) as error:
            raise DownloadError(
                f"{self.target} {state} and {self.url} could not be fetched after {self.retries + 1} "
                f"attempts ({error}); put the file there, or set LLM_MODEL_URL to a reachable copy"
            ) from error
        return self.target

    def _expected_digest(self) -> str | None:
        if self.checksum is None:
            return None
        algorithm, _, digest = self.checksum.partition(":")
        if algorithm != "sha256" or len(digest) != 64:
            raise DownloadError(f"LLM_MODEL_CHECKSUM must be sha256:<64 hex digits>, not {self.checksum!r}")
        return digest.lower()

    def _fetch(self, expected: str | None, attempt: int) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        partial = self.target.with_name(self.target.name + ".part")
        digest = hashlib.sha256()
        log.info("downloading %s (attempt %d)", self.url, attempt, extra={"fields": {"url": self.url}})
        with httpx.stream("GET", self.url, timeout=self.timeout, follow_redirects=True) as response:
            response.raise_for_status()
            total = int(response.headers.get("Content-Length", 0))
            with open(partial, "wb") as sink:
                done = shown = 0
                for chunk in response.iter_bytes(CHUNK):
                    sink.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    shown = _progress(self.target.name, done, total, shown)
        if total and done != total:
            raise DownloadError(f"the connection ended after {done} of {total} bytes")
        if expected is not None and digest.hexdigest() != expected:
            partial.unlink()
            raise DownloadError(f"checksum mismatch for {self.url}: sha256 {digest.hexdigest()}, expected {expected}")
        partial.replace(self.target)  # atomic: a partial file never looks complete
        log.info("downloaded %s (%d bytes)", self.target, done)


def file_name(url: str) -> str:
    """The URL's last path component, decoded, as a plain file name: an encoded separator (%2F, %5C) cannot
    reach another folder, nor can `..`, a NUL or a leading dot make it a special or hidden name."""
    decoded = unquote(urlparse(url).path).replace("\\", "/").replace("\0", "")
    name = decoded.rsplit("/", 1)[-1].strip().lstrip(".")
    return name or FALLBACK_NAME


def hub_url(url: str) -> str:
    """hf://owner/repo/path/file.gguf → the hub's download URL for it (main revision); others unchanged."""
    if not url.startswith("hf://"):
        return url
    parts = url.removeprefix("hf://").split("/")
    if len(parts) < 3:
        raise DownloadError(f"a hub id needs owner/repo/file: {url!r}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{parts[0]}/{parts[1]}/resolve/main/{'/'.join(parts[2:])}"


def _progress(name: str, done: int, total: int, shown: int) -> int:
    """Log a line every 10 % (every 100 MB without a Content-Length); return what was shown."""
    step = done * 10 // total if total else done // (100 * CHUNK)
    if step > shown:
        percent = f"{done * 100 // total}%" if total else "?"
        log.info("downloading %s: %s (%d bytes)", name, percent, done,
                 extra={"fields": {"bytes": done, "total_bytes": total}})  # fmt: skip
    return max(step, shown)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
