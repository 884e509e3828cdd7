"""The v3d DRM driver (runtime/v3d.py, runtime/v3d_uapi.py) without and with hardware.

* struct layouts, ioctl numbers and param ids against the real C headers (a C program compiled
  here; skipped with a reason when there is no compiler or no v3d_drm.h);
* CSD cfg words for many launch shapes against the documented bit layout, decoded independently;
* render-node discovery on fake sysfs / dev trees;
* the driver end to end on a fake kernel injected as the OS layer (alloc, mmap, load, submit,
  wait) and its error paths: no device, wrong GPU, permission denied, hung job;
* ``pi5``: a copy kernel on the real GPU, when there is one.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_qpu.runtime import v3d
from tvm_qpu.runtime import v3d_uapi as uapi
from tvm_qpu.runtime.device import DeviceError, open_device

REPO = Path(__file__).resolve().parent.parent
SELFTEST = REPO / "scripts" / "pi5_selftest.py"


# ============================================================================================
# 1. The uAPI against the C headers
# ============================================================================================
def find_v3d_header() -> Path | None:
    """v3d_drm.h from $TVM_QPU_V3D_HEADER, libdrm-dev / linux-libc-dev locations, or a Debian
    linux-headers-*-common package (include/uapi/drm/)."""
    cands = [os.environ.get("TVM_QPU_V3D_HEADER"), "/usr/include/drm/v3d_drm.h",
             "/usr/include/libdrm/v3d_drm.h",
             *sorted(glob.glob("/usr/src/linux-headers-*/include/uapi/drm/v3d_drm.h"), reverse=True)]
    for c in cands:
        if c and Path(c).is_file() and (Path(c).parent / "drm.h").is_file():
            return Path(c)
    return None


def _probe_source(header_text: str) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "v3d_drm.h"', "int main(void) {"]
    for cname, cls in uapi.STRUCTS.items():
        lines.append(f'printf("S {cname} %zu\\n", sizeof(struct {cname}));')
        for fname, _ in cls._fields_:
            lines.append(f'printf("F {cname}.{fname} %zu %zu\\n", offsetof(struct {cname}, {fname}), '
                         f"sizeof(((struct {cname} *)0)->{fname}));")
    for d in uapi.IOCTL_DEFS.values():
        lines.append(f'printf("I {d.macro} %lu\\n", (unsigned long)({d.macro}));')
    for name in uapi.PARAM_NAMES:
        if f"DRM_V3D_PARAM_{name}" in header_text:      # newer params are absent from older headers
            lines.append(f'printf("P {name} %d\\n", (int)DRM_V3D_PARAM_{name});')
    for macro in ("DRM_COMMAND_BASE", "DRM_IOCTL_BASE", "DRM_V3D_SUBMIT_CL_FLUSH_CACHE",
                  "DRM_V3D_SUBMIT_EXTENSION"):
        lines.append(f'printf("M {macro} %lu\\n", (unsigned long)({macro}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) to check the uAPI against the C header")
    header = find_v3d_header()
    if header is None:
        pytest.skip("no v3d_drm.h: install a package that ships it (Debian: linux-headers-*-common "
                    "has include/uapi/drm/v3d_drm.h) or set TVM_QPU_V3D_HEADER")
    d = tmp_path_factory.mktemp("uapi")
    (d / "probe.c").write_text(_probe_source(header.read_text()))
    # -D__user=: raw kernel uapi headers keep the __user annotation that headers_install strips
    r = subprocess.run([cc, "-std=c11", "-D__user=", "-I", str(header.parent), str(d / "probe.c"), "-o", str(d / "probe")],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"probe does not compile against {header}:\n{r.stderr}"
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout
    facts = {"S": {}, "F": {}, "I": {}, "P": {}, "M": {}}
    for line in out.splitlines():
        kind, key, *vals = line.split()
        facts[kind][key] = tuple(int(v) for v in vals) if len(vals) > 1 else int(vals[0])
    facts["header"] = header
    return facts


@pytest.mark.parametrize("cname", sorted(uapi.STRUCTS))
def test_struct_layout_matches_header(c_facts, cname):
    cls = uapi.STRUCTS[cname]
    assert ctypes.sizeof(cls) == c_facts["S"][cname], f"sizeof(struct {cname})"
    for fname, _ in cls._fields_:
        desc = getattr(cls, fname)
        assert (desc.offset, desc.size) == c_facts["F"][f"{cname}.{fname}"], f"{cname}.{fname}"


@pytest.mark.parametrize("name", sorted(uapi.IOCTL_DEFS))
def test_ioctl_numbers_match_header(c_facts, name):
    d = uapi.IOCTL_DEFS[name]
    assert uapi.IOCTLS[name] == c_facts["I"][d.macro], f"{d.macro} = {c_facts['I'][d.macro]:#x}"


def test_param_ids_and_constants_match_header(c_facts):
    assert c_facts["P"], "no DRM_V3D_PARAM_* found in the header"
    for name, value in c_facts["P"].items():
        assert uapi.PARAMS[name] == value, name
    m = c_facts["M"]
    assert (uapi.DRM_COMMAND_BASE, uapi.DRM_IOCTL_BASE) == (m["DRM_COMMAND_BASE"], m["DRM_IOCTL_BASE"])
    assert uapi.DRM_V3D_SUBMIT_CL_FLUSH_CACHE == m["DRM_V3D_SUBMIT_CL_FLUSH_CACHE"]
    assert uapi.DRM_V3D_SUBMIT_EXTENSION == m["DRM_V3D_SUBMIT_EXTENSION"]


def test_ioc_encoding_known_values():
    # Independent of any header: the asm-generic _IOC layout (dir 30, size 16, type 8, nr 0).
    assert uapi.ioc("WR", ord("d"), 0x44, 16) == (3 << 30) | (16 << 16) | (0x64 << 8) | 0x44
    assert uapi.ioc("W", ord("d"), 0x09, 8) == (1 << 30) | (8 << 16) | (0x64 << 8) | 0x09
    assert ctypes.sizeof(uapi.DrmV3dSubmitCsd) == 88       # as the shared doc says
    with pytest.raises(ValueError):
        uapi.ioc("WR", ord("d"), 0, 1 << 14)


# ============================================================================================
# 2. CSD cfg words
# ============================================================================================
def decode_cfg(cfg) -> dict:
    """Decode the cfg words from the documented bit layout (v3d_regs.h V3D_CSD_QUEUED_CFG*),
    written out here independently of v3d_uapi.CSD_CFG_FIELDS."""
    return {
        "x": cfg[0] >> 16, "y": cfg[1] >> 16, "z": cfg[2] >> 16,
        "offsets": (cfg[0] & 0xFFFF, cfg[1] & 0xFFFF, cfg[2] & 0xFFFF),
        "wg_size": (cfg[3] & 0xFF) or 256,
        "wgs_per_sg": ((cfg[3] >> 8) & 0xF) or 16,
        "batches_per_sg": ((cfg[3] >> 12) & 0xFF) + 1,
        "cfg3_high": cfg[3] >> 20,                     # max_sg_id / overlap: left 0 like Mesa
        "cfg4": cfg[4],
        "threading": cfg[5] & 1, "single_seg": (cfg[5] >> 1) & 1, "pnan": (cfg[5] >> 2) & 1,
        "code": cfg[5] & ~7 & 0xFFFFFFFF, "uniforms": cfg[6],
    }


def count_batches(num_wgs: int, wg_size: int, wgs_per_sg: int) -> int:
    """Batches by walking the supergroups one by one (each supergroup's lanes in 16-lane batches)."""
    total, left = 0, num_wgs
    while left:
        in_sg = min(wgs_per_sg, left)
        total += -(-in_sg * wg_size // 16)
        left -= in_sg
    return total


SHAPES = [(1, 1, 1), (12, 1, 1), (3, 5, 7), (65535, 1, 1), (1, 65535, 1), (2, 3, 65535), (100, 100, 1)]


@pytest.mark.parametrize("wg", SHAPES)
@pytest.mark.parametrize("wg_size", [1, 3, 8, 16, 17, 64, 100, 256])
@pytest.mark.parametrize("wgs_per_sg", [1, 3, 16])
@pytest.mark.parametrize("rev", [0, 5, 6, 10])
def test_csd_cfg_fields(wg, wg_size, wgs_per_sg, rev):
    code, unif = 0x0012_3458, 0x00ab_cdf4
    cfg = v3d.csd_cfg(wg, wg_size, code, unif, ver=71, rev=rev, wgs_per_sg=wgs_per_sg)
    assert len(cfg) == 7 and all(0 <= w < 2**32 for w in cfg)
    d = decode_cfg(cfg)
    assert (d["x"], d["y"], d["z"]) == wg and d["offsets"] == (0, 0, 0)
    assert d["wg_size"] == wg_size and d["wgs_per_sg"] == wgs_per_sg
    assert d["batches_per_sg"] == -(-wgs_per_sg * wg_size // 16)
    batches = count_batches(wg[0] * wg[1] * wg[2], wg_size, wgs_per_sg)
    assert d["cfg4"] == (batches - 1 if rev < 6 else batches)       # 7.1.6+ stores the count itself
    assert d["cfg3_high"] == 0
    assert (d["threading"], d["single_seg"], d["pnan"]) == (0, 0, 0)   # no pnan bit on 7.1
    assert (d["code"], d["uniforms"]) == (code, unif)


@pytest.mark.parametrize("threads,single_seg", [(1, False), (2, False), (4, False), (1, True),
                                                 (4, True)])
def test_csd_cfg_flags(threads, single_seg):
    d = decode_cfg(v3d.csd_cfg((2, 2, 1), 16, 0x1000, 0x2000, ver=71, rev=6, threads=threads,
                               single_seg=single_seg))
    assert d["threading"] == (threads == 4) and d["single_seg"] == single_seg
    assert d["code"] == 0x1000 and d["cfg4"] == 4


def test_csd_cfg_v42_subtracts_one_and_int_workgroups():
    d = decode_cfg(v3d.csd_cfg(5, 16, 0x1000, 0x2000, ver=42, rev=20))
    assert (d["x"], d["y"], d["z"], d["cfg4"]) == (5, 1, 1, 4)
    d = decode_cfg(v3d.csd_cfg((3, 2), 16, 0x1000, 0x2000, ver=71, rev=6))
    assert (d["x"], d["y"], d["z"], d["cfg4"]) == (3, 2, 1, 6)


def test_pack_unpack_roundtrip():
    values = {name: (1 << f.width) - 1 - (i % 2) for i, (name, f) in enumerate(uapi.CSD_CFG_FIELDS.items())}
    assert v3d.unpack_cfg(v3d.pack_cfg(values)) == values
    with pytest.raises(v3d.LaunchError, match="wgs_per_sg"):
        v3d.pack_cfg({"wgs_per_sg": 16})


@pytest.mark.parametrize("kwargs,match", [
    (dict(workgroups=(0, 1, 1)), r"workgroups\[x\]"),
    (dict(workgroups=(1, 65536, 1)), r"workgroups\[y\]"),
    (dict(workgroups=(1, 1, -1)), r"workgroups\[z\]"),
    (dict(workgroups=(1, 1, 1, 1)), "1 to 3 dimensions"),
    (dict(workgroups=(1.5, 1, 1)), "integer"),
    (dict(wg_size=0), "wg_size"),
    (dict(wg_size=257), "wg_size"),
    (dict(wgs_per_sg=0), "wgs_per_sg"),
    (dict(wgs_per_sg=17), "wgs_per_sg"),
    (dict(threads=3), "1, 2 .* or 4 threads"),
    (dict(code_addr=0x1004), "8-byte aligned"),
    (dict(code_addr=0), "code address"),
    (dict(code_addr=1 << 32), "code address"),
    (dict(uniforms_addr=0x2002), "4-byte aligned"),
    (dict(workgroups=(65535, 65535, 65535), wg_size=16), "too many"),
])
def test_csd_cfg_rejects_impossible_launches(kwargs, match):
    args = dict(workgroups=(1, 1, 1), wg_size=16, code_addr=0x1000, uniforms_addr=0x2000, ver=71, rev=6)
    args.update(kwargs)
    with pytest.raises(v3d.LaunchError, match=match):
        v3d.csd_cfg(**args)


# ============================================================================================
# 3. Render-node discovery
# ============================================================================================
def make_tree(tmp_path, nodes: dict, dev_nodes=None):
    """nodes: renderD name -> driver name (None: no driver link in sysfs)."""
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev" / "dri"
    dev_root.mkdir(parents=True)
    for name, driver in nodes.items():
        dev_dir = sys_root / "devices" / "platform" / f"{name}-dev"
        dev_dir.mkdir(parents=True)
        cls = sys_root / "class" / "drm" / name
        cls.parent.mkdir(parents=True, exist_ok=True)
        cls.symlink_to(dev_dir)
        (dev_dir / "device").mkdir()
        if driver is not None:
            drv = sys_root / "bus" / "platform" / "drivers" / driver
            drv.mkdir(parents=True, exist_ok=True)
            (dev_dir / "device" / "driver").symlink_to(drv)
    for name in (nodes if dev_nodes is None else dev_nodes):
        (dev_root / name).write_bytes(b"")
    return str(dev_root), str(sys_root)


def test_find_render_node_by_sysfs_driver(tmp_path):
    dev, sysr = make_tree(tmp_path, {"renderD128": "vc4", "renderD129": "v3d", "renderD130": "i915"})
    assert v3d.find_render_node(dev, sysr) == os.path.join(dev, "renderD129")


def test_find_render_node_orders_numerically(tmp_path):
    dev, sysr = make_tree(tmp_path, {"renderD1000": "v3d", "renderD999": "v3d"})
    assert v3d.find_render_node(dev, sysr) == os.path.join(dev, "renderD999")


def test_find_render_node_none_without_v3d(tmp_path):
    dev, sysr = make_tree(tmp_path, {"renderD128": "vc4", "renderD129": "amdgpu"})
    assert v3d.find_render_node(dev, sysr) is None


def test_find_render_node_needs_the_dev_node(tmp_path):
    dev, sysr = make_tree(tmp_path, {"renderD128": "v3d"}, dev_nodes=[])
    assert v3d.find_render_node(dev, sysr) is None


def test_find_render_node_empty_roots(tmp_path):
    assert v3d.find_render_node(str(tmp_path / "nodev"), str(tmp_path / "nosys")) is None


def test_find_render_node_falls_back_to_version_ioctl(tmp_path):
    dev, sysr = make_tree(tmp_path, {"renderD128": None, "renderD129": None})
    fake = FakeKernel(driver_names={os.path.join(dev, "renderD128"): "vc4",
                                    os.path.join(dev, "renderD129"): "v3d"})
    assert v3d.find_render_node(dev, sysr, sys=fake) == os.path.join(dev, "renderD129")
    assert not fake.open_fds, "probe left a file descriptor open"


def test_drm_driver_name_on_a_plain_file_is_none(tmp_path):
    f = tmp_path / "renderD128"
    f.write_bytes(b"")
    assert v3d.drm_driver_name(str(f)) is None          # real ioctl: ENOTTY, not a crash


# ============================================================================================
# 4. The driver on a fake kernel
# ============================================================================================
def ident_params(major=7, minor=1, rev=6, nslc=3, qups=4, csd=1) -> dict:
    """GET_PARAM values for a GPU, built from the v3d_regs.h layout."""
    return {
        "V3D_HUB_IDENT1": (1 << 8) | (minor << 4) | major | (1 << 17),
        "V3D_HUB_IDENT2": 1 << 8,
        "V3D_HUB_IDENT3": rev << 8,
        "V3D_CORE0_IDENT0": (major << 24) | 0x443356,
        "V3D_CORE0_IDENT1": (2 << 12) | (qups << 8) | (nslc << 4) | minor,
        "V3D_CORE0_IDENT2": 0,
        "SUPPORTS_TFU": 1, "SUPPORTS_CSD": csd, "SUPPORTS_CACHE_FLUSH": 1,
    }


class FakeKernel(v3d.SysCalls):
    """A fake v3d kernel driver: BOs are bytearrays, jobs run a Python callback.

    Time is virtual (``clock``): each job takes ``job_seconds``. The hang check is modelled on
    the kernel's (v3d_sched.c: a 500 ms scheduler timeout; at each expiry v3d_csd_job_timedout
    resets the GPU if CSD CURRENT_CFG4, the batch counter, equals its value at the previous
    expiry, 0 at the first): the fake's jobs keep every batch resident (as our persistent
    launches do), so a job of 500 ms or more is reset at the first expiry. A reset job's work is
    not done, the reset counters present in ``params`` go up and WAIT_BO still succeeds.
    """

    PAGE = 4096
    HANG_LIMIT_S = 0.500                # v3d_sched.c v3d_sched_init: hang_limit_ms = 500

    def __init__(self, params=None, *, open_error=None, wait_errno=None, on_submit=None,
                 driver_names=None, job_seconds=0.001):
        self.params = ident_params() if params is None else params
        self.now, self.job_seconds, self.resets = 100.0, job_seconds, 0
        self.open_error, self.wait_errno, self.on_submit = open_error, wait_errno, on_submit
        self.driver_names = driver_names or {}
        self.bos = {}                   # handle -> [gpu offset, bytearray]
        self.next_handle, self.next_offset = 1, 0x20000
        self.open_fds, self.next_fd = {}, 10
        self.submits, self.waits, self.calls = [], [], []
        self.by_request = {num: name for name, num in uapi.IOCTLS.items()}

    # syscalls
    def open(self, path):
        if self.open_error is not None:
            raise OSError(self.open_error, os.strerror(self.open_error), path)
        fd, self.next_fd = self.next_fd, self.next_fd + 1
        self.open_fds[fd] = path
        return fd

    def close(self, fd):
        del self.open_fds[fd]

    def ioctl(self, fd, request, arg):
        assert fd in self.open_fds, "ioctl on a closed fd"
        name = self.by_request.get(request)
        if name is None:
            raise OSError(errno.ENOTTY, "bad ioctl")
        assert type(arg) is uapi.IOCTL_DEFS[name].struct, f"{name} with {type(arg).__name__}"
        self.calls.append(name)
        getattr(self, "do_" + name)(fd, arg)

    def clock(self):
        return self.now

    def mmap(self, fd, length, offset):
        handle = offset >> 32
        assert len(self.bos[handle][1]) == length
        return self.bos[handle][1]

    # ioctls
    def do_VERSION(self, fd, v):
        name = self.driver_names.get(self.open_fds[fd], "").encode()
        ctypes.memmove(v.name, name, min(len(name), v.name_len))
        v.name_len = len(name)

    def do_GET_PARAM(self, fd, p):
        if p.pad or p.value:
            raise OSError(errno.EINVAL, "pad/value must be 0")
        name = uapi.PARAM_NAMES[p.param] if p.param < len(uapi.PARAM_NAMES) else None
        if name not in self.params:
            raise OSError(errno.EINVAL, "unknown param")
        p.value = self.params[name]

    def do_CREATE_BO(self, fd, c):
        assert c.flags == 0 and c.size % self.PAGE == 0 and c.size > 0
        c.handle, c.offset = self.next_handle, self.next_offset
        self.bos[c.handle] = [c.offset, bytearray(c.size)]
        self.next_handle += 1
        self.next_offset += -(-c.size // 0x20000) * 0x20000

    def do_MMAP_BO(self, fd, m):
        assert m.handle in self.bos and m.flags == 0
        m.offset = m.handle << 32

    def do_GEM_CLOSE(self, fd, g):
        if self.bos.pop(g.handle, None) is None:
            raise OSError(errno.EINVAL, "no such handle")

    def do_SUBMIT_CSD(self, fd, s):
        handles = list((ctypes.c_uint32 * s.bo_handle_count).from_address(s.bo_handles))
        assert handles and all(h in self.bos for h in handles)
        assert s.flags == 0 and s.pad == 0 and s.extensions == 0
        self.submits.append((tuple(s.cfg), handles))
        if self.job_seconds >= self.HANG_LIMIT_S:          # reset at the first timer expiry
            self.now += self.HANG_LIMIT_S
            self.resets += 1
            for counter in ("GLOBAL_RESET_COUNTER", "CONTEXT_RESET_COUNTER"):
                if counter in self.params:
                    self.params[counter] += 1
            return
        self.now += self.job_seconds
        if self.on_submit:
            self.on_submit(self, tuple(s.cfg))

    def do_WAIT_BO(self, fd, w):
        assert w.handle in self.bos and w.pad == 0 and w.timeout_ns > 0
        self.waits.append(w.timeout_ns)
        if self.wait_errno is not None:
            raise OSError(self.wait_errno, os.strerror(self.wait_errno))

    # GPU memory as the GPU sees it
    def _locate(self, addr):
        for off, mem in self.bos.values():
            if off <= addr < off + len(mem):
                return mem, addr - off
        raise AssertionError(f"GPU address {addr:#x} is in no BO")

    def read_words(self, addr, n):
        mem, o = self._locate(addr)
        return np.frombuffer(mem, np.uint32, count=n, offset=o).copy()

    def write_words(self, addr, words):
        mem, o = self._locate(addr)
        mem[o: o + 4 * len(words)] = np.asarray(words, np.uint32).tobytes()


def fake_copy_job(kernel: FakeKernel, cfg):
    """Stands in for the copy kernel: uniforms (at cfg6) are src, dst, word count."""
    src, dst, n = (int(x) for x in kernel.read_words(cfg[6], 3))
    kernel.write_words(dst, kernel.read_words(src, n))


def test_device_identifies_v3d71(tmp_path):
    fake = FakeKernel(ident_params(rev=6, nslc=3, qups=4))
    dev = v3d.V3DDevice("/dev/dri/renderD128", sys=fake)
    assert dev.info.ver == 71 and dev.info.rev == 6
    assert (dev.info.slices, dev.info.qpus_per_slice, dev.num_qpus) == (3, 4, 12)
    assert "7.1.6" in dev.info.describe() and "12 QPUs" in dev.info.describe()
    dev.close()
    assert not fake.open_fds


def test_alloc_maps_and_frees(tmp_path):
    fake = FakeKernel()
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        buf = dev.alloc(10000)
        assert buf.size == 10000 and buf.array.size == 10000 and buf.addr == fake.bos[buf.handle][0]
        buf.view(np.uint32)[:3] = [1, 2, 3]
        assert list(fake.read_words(buf.addr, 3)) == [1, 2, 3]       # the view is the BO's memory
        other = dev.upload(np.arange(5, dtype=np.float32))
        assert other.addr != buf.addr and list(other.view(np.float32)) == [0, 1, 2, 3, 4]
        dev.free(buf)
        assert buf.handle not in fake.bos and other.handle in fake.bos
        with pytest.raises(DeviceError, match="alignment"):
            dev.alloc(16, align=1 << 30)
        with pytest.raises(DeviceError, match="power of two"):
            dev.alloc(16, align=3)
    assert not fake.bos and not fake.open_fds                        # close() released everything


def test_execute_submits_cfg_and_runs(tmp_path):
    fake = FakeKernel(ident_params(rev=6), on_submit=fake_copy_job)
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog = dev.load_program(np.array([0x38003186BB03F000] * 8, dtype=np.uint64), name="copy")
        assert prog.addr == prog.buffer.addr and prog.addr % 8 == 0
        assert fake.read_words(prog.addr, 2).tolist() == [0xBB03F000, 0x38003186]
        data = np.arange(100, dtype=np.uint32) * 7
        src, dst = dev.upload(data), dev.alloc(400)
        stats = dev.execute(prog, [src.addr, dst.addr, 100], workgroups=(12, 1, 1), wg_size=16)
        assert np.array_equal(dst.view(np.uint32), data)
        assert stats.modeled is False and stats.seconds >= 0
        cfg, handles = fake.submits[-1]
        d = decode_cfg(cfg)
        assert (d["x"], d["y"], d["z"], d["wg_size"], d["cfg4"]) == (12, 1, 1, 16, 12)
        assert d["code"] == prog.addr
        assert {prog.buffer.handle, src.handle, dst.handle} <= set(handles)
        # the temporary uniform buffer is freed after the job
        assert d["uniforms"] not in [off for off, _ in fake.bos.values()]
        # a Buffer of uniforms is used in place
        unif = dev.upload(np.array([src.addr, dst.addr, 10], np.uint32))
        dev.execute(prog, unif, workgroups=1)
        assert decode_cfg(fake.submits[-1][0])["uniforms"] == unif.addr


def test_execute_large_workgroups_and_threads():
    """wg_size > 16 lanes is ceil(wg_size / 16) batches per workgroup; threads=4 sets the
    threading bit, 1 and 2 leave it clear (2 threads per QPU on a Pi 5)."""
    fake = FakeKernel()
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog = dev.load_program([0x38003186BB03F000])
        for threads, bit in ((1, 0), (2, 0), (4, 1)):
            dev.execute(prog, [0], workgroups=(3, 1, 1), wg_size=100, threads=threads)
            d = decode_cfg(fake.submits[-1][0])
            assert (d["wg_size"], d["batches_per_sg"], d["cfg4"]) == (100, 7, 21)
            assert d["threading"] == bit


@pytest.mark.parametrize("nslc,qups", [(3, 4), (4, 4), (2, 4)])
def test_qpu_count_comes_from_ident1_and_plans_for_12_run_anywhere(nslc, qups):
    """Sources disagree on 12 or 16 QPUs: the count is read from CORE0_IDENT1 (NSLC x QUPS,
    v3d_regs.h), and a launch planned for the default 12 QPUs runs whatever the count is."""
    fake = FakeKernel(ident_params(nslc=nslc, qups=qups), on_submit=fake_copy_job)
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        assert dev.num_qpus == nslc * qups
        assert f"{nslc} slices x {qups} QPUs = {nslc * qups} QPUs" in dev.info.describe()
        prog, data, src, dst = copy_setup(dev)
        dev.execute(prog, [src.addr, dst.addr, data.size], workgroups=12, num_qpus=12)
        assert np.array_equal(dst.view(np.uint32), data)


def test_execute_uses_minus_one_before_7_1_6():
    fake = FakeKernel(ident_params(rev=3))
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog = dev.load_program([0x38003186BB03F000])
        dev.execute(prog, [0], workgroups=(4, 2, 1))
        assert decode_cfg(fake.submits[-1][0])["cfg4"] == 7


def test_execute_rejects_bad_launches():
    fake = FakeKernel()
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog = dev.load_program([0x38003186BB03F000])
        for kwargs, match in [(dict(wg_size=0), "wg_size"), (dict(num_qpus=0), "num_qpus"),
                              (dict(threads=3), "1, 2"), (dict(workgroups=(0, 1, 1)), "workgroups"),
                              (dict(wg_size=257), "wg_size")]:
            with pytest.raises(DeviceError, match=match):
                dev.execute(prog, [0], **kwargs)
        assert not fake.submits
        with pytest.raises(DeviceError, match="no instructions"):
            dev.load_program([])


# ---- the kernel's hang check ----------------------------------------------------------------
def copy_setup(dev):
    prog = dev.load_program(np.array([0x38003186BB03F000] * 8, dtype=np.uint64), name="copy")
    data = np.arange(1, 65, dtype=np.uint32)
    src, dst = dev.upload(data), dev.alloc(data.nbytes)
    return prog, data, src, dst


@pytest.mark.parametrize("counters", [{"CONTEXT_RESET_COUNTER": 0, "GLOBAL_RESET_COUNTER": 0},
                                      {"GLOBAL_RESET_COUNTER": 3}, {}])
def test_short_jobs_pass_with_or_without_reset_counters(counters):
    fake = FakeKernel({**ident_params(), **counters}, on_submit=fake_copy_job, job_seconds=0.2)
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        assert dev.reset_counter == next(iter(counters), None)
        prog, data, src, dst = copy_setup(dev)
        stats = dev.execute(prog, [src.addr, dst.addr, data.size], workgroups=12)
        assert np.array_equal(dst.view(np.uint32), data) and stats.seconds == pytest.approx(0.2)


@pytest.mark.parametrize("counters,match", [
    ({"CONTEXT_RESET_COUNTER": 0, "GLOBAL_RESET_COUNTER": 0}, r"CONTEXT_RESET_COUNTER went 0 -> 1"),
    ({"GLOBAL_RESET_COUNTER": 7}, r"GLOBAL_RESET_COUNTER went 7 -> 8"),
    ({}, r"no GPU reset counter"),
])
def test_reset_job_is_an_error_not_silent_output(counters, match):
    """The kernel resets a job that outlives its hang check and WAIT_BO succeeds: the driver
    must turn that into JobResetError (never return the unfinished output)."""
    fake = FakeKernel({**ident_params(), **counters}, on_submit=fake_copy_job, job_seconds=0.8)
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog, data, src, dst = copy_setup(dev)
        with pytest.raises(v3d.JobResetError, match=match) as e:
            dev.execute(prog, [src.addr, dst.addr, data.size], workgroups=12)
        assert "'copy'" in str(e.value) and "discarded" in str(e.value)
        assert fake.resets == 1 and not dst.view(np.uint32).any()    # the job really did not run
        fake.job_seconds = 0.01                                      # the next job is fine again
        dev.execute(prog, [src.addr, dst.addr, data.size], workgroups=12)
        assert np.array_equal(dst.view(np.uint32), data)


def test_reset_counter_probe_errors_other_than_einval_are_reported():
    class Broken(FakeKernel):
        def do_GET_PARAM(self, fd, p):
            if uapi.PARAM_NAMES[p.param] == "CONTEXT_RESET_COUNTER":
                raise OSError(errno.EIO, "io")
            super().do_GET_PARAM(fd, p)
    broken = Broken()
    with pytest.raises(DeviceError, match="CONTEXT_RESET_COUNTER"):
        v3d.V3DDevice("/dev/dri/renderD128", sys=broken)
    assert not broken.open_fds, "the fd stays open after a failed probe"


def test_check_plan_refuses_plans_longer_than_the_dispatch_budget():
    with v3d.V3DDevice("/dev/dri/renderD128", sys=FakeKernel()) as dev:
        dev.check_plan(None, None)                                   # not modelled: the reset check covers it
        dev.check_plan(None, 0.2, what="ok")
        with pytest.raises(v3d.LaunchTooLongError, match=r"region X is modelled at 400 ms.*500 ms"):
            dev.check_plan(None, 0.4, what="region X")
    assert v3d.DISPATCH_BUDGET_SECONDS < v3d.HANG_CHECK_SECONDS == FakeKernel.HANG_LIMIT_S


def test_check_plan_bounds_the_longest_launch_of_a_split_plan():
    """A plan that models each launch (a GEMM split into row blocks) is checked launch by launch:
    three launches of 200 ms pass though the plan takes 600 ms; one of 400 ms is refused."""
    from tvm_qpu.codegen.plan import KernelPlan, Launch
    word = np.array([0x38003186BB03F000], np.uint64)

    def plan(per_launch):
        return KernelPlan("split", [], [Launch(word, [("u32", 0)]) for _ in per_launch],
                          attrs={"launch_seconds": per_launch})
    with v3d.V3DDevice("/dev/dri/renderD128", sys=FakeKernel()) as dev:
        dev.check_plan(plan([0.2, 0.2, 0.2]), 0.6, what="ok")
        with pytest.raises(v3d.LaunchTooLongError, match="modelled at 400 ms"):
            dev.check_plan(plan([0.2, 0.4]), 0.6, what="region Y")


def test_executor_checks_the_budget_before_running(monkeypatch):
    """The persistent executor asks the device about each region's modelled time before it makes
    the region resident: a region over the budget never reaches the GPU."""
    from tvm_qpu.codegen.plan import KernelPlan, Launch
    from tvm_qpu.executor import PlanExecutor, RegionInfo
    fake = FakeKernel()
    dev = v3d.V3DDevice("/dev/dri/renderD128", sys=fake)
    ex = PlanExecutor(dev)
    plan = KernelPlan("slow", [], [Launch(np.array([0x38003186BB03F000], np.uint64), [("u32", 0)])])
    ex.add(plan, RegionInfo("k-slow", name="qpu_matmul", qpu_estimate=1.5))
    try:
        with pytest.raises(v3d.LaunchTooLongError, match="QPU region qpu_matmul is modelled at 1500 ms"):
            ex.run("k-slow", [])
        assert not fake.submits
        ex.add(plan, RegionInfo("k-fast", name="qpu_fast", qpu_estimate=0.01))
        ex.run("k-fast", [])
        assert len(fake.submits) == 1
    finally:
        ex.close()
        dev.close()


# ---- error paths -------------------------------------------------------------------------
def test_no_device(monkeypatch):
    monkeypatch.setattr(v3d, "find_render_node", lambda *a, **k: None)
    with pytest.raises(v3d.V3DNotFoundError, match="no V3D device found"):
        v3d.V3DDevice()


def test_missing_node_is_no_device():
    with pytest.raises(v3d.V3DNotFoundError, match="no V3D device found"):
        v3d.V3DDevice("/nonexistent/dri/renderD128")


def test_open_device_v3d_without_hardware():
    if v3d.find_render_node() is not None:
        pytest.skip("this machine has a V3D render node")
    with pytest.raises(DeviceError, match="no V3D device found"):
        open_device("v3d")


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM])
def test_permission_denied(err):
    fake = FakeKernel(open_error=err)
    with pytest.raises(v3d.DevicePermissionError, match="render") as e:
        v3d.V3DDevice("/dev/dri/renderD128", sys=fake)
    assert "usermod -aG render" in str(e.value)


@pytest.mark.parametrize("params,match", [
    (ident_params(major=4, minor=2, rev=0), "V3D 4.2"),
    (ident_params(major=3, minor=3, rev=0), "V3D 3.3"),
    (ident_params(major=7, minor=2, rev=0), "V3D 7.2"),
    (ident_params(csd=0), "SUPPORTS_CSD"),
    (ident_params(nslc=0), "no QPUs"),
])
def test_wrong_gpu_is_refused(params, match):
    fake = FakeKernel(params)
    with pytest.raises(v3d.UnsupportedGpuError, match=match) as e:
        v3d.V3DDevice("/dev/dri/renderD128", sys=fake)
    if "V3D" in match:
        assert "7.1" in str(e.value)
    assert not fake.open_fds, "the fd of a refused GPU stays open"


def test_old_kernel_without_feature_params_reads_them_as_absent():
    params = ident_params()
    del params["SUPPORTS_CACHE_FLUSH"]
    dev = v3d.V3DDevice("/dev/dri/renderD128", sys=FakeKernel(params))
    assert dev.info.params["SUPPORTS_CACHE_FLUSH"] == 0 and dev.info.params["SUPPORTS_MULTISYNC_EXT"] == 0
    dev.close()


@pytest.mark.parametrize("err", [errno.ETIME, errno.ETIMEDOUT, errno.EAGAIN])
def test_hung_job_times_out(err):
    fake = FakeKernel(wait_errno=err)
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog = dev.load_program([0x38003186BB03F000], name="spin")
        with pytest.raises(v3d.JobTimeoutError, match=r"'spin'.*0\.05 s timeout") as e:
            dev.execute(prog, [0], timeout=0.05)
        assert "WAIT_BO" in str(e.value)
        assert fake.waits and all(t <= 0.05e9 for t in fake.waits)   # never an unbounded wait
        assert len(fake.bos) == 1, "uniform buffer leaked after a timeout"


def test_wait_failure_is_reported():
    fake = FakeKernel(wait_errno=errno.EINVAL)
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        prog = dev.load_program([0x38003186BB03F000])
        with pytest.raises(DeviceError, match="WAIT_BO"):
            dev.execute(prog, [0])


# ============================================================================================
# 5. The self-test script
# ============================================================================================
def load_selftest():
    spec = importlib.util.spec_from_file_location("pi5_selftest", SELFTEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_selftest_kernels_assemble_without_hazards():
    from tvm_qpu.codegen.asm import assemble
    from tvm_qpu.codegen.hazards import check_program
    st = load_selftest()
    for k in (st.copy_kernel, st.gemm_kernel):
        words = assemble(k)
        assert words.size > 0 and check_program(words) == [], k.__name__


def test_selftest_without_device_says_so():
    if v3d.find_render_node() is not None:
        pytest.skip("this machine has a V3D render node")
    r = subprocess.run([sys.executable, str(SELFTEST)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no V3D device found" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def selftest_fake_kernel(st, corrupt_gemm=False) -> FakeKernel:
    """A fake kernel that runs the self-test's two kernels in numpy, recognised by their code."""
    from tvm_qpu.codegen.asm import assemble
    copy_words, gemm_words = assemble(st.copy_kernel), assemble(st.gemm_kernel)

    def code_is(kernel, cfg, words):
        return np.array_equal(kernel.read_words(cfg[5] & ~7, 2 * words.size).view(np.uint64), words)

    def on_submit(kernel, cfg):
        groups = (cfg[0] >> 16) * (cfg[1] >> 16) * (cfg[2] >> 16)
        if code_is(kernel, cfg, copy_words):
            src, dst, blocks = (int(x) for x in kernel.read_words(cfg[6], 3))
            n = groups * blocks * st.COPY_BLOCK // 4
            kernel.write_words(dst, kernel.read_words(src, n))
        elif code_is(kernel, cfg, gemm_words):
            a, b, c, k, n = (int(x) for x in kernel.read_words(cfg[6], 5))
            m = cfg[1] >> 16
            assert cfg[0] >> 16 == n // 16
            am = kernel.read_words(a, m * k).view(np.float32).reshape(m, k)
            bm = kernel.read_words(b, k * n).view(np.float32).reshape(k, n)
            out = (am @ bm).astype(np.float32) + (1.0 if corrupt_gemm else 0.0)
            kernel.write_words(c, out.view(np.uint32).reshape(-1))
        else:
            raise AssertionError("unknown kernel submitted")

    return FakeKernel(on_submit=on_submit)


@pytest.mark.parametrize("corrupt,code", [(False, 0), (True, 1)])
def test_selftest_report_on_fake_kernel(monkeypatch, capsys, corrupt, code):
    st = load_selftest()
    fake = selftest_fake_kernel(st, corrupt_gemm=corrupt)
    monkeypatch.setattr(st, "open_target",
                        lambda kind, node, timeout: (v3d.V3DDevice("/dev/dri/renderD128", sys=fake), None))
    monkeypatch.setattr(st, "emulator_gemm", lambda m, n, k: (None, "emulator unavailable (test)"))
    assert st.main(["--copy-mib", "0.25", "--gemm", "8", "32", "8"]) == code
    out = capsys.readouterr().out
    assert "V3D 7.1.6" in out and "copy:     PASS" in out and "emulator unavailable" in out
    assert "qpus:     12 (3 slices x 4 QPUs per slice, from GET_PARAM CORE0_IDENT1)" in out
    assert "resets:   no reset counter" in out and "note:" not in out
    assert ("gemm:     FAIL" if corrupt else "gemm:     PASS") in out
    assert "measured" in out and not fake.bos and not fake.open_fds


def test_selftest_reports_a_16_qpu_gpu():
    st = load_selftest()
    dev = v3d.V3DDevice("/dev/dri/renderD128",
                        sys=FakeKernel({**ident_params(nslc=4, qups=4), "CONTEXT_RESET_COUNTER": 0}))
    lines = "\n".join(st.qpu_lines(dev))
    assert "qpus:     16 (4 slices x 4 QPUs per slice" in lines
    assert "resets:   detected with GET_PARAM CONTEXT_RESET_COUNTER" in lines
    assert "sized for 12 QPUs" in lines
    dev.close()


def _emulator():
    try:
        return open_device("emulator")
    except Exception as e:          # the emulator is another engineer's work in progress
        pytest.skip(f"emulator not available: {type(e).__name__}: {e}")


def test_selftest_kernels_on_emulator():
    st = load_selftest()
    emu = _emulator()
    try:
        cp = st.run_copy(emu, 2 * st.COPY_BLOCK * int(emu.num_qpus), reps=1)
        assert cp["ok"]
        g = st.run_gemm(emu, 4, 32, 8)
        assert g["ok"], g
    finally:
        emu.close()


# ============================================================================================
# 6. Real hardware
# ============================================================================================
@pytest.mark.pi5
def test_copy_kernel_on_pi5():
    node = v3d.find_render_node()
    if node is None:
        pytest.skip("no V3D render node: needs a Raspberry Pi 5")
    st = load_selftest()
    with v3d.V3DDevice(node) as dev:
        assert dev.info.ver == 71
        cp = st.run_copy(dev, 4 * st.COPY_BLOCK * dev.num_qpus, reps=1, timeout=10)
        assert cp["ok"], cp
        g = st.run_gemm(dev, 16, 32, 16, timeout=10)
        assert g["ok"], g


@pytest.mark.parametrize("counters", [{"CONTEXT_RESET_COUNTER": 0}, {}])
def test_reset_launch_of_a_multi_launch_plan_is_an_error(counters):
    """A split plan runs its launches as separate jobs, each checked on its own: when the second
    of three launches is reset (it outlives the hang check), running the plan raises
    JobResetError naming that launch, the third is never submitted and no output is returned;
    the same plan whose launches all stay short returns the copied data."""
    from tvm_qpu.codegen.plan import BufferSpec, KernelPlan, Launch, run_plan
    word = np.array([0x38003186BB03F000] * 8, np.uint64)
    n = 64
    bufs = [BufferSpec("data", "input", (n,), "uint32"), BufferSpec("mid", "scratch", (n,), "uint32"),
            BufferSpec("mid2", "scratch", (n,), "uint32"), BufferSpec("out", "output", (n,), "uint32")]
    hops = [("data", "mid"), ("mid", "mid2"), ("mid2", "out")]
    plan = KernelPlan("split_copy", bufs,
                      [Launch(word, [("addr", a, 0), ("addr", b, 0), ("u32", n)], (12, 1, 1), 16, 12, 1,
                              f"copy_part{i}") for i, (a, b) in enumerate(hops)],
                      attrs={"launch_seconds": [0.2, 0.2, 0.2]})

    class Timed(FakeKernel):
        """Each job takes the next of ``durations`` seconds."""
        durations: list = []

        def do_SUBMIT_CSD(self, fd, s):
            self.job_seconds = self.durations.pop(0)
            super().do_SUBMIT_CSD(fd, s)

    data = np.arange(1, n + 1, dtype=np.uint32)
    fake = Timed({**ident_params(), **counters}, on_submit=fake_copy_job)
    fake.durations = [0.2, 0.8, 0.2]
    with v3d.V3DDevice("/dev/dri/renderD128", sys=fake) as dev:
        dev.check_plan(plan, 0.6, what="split_copy")          # every launch is within the budget
        with pytest.raises(v3d.JobResetError, match="copy_part1") as e:
            run_plan(plan, dev, data=data)
        assert "discarded" in str(e.value)
        assert len(fake.submits) == 2 and fake.resets == 1    # the third launch never ran
        fake.durations = [0.2, 0.2, 0.2]
        out, stats = run_plan(plan, dev, data=data)
        assert np.array_equal(out, data) and len(stats) == 3
