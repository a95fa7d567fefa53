"""Adapters from an S3-compatible object store (`lorakit serve --adapters s3://bucket/prefix`), materialised
into a local cache directory on first use, so replicas share adapters without a shared filesystem.

    s3://bucket/prefix/<name>/adapter_config.json        one adapter per "directory", as save_adapter writes it
    s3://bucket/prefix/<name>/adapter_model.safetensors  (object metadata "sha256": the file's hex digest)

The endpoint is boto3's: AWS_ENDPOINT_URL (MinIO, Ceph, moto...) or AWS itself. A download is verified
before the server sees it: its byte count against the listing and the response, its SHA-256 against the
object's "sha256" metadata (upload_adapter writes it) or, without one, its MD5 against a single-part ETag;
it lands in a temp directory swapped into the cache in one step (lorakit.io.atomic), so a missing bucket,
a corrupt or truncated object or a store that goes away mid-download fails that adapter alone and leaves
nothing half-written. A cached copy is used again (across restarts) after the same size and checksum
checks against the store's listing and metadata, without downloading it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lorakit.io.atomic import atomic_directory
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME
from lorakit.names import adapter_name_problem
from lorakit.serve.adapter_store import AdapterLoadError

log = logging.getLogger("lorakit.serve")

FILES = (WEIGHTS_NAME, CONFIG_NAME)  # uploaded in this order: the config marks a complete adapter
CHUNK = 1 << 20


class ObjectStoreError(AdapterLoadError):
    """The object store could not give this adapter: no bucket, unreachable, or a corrupt/truncated object."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket (s3://bucket/prefix)")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"


def s3_client():
    """A boto3 S3 client: endpoint from AWS_ENDPOINT_URL, few retries and short timeouts (a request waiting
    on its adapter should fail in seconds, not minutes)."""
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region,
                        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5,
                                      read_timeout=30))


def _errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError, OSError


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code == "NoSuchBucket":
        return "the bucket does not exist"
    return f"{type(exc).__name__}: {exc}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upload_adapter(directory: str | os.PathLike, url: str, name: str, client=None) -> None:
    """Put the adapter in `directory` at `url`/<name>/ with each file's SHA-256 in its metadata (weights
    first, config last: a reader that sees the config sees a whole adapter)."""
    problem = adapter_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    where, client = S3Location.parse(url), client or s3_client()
    for file in FILES:
        path = Path(directory) / file
        data = path.read_bytes()
        client.put_object(Bucket=where.bucket, Key=f"{where.prefix}{name}/{file}", Body=data,
                          Metadata={"sha256": hashlib.sha256(data).hexdigest()})


@dataclass(frozen=True)
class _Listed:
    size: int
    etag: str


class S3Adapters:
    """An AdapterStore source (lorakit.serve.adapter_store.AdapterSource) over s3://bucket/prefix."""

    def __init__(self, url: str, cache_dir: str | os.PathLike, client=None, list_ttl: float = 10.0) -> None:
        self.location = S3Location.parse(url)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.client = client or s3_client()
        self.list_ttl = list_ttl
        self._lock = threading.Lock()
        self._name_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._verified: dict[str, Path] = {}  # fetched or checked by this process
        self._names: tuple[float, list[str]] | None = None

    # -- AdapterSource ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Adapters in the store (those with a config), listed at most every `list_ttl` seconds; the last
        listing (or the verified ones) when the store cannot be reached."""
        with self._lock:
            if self._names is not None and time.monotonic() - self._names[0] < self.list_ttl:
                return list(self._names[1])
        try:
            found = set()
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket,
                                                                          Prefix=self.location.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    name, _, file = item["Key"][len(self.location.prefix):].partition("/")
                    if file == CONFIG_NAME and adapter_name_problem(name) is None:
                        found.add(name)
        except _errors() as exc:
            log.warning("cannot list %s: %s", self.location.url(), _describe(exc))
            with self._lock:
                return list(self._names[1]) if self._names else sorted(self._verified)
        names = sorted(found)
        with self._lock:
            self._names = (time.monotonic(), names)
        return names

    def locate(self, name: str) -> Path | None:
        """The cached directory of `name`, fetched (or checked) first if this process has not yet; None when
        the store has no such adapter; ObjectStoreError when it cannot give it."""
        with self._lock:
            done = self._verified.get(name)
        if done is not None and done.is_dir():
            return done
        with self._name_locks[name]:  # one fetch per adapter at a time; the others wait for it
            with self._lock:
                done = self._verified.get(name)
            if done is not None and done.is_dir():
                return done
            listed = self._list(name)
            if listed is None:
                return None
            local = self.cache_dir / name
            if not self._cache_matches(name, local, listed):
                self._download(name, local, listed)
            with self._lock:
                self._verified[name] = local
            return local

    def forget(self, name: str) -> None:
        """Check `name` against the store again on its next use (a new version was uploaded)."""
        with self._lock:
            self._verified.pop(name, None)
            self._names = None

    # -- internals --------------------------------------------------------------------------------
    def _key(self, name: str, file: str) -> str:
        return f"{self.location.prefix}{name}/{file}"

    def _list(self, name: str) -> dict[str, _Listed] | None:
        try:
            page = self.client.list_objects_v2(Bucket=self.location.bucket, Prefix=self._key(name, ""))
        except _errors() as exc:
            raise ObjectStoreError(f"adapter {name!r}: cannot list {self.location.url(name + '/')}: "
                                   f"{_describe(exc)}") from None
        listed = {item["Key"].rpartition("/")[2]: _Listed(int(item["Size"]), item.get("ETag", "").strip('"'))
                  for item in page.get("Contents", []) if item["Key"].rpartition("/")[0] == self._key(name, "")[:-1]}
        if CONFIG_NAME not in listed:
            return None
        if WEIGHTS_NAME not in listed:
            raise ObjectStoreError(f"adapter {name!r}: {self.location.url(name + '/')} has {CONFIG_NAME} but no "
                                   f"{WEIGHTS_NAME}")
        return listed

    def _sha256_of(self, name: str, file: str) -> str | None:
        head = self.client.head_object(Bucket=self.location.bucket, Key=self._key(name, file))
        return head.get("Metadata", {}).get("sha256")

    def _cache_matches(self, name: str, local: Path, listed: dict[str, _Listed]) -> bool:
        """Whether the cached copy has each file's listed size and checksum."""
        if not local.is_dir():
            return False
        try:
            for file in FILES:
                path = local / file
                if not path.is_file() or path.stat().st_size != listed[file].size:
                    return False
                expected = self._sha256_of(name, file)
                if expected is not None:
                    if file_sha256(path) != expected:
                        return False
                elif not _md5_matches(path.read_bytes(), listed[file].etag):
                    return False
        except _errors() as exc:
            raise ObjectStoreError(f"adapter {name!r}: cannot check {self.location.url(name + '/')}: "
                                   f"{_describe(exc)}") from None
        return True

    def _download(self, name: str, local: Path, listed: dict[str, _Listed]) -> None:
        try:
            with atomic_directory(local) as tmp:  # removed, with whatever it holds, if anything below fails
                for file in FILES:
                    self._fetch(name, file, listed[file], tmp / file)
        except ObjectStoreError:
            raise
        except _errors() as exc:
            raise ObjectStoreError(f"adapter {name!r}: download from {self.location.url(name + '/')} failed "
                                   f"({_describe(exc)}); nothing was written to the cache") from None
        log.info("fetched adapter %s from %s", name, self.location.url(name + "/"))

    def _fetch(self, name: str, file: str, listed: _Listed, target: Path) -> None:
        where = self.location.url(f"{name}/{file}")
        response = self.client.get_object(Bucket=self.location.bucket, Key=self._key(name, file))
        sha, md5, seen = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        with open(target, "wb") as handle:
            for chunk in response["Body"].iter_chunks(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
                seen += len(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        declared = int(response.get("ContentLength", seen))
        if seen != declared or seen != listed.size:
            raise ObjectStoreError(f"adapter {name!r}: {where} is truncated: got {seen} bytes, the store lists "
                                   f"{listed.size}; nothing was written to the cache")
        expected = response.get("Metadata", {}).get("sha256")
        if expected is not None and sha.hexdigest() != expected:
            raise ObjectStoreError(f"adapter {name!r}: {where} is corrupt: sha256 {sha.hexdigest()}, its metadata "
                                   f"says {expected}; nothing was written to the cache")
        etag = response.get("ETag", listed.etag).strip('"')
        if expected is None and "-" not in etag and md5.hexdigest() != etag:
            raise ObjectStoreError(f"adapter {name!r}: {where} is corrupt: md5 {md5.hexdigest()}, its ETag is "
                                   f"{etag}; nothing was written to the cache")


def _md5_matches(data: bytes, etag: str) -> bool:
    """A single-part ETag is the MD5 of the object; a multipart one ("...-N") cannot be checked this way."""
    return "-" in etag or hashlib.md5(data, usedforsecurity=False).hexdigest() == etag
