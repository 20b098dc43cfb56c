//! The node's interfaces as the agent sees them: which exist, when they change, which match
//! `--pod-ifaces`, and where XDP can serve an uplink.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use lb_datapath::attach::UplinkXdp;
use tracing::info;

use crate::config::XdpMode;

/// Names of the interfaces of the calling thread's network namespace.
pub fn present() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut cursor = list;
        while (*cursor).if_index != 0 {
            names.push(
                CStr::from_ptr((*cursor).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cursor = cursor.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// A netlink socket subscribed to link changes: readable whenever an interface appears, goes
/// away or changes, so pod interfaces are attached as soon as they exist.
pub fn link_events() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: binding our socket to a properly sized sockaddr_nl.
    let ret = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Blocks until the next batch of link events (its content does not matter: the caller
/// re-scans the interfaces).
pub fn wait_link_event(socket: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `iface` matches one of the `--pod-ifaces` globs.
pub fn matches_any(patterns: &[glob::Pattern], iface: &str) -> bool {
    patterns.iter().any(|p| p.matches(iface))
}

/// Whether an XDP program can translate what `iface` receives. A NIC hands XDP frames as they
/// came off the wire: complete checksums, nothing larger than the MTU (drivers turn receive
/// offloads off while a program is attached). A virtual interface (veth, the uplink of a node
/// that is itself a container, as in kind) hands it its peer's skbs as they are: GSO packets of
/// up to 64 KiB whose TCP/UDP checksum holds only the pseudo-header sum. XDP cannot see that
/// state; every address or port it rewrites would leave a wrong checksum behind. Interfaces
/// backed by a bus device (`/sys/class/net/<iface>/device`) are NICs; the others are virtual.
fn xdp_is_safe(iface: &str) -> Result<(), &'static str> {
    if std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
    {
        Ok(())
    } else {
        Err(
            "virtual interface: its peer sends GSO packets with partial checksums, which XDP cannot translate",
        )
    }
}

/// How XDP serves uplink `iface` under `--xdp-mode`. `auto` means native XDP where a NIC driver
/// offers it and tc alone everywhere else. Generic XDP is never chosen by itself: it runs on
/// the same skbs as tc, later than XDP and no faster, and sees GSO packets with partial
/// checksums (see `xdp_is_safe`).
pub fn uplink_xdp(mode: XdpMode, iface: &str) -> UplinkXdp {
    match mode {
        XdpMode::Off => UplinkXdp::Off,
        XdpMode::Native => UplinkXdp::Native,
        XdpMode::Generic => UplinkXdp::Generic,
        XdpMode::Auto => match xdp_is_safe(iface) {
            Ok(()) => UplinkXdp::NativeIfAvailable,
            Err(reason) => {
                info!(%iface, reason, "XDP off here; tc serves this interface (--xdp-mode native forces XDP)");
                UplinkXdp::Off
            }
        },
    }
}
