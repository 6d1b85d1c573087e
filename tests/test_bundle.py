from __future__ import annotations

import json

import numpy as np
import pytest

from pathguard.models.bundle import (
    SCHEMA_VERSION,
    BundleCompatibilityError,
    BundleIntegrityError,
    bundle_sha256,
    read_verified,
    verify_bundle,
    write_bundle,
)


def _npz_bytes(**arrays):
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def small_bundle(tmp_path):
    files = {
        "a.json": b'{"x": 1}\n',
        "sub/b.npz": _npz_bytes(w=np.arange(6, dtype=np.float32).reshape(2, 3)),
        "c.bin": bytes(range(256)),
    }
    out = tmp_path / "bundle"
    digest = write_bundle(out, files, {"name": "tiny", "version": "1"})
    return out, digest, files


def test_write_then_verify(small_bundle):
    out, digest, files = small_bundle
    manifest = verify_bundle(out)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["name"] == "tiny"
    assert set(manifest["files"]) == set(files)
    assert manifest["files"]["c.bin"]["size"] == 256
    assert bundle_sha256(out) == digest
    vf = read_verified(out)
    assert vf.json("a.json") == {"x": 1}
    assert vf.npz("sub/b.npz")["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("name", ["a.json", "sub/b.npz", "c.bin"])
def test_flipped_byte_is_named(small_bundle, name):
    out, _, files = small_bundle
    blob = bytearray((out / name).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (out / name).write_bytes(bytes(blob))
    with pytest.raises(BundleIntegrityError, match=name) as exc:
        verify_bundle(out)
    assert exc.value.file == name


def test_missing_and_extra_files_are_named(small_bundle):
    out, _, _ = small_bundle
    (out / "c.bin").unlink()
    with pytest.raises(BundleIntegrityError, match="c.bin is missing"):
        verify_bundle(out)


def test_unknown_extra_file(small_bundle):
    out, _, _ = small_bundle
    (out / "sub" / "evil.joblib").write_bytes(b"payload")
    with pytest.raises(BundleIntegrityError, match="sub/evil.joblib"):
        verify_bundle(out)


def test_manifest_tampering(small_bundle):
    out, _, _ = small_bundle
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleCompatibilityError, match="schema version"):
        verify_bundle(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(BundleIntegrityError, match="manifest.json"):
        verify_bundle(out)


def test_newer_pathguard_required(small_bundle):
    out, _, _ = small_bundle
    m = json.loads((out / "manifest.json").read_text())
    m["requires"] = {"pathguard": "99.0"}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleCompatibilityError, match="pathguard >= 99.0"):
        verify_bundle(out)


def _list_in_manifest(out, name: str, data: bytes) -> None:
    """Add ``name`` to the bundle's manifest with the true digest of ``data`` (so only the path can be wrong)."""
    import hashlib

    m = json.loads((out / "manifest.json").read_text())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("ABSOLUTE", "is not a relative path"),
        ("../outside.json", "'..' component"),
        ("sub/../../outside.json", "'..' component"),
        ("./a.json", "'.' or '..' component"),
        ("sub//b.npz", "empty"),
        ("..\\outside.json", "backslash"),
        ("sub\\b.npz", "backslash"),
        ("C:/outside.json", "is not a relative path"),
        ("C:outside.json", "is not a relative path"),
        ("\\\\host\\share\\outside.json", "is not a relative path"),
    ],
)
def test_manifest_paths_must_stay_inside_the_bundle(small_bundle, tmp_path, name, why):
    out, _, _ = small_bundle
    data = b'{"outside": true}\n'
    outside = tmp_path / "outside.json"  # a real file beside the bundle, with the digest the manifest claims
    outside.write_bytes(data)
    name = str(outside) if name == "ABSOLUTE" else name
    _list_in_manifest(out, name, data)
    with pytest.raises(BundleIntegrityError, match=why) as exc:
        read_verified(out)
    assert exc.value.file == name and repr(name) in str(exc.value)


def test_symlinks_out_of_the_bundle_are_refused(small_bundle, tmp_path):
    out, _, files = small_bundle
    data = b'{"outside": true}\n'
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.json").write_bytes(data)
    (out / "link.json").symlink_to(tmp_path / "elsewhere" / "x.json")
    _list_in_manifest(out, "link.json", data)
    with pytest.raises(BundleIntegrityError, match="link.json is a symlink that points outside") as exc:
        read_verified(out)
    assert exc.value.file == "link.json"

    (out / "link.json").unlink()
    (out / "d").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a folder on the way
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["d/x.json"] = m["files"].pop("link.json")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleIntegrityError, match="d/x.json is a symlink that points outside") as exc:
        read_verified(out)
    assert exc.value.file == "d/x.json"


def test_symlink_inside_the_bundle_is_allowed(small_bundle):
    out, _, files = small_bundle
    (out / "alias.json").symlink_to("a.json")
    _list_in_manifest(out, "alias.json", files["a.json"])
    assert read_verified(out).json("alias.json") == {"x": 1}


def test_a_bundle_the_filesystem_cannot_rename_is_replaced_by_copying(small_bundle, monkeypatch):
    """overlayfs (a folder of a container image's lower layer) refuses to rename the old bundle with EXDEV: it is
    copied aside and removed instead, and the new bundle takes its place, with nothing left behind."""
    import errno
    from pathlib import Path

    out, _, files = small_bundle
    rename = Path.replace

    def no_cross_device(self: Path, target: Path) -> Path:
        if self == out:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(self, target)

    monkeypatch.setattr(Path, "replace", no_cross_device)
    digest = write_bundle(out, {**files, "d.txt": b"new\n"}, {"name": "tiny", "version": "2"})
    assert verify_bundle(out)["version"] == "2" and bundle_sha256(out) == digest
    assert (out / "d.txt").read_bytes() == b"new\n"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
