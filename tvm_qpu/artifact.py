"""Compiled-model artifacts: one tar file, validated on load, no pickle anywhere.

Layout (all regular files, flat relative names)::

    manifest.json              {"format": "tvm-qpu-artifact", "version": 1,
                                "files": {name: {"sha256": hex, "size": bytes}, ...}}
    model.json                 metadata: inputs, outputs, target, host triple, regions, report
    lib.so                     the exported TVM library (Relax VM executable, host code)
    plans/<key>.json           KernelPlan.to_json() of each QPU region
    plans/<key>/<const>.npy    its constants (weights in device layout), np.save(allow_pickle=False)

Loading (:func:`read_artifact`) checks, before anything is used: the tar is readable; every member
is a regular file with a safe relative name (no absolute path, no ``..``, no links, devices or
FIFOs, no duplicates); the manifest's format and version; that the members are exactly the files
the manifest lists; each member's size and sha256. Any failure is one :class:`ArtifactError`.
Nothing is ever extracted by tarfile itself: bytes are read into memory and written by
:func:`safe_extract` only under the target folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np

FORMAT = "tvm-qpu-artifact"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MEMBER_BYTES = 1 << 31


class ArtifactError(Exception):
    """The file is not a valid tvm-qpu artifact (unreadable, corrupted, unsafe, wrong version)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_member_name(name: str) -> str:
    """A safe relative POSIX name, or ArtifactError."""
    if not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"unsafe member name {name!r}")
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise ArtifactError(f"member {name!r} has an absolute path")
    parts = name.split("/")
    if any(p in ("..", "") for p in parts) or posixpath.normpath(name) != name:
        raise ArtifactError(f"member {name!r} is not a plain relative path (no '..', no empty parts)")
    return name


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a, order="C"), allow_pickle=False)      # keeps 0-d arrays 0-d
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise ArtifactError(f"array member is not a plain .npy array: {e}") from e


def write_artifact(path, files: dict) -> None:
    """Write ``files`` (name -> bytes) plus a manifest as one tar, atomically."""
    for name in files:
        check_member_name(name)
        if name == MANIFEST:
            raise ArtifactError(f"{MANIFEST} is reserved")
    manifest = {"format": FORMAT, "version": VERSION,
                "files": {n: {"sha256": _sha256(b), "size": len(b)} for n, b in sorted(files.items())}}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tvmqpu-", suffix=".tar", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in [(MANIFEST, json.dumps(manifest, indent=1).encode())] + sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Artifact:
    files: dict                     # name -> bytes (validated)
    manifest: dict

    def json(self, name: str) -> dict:
        try:
            return json.loads(self.files[name].decode())
        except KeyError:
            raise ArtifactError(f"artifact has no {name}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{name} is not valid JSON: {e}") from e

    def array(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ArtifactError(f"artifact has no {name}")
        return npy_load(self.files[name])


def read_artifact(path) -> Artifact:
    """Read and validate an artifact (see module docstring). Raises ArtifactError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: not a regular file")
    files = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                name = check_member_name(m.name)
                if not m.isreg():
                    what = ("link" if (m.issym() or m.islnk()) else "device" if (m.ischr() or m.isblk())
                            else "FIFO" if m.isfifo() else "directory" if m.isdir() else "special file")
                    raise ArtifactError(f"member {name!r} is a {what}; artifacts hold regular files only")
                if name in files:
                    raise ArtifactError(f"member {name!r} appears twice")
                if m.size > MAX_MEMBER_BYTES:
                    raise ArtifactError(f"member {name!r} is implausibly large ({m.size} bytes)")
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise ArtifactError(f"member {name!r} is truncated ({len(data)} of {m.size} bytes)")
                files[name] = data
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable tvm-qpu artifact (corrupted or truncated tar: {e})") from None
    if MANIFEST not in files:
        raise ArtifactError(f"{path}: not a tvm-qpu artifact (no {MANIFEST})")
    try:
        manifest = json.loads(files[MANIFEST].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a tvm-qpu artifact (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('version')!r} is not supported "
                            f"(this tvm-qpu reads version {VERSION}); rebuild it with this tvm-qpu")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{path}: manifest has no file list")
    present = set(files) - {MANIFEST}
    if set(listed) != present:
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        raise ArtifactError(f"{path}: members do not match the manifest (missing {missing}, unlisted {extra})")
    for name, entry in listed.items():
        data = files[name]
        if not isinstance(entry, dict) or entry.get("size") != len(data) or entry.get("sha256") != _sha256(data):
            raise ArtifactError(f"{path}: checksum mismatch for {name} (the artifact is corrupted)")
    del files[MANIFEST]
    return Artifact(files, manifest)


def safe_extract(artifact: Artifact, folder, names=None) -> dict:
    """Write (some of) an artifact's files under ``folder``; returns name -> path.

    Each destination is resolved and must stay inside ``folder`` (names were validated already;
    this is the second line of defence)."""
    root = os.path.realpath(os.fspath(folder))
    out = {}
    for name in (artifact.files if names is None else names):
        check_member_name(name)
        dest = os.path.realpath(os.path.join(root, *name.split("/")))
        if os.path.commonpath([root, dest]) != root:
            raise ArtifactError(f"member {name!r} would be written outside {root}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.lexists(dest):
            raise ArtifactError(f"refusing to overwrite {dest}")
        with open(dest, "xb") as f:
            f.write(artifact.files[name])
        out[name] = dest
    return out
