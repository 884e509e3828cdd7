"""Compiled-model artifacts: one tar file, validated on load, no pickle anywhere.

Layout (all regular files, flat relative names)::

    manifest.json              {"format": "tvm-qpu-artifact", "version": 2,
                                "files": {name: {"sha256": hex, "size": bytes}, ...}}
    manifest.sig               optional: Ed25519 signature of manifest.json's bytes (JSON, below)
    model.json                 metadata: inputs, outputs, target, host triple, regions, report;
                               each region lists its constants with their shape and dtype
    lib.so                     the exported TVM library (Relax VM executable, host code)
    plans/<key>.json           KernelPlan.to_json() of each QPU region
    plans/<key>/<const>.npy    its constants (weights in device layout), np.save(allow_pickle=False)

Loading (:func:`read_artifact`) checks, before anything is used: the tar is readable; every member
is a regular file with a safe relative name (no absolute path, no ``..``, no links, devices or
FIFOs, no duplicates); the manifest's format and version; that the members are exactly the files
the manifest lists; each member's size and sha256; with ``trusted_keys``, that manifest.sig is a
valid signature of the manifest by one of them (so every member is the signer's). Any failure is
one :class:`ArtifactError`. Nothing is ever extracted by tarfile itself: bytes are read into memory
and written by :func:`safe_extract` only under the target folder. :func:`check_plan` then checks
each region's plan against its members (``tvm_qpu.load`` calls it).

Checksums only catch accidents: whoever can write the file can recompute them. Loading an artifact
runs its ``lib.so`` (native code) in the loading process, so load only artifacts you trust: sign
them (``tvmc compile --sign-key``, :func:`generate_key`) and load with ``trusted_keys``. Signing uses
the ``cryptography`` package's Ed25519 (``pip install tvm-qpu[sign]``).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass, field

import numpy as np

FORMAT = "tvm-qpu-artifact"
VERSION = 2                      # 2: constants carry shape/dtype in model.json; optional signature
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
RESERVED = (MANIFEST, SIGNATURE)
MAX_MEMBER_BYTES = 1 << 31
SIGN_ALGORITHM = "ed25519"
INSTALL_SIGN = "signing needs the 'cryptography' package: pip install 'tvm-qpu[sign]' (or cryptography)"


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


def _umask() -> int:
    """The process umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_artifact(path, files: dict, sign_key=None) -> None:
    """Write ``files`` (name -> bytes) plus a manifest as one tar, atomically, with the
    permissions a new file gets (0666 minus the umask). ``sign_key`` (a private key file, PEM
    bytes or an Ed25519PrivateKey) adds manifest.sig."""
    for name in files:
        check_member_name(name)
        if name in RESERVED:
            raise ArtifactError(f"{name} is reserved")
    manifest = {"format": FORMAT, "version": VERSION,
                "files": {n: {"sha256": _sha256(b), "size": len(b)} for n, b in sorted(files.items())}}
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    members = [(MANIFEST, manifest_bytes)]
    if sign_key is not None:
        members.append((SIGNATURE, sign_manifest(manifest_bytes, sign_key)))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tvmqpu-", suffix=".tar", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())             # mkstemp makes 0600; follow the umask
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members + sorted(files.items()):
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
    signer: str | None = None       # key id of the trusted key that signed it (when checked)
    signature: dict | None = field(default=None, repr=False)

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


def read_artifact(path, trusted_keys=None) -> Artifact:
    """Read and validate an artifact (see module docstring). Raises ArtifactError.

    ``trusted_keys``: public keys (files, PEM bytes or Ed25519PublicKey objects); when given (even
    empty) the artifact must carry a valid signature by one of them."""
    path = os.fspath(path)
    trusted = None if trusted_keys is None else load_public_keys(trusted_keys)
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
    present = set(files) - set(RESERVED)
    if set(listed) != present:
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        raise ArtifactError(f"{path}: members do not match the manifest (missing {missing}, unlisted {extra})")
    for name, entry in listed.items():
        data = files[name]
        if not isinstance(entry, dict) or entry.get("size") != len(data) or entry.get("sha256") != _sha256(data):
            raise ArtifactError(f"{path}: checksum mismatch for {name} (the artifact is corrupted)")
    manifest_bytes = files.pop(MANIFEST)
    sig_bytes = files.pop(SIGNATURE, None)
    signature = _parse_signature(sig_bytes, path) if sig_bytes is not None else None
    signer = None
    if trusted is not None:
        signer = _verify(manifest_bytes, signature, trusted, path)
    return Artifact(files, manifest, signer, signature)


# ---------------------------------------------------------------------------------------------
# signing (Ed25519 over manifest.json, which holds every other member's sha256)

def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ArtifactError(INSTALL_SIGN) from None
    return ed25519, serialization, InvalidSignature


def key_id(public_key) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of sha256(raw key bytes)."""
    _, ser, _ = _crypto()
    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return _sha256(raw)[:16]


def _read_key_bytes(key, what):
    if isinstance(key, (bytes, bytearray)):
        return bytes(key), "<bytes>"
    path = os.fspath(key)
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except OSError as e:
        raise ArtifactError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_private_key(key):
    """An Ed25519 private key from a PEM file (tvmc keygen's .key), PEM bytes or a key object."""
    ed, ser, _ = _crypto()
    if isinstance(key, ed.Ed25519PrivateKey):
        return key
    data, where = _read_key_bytes(key, "signing key")
    try:
        k = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{where}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(k, ed.Ed25519PrivateKey):
        raise ArtifactError(f"{where}: not an Ed25519 private key (make one with tvmc keygen)")
    return k


def load_public_keys(keys) -> dict:
    """key id -> Ed25519PublicKey for public key files (tvmc keygen's .pub), PEM bytes or objects."""
    ed, ser, _ = _crypto()
    if isinstance(keys, (str, bytes, os.PathLike)) or isinstance(keys, ed.Ed25519PublicKey):
        keys = [keys]
    out = {}
    for key in keys:
        if isinstance(key, ed.Ed25519PublicKey):
            k = key
        else:
            data, where = _read_key_bytes(key, "trusted key")
            try:
                k = ser.load_pem_public_key(data)
            except (ValueError, TypeError) as e:
                raise ArtifactError(f"{where}: not a PEM public key ({e})") from None
            if not isinstance(k, ed.Ed25519PublicKey):
                raise ArtifactError(f"{where}: not an Ed25519 public key (make one with tvmc keygen)")
        out[key_id(k)] = k
    return out


def generate_key(stem) -> tuple:
    """Write a new Ed25519 key pair: ``<stem>.key`` (private, PEM, mode 0600) and ``<stem>.pub``
    (public, PEM). Refuses to overwrite. Returns (private path, public path, key id)."""
    ed, ser, _ = _crypto()
    stem = os.fspath(stem)
    priv_path, pub_path = stem + ".key", stem + ".pub"
    for p in (priv_path, pub_path):
        if os.path.lexists(p):
            raise ArtifactError(f"{p} exists; refusing to overwrite a key")
    k = ed.Ed25519PrivateKey.generate()
    priv = k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub = k.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    with open(pub_path, "xb") as f:
        f.write(pub)
    return priv_path, pub_path, key_id(k.public_key())


def sign_manifest(manifest_bytes: bytes, sign_key) -> bytes:
    """The manifest.sig member for ``manifest_bytes``."""
    k = load_private_key(sign_key)
    sig = k.sign(manifest_bytes)
    return json.dumps({"algorithm": SIGN_ALGORITHM, "key_id": key_id(k.public_key()),
                       "signature": base64.b64encode(sig).decode()}, indent=1).encode()


def _parse_signature(data: bytes, path) -> dict:
    try:
        sig = json.loads(data.decode())
        if not (isinstance(sig, dict) and isinstance(sig.get("key_id"), str)
                and isinstance(sig.get("signature"), str)):
            raise ValueError("missing key_id or signature")
        sig["raw"] = base64.b64decode(sig["signature"], validate=True)
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: {SIGNATURE} is malformed ({e})") from None
    if sig.get("algorithm") != SIGN_ALGORITHM:
        raise ArtifactError(f"{path}: {SIGNATURE} uses algorithm {sig.get('algorithm')!r}; "
                            f"only {SIGN_ALGORITHM} is supported")
    return sig


def _verify(manifest_bytes: bytes, signature, trusted: dict, path) -> str:
    """The signer's key id, or ArtifactError (unsigned, unknown signer, bad signature)."""
    _, _, invalid = _crypto()
    if signature is None:
        raise ArtifactError(f"{path}: refusing to load an unsigned artifact (trusted keys were given; "
                            f"sign it with tvmc compile --sign-key)")
    kid = signature["key_id"]
    key = trusted.get(kid)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise ArtifactError(f"{path}: refusing to load: signed by key {kid}, which is not a trusted key "
                            f"(trusted: {known})")
    try:
        key.verify(signature["raw"], manifest_bytes)
    except invalid:
        raise ArtifactError(f"{path}: refusing to load: the signature by key {kid} does not match the "
                            f"contents (the artifact was modified after signing)") from None
    return kid


# ---------------------------------------------------------------------------------------------
# region plans against their members

def _uniform_reads(words) -> int:
    """How many uniforms a program reads from its uniform stream: one per ldunif / ldunifrf
    signal (the generators read each argument once; ldunifa streams are separate)."""
    from tvm_qpu.codegen import isa
    af = isa.ALU_FIELDS
    n = 0
    for w in words:
        w = int(w)
        if isa.get_field(w, af, "op_mul") == 0 and isa.is_branch_word(w):
            continue
        sigs = isa.SIG_TABLE.get(isa.get_field(w, af, "sig"), ())
        n += ("ldunif" in sigs) + ("ldunifrf" in sigs)
    return n


def check_plan(plan, constant_specs: dict, where: str) -> None:
    """Check a loaded KernelPlan against what its artifact must hold, else ArtifactError naming
    ``where``: every weight buffer has constant data and nothing else does; each constant has the
    shape and dtype recorded for it (``constant_specs``: name -> {"shape", "dtype"}) and fits its
    device buffer; each launch has code and at least as many uniforms (kernel arguments) as the
    code reads, each a known buffer address in range or a number."""
    weights = {b.name: b for b in plan.buffers if b.role == "weight"}
    if set(plan.constants) != set(weights):
        raise ArtifactError(f"{where}: constants {sorted(plan.constants)} do not match the plan's weight "
                            f"buffers {sorted(weights)}")
    if set(constant_specs) != set(weights):
        raise ArtifactError(f"{where}: constant table {sorted(constant_specs)} does not match the plan's "
                            f"weight buffers {sorted(weights)}")
    for name, a in plan.constants.items():
        spec = constant_specs[name]
        want_shape, want_dtype = list(spec.get("shape", [])), str(spec.get("dtype"))
        if list(a.shape) != want_shape or str(a.dtype) != want_dtype:
            raise ArtifactError(f"{where}: constant {name} is {a.dtype}{list(a.shape)}, the plan expects "
                                f"{want_dtype}{want_shape}")
        if a.nbytes > weights[name].nbytes:
            raise ArtifactError(f"{where}: constant {name} ({a.nbytes} bytes) does not fit its buffer "
                                f"({weights[name].nbytes} bytes)")
    sizes = {b.name: b.nbytes for b in plan.buffers}
    if not plan.launches:
        raise ArtifactError(f"{where}: plan has no launches")
    for i, L in enumerate(plan.launches):
        what = f"{where}: launch {i} ({L.name})"
        if len(L.words) == 0:
            raise ArtifactError(f"{what}: no code")
        for j, e in enumerate(L.uniforms):
            ok = (len(e) == 3 and e[0] == "addr" and e[1] in sizes and isinstance(e[2], int)
                  and 0 <= e[2] <= sizes[e[1]]) or \
                 (len(e) == 2 and e[0] in ("u32", "f32") and isinstance(e[1], (int, float)))
            if not ok:
                raise ArtifactError(f"{what}: uniform {j} {list(e)!r} is not a buffer address in range "
                                    f"or a number")
        reads = _uniform_reads(L.words)
        if len(L.uniforms) < reads:
            raise ArtifactError(f"{what}: the code reads {reads} uniforms (kernel arguments) but the "
                                f"stream holds {len(L.uniforms)} (truncated)")


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
