//! The one BPF syscall aya does not wrap for us: deleting an array-of-maps slot.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// `union bpf_attr` as used by BPF_MAP_*_ELEM commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_MAP_DELETE_ELEM` on `map` for `key`.
pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: the attribute points at a live key; the kernel reads only `size_of::<MapElemAttr>()`
    // bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
