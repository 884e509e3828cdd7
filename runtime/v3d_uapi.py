"""The kernel interface of the ``v3d`` DRM driver, as ctypes data: structs, ioctl numbers, ids.

Every fact here comes from the Linux uAPI headers and is checked against them by
``tests/test_v3d_driver.py`` (which compiles a C program against the real headers):

* ``include/uapi/asm-generic/ioctl.h``: the ``_IOC`` encoding (nr 8 bits at 0, type 8 bits at 8,
  size 14 bits at 16, direction 2 bits at 30; write = 1, read = 2). arm64 and x86-64 use it.
* ``include/uapi/drm/drm.h``: ``DRM_IOCTL_BASE`` = 'd', ``DRM_COMMAND_BASE`` = 0x40,
  ``DRM_IOCTL_VERSION`` = DRM_IOWR(0x00, struct drm_version),
  ``DRM_IOCTL_GEM_CLOSE`` = DRM_IOW(0x09, struct drm_gem_close).
* ``include/uapi/drm/v3d_drm.h``: the driver's ioctls (note SUBMIT_CSD is DRM_IOW, not IOWR),
  structs and ``enum drm_v3d_param``.
* ``drivers/gpu/drm/v3d/v3d_regs.h``: the bit fields of the identification registers that
  GET_PARAM returns (HUB_IDENT1/3, CORE IDENT0/1), and the CSD cfg word layout
  (``V3D_CSD_QUEUED_CFG0..6``), also in Mesa ``src/broadcom/common/v3d_csd.h``.

This module holds data only; ``runtime/v3d.py`` is the driver that uses it.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

# --------------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h)
# --------------------------------------------------------------------------------------------
IOC_NRBITS, IOC_TYPEBITS, IOC_SIZEBITS, IOC_DIRBITS = 8, 8, 14, 2
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

#: direction name (as in the _IO/_IOR/_IOW/_IOWR macros) -> _IOC direction bits
IOC_DIRECTIONS = {"": 0, "W": 1, "R": 2, "WR": 3}


def ioc(direction: str, type_: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``; ``direction`` is "", "R", "W" or "WR"."""
    if not 0 <= size < (1 << IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {IOC_SIZEBITS} bits")
    return ((IOC_DIRECTIONS[direction] << IOC_DIRSHIFT) | (size << IOC_SIZESHIFT)
            | (type_ << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT))


DRM_IOCTL_BASE = ord("d")
DRM_COMMAND_BASE = 0x40


# --------------------------------------------------------------------------------------------
# Structs (field names and order exactly as in the C headers)
# --------------------------------------------------------------------------------------------
class DrmVersion(ctypes.Structure):
    """struct drm_version (drm.h): the caller supplies name/date/desc buffers and their lengths."""
    _fields_ = [
        ("version_major", ctypes.c_int),
        ("version_minor", ctypes.c_int),
        ("version_patchlevel", ctypes.c_int),
        ("name_len", ctypes.c_size_t),
        ("name", ctypes.c_void_p),
        ("date_len", ctypes.c_size_t),
        ("date", ctypes.c_void_p),
        ("desc_len", ctypes.c_size_t),
        ("desc", ctypes.c_void_p),
    ]


class DrmGemClose(ctypes.Structure):
    """struct drm_gem_close (drm.h)."""
    _fields_ = [("handle", u32), ("pad", u32)]


class DrmV3dWaitBo(ctypes.Structure):
    """struct drm_v3d_wait_bo; the kernel decrements timeout_ns by the time it waited."""
    _fields_ = [("handle", u32), ("pad", u32), ("timeout_ns", u64)]


class DrmV3dCreateBo(ctypes.Structure):
    """struct drm_v3d_create_bo; handle and offset (GPU address, never 0) are returned."""
    _fields_ = [("size", u32), ("flags", u32), ("handle", u32), ("offset", u32)]


class DrmV3dMmapBo(ctypes.Structure):
    """struct drm_v3d_mmap_bo; offset is returned: the mmap offset to use on the DRM fd."""
    _fields_ = [("handle", u32), ("flags", u32), ("offset", u64)]


class DrmV3dGetParam(ctypes.Structure):
    """struct drm_v3d_get_param; pad and value must be 0 on entry."""
    _fields_ = [("param", u32), ("pad", u32), ("value", u64)]


class DrmV3dGetBoOffset(ctypes.Structure):
    """struct drm_v3d_get_bo_offset."""
    _fields_ = [("handle", u32), ("offset", u32)]


class DrmV3dSubmitCsd(ctypes.Structure):
    """struct drm_v3d_submit_csd: one compute dispatch. bo_handles points at a u32 array of the
    GEM handles the job uses (at least one); the kernel fences all of them with the job."""
    _fields_ = [
        ("cfg", u32 * 7),
        ("coef", u32 * 4),
        ("bo_handles", u64),
        ("bo_handle_count", u32),
        ("in_sync", u32),
        ("out_sync", u32),
        ("perfmon_id", u32),
        ("extensions", u64),
        ("flags", u32),
        ("pad", u32),
    ]


#: C struct name -> ctypes class; the header test compares sizeof/offsetof of each field.
STRUCTS = {
    "drm_version": DrmVersion,
    "drm_gem_close": DrmGemClose,
    "drm_v3d_wait_bo": DrmV3dWaitBo,
    "drm_v3d_create_bo": DrmV3dCreateBo,
    "drm_v3d_mmap_bo": DrmV3dMmapBo,
    "drm_v3d_get_param": DrmV3dGetParam,
    "drm_v3d_get_bo_offset": DrmV3dGetBoOffset,
    "drm_v3d_submit_csd": DrmV3dSubmitCsd,
}


# --------------------------------------------------------------------------------------------
# ioctls
# --------------------------------------------------------------------------------------------
class IoctlDef(NamedTuple):
    macro: str          # the header's macro name, e.g. DRM_IOCTL_V3D_CREATE_BO
    direction: str      # "W" (DRM_IOW) or "WR" (DRM_IOWR)
    nr: int             # number within the 'd' space (driver ioctls are DRM_COMMAND_BASE + n)
    struct: type


#: short name -> definition (driver numbers: DRM_V3D_* in v3d_drm.h, added to DRM_COMMAND_BASE)
IOCTL_DEFS = {
    "VERSION": IoctlDef("DRM_IOCTL_VERSION", "WR", 0x00, DrmVersion),
    "GEM_CLOSE": IoctlDef("DRM_IOCTL_GEM_CLOSE", "W", 0x09, DrmGemClose),
    "WAIT_BO": IoctlDef("DRM_IOCTL_V3D_WAIT_BO", "WR", DRM_COMMAND_BASE + 0x01, DrmV3dWaitBo),
    "CREATE_BO": IoctlDef("DRM_IOCTL_V3D_CREATE_BO", "WR", DRM_COMMAND_BASE + 0x02, DrmV3dCreateBo),
    "MMAP_BO": IoctlDef("DRM_IOCTL_V3D_MMAP_BO", "WR", DRM_COMMAND_BASE + 0x03, DrmV3dMmapBo),
    "GET_PARAM": IoctlDef("DRM_IOCTL_V3D_GET_PARAM", "WR", DRM_COMMAND_BASE + 0x04, DrmV3dGetParam),
    "GET_BO_OFFSET": IoctlDef("DRM_IOCTL_V3D_GET_BO_OFFSET", "WR", DRM_COMMAND_BASE + 0x05,
                              DrmV3dGetBoOffset),
    "SUBMIT_CSD": IoctlDef("DRM_IOCTL_V3D_SUBMIT_CSD", "W", DRM_COMMAND_BASE + 0x07, DrmV3dSubmitCsd),
}


def ioctl_number(d: IoctlDef) -> int:
    return ioc(d.direction, DRM_IOCTL_BASE, d.nr, ctypes.sizeof(d.struct))


#: short name -> request number for ioctl(2)
IOCTLS = {name: ioctl_number(d) for name, d in IOCTL_DEFS.items()}

#: submit flags (v3d_drm.h)
DRM_V3D_SUBMIT_CL_FLUSH_CACHE = 0x01
DRM_V3D_SUBMIT_EXTENSION = 0x02


# --------------------------------------------------------------------------------------------
# GET_PARAM ids (enum drm_v3d_param, in order) and the register fields they carry
# --------------------------------------------------------------------------------------------
PARAM_NAMES = (
    "V3D_UIFCFG", "V3D_HUB_IDENT1", "V3D_HUB_IDENT2", "V3D_HUB_IDENT3",
    "V3D_CORE0_IDENT0", "V3D_CORE0_IDENT1", "V3D_CORE0_IDENT2",
    "SUPPORTS_TFU", "SUPPORTS_CSD", "SUPPORTS_CACHE_FLUSH", "SUPPORTS_PERFMON",
    "SUPPORTS_MULTISYNC_EXT", "SUPPORTS_CPU_QUEUE", "MAX_PERF_COUNTERS",
    # newer kernels (older ones answer EINVAL): the reset counters count GPU resets, globally and
    # for jobs of this DRM file (v3d_drv.c v3d_get_param_ioctl)
    "SUPPORTS_SUPER_PAGES", "GLOBAL_RESET_COUNTER", "CONTEXT_RESET_COUNTER",
)
#: name (without the DRM_V3D_PARAM_ prefix) -> id
PARAMS = {name: i for i, name in enumerate(PARAM_NAMES)}


class RegField(NamedTuple):
    param: str          # GET_PARAM name whose value holds the register
    lo: int             # lowest bit
    width: int

    def get(self, value: int) -> int:
        return (value >> self.lo) & ((1 << self.width) - 1)


#: identification fields (v3d_regs.h V3D_HUB_IDENT*/V3D_IDENT*; Mesa v3d_device_info.c reads
#: the version as CORE IDENT0[31:24] * 10 + CORE IDENT1[3:0] and the QPU count as NSLC * QUPS)
IDENT_FIELDS = {
    "hub_tver": RegField("V3D_HUB_IDENT1", 0, 4),
    "hub_rev": RegField("V3D_HUB_IDENT1", 4, 4),
    "ncores": RegField("V3D_HUB_IDENT1", 8, 4),
    "nhosts": RegField("V3D_HUB_IDENT1", 12, 4),
    "with_l3c": RegField("V3D_HUB_IDENT1", 16, 1),
    "with_tfu": RegField("V3D_HUB_IDENT1", 17, 1),
    "with_tsy": RegField("V3D_HUB_IDENT1", 18, 1),
    "with_mso": RegField("V3D_HUB_IDENT1", 19, 1),
    "with_mmu": RegField("V3D_HUB_IDENT2", 8, 1),
    "l3c_nkb": RegField("V3D_HUB_IDENT2", 0, 8),
    "ip_rev": RegField("V3D_HUB_IDENT3", 8, 8),
    "ip_idx": RegField("V3D_HUB_IDENT3", 0, 8),
    "ver_major": RegField("V3D_CORE0_IDENT0", 24, 8),
    "ver_minor": RegField("V3D_CORE0_IDENT1", 0, 4),
    "nslc": RegField("V3D_CORE0_IDENT1", 4, 4),
    "qups": RegField("V3D_CORE0_IDENT1", 8, 4),
    "ntmu": RegField("V3D_CORE0_IDENT1", 12, 4),
    "nsem": RegField("V3D_CORE0_IDENT1", 16, 8),
    # VPM size: v3d_regs.h says "multiples of 1kb", Mesa's v3d_device_info.c multiplies by 8192;
    # kept raw here (informational only, the driver does not use it)
    "vpm_size_units": RegField("V3D_CORE0_IDENT1", 28, 4),
}


# --------------------------------------------------------------------------------------------
# CSD cfg words (v3d_regs.h V3D_CSD_QUEUED_CFG0..6, Mesa common/v3d_csd.h)
# --------------------------------------------------------------------------------------------
class CfgField(NamedTuple):
    word: int
    lo: int
    width: int


CSD_CFG_FIELDS = {
    "wg_x_offset": CfgField(0, 0, 16),
    "num_wgs_x": CfgField(0, 16, 16),
    "wg_y_offset": CfgField(1, 0, 16),
    "num_wgs_y": CfgField(1, 16, 16),
    "wg_z_offset": CfgField(2, 0, 16),
    "num_wgs_z": CfgField(2, 16, 16),
    "wg_size": CfgField(3, 0, 8),                 # 256 is written as 0 (Mesa: wg_size & 0xff)
    "wgs_per_sg": CfgField(3, 8, 4),              # 16 is written as 0 ("0 means 16")
    "batches_per_sg_m1": CfgField(3, 12, 8),
    "max_sg_id": CfgField(3, 20, 6),
    "overlap_with_prev": CfgField(3, 26, 1),
    "num_batches": CfgField(4, 0, 32),            # minus 1 before V3D 7.1.6 (see v3d.csd_cfg)
    "threading": CfgField(5, 0, 1),               # 4-way threaded shader
    "single_seg": CfgField(5, 1, 1),              # shader has no "last thrsw" segment marker
    "propagate_nans": CfgField(5, 2, 1),          # set by Mesa only before V3D 7.1
    "code_addr": CfgField(5, 3, 29),              # the code address, 8-byte aligned, bits 31:3
    "uniforms_addr": CfgField(6, 0, 32),          # 4-byte aligned
}
CSD_CFG_WORDS = 7
