//! Socket-level balancing (the `cgroup/connect4` and `cgroup/getpeername4` programs): what a
//! `connect()` to a frontend becomes, and the hash that picks its Maglev slot. The kernel
//! programs call these rules; userspace (tests, later `lbctl trace`) can call them too.

use crate::{
    Be16, Be32,
    hash::flow_hash,
    maps::{Frontend, FrontendKey},
    net::proto,
};

/// What `connect()` to an address of a ClusterIP does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connect {
    /// Left to the packet path: the socket connects to the address it asked for.
    Leave,
    /// `connect()` fails at once with [`REFUSED_ERRNO`]: the frontend has no backend that takes
    /// new connections, or the ClusterIP does not serve that port (the packet path rejects both
    /// with a TCP reset, which a client also sees as `ECONNREFUSED`).
    Refuse,
    /// Connected to a backend of the frontend.
    Balance,
}

/// The errno `connect()` returns for [`Connect::Refuse`]: `ECONNREFUSED` (111 on x86-64 and
/// arm64, the architectures the datapath is built for). The program sets it with
/// `bpf_set_retval` (cgroup `sock_addr` programs have it from Linux 6.1) and returns 0; without
/// it, a 0 from the program makes the syscall fail with `EPERM`.
pub const REFUSED_ERRNO: i32 = 111;

/// What `connect()` to `frontend` (found for the socket's destination, internal scope) does.
/// Frontends whose rules need the client's address (session affinity, source ranges) are left
/// to the packet path: before `connect()` a socket usually has no source address yet.
#[inline(always)]
pub const fn on_connect(frontend: &Frontend) -> Connect {
    if frontend.backend_count == 0 {
        Connect::Refuse
    } else if frontend.affinity_timeout_s != 0 || frontend.has_source_ranges() {
        Connect::Leave
    } else {
        Connect::Balance
    }
}

/// The hash whose Maglev slot a socket's `connect()` to `frontend` uses. A socket has no source
/// port before `connect()`, so the socket's cookie (unique per socket for the life of the
/// system) stands in for the source address and port of the flow hash: sockets spread over the
/// table as flows from consecutive source ports do, and one socket connecting again (a
/// non-blocking `connect()` repeated) gets the same backend while the table is unchanged.
/// Unlike a flow's hash it is not the same on every node: a connected socket needs no other
/// node to agree.
#[inline(always)]
pub const fn slot_hash(cookie: u64, frontend: &FrontendKey) -> u32 {
    flow_hash(
        Be32::from_raw(cookie as u32),
        frontend.addr,
        Be16::from_raw((cookie >> 32) as u16),
        frontend.port,
        proto::TCP,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_frontends_refuse_and_client_rules_stay_with_the_packet_path() {
        let balanced = Frontend {
            backend_count: 2,
            ..Frontend::default()
        };
        assert_eq!(on_connect(&balanced), Connect::Balance);
        assert_eq!(on_connect(&Frontend::default()), Connect::Refuse);
        let sticky = Frontend {
            affinity_timeout_s: 10_800,
            ..balanced
        };
        assert_eq!(on_connect(&sticky), Connect::Leave);
        let ranged = Frontend {
            source_range_id: 3,
            ..balanced
        };
        assert_eq!(on_connect(&ranged), Connect::Leave);
        // No backend refuses even with affinity (as the packet path rejects everyone).
        assert_eq!(
            on_connect(&Frontend {
                backend_count: 0,
                ..sticky
            }),
            Connect::Refuse
        );
    }

    #[test]
    fn consecutive_cookies_spread_evenly() {
        let frontend = FrontendKey::new(core::net::Ipv4Addr::new(10, 96, 0, 10), 53, 6, 0);
        let mut buckets = [0u32; 64];
        for cookie in 4096..4096 + 65_536u64 {
            buckets[(slot_hash(cookie, &frontend) % 64) as usize] += 1;
        }
        let mean = 65_536 / 64;
        for count in buckets {
            assert!(count.abs_diff(mean) < mean * 15 / 100, "{buckets:?}");
        }
    }
}
