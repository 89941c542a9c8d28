"""A store in an S3 bucket (AWS or any S3-compatible server).

Endpoint and credentials come from the standard AWS configuration
(environment, profiles, ``AWS_ENDPOINT_URL``). Archives go through boto3's
transfer manager (parallel multipart parts, each with a SHA-256 checksum the
server verifies); small objects carry one too. An object only appears when
complete, and a failed upload aborts its multipart upload; one left open by a
killed process is aborted by the next upload of the same blob.

Retries: botocore retries each request (standard mode: 3 attempts with
backoff, 5xx and throttling included) and s3transfer each downloaded part
from its first byte when its stream breaks (5 attempts); on top of that,
every primitive here is retried as a whole with backoff while it fails in a
transient way, until the deadline of :mod:`.network`, whose stall timeout is
also botocore's connect and read timeout. A download is bounded by the size
its record says: a larger object is refused before it is read, and the bytes
received are counted.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from urllib.parse import urlparse

from ..errors import EnvcrateError, NotFoundError, StoreError
from ..network import RETRY_STATUS, Deadline, Transient, retrying, timeout, too_large
from .base import Progress, Store, Stored, too_big

MAX_PRESIGN = 7 * 24 * 3600  # SigV4 limit
_PART = 8 << 20  # awscli's default part size and concurrency
_CONCURRENCY = 10


class S3Store(Store):
    can_presign = True

    def __init__(self, url: str):
        parsed = urlparse(url)
        if not parsed.netloc:
            raise StoreError(f"{url} names no bucket; write s3://BUCKET[/PREFIX]")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._client = None

    # -- plumbing

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                # Checksums only where we ask for them: some S3-compatible
                # servers reject the CRC headers boto3 1.36+ adds by default.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=timeout(),
                read_timeout=timeout(),
                max_pool_connections=_CONCURRENCY + 2,
            )
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=_PART,
            multipart_chunksize=_PART,
            max_concurrency=_CONCURRENCY,
        )

    def _fail(self, e: Exception, doing: str) -> StoreError:
        """A one-line StoreError for a boto3/botocore failure."""
        from botocore import exceptions as bx

        while not isinstance(e, (bx.BotoCoreError, bx.ClientError)):
            inner = e.__cause__ or e.__context__  # boto3's transfer wraps the real error
            if inner is None:
                break
            e = inner
        endpoint = self.client.meta.endpoint_url
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreError(
                f"no AWS credentials to {doing} {self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionError)):
            return StoreError(
                f"cannot reach the S3 endpoint {endpoint} to {doing} {self.url}; "
                "check AWS_ENDPOINT_URL and the network, then try again"
            )
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code == "NoSuchBucket":
                return StoreError(
                    f"the bucket {self.bucket} does not exist at {endpoint}; create it or fix --store"
                )
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"):
                return StoreError(
                    f"{endpoint} rejected the credentials ({code}) to {doing} {self.url}; "
                    "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the profile"
                )
            if code in ("AccessDenied", "403", "Forbidden"):
                return StoreError(
                    f"access denied to {doing} {self.url}; ask for that permission on the bucket"
                )
            return StoreError(
                f"S3 error {code} to {doing} {self.url}: {err.get('Message', e)}; try again"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return StoreError(f"cannot {doing} {self.url}: {first}; try again")

    @staticmethod
    def _transient(e: Exception) -> bool:
        """Whether another attempt may not meet this failure: a lost, refused
        or stalled connection, a broken stream, a 5xx or throttling answer."""
        from botocore import exceptions as bx
        from s3transfer.exceptions import RetriesExceededError

        while e is not None:
            if isinstance(
                e,
                (
                    bx.ConnectionError,
                    bx.HTTPClientError,
                    bx.IncompleteReadError,
                    RetriesExceededError,
                    ConnectionError,
                    TimeoutError,
                ),
            ):
                return True
            if isinstance(e, bx.ClientError):
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(e.response.get("Error", {}).get("Code", ""))
                return status in RETRY_STATUS or code in (
                    "SlowDown",
                    "RequestTimeout",
                    "InternalError",
                    "ServiceUnavailable",
                    "503",
                    "500",
                )
            e = e.__cause__ or e.__context__  # boto3's transfer wraps the real error
        return False

    def _call(self, doing: str, fn, missing=Ellipsis):
        """``fn(deadline)``, retried with backoff while it fails transiently and
        the deadline allows; ``missing`` is returned for a missing object
        (else that is an error too)."""
        deadline = Deadline(f"trying to {doing} {self.url}")

        def attempt():
            try:
                return fn(deadline)
            except EnvcrateError:
                raise
            except Exception as e:
                if missing is not Ellipsis and self._missing(e):
                    return missing
                if self._transient(e):
                    raise Transient(str(self._fail(e, doing))) from None
                raise self._fail(e, doing) from None

        return retrying(attempt, deadline)

    @staticmethod
    def _missing(e: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in (
            "NoSuchKey",
            "404",
            "NotFound",
        )

    # -- primitives

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        def get(deadline):
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            with answer["Body"] as body:
                if limit is None:
                    return body.read()
                data = body.read(limit + 1)
            if len(data) > limit:
                raise too_big(f"{self.url}/{key}", limit)
            return data

        return self._call(f"read {key} from", get, missing=None)

    def write(self, key: str, data: bytes) -> None:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()

        def put(deadline):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumSHA256=checksum
            )

        self._call(f"write {key} to", put)

    def upload(
        self, key: str, path: Path, digest: str, progress: Progress | None, move: bool = False
    ) -> None:
        full = self._key(key)
        expected = path.stat().st_size

        def put(deadline):
            sent = [0]

            def tick(n: int) -> None:
                sent[0] += n
                if progress:
                    progress(n)
                if n > 0:
                    deadline.moved(n)

            try:
                self._abort_stale(full)
                self.client.upload_file(
                    str(path),
                    self.bucket,
                    full,
                    ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                    Callback=tick,
                    Config=self._transfer(),
                )
            except Exception:
                # Another publisher of the same blob may have completed it (and
                # aborted our parts as stale): the key is the content, so that is fine.
                try:
                    if self._head(key) == expected:
                        return
                except Exception:
                    pass
                if progress and sent[0]:
                    progress(-sent[0])  # the next attempt sends it all again
                raise

        self._call(f"upload {key} to", put)

    def _abort_stale(self, full: str) -> None:
        listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
        for up in listing.get("Uploads", []):
            if up.get("Key") == full:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=up["UploadId"]
                )

    def download(
        self, key: str, dest: Path, progress: Progress | None, size: int | None = None
    ) -> None:
        where = f"{self.url}/{key}"

        def get(deadline):
            if size is not None:
                found = self._head(key)
                if found is not None and found > size:
                    raise too_large(where, size)
            got = [0]

            def tick(n: int) -> None:
                # s3transfer reports a retried part's bytes back as negative
                got[0] += n
                if size is not None and got[0] > size:
                    raise too_large(where, size)
                if progress:
                    progress(n)
                if n > 0:
                    deadline.moved(n)

            try:
                self.client.download_file(
                    self.bucket, self._key(key), str(dest), Callback=tick, Config=self._transfer()
                )
            except Exception as e:
                if self._missing(e):
                    raise NotFoundError(f"{where} does not exist") from None
                if progress and got[0]:
                    progress(-got[0])
                raise

        self._call(f"download {key} from", get)

    def _head(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except Exception as e:
            if self._missing(e):
                return None
            raise

    def size(self, key: str) -> int | None:
        return self._call(f"read {key} from", lambda deadline: self._head(key))

    def keys(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        skip = len(self._key(""))

        def listing(deadline):
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                out += [o["Key"][skip:] for o in page.get("Contents", [])]
            return sorted(out)

        return self._call("list", listing)

    def walk(self, prefix: str) -> list[Stored]:
        skip = len(self._key(""))

        def listing(deadline):
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                out += [
                    Stored(o["Key"][skip:], o["Size"], o["LastModified"].timestamp())
                    for o in page.get("Contents", [])
                ]
            return sorted(out, key=lambda o: o.key)

        return self._call("list", listing)

    def delete(self, key: str) -> None:
        def remove(deadline):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

        self._call(f"remove {key} from", remove, missing=None)

    def presign(self, key: str, expires: int) -> str:
        if not 1 <= expires <= MAX_PRESIGN:
            raise StoreError(f"--expires must be 1..{MAX_PRESIGN} seconds (7 days, the S3 limit)")
        try:
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=expires,
            )
        except Exception as e:
            raise self._fail(e, "sign a URL for") from None
