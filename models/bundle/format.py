"""The artifact bundle: a folder with ``manifest.json`` and the files it lists, each with sha256 and size.

Verification before use: every file is read once into memory, its digest compared with the manifest,
and only those verified bytes are parsed (no time-of-check/time-of-use gap). Any missing, altered or
unknown extra file is an error naming the file. The bundle id (``Bundle.sha256``) is the sha256 of
``manifest.json``, which pins every other file.

Formats cannot execute code (json, safetensors, npz without pickle, onnx); nothing in a bundle is pickled (the
optional supervised ensembles are plain arrays too, see :mod:`pathguard.models.verdict.supervised`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from pathguard.models.errors import BundleCompatibilityError, BundleError, BundleIntegrityError

__all__ = [
    "BENIGN_RANGES",
    "EP_THRESHOLDS",
    "MAHALANOBIS_FILE",
    "MANIFEST",
    "SCHEMA_VERSION",
    "BundleCompatibilityError",
    "BundleError",
    "BundleIntegrityError",
    "ManifestFacts",
    "VerifiedFiles",
    "bundle_sha256",
    "check_bundle_target",
    "is_bundle",
    "library_versions",
    "npz_bytes",
    "read_verified",
    "verify_bundle",
    "write_bundle",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BENIGN_RANGES = "benign_similarity.npz"  # optional: per-class benign similarity ranges (reporting only)
MAHALANOBIS_FILE = "mahalanobis.npz"  # bundles whose verdict fuses the class-conditional Gaussians
EP_THRESHOLDS = "ep_thresholds.json"  # Effective Path with the absolute rule: its per-layer thresholds
_PACKAGES = ("pathguard", "torch", "numpy", "scikit-learn", "onnx", "onnxruntime", "safetensors")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a bundle depends on."""
    out = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_sha256(path: str | Path) -> str:
    """The bundle id: sha256 of its ``manifest.json``."""
    return _sha256((Path(path) / MANIFEST).read_bytes())


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    if not mpath.is_file():
        raise BundleIntegrityError(MANIFEST, f"bundle {root}: {MANIFEST} is missing")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleIntegrityError(MANIFEST, f"bundle {root}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleIntegrityError(MANIFEST, f"bundle {root}: {MANIFEST} has no 'files' table")
    return manifest, raw


def _check_compatibility(root: Path, manifest: dict[str, Any]) -> None:
    schema = manifest.get("schema_version")
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise BundleCompatibilityError(
            f"bundle {root} has schema version {schema!r}; "
            f"this pathguard reads up to {SCHEMA_VERSION} - upgrade pathguard"
        )
    req = manifest.get("requires", {})
    need = req.get("pathguard")
    have = library_versions()["pathguard"]
    if need and have != "not installed" and _version_tuple(have) < _version_tuple(need):
        raise BundleCompatibilityError(f"bundle {root} needs pathguard >= {need}, installed is {have}")
    opset = req.get("onnx_opset")
    if opset is not None:
        try:
            import onnx.defs
        except ImportError:  # a server without the builder's extras: onnxruntime refuses the graph if it cannot run it
            return
        if onnx.defs.onnx_opset_version() < int(opset):
            raise BundleCompatibilityError(
                f"bundle {root} needs ONNX opset {opset}; installed onnx supports {onnx.defs.onnx_opset_version()}"
            )


class ManifestFacts:
    """What a loaded bundle says of itself, read from its verified ``manifest``: name, version, dataset, classes and
    input shape."""

    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input"]["shape"]
        return (int(c), int(h), int(w))


@dataclass
class VerifiedFiles:
    """Bytes of every bundle file, each checked against the manifest."""

    root: Path
    manifest: dict[str, Any]
    sha256: str
    blobs: dict[str, bytes] = field(repr=False)

    def bytes(self, name: str) -> bytes:
        try:
            return self.blobs[name]
        except KeyError:
            msg = f"bundle {self.root}: required file {name} is not in the manifest"
            raise BundleIntegrityError(name, msg) from None

    def json(self, name: str) -> Any:
        return json.loads(self.bytes(name))

    def npz(self, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.bytes(name)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def has(self, name: str) -> bool:
        return name in self.blobs


def _check_member(root: Path, name: str) -> Path:
    """The path of manifest entry ``name``: a relative POSIX path that stays inside the bundle folder.

    Refused (naming the file): absolute paths, drive letters, backslashes, empty or ``.``/``..`` components, and
    symlinks (of the file or a folder on its way) that resolve outside the bundle folder.
    """
    parts = name.split("/")
    why = None
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        why = "is not a relative path"
    elif "\\" in name:
        why = "contains a backslash (manifest paths use '/')"
    elif any(p in ("", ".", "..") for p in parts):
        why = "has an empty, '.' or '..' component"
    if why is not None:
        raise BundleIntegrityError(name, f"bundle {root}: manifest entry {name!r} {why}")
    fpath = root / name
    if not fpath.resolve().is_relative_to(root.resolve()):
        raise BundleIntegrityError(name, f"bundle {root}: file {name} is a symlink that points outside the bundle")
    return fpath


def _listed_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}


def read_verified(path: str | Path) -> VerifiedFiles:
    """Read and verify every file of the bundle at ``path``.

    Raises
    ------
    BundleIntegrityError
        A listed file is missing or its size/sha256 differ, an unlisted file is present, or a manifest path is
        not a relative path inside the bundle (absolute, ``..``, backslash or drive letter, a symlink out).
    BundleCompatibilityError
        The bundle needs a newer schema, pathguard or ONNX opset.
    """
    root = Path(path)
    manifest, raw = _read_manifest(root)
    _check_compatibility(root, manifest)
    files: dict[str, dict[str, Any]] = manifest["files"]
    paths = {name: _check_member(root, name) for name in sorted(files)}
    extra = sorted(_listed_files(root) - set(files))
    if extra:
        raise BundleIntegrityError(extra[0], f"bundle {root}: unknown file {extra[0]} is not listed in the manifest")
    blobs = {}
    for name, entry in sorted(files.items()):
        fpath = paths[name]
        if not fpath.is_file():
            raise BundleIntegrityError(name, f"bundle {root}: file {name} is missing")
        data = fpath.read_bytes()
        if len(data) != entry.get("size") or _sha256(data) != entry.get("sha256"):
            raise BundleIntegrityError(name, f"bundle {root}: file {name} does not match its sha256 in the manifest")
        blobs[name] = data
    return VerifiedFiles(root, manifest, _sha256(raw), blobs)


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Verify the bundle at ``path`` and return its manifest (see :func:`read_verified`)."""
    return read_verified(path).manifest


def write_bundle(out_dir: str | Path, files: dict[str, bytes], manifest: dict[str, Any]) -> str:
    """Write ``files`` and a manifest listing their digests into ``out_dir``; returns the bundle sha256.

    The folder is assembled beside ``out_dir`` and moved into place at the end, so a crash never leaves
    a half-written bundle under the final name. An existing bundle (a folder with a manifest) at ``out_dir`` is
    replaced by two renames (the old one moved aside, the new one moved in, then the old one removed); an
    existing empty folder is replaced too.

    Raises
    ------
    BundleError
        ``out_dir`` exists and is not a bundle (a file, or a folder with files but no manifest): nothing is
        written and nothing there is touched.
    """
    out = Path(out_dir)
    check_bundle_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        **manifest,
        "files": {n: {"sha256": _sha256(b), "size": len(b)} for n, b in sorted(files.items())},
    }
    raw = (json.dumps(full, indent=2, sort_keys=False) + "\n").encode()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by other users (e.g. a container's non-root user)
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_bytes(raw)
        check_bundle_target(out)  # again: the folder may have changed while the files were written
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            _move_aside(out, old / "bundle")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (old / "bundle").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return _sha256(raw)


def _move_aside(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; where the filesystem cannot rename that folder (overlayfs without ``redirect_dir``
    refuses a folder of a lower layer with EXDEV, e.g. one a container image's earlier layer wrote), copy it there
    and remove it."""
    try:
        src.replace(dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copytree(src, dst, symlinks=True)
        shutil.rmtree(src)


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a bundle manifest."""
    return (Path(path) / MANIFEST).is_file()


def check_bundle_target(out: Path) -> None:
    """Raise :class:`BundleError` unless ``out`` is absent, an empty folder or a bundle (safe to replace)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise BundleError(f"{out} exists and is not a bundle folder; refusing to replace it")
    if not is_bundle(out) and any(out.iterdir()):
        raise BundleError(f"{out} is a folder with files but no {MANIFEST}, not a bundle; refusing to replace it")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Compressed ``.npz`` bytes of plain arrays (loadable with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()
