"""Docker image manifest schema 1, converted on pull as containerd does (old registries
still serve it; distribution 2.8 no longer accepts it).

A schema 1 manifest lists its layers newest first (`fsLayers[].blobSum`, gzip'd tars) with
one `history[].v1Compatibility` JSON document each; an entry marked `throwaway` is an
empty layer (a Dockerfile step that changed no file) and is skipped. It has no config
blob: the converted image gets a schema 2 manifest and a config built from the newest
v1Compatibility (its config, os, architecture, created, ...), with `rootfs.diff_ids` the
digests of the uncompressed layers and a `history` entry per step. The `+prettyjws`
form carries JWS signatures; its digest is that of the payload they sign, which is the
document without them (libtrust: `formatLength` bytes, then `formatTail`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from berth.daemon.documents import load_json_object
from berth.daemon.storage import images
from berth.daemon.storage.content import validate_digest
from berth.daemon.storage.images import Descriptor
from berth.shim.wire.errors import InvalidArgument

MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"
TYPES = (MANIFEST, SIGNED_MANIFEST)
MAX_LAYERS = 512
# Keys of a v1Compatibility document that describe the v1 layer, not the image.
_LAYER_KEYS = ("id", "parent", "Size", "parent_id", "layer_id", "throwaway")


@dataclass(frozen=True)
class Step:
    """One history entry, oldest first: its blob, and whether it is an empty layer."""

    blob_sum: str
    v1: dict[str, Any]
    throwaway: bool


def is_schema1(doc: dict[str, Any]) -> bool:
    """A document served with no (or an odd) media type is schema 1 if it says so."""
    return doc.get("schemaVersion") == 1 and "fsLayers" in doc


def parse(data: bytes) -> list[Step]:
    """The steps of a schema 1 manifest, oldest first; everything checked. Read from
    the signed payload (`payload`), the very bytes its digest is of: whatever a document
    carries beyond them (a duplicate key after the payload's end) is never used."""
    doc = images.parse_document(payload(data), "schema 1 manifest")
    fs_layers, history = doc.get("fsLayers"), doc.get("history")
    if not isinstance(fs_layers, list) or not isinstance(history, list):
        raise InvalidArgument("schema 1 manifest needs fsLayers and history lists")
    if len(fs_layers) != len(history) or not 0 < len(fs_layers) <= MAX_LAYERS:
        raise InvalidArgument(
            f"schema 1 manifest has {len(fs_layers)} fsLayers and {len(history)} history "
            f"entries: want as many of each, 1 to {MAX_LAYERS}"
        )
    steps = []
    for layer, entry in zip(reversed(fs_layers), reversed(history), strict=True):
        if not isinstance(layer, dict) or not isinstance(entry, dict):
            raise InvalidArgument("schema 1 fsLayers and history entries must be objects")
        compat = entry.get("v1Compatibility")
        if not isinstance(compat, str):
            raise InvalidArgument("schema 1 history entry without v1Compatibility")
        v1 = load_json_object(compat.encode(), "v1Compatibility", max_size=images.MAX_DOCUMENT)
        steps.append(Step(validate_digest(layer.get("blobSum")), v1, v1.get("throwaway") is True))
    return steps


def canonical_digest(data: bytes) -> str:
    """The digest a registry gives a schema 1 manifest: of its payload (`payload`)."""
    return "sha256:" + hashlib.sha256(payload(data)).hexdigest()


def payload(data: bytes) -> bytes:
    """What a schema 1 manifest says: for the signed (prettyjws) form, the payload the
    signature's `formatLength` and `formatTail` rebuild (the document without its
    signatures); the bytes themselves otherwise. The digest is of it, and it is what is
    parsed: hashing one text and parsing another would let bytes after the payload
    change the image a digest pins."""
    doc = images.parse_document(data, "schema 1 manifest")
    signatures = doc.get("signatures")
    if isinstance(signatures, list) and signatures and isinstance(signatures[0], dict):
        try:
            protected = load_json_object(
                _b64url(str(signatures[0].get("protected", ""))),
                "schema 1 signature header",
                max_size=images.MAX_DOCUMENT,
            )
            length, tail = protected["formatLength"], _b64url(protected["formatTail"])
        except (InvalidArgument, ValueError, KeyError, TypeError, binascii.Error):
            raise InvalidArgument("schema 1 manifest with an unreadable signature") from None
        if not isinstance(length, int) or not 0 < length <= len(data):
            raise InvalidArgument("schema 1 signature with an invalid formatLength")
        signed = data[:length] + tail
        if "signatures" in images.parse_document(signed, "schema 1 signed payload"):
            raise InvalidArgument("schema 1 signed payload carries signatures itself")
        return signed
    return data


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def convert(steps: list[Step], layers: dict[str, tuple[Descriptor, str]]) -> tuple[bytes, bytes]:
    """The config and the schema 2 manifest of a schema 1 image; `layers` maps each
    non-empty step's blob to its stored descriptor and its diff ID."""
    kept = [layers[s.blob_sum] for s in steps if not s.throwaway]
    newest = steps[-1].v1
    config: dict[str, Any] = {k: v for k, v in newest.items() if k not in _LAYER_KEYS}
    config.setdefault("os", "linux")
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, diff_id in kept]}
    config["history"] = [_history(s) for s in steps]
    config_data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": images.DOCKER_MANIFEST,
        "config": {
            "mediaType": images.DOCKER_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config_data).hexdigest(),
            "size": len(config_data),
        },
        "layers": [desc.to_json() for desc, _ in kept],
    }
    return config_data, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _history(step: Step) -> dict[str, Any]:
    """An OCI history entry from a v1Compatibility document."""
    v1 = step.v1
    entry: dict[str, Any] = {}
    for key in ("created", "author", "comment"):
        if isinstance(v1.get(key), str) and v1[key]:
            entry[key] = v1[key]
    container_config = v1.get("container_config")
    cmd = container_config.get("Cmd") if isinstance(container_config, dict) else None
    if isinstance(cmd, list) and all(isinstance(c, str) for c in cmd):
        entry["created_by"] = " ".join(cmd)
    if step.throwaway:
        entry["empty_layer"] = True
    return entry
