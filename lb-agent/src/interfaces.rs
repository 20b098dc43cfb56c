//! The node's interfaces as the agent sees them: which exist, when they change, which match
//! `--pod-ifaces`, and where XDP can serve an uplink.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use lb_datapath::{attach::UplinkXdp, uplink};
use tracing::{error, info, warn};

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

/// How XDP serves uplink `iface` under `--xdp-mode`, decided in the agent's own network
/// namespace (see [`lb_datapath::uplink`]).
///
/// - `auto`: native XDP where the interface is a device on a bus (a NIC) and its driver offers
///   it; tc alone on software interfaces (veths, bridges, bonds, VLANs), whose packets may be
///   GSO packets with partial checksums that XDP cannot translate. Generic XDP is never chosen
///   by itself: it runs on the same skbs as tc, later than XDP and no faster.
/// - `native`: as asked, but refused (with an error, and tc serving the interface) on a veth
///   whose peer runs no XDP program: every frame XDP sent back out of it would be dropped.
/// - `generic`, `off`: as asked.
pub fn uplink_xdp(mode: XdpMode, iface: &str) -> UplinkXdp {
    match mode {
        XdpMode::Off => UplinkXdp::Off,
        XdpMode::Generic => UplinkXdp::Generic,
        XdpMode::Auto => match uplink::driver(iface) {
            Ok(driver) if driver.is_device() => UplinkXdp::NativeIfAvailable,
            Ok(driver) => {
                info!(%iface, driver = %driver.name, "XDP off here: a software interface hands XDP packets it cannot translate (GSO, partial checksums); tc serves it");
                UplinkXdp::Off
            }
            Err(e) => {
                warn!(%iface, error = %e, "cannot tell what this interface is; XDP off, tc serves it");
                UplinkXdp::Off
            }
        },
        XdpMode::Native => match uplink::driver(iface) {
            Ok(driver) if driver.is_veth() => match uplink::veth_peer_runs_xdp(iface) {
                Ok(true) => UplinkXdp::Native,
                Ok(false) => {
                    error!(%iface, "--xdp-mode native refused: {iface} is a veth whose peer runs no XDP program, so every frame XDP sent back out of it (forwarded and source-NATed packets, their replies, rejects) would be dropped; tc serves it instead");
                    UplinkXdp::Off
                }
                Err(e) => {
                    error!(%iface, error = %e, "--xdp-mode native refused: cannot tell whether the peer of veth {iface} runs XDP, without which frames XDP sends back out are dropped; tc serves it instead");
                    UplinkXdp::Off
                }
            },
            _ => UplinkXdp::Native,
        },
    }
}
