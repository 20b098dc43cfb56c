//! The BPF syscalls aya does not wrap for us: deleting an array-of-maps slot, and batch updates.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

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

/// `union bpf_attr` as used by BPF_MAP_*_BATCH commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_UPDATE_BATCH`: writes `keys[i] -> values[i]` in one call. Returns how many were
/// written (all of them on success).
pub fn map_update_batch<K, V>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: keys and values are live arrays of `count` elements; the kernel writes back only
    // `count` in the attribute.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(attr.count as usize)
    }
}

/// Reads a whole array map (`len` slots) with `BPF_MAP_LOOKUP_BATCH`, a few thousand slots per
/// syscall.
pub fn array_lookup_all<V: Copy + Default>(map: BorrowedFd<'_>, len: usize) -> io::Result<Vec<V>> {
    const CHUNK: usize = 8192;
    let mut values: Vec<V> = vec![V::default(); len];
    let mut keys: Vec<u32> = vec![0; CHUNK];
    let mut read = 0usize;
    let mut token: u32 = 0;
    let mut first = true;
    while read < len {
        let want = CHUNK.min(len - read);
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&token) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values[read..].as_mut_ptr() as u64,
            count: want as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: keys and values have room for `count` elements; the tokens are u32 as array
        // maps use.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let done = if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            true
        } else {
            false
        };
        read += attr.count as usize;
        if done || attr.count == 0 {
            break;
        }
        token = next;
        first = false;
    }
    values.truncate(read);
    Ok(values)
}

/// Counts the entries of a hash map with `BPF_MAP_LOOKUP_BATCH` (a few thousand per syscall).
pub fn hash_count(map: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<usize> {
    // Values of per-CPU maps are larger; this is for plain (LRU) hash maps.
    let mut chunk: usize = 4096;
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    let mut total = 0usize;
    // Hash maps' batch token is a bucket index.
    let mut token: u32 = 0;
    let mut first = true;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&token) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: keys and values have room for `count` entries of the map's key and value sizes.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) => return Ok(total + attr.count as usize),
                // One bucket holds more entries than fit: retry the same bucket with more room.
                Some(libc::ENOSPC) if chunk < 1 << 20 => {
                    chunk *= 2;
                    keys.resize(chunk * key_size, 0);
                    values.resize(chunk * value_size, 0);
                    continue;
                }
                _ => return Err(err),
            }
        }
        total += attr.count as usize;
        token = next;
        first = false;
    }
}
