"""Build OCI image layouts on disk, in pure Python and without any network.

The layouts are what skopeo reads as `oci:DIR:TAG`.  Layer contents are random, so two
images built separately never share blobs unless a test reuses one on purpose.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

REF_NAME = "org.opencontainers.image.ref.name"


def digest_of(data: bytes) -> str:
    """The canonical `sha256:<hex>` digest of some bytes (a manifest, a blob)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class OciImage:
    """A single-platform image inside an OCI layout."""

    layout: Path
    tag: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    platform: tuple[str, str]  # (os, architecture)
    manifest_bytes: bytes

    @property
    def ref(self) -> str:
        """The skopeo source reference, `oci:DIR:TAG`."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blob_digests(self) -> list[str]:
        return [self.config.digest, *(layer.digest for layer in self.layers)]


@dataclass(frozen=True)
class OciIndex:
    """A multi-platform image (image index) inside an OCI layout."""

    layout: Path
    tag: str
    index: Blob
    images: tuple[OciImage, ...]
    index_bytes: bytes

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.index.digest

    def image_for(self, arch: str) -> OciImage:
        return next(i for i in self.images if i.platform[1] == arch)


class Layout:
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/...)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        if not (self.path / "index.json").exists():
            self._write_index([])

    def _write_index(self, manifests: list[dict]) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        (self.path / "index.json").write_text(json.dumps(index, indent=2))

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        digest = digest_of(data)
        (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
        return Blob(digest, len(data), media_type)

    def tag(self, blob: Blob, tag: str) -> None:
        """Point `tag` at `blob` in index.json (replacing an older entry of that tag)."""
        index = json.loads((self.path / "index.json").read_text())
        manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
        manifests.append(blob.descriptor(annotations={REF_NAME: tag}))
        self._write_index(manifests)


def random_layer(size: int, files: int = 3, rng=os.urandom) -> tuple[bytes, str]:
    """A gzipped tarball of `files` files holding `size` random bytes in total.

    Returns (compressed bytes, diff ID = digest of the uncompressed tar).  Timestamps are
    fixed so only the random content makes layers differ.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("data")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        tar.addfile(directory)
        per_file = max(size // max(files, 1), 0)
        for i in range(max(files, 1)):
            content = rng(per_file if i < files - 1 else size - per_file * (files - 1))
            info = tarfile.TarInfo(f"data/file-{i}-{rng(4).hex()}.bin")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    uncompressed = raw.getvalue()
    compressed = gzip.compress(uncompressed, mtime=0)
    return compressed, digest_of(uncompressed)


def _image_into(
    layout: Layout,
    *,
    layers: int,
    layer_size: int,
    files_per_layer: int,
    os_name: str,
    arch: str,
    shared_layers: Sequence[tuple[bytes, str]] = (),
) -> tuple[Blob, Blob, tuple[Blob, ...], bytes]:
    layer_blobs, diff_ids = [], []
    contents = list(shared_layers) + [
        random_layer(layer_size, files_per_layer) for _ in range(layers)
    ]
    for compressed, diff_id in contents:
        layer_blobs.append(layout.add_blob(compressed, OCI_LAYER))
        diff_ids.append(diff_id)
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os_name,
        "config": {"Cmd": ["/bin/true"], "Labels": {"e2e.nonce": os.urandom(8).hex()}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "e2e"}] * len(diff_ids),
    }
    config_blob = layout.add_blob(json.dumps(config).encode(), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layer_blobs],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    manifest_blob = layout.add_blob(manifest_bytes, OCI_MANIFEST)
    return manifest_blob, config_blob, tuple(layer_blobs), manifest_bytes


def build_image(
    path: Path,
    *,
    tag: str = "latest",
    layers: int = 2,
    layer_size: int = 4096,
    files_per_layer: int = 3,
    os_name: str = "linux",
    arch: str = "amd64",
    shared_layers: Sequence[tuple[bytes, str]] = (),
) -> OciImage:
    """A single-platform image with `layers` random layers, tagged `tag` in layout `path`.

    `shared_layers` (results of `random_layer`) are put first, to build images that share
    blobs.  Several images can live in one layout under different tags.
    """
    layout = Layout(path)
    manifest, config, layer_blobs, manifest_bytes = _image_into(
        layout,
        layers=layers,
        layer_size=layer_size,
        files_per_layer=files_per_layer,
        os_name=os_name,
        arch=arch,
        shared_layers=shared_layers,
    )
    layout.tag(manifest, tag)
    return OciImage(
        layout.path, tag, manifest, config, layer_blobs, (os_name, arch), manifest_bytes
    )


def build_index(
    path: Path,
    *,
    tag: str = "latest",
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    layers: int = 1,
    layer_size: int = 4096,
) -> OciIndex:
    """A multi-platform image index (default linux/amd64 + linux/arm64) tagged `tag`."""
    layout = Layout(path)
    images, descriptors = [], []
    for os_name, arch in platforms:
        manifest, config, layer_blobs, manifest_bytes = _image_into(
            layout,
            layers=layers,
            layer_size=layer_size,
            files_per_layer=2,
            os_name=os_name,
            arch=arch,
        )
        images.append(
            OciImage(
                layout.path, tag, manifest, config, layer_blobs, (os_name, arch), manifest_bytes
            )
        )
        descriptors.append(manifest.descriptor(platform={"os": os_name, "architecture": arch}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    index_bytes = json.dumps(index, indent=2).encode()
    index_blob = layout.add_blob(index_bytes, OCI_INDEX)
    layout.tag(index_blob, tag)
    return OciIndex(layout.path, tag, index_blob, tuple(images), index_bytes)


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str
    header_digest: str | None  # Docker-Content-Digest as the registry sent it

    @property
    def digest(self) -> str:
        """The digest computed over the bytes actually received."""
        return digest_of(self.body)

    def json(self) -> dict:
        return json.loads(self.body)


ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


def fetch_manifest(client, repo: str, reference: str) -> FetchedManifest:
    """GET a manifest with a `regclient.RegistryHTTP` client (directly or via the proxy)."""
    response = client.request(
        "GET",
        f"/v2/{repo}/manifests/{reference}",
        headers={"Accept": ACCEPT_MANIFESTS},
        scopes=[f"repository:{repo}:pull"],
    )
    if response.status != 200:
        raise AssertionError(
            f"GET manifest {repo}:{reference} -> {response.status}: {response.body[:500]!r}"
        )
    return FetchedManifest(
        response.body,
        response.header("Content-Type") or "",
        response.header("Docker-Content-Digest"),
    )


def manifest_digest(client, repo: str, reference: str) -> str:
    """The digest of a manifest as served by the registry, computed over the bytes."""
    return fetch_manifest(client, repo, reference).digest
