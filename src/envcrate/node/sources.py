"""Where the archive of a crate comes from, as the compute side sees it: a
path (a shared filesystem, a staged file) or an HTTP(S) or ``file://`` URL
with its blob digest. A store is not among them: the client's side
(:mod:`envcrate.shipping`) hands :mod:`envcrate.node.ensure` a :class:`Source`
of its own that fetches from one.
"""

import os

from ..ids import blob_digest
from .events import Events


class Source:
    def manifest(self, dl: str, ev: "Events"):
        raise NotImplementedError

    def archive(self, dl: str, ev: "Events", progress: bool) -> "tuple[str, str | None, bool]":
        """(archive path, expected blob digest, whether the path is a download)."""
        raise NotImplementedError


class ArchiveFile(Source):
    def __init__(self, path: str, sha256: "str | None"):
        self.path = os.path.abspath(path)
        self.blob = blob_digest(sha256) if sha256 else None

    def manifest(self, dl, ev):
        from ..crate.head import read_manifest

        return read_manifest(self.path)

    def archive(self, dl, ev, progress):
        if self.blob is None:
            from ..crate.record import recorded_blob

            self.blob = recorded_blob(self.path)
        return self.path, self.blob, False


class ArchiveUrl(Source):
    def __init__(self, url: str, blob: str):
        self.url = url
        self.blob = blob
        self.path: str | None = None

    def _download(self, dl: str, ev: "Events", progress: bool) -> str:
        if self.path is None:
            if self.url.startswith("file://"):
                from urllib.parse import unquote, urlparse

                self.path = unquote(urlparse(self.url).path)
                return self.path
            from ..network import download_url
            from ..progress import bar

            ev.emit("DOWNLOADING", url=self.url.split("?", 1)[0])
            name = f".{self.blob.split(':', 1)[1]}.{this_process()}.tar"
            with bar(0, "downloading", progress) as tick:
                self.path = str(download_url(self.url, dl, name, self.blob, tick))
        return self.path

    def manifest(self, dl, ev):
        from ..crate.head import read_manifest

        return read_manifest(self._download(dl, ev, False))

    def archive(self, dl, ev, progress):
        path = self._download(dl, ev, progress)
        return path, self.blob, not self.url.startswith("file://")


def this_process() -> str:
    """``<host>-<pid>``: names a download so that only its own host judges it."""
    from .leases import this_host

    return f"{this_host().replace('.', '_')}-{os.getpid()}"


def ref_of(source: "Source") -> str:
    """What ``source`` is, for a message."""
    for attr in ("url", "path"):
        value = getattr(source, attr, None)
        if value:
            return str(value).split("?", 1)[0]
    return "the archive"
