"""Artifacts: round trip, checksum / version / truncation rejection, unsafe members, no pickle."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

import qpu_doubles as D
from tvm_qpu.artifact import ArtifactError, npy_bytes, read_artifact, safe_extract, write_artifact

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A digits CNN artifact with test-double QPU regions (placement=all)."""
    pytest.importorskip("tvm")
    import tvm_qpu
    from tvm_qpu.codegen import registry
    mp = pytest.MonkeyPatch()
    D.install(mp)
    try:
        mod, params = tvm_qpu.from_onnx(MODELS / "digits_cnn.onnx")
        lib = tvm_qpu.build(mod, placement="all", params=params)
        path = lib.save(tmp_path_factory.mktemp("art") / "digits.tar")
    finally:
        mp.undo()
    assert registry._REGISTRY is not None
    return lib, Path(path)


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def _rewrite(path, dst, change):
    """Copy an artifact, letting ``change(name, data)`` return new bytes (or None to drop)."""
    with tarfile.open(path) as src, tarfile.open(dst, "w") as out:
        for m in src:
            data = change(m.name, src.extractfile(m).read())
            if data is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return dst


def test_round_trip_runs_and_matches(built, tmp_path):
    import tvm_qpu
    lib, path = built
    names = set(_members(path))
    assert {"manifest.json", "model.json", "lib.so"} <= names
    assert sum(n.endswith(".npy") for n in names) >= 5           # weights and biases of 5 regions
    x = np.load(MODELS / "digits_test.npz")["x"][:1]
    r1 = tvm_qpu.load(path, device=D.DoubleDevice())
    r2 = lib.runner(device=D.DoubleDevice())
    try:
        a, b = r1.run(input=x)["logits"], r2.run(input=x)["logits"]
    finally:
        r1.close(), r2.close()
    np.testing.assert_array_equal(a, b)
    meta = json.loads(_members(path)["model.json"])
    assert meta["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert len(meta["regions"]) == len(lib.regions) and meta["report"]["placement"] == "all"


def test_plan_constants_survive_round_trip(built):
    lib, path = built
    art = read_artifact(path)
    for r in lib.regions:
        for name, arr in r.plan.constants.items():
            np.testing.assert_array_equal(art.array(f"plans/{r.key}/{name}.npy"), arr)


def test_checksum_mismatch_is_rejected(built, tmp_path):
    _, path = built

    def flip(name, data):
        if name == "lib.so":
            b = bytearray(data)
            b[len(b) // 2] ^= 0xFF
            return bytes(b)
        return data
    bad = _rewrite(path, tmp_path / "bad.tar", flip)
    with pytest.raises(ArtifactError, match="checksum mismatch for lib.so"):
        read_artifact(bad)


@pytest.mark.parametrize("cut", [0.1, 0.5, "last member's last byte"])
def test_truncated_artifact_is_rejected(built, tmp_path, cut):
    _, path = built
    data = path.read_bytes()
    if isinstance(cut, str):                 # lose exactly one byte of real content
        with tarfile.open(path) as t:
            last = t.getmembers()[-1]
        n = last.offset_data + last.size - 1
    else:
        n = int(len(data) * cut)
    bad = tmp_path / "cut.tar"
    bad.write_bytes(data[:n])
    with pytest.raises(ArtifactError):
        read_artifact(bad)


def test_wrong_version_is_rejected(built, tmp_path):
    _, path = built

    def bump(name, data):
        if name == "manifest.json":
            m = json.loads(data)
            m["version"] = 99
            return json.dumps(m).encode()
        return data
    with pytest.raises(ArtifactError, match="version 99 is not supported"):
        read_artifact(_rewrite(path, tmp_path / "v99.tar", bump))


def test_missing_and_unlisted_members_are_rejected(built, tmp_path):
    _, path = built
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        read_artifact(_rewrite(path, tmp_path / "drop.tar", lambda n, d: None if n == "model.json" else d))


def test_not_an_artifact(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"hello world" * 100)
    with pytest.raises(ArtifactError):
        read_artifact(p)
    with pytest.raises(ArtifactError, match="no such file"):
        read_artifact(tmp_path / "nope.tar")
    write_artifact(p, {"a.txt": b"x"})
    with tarfile.open(p) as t:
        assert t.getnames() == ["manifest.json", "a.txt"]
    # a valid tar without a manifest
    with tarfile.open(tmp_path / "plain.tar", "w") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_artifact(tmp_path / "plain.tar")


def _evil_tar(path, member: tarfile.TarInfo, data=b"evil"):
    """A tar holding a correct manifest for 'ok.txt' plus one hostile member."""
    manifest = {"format": "tvm-qpu-artifact", "version": 1, "files": {}}
    with tarfile.open(path, "w") as t:
        m = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(m)
        t.addfile(info, io.BytesIO(m))
        if member.isreg():
            member.size = len(data)
            t.addfile(member, io.BytesIO(data))
        else:
            t.addfile(member)
    return path


def _info(name, type_=tarfile.REGTYPE, linkname=""):
    i = tarfile.TarInfo(name)
    i.type = type_
    i.linkname = linkname
    return i


@pytest.mark.parametrize("member, why", [
    (_info("../escape.txt"), "plain relative path"),
    (_info("a/../../escape.txt"), "plain relative path"),
    (_info("/tmp/tvm_qpu_abs_escape.txt"), "absolute path"),
    (_info("link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_info("hard", tarfile.LNKTYPE, "manifest.json"), "link"),
    (_info("dev", tarfile.CHRTYPE), "device"),
    (_info("fifo", tarfile.FIFOTYPE), "FIFO"),
    (_info("dir", tarfile.DIRTYPE), "directory"),
])
def test_unsafe_members_are_rejected(tmp_path, member, why):
    work = tmp_path / "work"
    work.mkdir()
    p = _evil_tar(tmp_path / "evil.tar", member)
    with pytest.raises(ArtifactError, match=why):
        read_artifact(p)
    assert not (tmp_path / "escape.txt").exists() and not os.path.exists("/tmp/tvm_qpu_abs_escape.txt")
    assert list(work.iterdir()) == []


def test_load_rejects_unsafe_artifact_before_touching_disk(tmp_path):
    pytest.importorskip("tvm")
    import tvm_qpu
    p = _evil_tar(tmp_path / "evil.tar", _info("../escape.txt"))
    with pytest.raises(ArtifactError):
        tvm_qpu.load(p)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_duplicate_members_are_rejected(tmp_path):
    p = tmp_path / "dup.tar"
    write_artifact(p, {"a.txt": b"x"})
    with tarfile.open(p, "a") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"y"))
    with pytest.raises(ArtifactError, match="twice"):
        read_artifact(p)


def test_safe_extract_stays_in_folder(tmp_path):
    p = tmp_path / "a.tar"
    write_artifact(p, {"x/y.txt": b"1", "z.npy": npy_bytes(np.arange(3))})
    art = read_artifact(p)
    out = safe_extract(art, tmp_path / "dst")
    assert sorted(Path(v).relative_to(tmp_path / "dst").as_posix() for v in out.values()) == ["x/y.txt", "z.npy"]
    art.files["../bad"] = b"2"
    with pytest.raises(ArtifactError):
        safe_extract(art, tmp_path / "dst2", ["../bad"])
    assert not (tmp_path / "bad").exists()


def test_object_arrays_are_refused_without_pickle(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    p = tmp_path / "obj.tar"
    write_artifact(p, {"c.npy": buf.getvalue()})
    with pytest.raises(ArtifactError, match="not a plain .npy"):
        read_artifact(p).array("c.npy")


def test_no_pickle_in_frontend_sources():
    src = Path(__file__).resolve().parent.parent / "tvm_qpu"
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, f.name


def test_two_loaded_copies_of_one_artifact_are_independent(tmp_path):
    """Closing one runner must not unload the regions of another copy of the same artifact, and
    each runner's regions run on its own executor (device)."""
    import numpy as np
    import tvm_qpu
    from pathlib import Path
    model = Path(__file__).resolve().parent.parent / "models" / "mlp.onnx"
    mod, params = tvm_qpu.from_onnx(str(model))
    path = str(tmp_path / "mlp.tar")
    tvm_qpu.build(mod, target="qpu", params=params, placement="all").save(path)
    a = tvm_qpu.load(path, device="emulator")
    b = tvm_qpu.load(path, device="emulator")
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    ya = a.run(input=x)
    b.run(input=x)
    assert sum(st.calls for st in a.executor.stats.values()) > 0
    assert sum(st.calls for st in b.executor.stats.values()) > 0      # b's calls went to b
    b.close()
    yb_after = a.run(input=x)                                         # still loaded for a
    for k in ya:
        np.testing.assert_array_equal(ya[k], yb_after[k])
    a.close()


def test_npy_members_keep_zero_d_arrays():
    import numpy as np
    from tvm_qpu.artifact import npy_bytes, npy_load
    for a in (np.array(3.5, np.float32), np.arange(6, dtype=np.int8).reshape(2, 3)[:, ::2]):
        b = npy_load(npy_bytes(a))
        assert b.shape == a.shape and b.dtype == a.dtype
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# members checked against the plan (checksums recomputed, as anyone who edits a file can)

def _files(path) -> dict:
    """An artifact's members without the manifest and signature."""
    return {n: d for n, d in _members(path).items() if n not in ("manifest.json", "manifest.sig")}


def _recomputed(path, dst, change, sign_key=None):
    """Rewrite an artifact through write_artifact (fresh, valid checksums) after ``change(files)``."""
    files = _files(path)
    change(files)
    write_artifact(dst, files, sign_key=sign_key)
    return dst


@pytest.fixture(scope="module")
def real_mlp(tmp_path_factory):
    """The MLP with the real QPU kernels (placement=all); loading needs no emulation."""
    pytest.importorskip("tvm")
    import tvm_qpu
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    lib = tvm_qpu.build(mod, placement="all", params=params)
    assert lib.regions and any(r.plan.constants for r in lib.regions)
    return lib, Path(lib.save(tmp_path_factory.mktemp("real") / "mlp.tar"))


def _first_constant(path):
    meta = json.loads(_files(path)["model.json"])
    r = next(r for r in meta["regions"] if r["constants"])
    name, c = next(iter(r["constants"].items()))
    return r, name, c


def _load_error(path) -> str:
    import tvm_qpu
    with pytest.raises(ArtifactError) as e:
        tvm_qpu.load(path, device="emulator")
    return str(e.value)


def test_round_trip_real_kernels_passes_the_plan_checks(real_mlp):
    import tvm_qpu
    _, path = real_mlp
    tvm_qpu.load(path, device="emulator").close()


@pytest.mark.parametrize("how, needle", [
    ("shape", "the plan expects"),
    ("dtype", "the plan expects"),
    ("short", "the plan expects"),
])
def test_constant_of_wrong_shape_or_dtype_is_refused(real_mlp, tmp_path, how, needle):
    _, path = real_mlp
    _, name, c = _first_constant(path)

    def change(files):
        a = np.load(io.BytesIO(files[c["member"]]))
        b = {"shape": a.reshape(1, -1), "dtype": a.astype(np.float64), "short": a.reshape(-1)[:-1]}[how]
        files[c["member"]] = npy_bytes(b)
    err = _load_error(_recomputed(path, tmp_path / "bad.tar", change))
    assert f"constant {name}" in err and needle in err


def _edit_plan(files, edit):
    meta = json.loads(files["model.json"])
    key = meta["regions"][0]["plan"]
    plan = json.loads(files[key])
    edit(plan)
    files[key] = json.dumps(plan).encode()


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["launches"][-1]["uniforms"].pop(), "(truncated)"),
    (lambda p: p["launches"][-1].__setitem__("uniforms", []), "(truncated)"),
    (lambda p: p["launches"][-1]["uniforms"].__setitem__(0, ["addr", "nosuch", 0]), "not a buffer address"),
    (lambda p: p["launches"][-1]["uniforms"].__setitem__(0, ["addr", p["buffers"][0]["name"], 1 << 30]),
     "not a buffer address"),
    (lambda p: p["launches"][-1]["uniforms"].__setitem__(0, ["u32"]), "not a buffer address"),
    (lambda p: p["launches"][-1].__setitem__("words", []), "no code"),
    (lambda p: p.__setitem__("launches", []), "no launches"),
])
def test_kernel_argument_stream_is_checked(real_mlp, tmp_path, edit, needle):
    _, path = real_mlp
    err = _load_error(_recomputed(path, tmp_path / "bad.tar", lambda f: _edit_plan(f, edit)))
    assert needle in err, err


def test_constants_must_match_the_weight_buffers(real_mlp, tmp_path):
    _, path = real_mlp
    r, name, c = _first_constant(path)

    def drop_spec(files):
        meta = json.loads(files["model.json"])
        for reg in meta["regions"]:
            if reg["plan"] == r["plan"]:
                del reg["constants"][name]
        files["model.json"] = json.dumps(meta).encode()
        del files[c["member"]]
        plan = json.loads(files[r["plan"]])             # and from the plan's own list
        plan["constants"].remove(name)
        files[r["plan"]] = json.dumps(plan).encode()
    err = _load_error(_recomputed(path, tmp_path / "bad.tar", drop_spec))
    assert "do not match the plan's weight buffers" in err, err


def test_members_outside_every_region_are_refused(real_mlp, tmp_path):
    _, path = real_mlp
    err = _load_error(_recomputed(path, tmp_path / "bad.tar",
                                  lambda f: f.__setitem__("plans/extra.npy", npy_bytes(np.zeros(3)))))
    assert "belong to no region" in err and "plans/extra.npy" in err


def test_artifact_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        for mask in (0o022, 0o077, 0o002, 0o027):
            os.umask(mask)
            p = tmp_path / f"a{mask:o}.tar"
            write_artifact(p, {"a.txt": b"x"})
            assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# signing

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography")
    from tvm_qpu.artifact import generate_key
    d = tmp_path_factory.mktemp("keys")
    return {n: generate_key(d / n) for n in ("alice", "mallory")}      # (private, public, key id)


def _signed_copy(built, tmp_path, key, name="signed.tar"):
    _, path = built
    return _recomputed(path, tmp_path / name, lambda f: None, sign_key=key)


def test_signed_artifact_loads_with_its_key(built, keys, tmp_path):
    import tvm_qpu
    priv, pub, kid = keys["alice"]
    p = _signed_copy(built, tmp_path, priv)
    art = read_artifact(p, trusted_keys=[keys["mallory"][1], pub])
    assert art.signer == kid and "manifest.sig" not in art.files
    assert read_artifact(p).signer is None                        # not checked without trusted keys
    tvm_qpu.load(p, device=D.DoubleDevice(), trusted_keys=pub).close()
    lib, _ = built                                                  # CompiledModule.save signs too
    assert read_artifact(lib.save(tmp_path / "s2.tar", sign_key=priv), trusted_keys=pub).signer == kid


def test_unsigned_untrusted_and_tampered_are_refused(built, keys, tmp_path):
    import tvm_qpu
    _, path = built
    alice, mallory = keys["alice"], keys["mallory"]
    with pytest.raises(ArtifactError, match="refusing to load an unsigned artifact"):
        tvm_qpu.load(path, trusted_keys=[alice[1]])
    signed = _signed_copy(built, tmp_path, mallory[0])
    with pytest.raises(ArtifactError, match=f"signed by key {mallory[2]}, which is not a trusted key"):
        tvm_qpu.load(signed, trusted_keys=[alice[1]])
    with pytest.raises(ArtifactError, match="trusted: none"):
        read_artifact(signed, trusted_keys=[])
    # tamper: change lib.so, recompute its checksum in the manifest, keep alice's signature
    members = _members(_signed_copy(built, tmp_path, alice[0], "a.tar"))
    lib = bytearray(members["lib.so"])
    lib[len(lib) // 2] ^= 0x01
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["lib.so"] = {"sha256": __import__("hashlib").sha256(bytes(lib)).hexdigest(),
                                   "size": len(lib)}
    new = {"manifest.json": json.dumps(manifest, indent=1).encode(), "lib.so": bytes(lib)}
    tampered = _rewrite(tmp_path / "a.tar", tmp_path / "t.tar", lambda n, d: new.get(n, d))
    read_artifact(tampered)                                         # checksums alone do not see it
    with pytest.raises(ArtifactError, match="does not match the contents"):
        tvm_qpu.load(tampered, trusted_keys=[alice[1]])
    forged = _rewrite(tmp_path / "a.tar", tmp_path / "f.tar",
                      lambda n, d: b"{not json" if n == "manifest.sig" else d)
    with pytest.raises(ArtifactError, match="manifest.sig is malformed"):
        read_artifact(forged)


def test_bad_key_files_are_clear_errors(keys, tmp_path):
    from tvm_qpu.artifact import generate_key, load_private_key, load_public_keys
    priv, pub, _ = keys["alice"]
    assert os.stat(priv).st_mode & 0o777 == 0o600
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        generate_key(priv[: -len(".key")])
    with pytest.raises(ArtifactError, match="not an unencrypted PEM private key"):
        load_private_key(pub)
    with pytest.raises(ArtifactError, match="not a PEM public key"):
        load_public_keys([priv])
    with pytest.raises(ArtifactError, match="cannot read trusted key"):
        load_public_keys([tmp_path / "missing.pub"])
