"""A store in an S3 bucket (AWS or any S3-compatible server).

Endpoint and credentials come from the standard AWS configuration
(environment, profiles, ``AWS_ENDPOINT_URL``). Archives go through boto3's
transfer manager (parallel multipart parts, each with a SHA-256 checksum the
server verifies); small objects carry one too. An object only appears when
complete, and a failed upload aborts its multipart upload; one left open by a
killed process is aborted by the next upload of the same blob.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from urllib.parse import urlparse

from ..errors import NotFoundError, StoreError
from .base import Progress, Store, Stored

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
                connect_timeout=10,
                read_timeout=60,
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
    def _missing(e: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in (
            "NoSuchKey",
            "404",
            "NotFound",
        )

    # -- primitives

    def read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:
            if self._missing(e):
                return None
            raise self._fail(e, f"read {key} from") from None

    def write(self, key: str, data: bytes) -> None:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumSHA256=checksum
            )
        except Exception as e:
            raise self._fail(e, f"write {key} to") from None

    def upload(
        self, key: str, path: Path, digest: str, progress: Progress | None, move: bool = False
    ) -> None:
        full = self._key(key)
        try:
            self._abort_stale(full)
            self.client.upload_file(
                str(path),
                self.bucket,
                full,
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Callback=progress,
                Config=self._transfer(),
            )
        except Exception as e:
            # Another publisher of the same blob may have completed it (and
            # aborted our parts as stale): the key is the content, so that is fine.
            try:
                if self.size(key) == path.stat().st_size:
                    return
            except StoreError:
                pass
            raise self._fail(e, f"upload {key} to") from None

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
        try:
            self.client.download_file(
                self.bucket, self._key(key), str(dest), Callback=progress, Config=self._transfer()
            )
        except Exception as e:
            if self._missing(e):
                raise NotFoundError(f"{self.url}/{key} does not exist") from None
            raise self._fail(e, f"download {key} from") from None

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except Exception as e:
            if self._missing(e):
                return None
            raise self._fail(e, f"read {key} from") from None

    def keys(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        skip = len(self._key(""))
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                out += [o["Key"][skip:] for o in page.get("Contents", [])]
        except Exception as e:
            raise self._fail(e, "list") from None
        return sorted(out)

    def walk(self, prefix: str) -> list[Stored]:
        skip = len(self._key(""))
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                out += [
                    Stored(o["Key"][skip:], o["Size"], o["LastModified"].timestamp())
                    for o in page.get("Contents", [])
                ]
        except Exception as e:
            raise self._fail(e, "list") from None
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if not self._missing(e):
                raise self._fail(e, f"remove {key} from") from None

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
