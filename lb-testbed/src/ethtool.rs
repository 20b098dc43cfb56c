//! GRO on an interface, switched with the `SIOCETHTOOL` ioctl that `ethtool -K <iface> gro on`
//! uses, so that the bed needs no `ethtool` binary (iproute2 cannot switch GRO: it only sets
//! `gro_max_size`).
//!
//! Why beds care: a veth only receives frames that XDP sends into it (`XDP_TX` on its peer,
//! `XDP_REDIRECT` from elsewhere) when its receive side runs in NAPI mode, which it does when an
//! XDP program is attached to it or GRO is on. Without either, such frames are dropped. GRO is
//! enough for XDP_REDIRECT, not for XDP_TX: see [`crate::xdp`].

use std::{io, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

// From <linux/ethtool.h>: the legacy one-feature commands, still supported by every kernel.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Switches GRO on or off for `iface` in `ns`, and checks that the kernel kept the setting.
pub fn set_gro(ns: &Netns, iface: &str, on: bool) -> Result<()> {
    let name = iface.to_owned();
    ns.enter(move || ethtool_value(&name, ETHTOOL_SGRO, u32::from(on)))?
        .with_context(|| format!("switching GRO on {iface} in netns {}", ns.name()))?;
    let now = gro(ns, iface)?;
    if now != on {
        bail!(
            "GRO on {iface} in netns {} is still {} after switching it",
            ns.name(),
            if now { "on" } else { "off" }
        );
    }
    Ok(())
}

/// Whether GRO is on for `iface` in `ns`.
pub fn gro(ns: &Netns, iface: &str) -> Result<bool> {
    let name = iface.to_owned();
    let value = ns
        .enter(move || ethtool_value(&name, ETHTOOL_GGRO, 0))?
        .with_context(|| format!("reading GRO of {iface} in netns {}", ns.name()))?;
    Ok(value != 0)
}

/// Switches transmit checksum offload of `iface` in `ns` (`ethtool -K <iface> tx on|off`).
///
/// Why beds care: a veth never computes an offloaded checksum, so a TCP or UDP packet a
/// namespace sends over one arrives on the other side with only its pseudo-header sum in the
/// checksum field (`CHECKSUM_PARTIAL`). tc programs learn that from the skb; an XDP program
/// sees bytes only and must assume a complete checksum, as a physical wire always delivers. With
/// offload off on the bed's "wires", the kernel completes checksums in software before sending,
/// as a real NIC does in hardware.
pub fn set_tx_checksum(ns: &Netns, iface: &str, on: bool) -> Result<()> {
    let name = iface.to_owned();
    ns.enter(move || ethtool_value(&name, ETHTOOL_STXCSUM, u32::from(on)))?
        .with_context(|| {
            format!(
                "switching tx checksumming on {iface} in netns {}",
                ns.name()
            )
        })?;
    let name = iface.to_owned();
    let now = ns
        .enter(move || ethtool_value(&name, ETHTOOL_GTXCSUM, 0))?
        .with_context(|| format!("reading tx checksumming of {iface} in netns {}", ns.name()))?;
    if (now != 0) != on {
        bail!(
            "tx checksumming on {iface} in netns {} did not switch",
            ns.name()
        );
    }
    Ok(())
}

/// Runs one `ethtool_value` command on `iface` of the calling thread's namespace; returns the
/// value the kernel wrote back.
fn ethtool_value(iface: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {iface:?} is longer than 15 bytes"),
        ));
    }
    // Any socket serves as a handle for interface ioctls.
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL with an ifreq naming the interface and pointing at an ethtool_value
    // that outlives the call.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}
