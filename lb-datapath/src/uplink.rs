//! What an uplink is, asked in the calling thread's network namespace: its driver and bus
//! (ethtool's `GDRVINFO`), and, for a veth, whether its peer runs an XDP program (rtnetlink,
//! which reaches the peer in whatever namespace it lives). Never from `/sys/class/net`: that
//! shows the namespace that mounted sysfs, which for an agent started with `nsenter --net` is
//! the host's, where an interface of the same name (`eth0`) is something else altogether.
//!
//! Why XDP cares: a NIC hands XDP frames as they came off the wire (complete checksums, nothing
//! over the MTU), and sends what XDP transmits. A veth hands XDP its peer's packets as they are
//! (GSO packets, partial checksums), and a frame XDP sends back out of it (`XDP_TX`) reaches the
//! peer only when the peer runs an XDP program; otherwise it is dropped without a trace.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An interface's driver, as `ethtool -i` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    /// `veth`, `virtio_net`, `ixgbe`, ...
    pub name: String,
    /// The device's bus address (`0000:00:03.0`); empty for a software interface.
    pub bus_info: String,
}

impl Driver {
    /// Whether the interface is a device on a bus (a NIC, physical or virtual), as opposed to a
    /// software interface (veth, bridge, bond, VLAN, tunnel, ...).
    pub fn is_device(&self) -> bool {
        !self.bus_info.is_empty() && self.bus_info != "N/A" && self.bus_info != "tap"
    }

    pub fn is_veth(&self) -> bool {
        self.name == "veth"
    }
}

/// `ETHTOOL_GDRVINFO` from `<linux/ethtool.h>`.
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The driver of `iface` in the calling thread's network namespace.
pub fn driver(iface: &str) -> io::Result<Driver> {
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {iface:?} is longer than 15 bytes"),
        ));
    }
    // Any socket of this namespace serves as a handle for interface ioctls.
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain old data; all-zero is a valid value.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with an ifreq naming the interface and pointing at an ethtool_drvinfo
    // that outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Driver {
        name: text(&info.driver),
        bus_info: text(&info.bus_info),
    })
}

/// One `RTM_GETLINK` for interface `ifindex`, in the namespace with id `netns_id` as this
/// namespace knows it (`None`: this namespace).
fn get_link(ifindex: u32, netns_id: Option<i32>) -> io::Result<Vec<LinkAttribute>> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    if let Some(id) = netns_id {
        // IFLA_TARGET_NETNSID (Linux 4.20): the query is answered from that namespace.
        request.attributes.push(LinkAttribute::IfNetnsId(id));
    }
    let mut message = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(request)),
    );
    message.header.flags = NLM_F_REQUEST;
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut answer = vec![0u8; 1 << 16];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(link.attributes),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to RTM_GETLINK: {other:?}"),
        )),
    }
}

fn xdp_attached(attributes: &[LinkAttribute]) -> bool {
    attributes.iter().any(|a| {
        matches!(a, LinkAttribute::Xdp(xdp) if xdp.iter().any(|x| {
            matches!(x, LinkXdp::Attached(mode) if *mode != XdpAttached::None)
        }))
    })
}

/// Whether the peer of veth `iface` (in the calling thread's namespace) runs an XDP program,
/// wherever it lives: the condition for frames that XDP sends back out of `iface` to arrive.
pub fn veth_peer_runs_xdp(iface: &str) -> io::Result<bool> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let attributes = get_link(ifindex, None)?;
    let mut peer = None;
    let mut netns_id = None;
    for attribute in &attributes {
        match attribute {
            LinkAttribute::Link(index) => peer = Some(*index),
            LinkAttribute::LinkNetNsId(id) => netns_id = Some(*id),
            _ => {}
        }
    }
    let peer = peer.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{iface} names no peer (IFLA_LINK)"),
        )
    })?;
    Ok(xdp_attached(&get_link(peer, netns_id)?))
}
