//! Runs the real datapath programs on crafted packets through BPF_PROG_TEST_RUN
//! ([`lb_datapath::testing`]), with fresh, private (unpinned) maps per harness, and the
//! services and addresses the packet tests use.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::net::proto;
use lb_datapath::{
    Capacities, Pinning,
    maglev::DEFAULT_TABLE_SIZE,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec},
};

use super::packet::{Packet, flags};

#[allow(unused_imports, reason = "used by some test binaries only")]
pub use lb_datapath::testing::{Harness, Hook, tc, xdp};

/// A fresh datapath with private maps and the agent's defaults; `None` when privileged tests
/// are explicitly skipped.
pub fn harness() -> Option<Harness> {
    super::require_privileges()
        .then(|| Harness::load(&Pinning::None, Capacities::default(), DEFAULT_TABLE_SIZE))
}

/// Verdict counters as [`Harness::verdicts`] reports them.
pub fn counts(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

/// A fresh harness with `svc` programmed; `None` when privileged tests are skipped.
pub fn setup(svc: &ServiceSpec) -> Option<Harness> {
    let mut h = harness()?;
    h.program(svc);
    Some(h)
}

/// `web` (`VIP:80`/TCP over the three [`addrs::BACKENDS`]) programmed, and `CLIENT`'s SYN to it
/// run through `lb_from_pod`, where the tests of an established flow start: the harness, the
/// service, the SYN and the backend the flow got. `None` when privileged tests are skipped.
pub fn web_flow() -> Option<(Harness, ServiceSpec, Packet, SocketAddrV4)> {
    let svc = cluster_ip("web", 80, TCP, &addrs::BACKENDS);
    let mut h = setup(&svc)?;
    let syn = Packet::tcp(addrs::CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, addrs::CLIENT, vip(80), TCP);
    h.run(Hook::FromPod, &syn.bytes());
    Some((h, svc, syn, backend))
}

/// Addresses of the standard fixture (the kube-proxy unit-test address plan).
pub mod addrs {
    use std::net::{Ipv4Addr, SocketAddrV4};

    pub const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
    pub const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40_000);
    pub const BACKENDS: [SocketAddrV4; 3] = [
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 5), 8080),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 6), 8080),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 7), 8080),
    ];
    /// An address that is no frontend.
    pub const OTHER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 9), 80);
}

/// A ClusterIP service `name`, `VIP:port/proto -> backends` (all on this node), internal scope.
pub fn cluster_ip(name: &str, port: u16, l4_proto: u8, backends: &[SocketAddrV4]) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        frontends: vec![FrontendSpec {
            addr: addrs::VIP,
            port,
            proto: l4_proto,
            scope: lb_common::maps::scope::INTERNAL,
            kind: FrontendKind::ClusterIp,
        }],
        backends: backends.iter().copied().map(BackendSpec::local).collect(),
        ..Default::default()
    }
}

/// The same service also reachable from the external scope (for the XDP entry point).
pub fn with_external_scope(mut svc: ServiceSpec) -> ServiceSpec {
    let extra: Vec<FrontendSpec> = svc
        .frontends
        .iter()
        .map(|f| FrontendSpec {
            scope: lb_common::maps::scope::EXTERNAL,
            ..*f
        })
        .collect();
    svc.frontends.extend(extra);
    svc
}

pub fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addrs::VIP, port)
}

pub const TCP: u8 = proto::TCP;
pub const UDP: u8 = proto::UDP;
pub const SCTP: u8 = proto::SCTP;

pub fn socket(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}
