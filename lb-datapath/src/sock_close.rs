//! Connected UDP sockets of the node whose backend went away. Socket-level balancing connects a
//! node's UDP socket (a DNS client, say) straight to a backend; nothing per packet would move it
//! when that backend leaves its Service, so the agent closes it instead, as kube-proxy flushes
//! UDP conntrack: the kernel's `SOCK_DESTROY` (sock_diag, `CONFIG_INET_DIAG_DESTROY`, which
//! Debian and most distributions enable) disconnects it with `ECONNABORTED`: its next `send()`
//! fails with `EDESTADDRREQ`, its next `recv()` with `ECONNABORTED`, and resolvers open a new
//! socket, which is balanced anew. Works on every kernel
//! the socket programs load on (6.1+), unlike `bpf_sock_destroy` (6.5+).
//!
//! IPv4 sockets and IPv6 ones connected to an IPv4-mapped address are looked at. Only sockets of
//! the calling thread's network namespace (the agent's: the node's) are
//! concerned: pods' connected UDP sockets are left to the packet path (see `lb_ebpf::sock`).

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use bytemuck::{Pod, Zeroable};
use lb_common::{maps as names, net::proto, sock::SockRevKey};

use crate::maps::{Maps, MapsError};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_ESTABLISHED`: a connected UDP socket's state.
const ESTABLISHED: u32 = 1;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [[u8; 4]; 4],
    dst: [[u8; 4]; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

impl SockId {
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[0]) | (u64::from(self.cookie[1]) << 32)
    }

    /// The peer, for an IPv4 socket or an IPv6 one connected to an IPv4-mapped address (the
    /// kernel fills `dst[0]` for the first, all of `dst` for the second).
    fn peer(&self, family: u8) -> Option<SocketAddrV4> {
        let addr = if family == libc::AF_INET as u8 {
            self.dst[0]
        } else if self.dst[0] == [0; 4]
            && self.dst[1] == [0; 4]
            && self.dst[2] == [0, 0, 0xff, 0xff]
        {
            self.dst[3]
        } else {
            return None;
        };
        Some(SocketAddrV4::new(
            Ipv4Addr::from(addr),
            u16::from_be_bytes(self.dport),
        ))
    }
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// The sockets to close: (socket cookie, the backend it was sent to).
pub type Doomed = BTreeSet<(u64, SocketAddrV4)>;

/// Forgets the UDP sockets socket-level balancing sent to one of `gone` (backends that stopped
/// serving or left their set): removes their `LB_SOCK_REV` entries and returns them, for
/// [`close_connected`].
pub fn forget_udp(maps: &mut Maps, gone: &BTreeSet<SocketAddrV4>) -> Result<Doomed, MapsError> {
    let mut stale: Vec<SockRevKey> = Vec::new();
    if gone.is_empty() {
        return Ok(Doomed::new());
    }
    for entry in maps.sock_rev.keys() {
        let key = entry.map_err(map_error)?;
        if key.proto == proto::UDP && gone.contains(&backend(&key)) {
            stale.push(key);
        }
    }
    for key in &stale {
        // Gone already (LRU) is fine.
        let _ = maps.sock_rev.remove(key);
    }
    Ok(stale.iter().map(|k| (k.cookie, backend(k))).collect())
}

fn backend(key: &SockRevKey) -> SocketAddrV4 {
    SocketAddrV4::new(key.backend_addr.to_ip(), key.backend_port.to_host())
}

/// Closes the connected UDP sockets of the calling thread's network namespace that are in
/// `doomed` and still connected to that backend; returns how many.
pub fn close_connected(doomed: &Doomed) -> io::Result<usize> {
    if doomed.is_empty() {
        return Ok(0);
    }
    let netlink = open()?;
    let mut closed = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for id in connected_udp(&netlink, family)? {
            if id
                .peer(family)
                .is_some_and(|peer| doomed.contains(&(id.cookie(), peer)))
            {
                destroy(&netlink, family, &id)?;
                closed += 1;
            }
        }
    }
    Ok(closed)
}

fn map_error(e: aya::maps::MapError) -> MapsError {
    MapsError::Map {
        name: names::LB_SOCK_REV,
        source: e,
    }
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(fd: &OwnedFd, kind: u16, flags: u16, req: &DiagReq) -> io::Result<()> {
    let hdr = NlMsgHdr {
        len: (size_of::<NlMsgHdr>() + size_of::<DiagReq>()) as u32,
        kind,
        flags,
        seq: 1,
        pid: 0,
    };
    let mut msg = bytemuck::bytes_of(&hdr).to_vec();
    msg.extend_from_slice(bytemuck::bytes_of(req));
    // SAFETY: sending our buffer on our socket (to the kernel: no address needed for netlink
    // once unbound sockets default to it).
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until `NLMSG_DONE` or an acknowledgement, handing each payload of
/// another type to `each`.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<NlMsgHdr>() {
            let hdr: NlMsgHdr = bytemuck::pod_read_unaligned(&rest[..size_of::<NlMsgHdr>()]);
            let len = (hdr.len as usize).clamp(size_of::<NlMsgHdr>(), rest.len());
            let payload = &rest[size_of::<NlMsgHdr>()..len];
            match hdr.kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => each(payload),
            }
            // Messages are 4-byte aligned.
            rest = &rest[(len + 3) & !3..];
            if len == 0 {
                break;
            }
        }
    }
}

/// The connected UDP sockets of the namespace of one address family.
fn connected_udp(fd: &OwnedFd, family: u8) -> io::Result<Vec<SockId>> {
    let req = DiagReq {
        family,
        protocol: proto::UDP,
        states: 1 << ESTABLISHED,
        ..DiagReq::default()
    };
    request(fd, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
    let mut found = Vec::new();
    receive(fd, |payload| {
        if payload.len() >= size_of::<DiagMsg>() {
            let msg: DiagMsg = bytemuck::pod_read_unaligned(&payload[..size_of::<DiagMsg>()]);
            found.push(msg.id);
        }
    })?;
    Ok(found)
}

/// Closes the socket `id` names (with its cookie, so no other socket on the same ports).
fn destroy(fd: &OwnedFd, family: u8, id: &SockId) -> io::Result<()> {
    let req = DiagReq {
        family,
        protocol: proto::UDP,
        states: u32::MAX,
        id: *id,
        ..DiagReq::default()
    };
    request(fd, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    match receive(fd, |_| {}) {
        // Closed meanwhile: nothing left to do.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_read_from_ipv4_sockets_and_ipv4_mapped_ipv6_ones() {
        let v4 = SockId {
            dport: 53u16.to_be_bytes(),
            dst: [[10, 96, 0, 10], [0; 4], [0; 4], [0; 4]],
            cookie: [7, 1],
            ..SockId::default()
        };
        let dns = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
        assert_eq!(v4.peer(libc::AF_INET as u8), Some(dns));
        assert_eq!(v4.cookie(), (1 << 32) | 7);
        let mapped = SockId {
            dst: [[0; 4], [0; 4], [0, 0, 0xff, 0xff], [10, 96, 0, 10]],
            ..v4
        };
        assert_eq!(mapped.peer(libc::AF_INET6 as u8), Some(dns));
        let native = SockId {
            dst: [[0x20, 0x01, 0x0d, 0xb8], [0; 4], [0; 4], [0, 0, 0, 1]],
            ..v4
        };
        assert_eq!(native.peer(libc::AF_INET6 as u8), None);
    }
}
