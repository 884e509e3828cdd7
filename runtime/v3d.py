"""The real-hardware device: a pure-Python client of the Linux ``v3d`` DRM driver (Raspberry Pi 5).

What it does, in kernel terms (all through the render node's file descriptor):

* discovery: the render node whose DRM driver is ``v3d`` (sysfs driver link, else DRM_IOCTL_VERSION);
* identification: V3D_GET_PARAM for HUB_IDENT1/3 and CORE0_IDENT0/1 (version, slices, QPUs per
  slice) and SUPPORTS_CSD; anything but V3D 7.1 with CSD is refused;
* memory: V3D_CREATE_BO (GEM handle + GPU address), V3D_MMAP_BO + mmap(2) on the DRM fd (the
  numpy view of the buffer), DRM_IOCTL_GEM_CLOSE to free;
* execution: V3D_SUBMIT_CSD with cfg words from :func:`csd_cfg`, then V3D_WAIT_BO with a deadline
  so a hung job becomes a :class:`JobTimeoutError` instead of blocking forever;
* hang check: the kernel resets a compute job whose batch counter (CSD CURRENT_CFG4) has not
  moved for one 500 ms scheduler timeout (v3d_sched.c: ``hang_limit_ms = 500``,
  ``v3d_csd_job_timedout``), and WAIT_BO then returns success over unfinished output. A job
  that was reset becomes a :class:`JobResetError` (reset counter, or the wall-time rule when the
  kernel has no counter), and :meth:`V3DDevice.check_plan` refuses plans modelled too long for
  one dispatch (:data:`DISPATCH_BUDGET_SECONDS`) before they run.

The OS calls go through a :class:`SysCalls` object so tests can inject a fake kernel.
Standard library (ctypes, fcntl, mmap, os) plus numpy only.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import v3d_uapi as uapi
from .device import Buffer, Device, DeviceError, ExecStats, ProgramHandle

DRIVER_NAME = "v3d"
SUPPORTED_VERSION = 71            # V3D 7.1 (VideoCore VII, Raspberry Pi 5)
DEFAULT_TIMEOUT = 10.0            # seconds to wait for one dispatch before calling it hung
GPU_PAGE = 4096                   # V3D MMU page size
BATCH_LANES = 16                  # work items per CSD batch (one QPU thread)
#: the device API's threads -> cfg5 threading bit. Mesa sets it only for 4-thread shaders
#: (v3d/v3dv: ``threads == 4``) and compiles for at least 2 threads on V3D 4.1+; with it clear a
#: Pi 5 runs 2 threads per QPU (py-videocore7 tests/test_parallel.py keeps 24 resident on 12
#: QPUs), so 1 and 2 write the same words: a "1-thread" program shares its QPU with a second
#: thread slot (64 registers each; the QPU's 16 TMU FIFO words, of which Mesa keeps 8 per thread).
#: The emulator runs the same (emulator.RESIDENT_THREADS).
CSD_THREADS_BIT = {1: 0, 2: 0, 4: 1}
MAX_BO_BYTES = (1 << 32) - 1      # drm_v3d_create_bo.size is a u32
#: the v3d scheduler's job timeout (v3d_sched.c v3d_sched_init: hang_limit_ms = 500). At each
#: expiry v3d_csd_job_timedout compares the CSD batch counter (V3D_CSD_CURRENT_CFG4) with its
#: value at the previous expiry (0 at the first) and resets the GPU when it has not changed. A
#: batch counter only moves when a batch is handed to a QPU, so once the last batch is running
#: (at once for our persistent launches: <= one batch per QPU thread) the rest of the job must
#: end within one timeout. A job shorter than this is never reset by the hang check.
HANG_CHECK_SECONDS = 0.5
#: modelled seconds one dispatch may take on the GPU: half the hang check, a margin for the
#: cycle model's error (its estimates are held to +-25 % of the emulator) and the clock
DISPATCH_BUDGET_SECONDS = HANG_CHECK_SECONDS / 2
#: GET_PARAM reset counters, most specific first (newer kernels; older ones answer EINVAL)
RESET_COUNTER_PARAMS = ("CONTEXT_RESET_COUNTER", "GLOBAL_RESET_COUNTER")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class V3DNotFoundError(DeviceError):
    """No render node driven by ``v3d``."""


class UnsupportedGpuError(DeviceError):
    """A v3d GPU that is not V3D 7.1 with compute dispatch."""


class DevicePermissionError(DeviceError):
    """The render node exists but this user may not open it."""


class JobTimeoutError(DeviceError):
    """A dispatch did not finish within its timeout."""


class LaunchError(DeviceError):
    """The launch shape or addresses cannot be expressed in the CSD cfg words."""


class JobResetError(DeviceError):
    """The kernel driver reset the GPU during a job: its output is incomplete and is discarded."""


class LaunchTooLongError(LaunchError):
    """A plan is modelled to run longer than one dispatch may before the kernel's hang check."""


NO_DEVICE_HINT = ("no V3D device found: no /dev/dri/renderD* node is driven by the 'v3d' DRM driver "
                  "(it exists on a Raspberry Pi 5 running Raspberry Pi OS or another kernel with the "
                  "v3d driver). Use the emulator instead: open_device('emulator').")
PERMISSION_HINT = ("permission denied opening {path}: add yourself to the 'render' group "
                   "(sudo usermod -aG render $USER), then log out and back in.")


# --------------------------------------------------------------------------------------------
# OS layer (injectable)
# --------------------------------------------------------------------------------------------
class SysCalls:
    """The system calls the driver makes. Tests replace this with a fake kernel."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        """ioctl(2) with ``arg`` read and written in place; raises OSError on failure."""
        fcntl.ioctl(fd, request, arg, True)

    def mmap(self, fd: int, length: int, offset: int):
        """A shared read/write mapping of ``length`` bytes of ``fd`` at ``offset``."""
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def clock(self) -> float:
        """Monotonic seconds (job wall times; a fake kernel supplies its own time)."""
        return time.monotonic()


def _ioctl(sys: SysCalls, fd: int, name: str, arg: ctypes.Structure, retry_eagain: bool = True) -> None:
    """Issue ioctl ``name`` (a key of v3d_uapi.IOCTLS); retries EINTR (and EAGAIN, like libdrm's
    drmIoctl) so callers only see real failures."""
    while True:
        try:
            sys.ioctl(fd, uapi.IOCTLS[name], arg)
            return
        except OSError as e:
            if e.errno == errno.EINTR or (retry_eagain and e.errno == errno.EAGAIN):
                continue
            raise


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------
def _node_order(name: str):
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else 0, name)


def _sysfs_driver(class_dir: str, node: str) -> str | None:
    """Name of the kernel driver bound to ``node`` (basename of its device/driver link)."""
    link = os.path.join(class_dir, node, "device", "driver")
    try:
        return os.path.basename(os.path.realpath(link)) if os.path.islink(link) else None
    except OSError:
        return None


def drm_driver_name(path: str, sys: SysCalls | None = None) -> str | None:
    """The DRM driver name of a node, asked with DRM_IOCTL_VERSION; None if it cannot be asked."""
    sys = sys or SysCalls()
    try:
        fd = sys.open(path)
    except OSError:
        return None
    try:
        name = ctypes.create_string_buffer(64)
        v = uapi.DrmVersion(name_len=len(name), name=ctypes.addressof(name))
        _ioctl(sys, fd, "VERSION", v)
        return name.raw[: min(v.name_len, len(name))].split(b"\0")[0].decode("ascii", "replace")
    except OSError:
        return None
    finally:
        sys.close(fd)


def find_render_node(dev_root: str = "/dev/dri", sys_root: str = "/sys", *,
                     sys: SysCalls | None = None) -> str | None:
    """Path of the render node whose DRM driver is ``v3d``, or None.

    Each ``renderD*`` node is identified by the driver bound to its device in sysfs
    (``<sys_root>/class/drm/renderDN/device/driver`` -> ``.../drivers/v3d``); a node sysfs does not
    describe is asked with DRM_IOCTL_VERSION. Only nodes present under ``dev_root`` are returned.
    """
    class_dir = os.path.join(sys_root, "class", "drm")
    names = set()
    for d in (class_dir, dev_root):
        try:
            names.update(n for n in os.listdir(d) if n.startswith("renderD"))
        except OSError:
            pass
    for node in sorted(names, key=_node_order):
        path = os.path.join(dev_root, node)
        if not os.path.exists(path):
            continue
        driver = _sysfs_driver(class_dir, node)
        if driver is None:
            driver = drm_driver_name(path, sys)
        if driver == DRIVER_NAME:
            return path
    return None


# --------------------------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------------------------
IDENT_PARAMS = ("V3D_HUB_IDENT1", "V3D_HUB_IDENT2", "V3D_HUB_IDENT3", "V3D_CORE0_IDENT0",
                "V3D_CORE0_IDENT1")
#: feature params; kernels older than the param answer EINVAL, read as "no"
FEATURE_PARAMS = ("SUPPORTS_CSD", "SUPPORTS_CACHE_FLUSH", "SUPPORTS_MULTISYNC_EXT")


@dataclass(frozen=True)
class GpuInfo:
    """What GET_PARAM says about the GPU. ``ver`` is major*10+minor (71 = V3D 7.1)."""
    params: dict = field(default_factory=dict)      # GET_PARAM name -> raw value

    def field(self, name: str) -> int:
        f = uapi.IDENT_FIELDS[name]
        return f.get(self.params.get(f.param, 0))

    @property
    def ver(self) -> int:
        return self.field("ver_major") * 10 + self.field("ver_minor")

    @property
    def rev(self) -> int:
        """IP revision (HUB_IDENT3 IPREV), e.g. 6 in "7.1.6"."""
        return self.field("ip_rev")

    @property
    def slices(self) -> int:
        return self.field("nslc")

    @property
    def qpus_per_slice(self) -> int:
        return self.field("qups")

    @property
    def num_qpus(self) -> int:
        return self.slices * self.qpus_per_slice

    @property
    def supports_csd(self) -> bool:
        return bool(self.params.get("SUPPORTS_CSD", 0))

    def version_string(self) -> str:
        return f"{self.ver // 10}.{self.ver % 10}.{self.rev}"

    def describe(self) -> str:
        return (f"V3D {self.version_string()}: {self.slices} slices x {self.qpus_per_slice} QPUs = "
                f"{self.num_qpus} QPUs, {self.field('ntmu')} TMUs, "
                f"compute dispatch {'yes' if self.supports_csd else 'no'}")


def query_gpu(get_param) -> GpuInfo:
    """Read the identification and feature params with ``get_param(name) -> int``."""
    params = {name: get_param(name) for name in IDENT_PARAMS}
    for name in FEATURE_PARAMS:
        try:
            params[name] = get_param(name)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            params[name] = 0
    return GpuInfo(params)


def check_supported(info: GpuInfo, path: str = "the GPU") -> None:
    """Refuse anything that is not V3D 7.1 with compute dispatch, saying what was found."""
    if info.ver != SUPPORTED_VERSION:
        raise UnsupportedGpuError(
            f"{path} is V3D {info.ver // 10}.{info.ver % 10} ({info.describe()}); tvm-qpu runs only on "
            f"V3D 7.1 (Raspberry Pi 5, VideoCore VII). Use open_device('emulator') on other machines.")
    if not info.supports_csd:
        raise UnsupportedGpuError(f"{path} ({info.describe()}): the kernel driver does not offer "
                                  "compute dispatch (SUPPORTS_CSD = 0); update the kernel.")
    if info.num_qpus == 0:
        raise UnsupportedGpuError(f"{path} reports no QPUs (CORE0_IDENT1 = "
                                  f"{info.params.get('V3D_CORE0_IDENT1', 0):#x})")


# --------------------------------------------------------------------------------------------
# CSD cfg words
# --------------------------------------------------------------------------------------------
def pack_cfg(values: dict) -> tuple:
    """Pack named CSD fields (v3d_uapi.CSD_CFG_FIELDS) into the 7 cfg words; a value that does
    not fit its field raises LaunchError naming it."""
    words = [0] * uapi.CSD_CFG_WORDS
    for name, value in values.items():
        f = uapi.CSD_CFG_FIELDS[name]
        if not 0 <= value < (1 << f.width):
            raise LaunchError(f"CSD field {name} = {value} does not fit its {f.width}-bit field")
        words[f.word] |= value << f.lo
    return tuple(words)


def unpack_cfg(cfg) -> dict:
    """Inverse of :func:`pack_cfg` (for tests and debugging)."""
    return {name: (cfg[f.word] >> f.lo) & ((1 << f.width) - 1)
            for name, f in uapi.CSD_CFG_FIELDS.items()}


def batches_minus_one(ver: int, rev: int) -> bool:
    """Whether cfg4 holds num_batches - 1: yes before V3D 7.1.6, no from 7.1.6 on (kernel
    v3d_sched.c and Mesa v3dx_draw.c)."""
    return ver < 71 or (ver == 71 and rev < 6)


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _count(value, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LaunchError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise LaunchError(f"{what} = {value} is outside {lo}..{hi}")
    return value


def normalize_workgroups(workgroups) -> tuple:
    """(x, y, z) from an int or a 1-3 element sequence; counts must be 1..65535 (16-bit fields)."""
    wg = (workgroups,) if isinstance(workgroups, (int, np.integer)) else tuple(workgroups)
    if not 1 <= len(wg) <= 3:
        raise LaunchError(f"workgroups must have 1 to 3 dimensions, got {workgroups!r}")
    wg = wg + (1,) * (3 - len(wg))
    limit = (1 << uapi.CSD_CFG_FIELDS["num_wgs_x"].width) - 1
    return tuple(_count(n, 1, limit, f"workgroups[{'xyz'[i]}]") for i, n in enumerate(wg))


def csd_cfg(workgroups, wg_size: int, code_addr: int, uniforms_addr: int, *, ver: int, rev: int,
            threads: int = 1, single_seg: bool = False, wgs_per_sg: int = 1) -> tuple:
    """The 7 cfg words of drm_v3d_submit_csd.

    workgroups: (x, y, z) counts, each 1..65535 (cfg0-2 bits 31:16);
    wg_size: work items per workgroup, 1..256 (cfg3 bits 7:0, 256 written as 0);
    wgs_per_sg: workgroups per supergroup, 1..16 (cfg3 bits 11:8, 16 written as 0); batches per
    supergroup = ceil(wgs_per_sg * wg_size / 16), written minus one in cfg3 bits 19:12;
    cfg4: the number of 16-lane batches, minus one before V3D 7.1.6 (``ver``/``rev``);
    cfg5: code address (8-byte aligned) | single_seg << 1 | threading (threads == 4; 1 and 2
    both leave it clear: 2 threads per QPU, see CSD_THREADS_BIT);
    cfg6: uniforms address (4-byte aligned).
    Impossible launches raise LaunchError.
    """
    x, y, z = normalize_workgroups(workgroups)
    wg_size = _count(wg_size, 1, 256, "wg_size")
    wgs_per_sg = _count(wgs_per_sg, 1, 16, "wgs_per_sg")
    if threads not in CSD_THREADS_BIT:
        raise LaunchError(f"threads = {threads!r}: a compute dispatch takes 1, 2 (both: threading "
                          f"bit clear, 2 threads per QPU) or 4 threads per QPU")
    code_addr = _count(code_addr, 1, 0xFFFFFFFF, "code address")
    uniforms_addr = _count(uniforms_addr, 0, 0xFFFFFFFF, "uniforms address")
    if code_addr % 8:
        raise LaunchError(f"code address {code_addr:#x} is not 8-byte aligned")
    if uniforms_addr % 4:
        raise LaunchError(f"uniforms address {uniforms_addr:#x} is not 4-byte aligned")

    num_wgs = x * y * z
    batches_per_sg = _div_up(wgs_per_sg * wg_size, BATCH_LANES)
    whole_sgs, rem_wgs = divmod(num_wgs, wgs_per_sg)
    num_batches = batches_per_sg * whole_sgs + _div_up(rem_wgs * wg_size, BATCH_LANES)
    cfg4 = num_batches - 1 if batches_minus_one(ver, rev) else num_batches
    if cfg4 >= 1 << uapi.CSD_CFG_FIELDS["num_batches"].width or cfg4 == 0xFFFFFFFF:
        raise LaunchError(f"{num_wgs} workgroups of {wg_size} make {num_batches} batches: too many "
                          "for one dispatch (32-bit batch count); split the launch")
    return pack_cfg({
        "num_wgs_x": x, "num_wgs_y": y, "num_wgs_z": z,
        "wg_size": wg_size & 0xFF,
        "wgs_per_sg": wgs_per_sg & 0xF,
        "batches_per_sg_m1": batches_per_sg - 1,
        "num_batches": cfg4,
        "threading": CSD_THREADS_BIT[threads],
        "single_seg": int(bool(single_seg)),
        "code_addr": code_addr >> 3,
        "uniforms_addr": uniforms_addr,
    })


# --------------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------------
@dataclass
class _Bo:
    handle: int
    size: int           # bytes mapped (page-rounded)
    map: object         # the mmap object (or a fake's buffer)


class V3DDevice(Device):
    """The Raspberry Pi 5 GPU through /dev/dri/renderD* (driver ``v3d``).

    path: the render node (default: :func:`find_render_node`); sys: the OS layer (tests inject a
    fake); timeout: default seconds per execute() before a job is reported as hung.
    """

    kind = "v3d"

    def __init__(self, path: str | None = None, *, sys: SysCalls | None = None,
                 timeout: float = DEFAULT_TIMEOUT, clock_hz: float | None = None):
        self.sys = sys or SysCalls()
        self.default_timeout = timeout
        self.fd = None
        self._bos: dict = {}            # GEM handle -> _Bo
        if path is None:
            path = find_render_node(sys=self.sys)
            if path is None:
                raise V3DNotFoundError(NO_DEVICE_HINT)
        self.path = path
        self.fd = self._open(path)
        try:
            self.info = query_gpu(self._get_param)
            check_supported(self.info, path)
            self.reset_counter = self._find_reset_counter()
        except BaseException:
            self._close_fd()
            raise
        self.num_qpus = self.info.num_qpus
        if clock_hz is not None:
            self.clock_hz = clock_hz

    # ---- setup ---------------------------------------------------------------------------
    def _open(self, path: str) -> int:
        try:
            return self.sys.open(path)
        except PermissionError as e:
            raise DevicePermissionError(PERMISSION_HINT.format(path=path)) from e
        except FileNotFoundError as e:
            raise V3DNotFoundError(f"{path} does not exist. " + NO_DEVICE_HINT) from e
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise DevicePermissionError(PERMISSION_HINT.format(path=path)) from e
            raise DeviceError(f"cannot open {path}: {os.strerror(e.errno or 0)}") from e

    def _get_param(self, name: str) -> int:
        p = uapi.DrmV3dGetParam(param=uapi.PARAMS[name])
        _ioctl(self.sys, self.fd, "GET_PARAM", p)
        return int(p.value)

    def _find_reset_counter(self) -> str | None:
        """The first GET_PARAM reset counter this kernel answers (None on kernels without one)."""
        for name in RESET_COUNTER_PARAMS:
            try:
                self._get_param(name)
                return name
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise DeviceError(f"GET_PARAM {name} failed: {os.strerror(e.errno or 0)}") from e
        return None

    def _resets(self) -> int | None:
        return None if self.reset_counter is None else self._get_param(self.reset_counter)

    # ---- the kernel's hang check -----------------------------------------------------------
    def check_plan(self, plan, modelled_seconds: float | None, what: str | None = None) -> None:
        """Refuse, before it runs, a plan whose modelled time (the kernel estimate, or the
        emulator's cycle model) exceeds :data:`DISPATCH_BUDGET_SECONDS`: its dispatch could
        outlast the kernel's hang check, be reset and leave unfinished output. The whole plan's
        time bounds each of its launches, unless the plan models each launch itself
        (``plan.attrs["launch_seconds"]``, one per launch, e.g. a GEMM split into row blocks):
        then the longest launch is checked. ``None`` (not modelled) is accepted: the reset check
        after each job still catches a reset."""
        per_launch = getattr(plan, "attrs", {}).get("launch_seconds")
        if per_launch is not None and len(per_launch) == len(plan.launches) and per_launch:
            modelled_seconds = max(float(x) for x in per_launch)
        if modelled_seconds is None or modelled_seconds <= DISPATCH_BUDGET_SECONDS:
            return
        name = what or getattr(plan, "name", "plan")
        raise LaunchTooLongError(
            f"{name} is modelled at {modelled_seconds * 1e3:.0f} ms on the QPUs, longer than one GPU "
            f"dispatch may run ({DISPATCH_BUDGET_SECONDS * 1e3:.0f} ms budget): the v3d kernel driver "
            f"resets a compute job whose batches make no progress for {HANG_CHECK_SECONDS * 1e3:.0f} "
            "ms, which would leave its output unfinished. Run this operator on the CPU "
            "(compile with --qpu-placement none, or use a smaller input shape).")

    def _check_not_reset(self, what: str, resets_before: int | None, seconds: float) -> None:
        """Raise JobResetError if the kernel reset the GPU while the job ran. With a reset counter
        any increase is a reset. Without one (older kernels) a job that ran at least one hang
        check period cannot be told from a reset one (WAIT_BO succeeds either way), so it is
        refused too: our launches keep every batch resident, so their counter cannot move."""
        if resets_before is not None:
            after = self._resets()
            if after != resets_before:
                raise JobResetError(
                    f"GPU job {what!r} was reset by the kernel driver ({self.reset_counter} went "
                    f"{resets_before} -> {after}) after {seconds:.3f} s: its output is incomplete and "
                    f"was discarded. The v3d driver resets a compute job whose batches make no "
                    f"progress for {HANG_CHECK_SECONDS * 1e3:.0f} ms; see `dmesg | grep v3d`.")
            return
        if seconds >= HANG_CHECK_SECONDS:
            raise JobResetError(
                f"GPU job {what!r} ran {seconds:.3f} s, at least the v3d driver's "
                f"{HANG_CHECK_SECONDS * 1e3:.0f} ms hang check, and this kernel has no GPU reset "
                "counter (GET_PARAM CONTEXT_RESET_COUNTER) to prove it was not reset: the kernel "
                "resets such jobs and WAIT_BO still succeeds, so the output cannot be trusted and "
                "was discarded. Split the work into shorter launches.")

    # ---- memory --------------------------------------------------------------------------
    def alloc(self, nbytes: int, align: int = 4096) -> Buffer:
        nbytes = int(nbytes)
        if nbytes < 0 or nbytes > MAX_BO_BYTES:
            raise DeviceError(f"cannot allocate {nbytes} bytes: a V3D buffer holds 0..{MAX_BO_BYTES}")
        if align <= 0 or align & (align - 1):
            raise DeviceError(f"alignment {align} is not a power of two")
        page = max(GPU_PAGE, mmap.PAGESIZE)
        size = max(page, _div_up(nbytes, page) * page)
        create = uapi.DrmV3dCreateBo(size=size, flags=0)
        try:
            _ioctl(self.sys, self.fd, "CREATE_BO", create)
        except OSError as e:
            raise DeviceError(f"CREATE_BO of {size} bytes failed: {os.strerror(e.errno or 0)}"
                              + (" (out of GPU memory)" if e.errno == errno.ENOMEM else "")) from e
        handle = create.handle
        try:
            if create.offset % align:
                raise DeviceError(f"buffer at GPU address {create.offset:#x} does not meet the "
                                  f"requested {align}-byte alignment")
            mm = uapi.DrmV3dMmapBo(handle=handle, flags=0)
            _ioctl(self.sys, self.fd, "MMAP_BO", mm)
            mapping = self.sys.mmap(self.fd, size, mm.offset)
        except OSError as e:
            self._gem_close(handle)
            raise DeviceError(f"cannot map buffer {handle}: {os.strerror(e.errno or 0)}") from e
        except BaseException:
            self._gem_close(handle)
            raise
        self._bos[handle] = _Bo(handle, size, mapping)
        array = np.frombuffer(mapping, dtype=np.uint8, count=nbytes)
        return Buffer(device=self, addr=int(create.offset), size=nbytes, array=array, handle=handle)

    def _gem_close(self, handle: int) -> None:
        try:
            _ioctl(self.sys, self.fd, "GEM_CLOSE", uapi.DrmGemClose(handle=handle))
        except OSError:
            pass

    def free(self, buf: Buffer) -> None:
        bo = self._bos.pop(buf.handle, None)
        if bo is None:
            return
        buf.array = np.empty(0, dtype=np.uint8)
        close = getattr(bo.map, "close", None)
        if close is not None:
            try:
                close()
            except BufferError:
                pass        # other numpy views still use the mapping; it goes with them
        self._gem_close(bo.handle)

    # ---- programs ------------------------------------------------------------------------
    def load_program(self, words, name: str = "kernel") -> ProgramHandle:
        words = np.ascontiguousarray(np.asarray(words, dtype=np.uint64).reshape(-1))
        if words.size == 0:
            raise DeviceError(f"program {name!r} has no instructions")
        buf = self.upload(words)
        return ProgramHandle(addr=buf.addr, words=words, buffer=buf, name=name)

    # ---- execution -----------------------------------------------------------------------
    def execute(self, program: ProgramHandle, uniforms, *, workgroups=(1, 1, 1), wg_size: int = 16,
                num_qpus: int | None = None, threads: int = 1, timeout: float | None = None) -> ExecStats:
        """Dispatch ``program`` once and wait for it. Each workgroup of ``wg_size`` (<= 256) lanes
        is ceil(wg_size / 16) batches, one QPU thread each (one workgroup per supergroup);
        ``threads`` sets the cfg threading bit (CSD_THREADS_BIT). The hardware dispatcher spreads the
        batches over all QPUs: ``num_qpus`` (a plan's QPU count, 12 unless compiled for another
        GPU) is only a hint and cannot restrict that; a plan sized for more QPUs than this GPU has
        (``self.num_qpus``, from CORE0_IDENT1) still runs, its extra batches queue."""
        if self.fd is None:
            raise DeviceError("device is closed")
        wg_size = _count(wg_size, 1, 256, "wg_size (lanes per workgroup)")    # ceil(/16) batches
        if num_qpus is not None:
            _count(num_qpus, 1, 255, "num_qpus")
        timeout = self.default_timeout if timeout is None else float(timeout)
        owned = None
        if isinstance(uniforms, Buffer):
            unif = uniforms
        else:
            unif = owned = self.upload(np.asarray(uniforms, dtype=np.uint32).reshape(-1))
        try:
            cfg = csd_cfg(workgroups, wg_size, program.addr, unif.addr, ver=self.info.ver,
                          rev=self.info.rev, threads=threads)
            submit = uapi.DrmV3dSubmitCsd()
            submit.cfg[:] = cfg
            handles = (ctypes.c_uint32 * len(self._bos))(*self._bos)
            submit.bo_handles = ctypes.addressof(handles)
            submit.bo_handle_count = len(handles)
            wait_handle = program.buffer.handle if program.buffer is not None else unif.handle
            resets_before = self._resets()
            start = self.sys.clock()
            try:
                _ioctl(self.sys, self.fd, "SUBMIT_CSD", submit)
            except OSError as e:
                raise DeviceError(f"SUBMIT_CSD of {program.name!r} failed: "
                                  f"{os.strerror(e.errno or 0)}") from e
            self.wait(wait_handle, timeout, what=program.name)
            seconds = self.sys.clock() - start
            self._check_not_reset(program.name, resets_before, seconds)
        finally:
            if owned is not None:
                self.free(owned)
        return ExecStats(seconds=seconds, modeled=False)

    def wait(self, handle: int, timeout: float, what: str = "job") -> None:
        """Wait until every job using BO ``handle`` is done, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            arg = uapi.DrmV3dWaitBo(handle=handle, pad=0, timeout_ns=max(1, int(remaining * 1e9)))
            try:
                _ioctl(self.sys, self.fd, "WAIT_BO", arg, retry_eagain=False)
                return
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue        # woken early with time left: wait again for the rest
                if e.errno in (errno.ETIME, errno.ETIMEDOUT):
                    break
                raise DeviceError(f"WAIT_BO for {what!r} failed: {os.strerror(e.errno or 0)}") from e
        raise JobTimeoutError(
            f"GPU job {what!r} did not finish within the {timeout:g} s timeout (WAIT_BO timed out): "
            "the kernel is probably stuck in a loop or waiting on a TMU read that never returns. "
            f"(The kernel driver resets a job whose batches stop progressing for "
            f"{HANG_CHECK_SECONDS * 1e3:.0f} ms; a larger timeout= only helps launches of many batches.)")

    # ---- teardown ------------------------------------------------------------------------
    def _close_fd(self):
        if self.fd is not None:
            try:
                self.sys.close(self.fd)
            finally:
                self.fd = None

    def close(self) -> None:
        if self.fd is None:
            return
        for handle in list(self._bos):
            bo = self._bos.pop(handle)
            close = getattr(bo.map, "close", None)
            if close is not None:
                try:
                    close()
                except BufferError:
                    pass
            self._gem_close(handle)
        self._close_fd()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        info = getattr(self, "info", None)
        return f"V3DDevice({self.path!r}, {info.describe() if info else 'unidentified'})"
