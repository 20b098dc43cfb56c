//! The BPF syscalls aya does not wrap for us: deleting an array-of-maps slot, batch updates and
//! batch lookups, and what socket-level balancing needs of its pinned cgroup links (opening a
//! pin, a link's cgroup, swapping a link's program).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
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
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: the attribute points at a live key.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }
}

/// `union bpf_attr` as used by BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the attribute points at a live C string.
    let fd = unsafe { bpf_ret(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    /// `bpf_link_type`.
    pub link_type: u32,
    pub link_id: u32,
    pub prog_id: u32,
    /// The cgroup's id (the inode number of its directory), for cgroup links.
    pub cgroup_id: u64,
    /// `bpf_attach_type`, for cgroup links.
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: `struct bpf_link_info`'s head and its `cgroup` member
/// (meaningful when the link is a cgroup link).
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // type, id, prog_id, 4 bytes of padding, then the union (8-aligned): cgroup_id, attach_type.
    let mut info = [0u8; 64];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the attribute points at a live buffer of `info_len` bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok(CgroupLinkInfo {
        link_type: u32_at(0),
        link_id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")),
        attach_type: u32_at(24),
    })
}

/// `BPF_LINK_UPDATE`: swaps `prog` into `link` (atomic for the hook's users).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = UpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: no pointers in the attribute.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }
}

/// The `bpf(2)` syscall `cmd` with `attr`; the kernel reads (and for some commands writes back)
/// only `size_of::<A>()` bytes of it.
///
/// # Safety
///
/// `attr` is the `union bpf_attr` layout of `cmd`, and every pointer in it is valid for what
/// `cmd` reads or writes through it.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: as the caller vouches.
    unsafe { bpf_ret(cmd, attr) }.map(drop)
}

/// [`bpf`], returning what the syscall returned (a descriptor, for some commands).
///
/// # Safety
///
/// As for [`bpf`].
unsafe fn bpf_ret<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed attribute of `size_of::<A>()` bytes; the
    // caller vouches for the pointers inside it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
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

impl BatchAttr {
    /// `count` entries of `map` in the arrays at `keys` and `values`, no batch tokens.
    fn new(map: BorrowedFd<'_>, keys: *const u8, values: *const u8, count: usize) -> Self {
        Self {
            in_batch: 0,
            out_batch: 0,
            keys: keys as u64,
            values: values as u64,
            count: count as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        }
    }
}

/// `BPF_MAP_UPDATE_BATCH`: writes `keys[i] -> values[i]` in one call. Returns how many were
/// written (all of them on success).
pub fn map_update_batch<K, V>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr::new(
        map,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    );
    // SAFETY: keys and values are live arrays of `count` elements; the kernel writes back only
    // `count` in the attribute.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
    Ok(attr.count as usize)
}

/// What one `BPF_MAP_LOOKUP_BATCH` call did.
struct Lookup {
    /// Entries read, also when the call failed (with ENOENT: the last, partial batch).
    read: usize,
    /// The token to continue from.
    next: u32,
    result: io::Result<()>,
}

/// One `BPF_MAP_LOOKUP_BATCH` call: up to `count` entries of `map` into `keys` and `values`,
/// from `token` (from the start when `None`). Array and hash maps both take u32 tokens (an index,
/// a bucket).
///
/// # Safety
///
/// `keys` and `values` have room for `count` of the map's keys and values.
unsafe fn lookup_batch(
    map: BorrowedFd<'_>,
    token: Option<u32>,
    keys: *mut u8,
    values: *mut u8,
    count: usize,
) -> Lookup {
    let mut next: u32 = 0;
    let mut attr = BatchAttr {
        in_batch: token.as_ref().map_or(0, |t| std::ptr::from_ref(t) as u64),
        out_batch: std::ptr::from_mut(&mut next) as u64,
        ..BatchAttr::new(map, keys, values, count)
    };
    // SAFETY: the caller vouches for keys and values; the tokens are live u32s.
    let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
    Lookup {
        read: attr.count as usize,
        next,
        result,
    }
}

/// Reads a whole array map (`len` slots) with `BPF_MAP_LOOKUP_BATCH`, a few thousand slots per
/// syscall.
pub fn array_lookup_all<V: Copy + Default>(map: BorrowedFd<'_>, len: usize) -> io::Result<Vec<V>> {
    const CHUNK: usize = 8192;
    let mut values: Vec<V> = vec![V::default(); len];
    let mut keys: Vec<u32> = vec![0; CHUNK];
    let mut read = 0usize;
    let mut token = None;
    while read < len {
        let want = CHUNK.min(len - read);
        // SAFETY: keys has room for CHUNK >= want keys, values for `len - read` >= want values.
        let batch = unsafe {
            lookup_batch(
                map,
                token,
                keys.as_mut_ptr().cast(),
                values[read..].as_mut_ptr().cast(),
                want,
            )
        };
        let done = match batch.result {
            Err(err) if err.raw_os_error() != Some(libc::ENOENT) => return Err(err),
            Err(_) => true,
            Ok(()) => false,
        };
        read += batch.read;
        if done || batch.read == 0 {
            break;
        }
        token = Some(batch.next);
    }
    values.truncate(read);
    Ok(values)
}

/// Calls `visit` with the bytes of every key of a hash map, read with `BPF_MAP_LOOKUP_BATCH` (a
/// few thousand per syscall); returns how many there were.
pub fn hash_keys(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut visit: impl FnMut(&[u8]),
) -> io::Result<usize> {
    hash_entries(map, key_size, value_size, |key, _| visit(key))
}

/// Calls `visit` with the bytes of every key and its value of a hash map, read with
/// `BPF_MAP_LOOKUP_BATCH` (a few thousand per syscall, where iterating costs two syscalls an
/// entry); returns how many there were.
pub fn hash_entries(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut visit: impl FnMut(&[u8], &[u8]),
) -> io::Result<usize> {
    // Values of per-CPU maps are larger; this is for plain (LRU) hash maps.
    let mut chunk: usize = 4096;
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    let mut total = 0usize;
    let mut token = None;
    loop {
        // SAFETY: keys and values have room for `chunk` entries of the map's key and value sizes.
        let batch =
            unsafe { lookup_batch(map, token, keys.as_mut_ptr(), values.as_mut_ptr(), chunk) };
        keys.chunks_exact(key_size)
            .zip(values.chunks_exact(value_size))
            .take(batch.read)
            .for_each(|(k, v)| visit(k, v));
        if let Err(err) = batch.result {
            match err.raw_os_error() {
                Some(libc::ENOENT) => return Ok(total + batch.read),
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
        total += batch.read;
        token = Some(batch.next);
    }
}

/// Hands the heap's free pages back to the kernel (glibc keeps what a thread freed in that
/// thread's arena, where other threads' allocations cannot reuse it).
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; nothing allocated is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
