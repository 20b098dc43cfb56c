//! Runs the real datapath programs on crafted packets through BPF_PROG_TEST_RUN, with fresh,
//! private (unpinned) maps per harness.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Be16, Be32, hash::flow_hash, maps::maglev::DEFAULT_TABLE_SIZE, net::proto, stats::Reason,
};
use lb_datapath::{
    Capacities, Datapath, Pinning,
    install::{self, BackendSpec, FrontendSpec, ServiceSpec},
    maps::Maps,
};

/// tc verdicts as `BPF_PROG_TEST_RUN` reports them.
pub mod tc {
    /// TC_ACT_UNSPEC: continue (the datapath's "pass").
    pub const PASS: u32 = u32::MAX;
    pub const SHOT: u32 = 2;
    pub const REDIRECT: u32 = 7;
}

/// XDP verdicts.
pub mod xdp {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress of a pod's veth.
    FromPod,
    /// tc egress of a pod's veth.
    ToPod,
    /// XDP on an uplink.
    Xdp,
    /// tc ingress of an uplink (where XDP is off).
    ExtIn,
    /// tc egress of an uplink.
    ExtOut,
}

/// What a program did with one packet.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
}

pub struct Harness {
    pub dp: Datapath,
    pub maps: Maps,
}

impl Harness {
    /// Loads a fresh datapath; `None` when privileged tests are explicitly skipped.
    pub fn new() -> Option<Self> {
        if !super::require_privileges() {
            return None;
        }
        let mut dp = Datapath::load(&Pinning::None, Capacities::default())
            .unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
        let maps = dp.take_maps().expect("maps");
        Some(Self { dp, maps })
    }

    pub fn run(&mut self, hook: Hook, input: &[u8]) -> Run {
        let mut out = vec![0u8; 4096];
        let opts = || TestRunOptions {
            data_in: Some(input),
            repeat: 1,
            ..Default::default()
        };
        let result = match hook {
            Hook::FromPod => self.dp.from_pod().test_run(TestRunOptions {
                data_out: Some(&mut out),
                ..opts()
            }),
            Hook::ToPod => self.dp.to_pod().test_run(TestRunOptions {
                data_out: Some(&mut out),
                ..opts()
            }),
            Hook::Xdp => self.dp.xdp().test_run(TestRunOptions {
                data_out: Some(&mut out),
                ..opts()
            }),
            Hook::ExtIn => self.dp.ext_in().test_run(TestRunOptions {
                data_out: Some(&mut out),
                ..opts()
            }),
            Hook::ExtOut => self.dp.ext_out().test_run(TestRunOptions {
                data_out: Some(&mut out),
                ..opts()
            }),
        }
        .unwrap_or_else(|e| panic!("test run on {hook:?}: {e:?}"));
        out.truncate(result.data_size_out as usize);
        Run {
            verdict: result.return_value,
            out,
        }
    }

    pub fn install(&mut self, svc: &ServiceSpec) {
        install::install(&mut self.maps, svc)
            .unwrap_or_else(|e| panic!("installing service {}: {e:?}", svc.id));
    }

    /// Verdict counters (packets) by reason name, zero counters left out.
    pub fn verdicts(&self) -> BTreeMap<&'static str, u64> {
        self.maps
            .verdict_totals()
            .unwrap()
            .into_iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(reason, c)| (reason.name(), c.packets))
            .collect()
    }

    pub fn verdict_count(&self, reason: Reason) -> u64 {
        self.maps
            .verdict_totals()
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .unwrap()
            .1
            .packets
    }

    /// The backend the datapath must pick for a new flow `src -> dst` of `svc`, computed in
    /// userspace from the installed table and the shared flow hash.
    pub fn expected_backend(
        &self,
        svc: &ServiceSpec,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        l4_proto: u8,
    ) -> SocketAddrV4 {
        let chosen = match svc.backends.iter().filter(|b| b.weight > 0).count() {
            0 => panic!("service {} has no backend", svc.id),
            1 => svc.backends.iter().find(|b| b.weight > 0).unwrap().id,
            _ => {
                let table = self.maps.maglev_table(svc.id, svc.table_size).unwrap();
                let hash = flow_hash(
                    Be32::from(*src.ip()),
                    Be32::from(*dst.ip()),
                    Be16::from_host(src.port()),
                    Be16::from_host(dst.port()),
                    l4_proto,
                );
                table[(hash % svc.table_size) as usize]
            }
        };
        let b = svc.backends.iter().find(|b| b.id == chosen).unwrap();
        SocketAddrV4::new(b.addr, b.port)
    }
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

/// A ClusterIP service `VIP:port/proto -> backends` (ids 1..), internal scope, default table.
pub fn cluster_ip(id: u32, port: u16, l4_proto: u8, backends: &[SocketAddrV4]) -> ServiceSpec {
    ServiceSpec {
        id,
        frontends: vec![FrontendSpec {
            addr: addrs::VIP,
            port,
            proto: l4_proto,
            scope: lb_common::maps::scope::INTERNAL,
            cluster_ip: true,
        }],
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, b)| BackendSpec {
                id: id * 100 + i as u32 + 1,
                addr: *b.ip(),
                port: b.port(),
                local: true,
                weight: 1,
            })
            .collect(),
        table_size: DEFAULT_TABLE_SIZE,
        flags: 0,
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

pub fn socket(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}
