//! Runs the real datapath programs on crafted packets through BPF_PROG_TEST_RUN, with fresh,
//! private (unpinned) maps per harness, programmed through the agent's planner and writer
//! ([`lb_datapath::program`]).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{Be16, Be32, hash::flow_hash, net::proto, stats::Reason};
use lb_datapath::{
    Capacities, Datapath, Pinning,
    maps::Maps,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec, Services},
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
    /// What is programmed, and the ids the planner gave it.
    pub services: Services,
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
        Some(Self {
            dp,
            maps,
            services: Services::default(),
        })
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

    /// Programs `svc` (adds it, or changes the service of that name).
    pub fn program(&mut self, svc: &ServiceSpec) {
        self.services
            .program(&mut self.maps, svc)
            .unwrap_or_else(|e| panic!("programming service {}: {e:?}", svc.name));
    }

    /// Removes the service `name`.
    pub fn remove(&mut self, name: &str) {
        self.services.remove(name);
        self.services
            .apply(&mut self.maps)
            .unwrap_or_else(|e| panic!("removing service {name}: {e:?}"));
    }

    /// Programs the node's SNAT address and port range.
    pub fn set_node(&mut self, snat_addr: Ipv4Addr, snat_ports: std::ops::RangeInclusive<u16>) {
        self.services.set_node(Some(snat_addr), Some(snat_ports));
        self.services
            .apply(&mut self.maps)
            .unwrap_or_else(|e| panic!("programming the node: {e:?}"));
    }

    /// The backend-set id the planner gave `svc`.
    pub fn set_id(&self, svc: &ServiceSpec) -> u32 {
        self.services
            .set_id(&svc.name)
            .unwrap_or_else(|| panic!("service {} is not programmed", svc.name))
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

    /// The backend the datapath must pick for a new flow `src -> dst` of `svc` (as last
    /// programmed), computed in userspace from the programmed table and the shared flow hash.
    pub fn expected_backend(
        &self,
        svc: &ServiceSpec,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        l4_proto: u8,
    ) -> SocketAddrV4 {
        let mut selectable = svc.backends.iter().filter(|b| b.weight > 0);
        match (selectable.next(), selectable.next()) {
            (None, _) => panic!("service {} has no backend", svc.name),
            (Some(only), None) => only.addr,
            (Some(_), Some(_)) => {
                let size = self.services.table_size(&svc.name).unwrap();
                let table = self.maps.maglev_table(self.set_id(svc), size).unwrap();
                let hash = flow_hash(
                    Be32::from(*src.ip()),
                    Be32::from(*dst.ip()),
                    Be16::from_host(src.port()),
                    Be16::from_host(dst.port()),
                    l4_proto,
                );
                let chosen = table[(hash % size) as usize];
                self.services.backend_addr(chosen).unwrap()
            }
        }
    }
}

/// Verdict counters as [`Harness::verdicts`] reports them.
pub fn counts(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

/// A fresh harness with `svc` programmed; `None` when privileged tests are skipped.
pub fn setup(svc: &ServiceSpec) -> Option<Harness> {
    let mut h = Harness::new()?;
    h.program(svc);
    Some(h)
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
        backends: backends
            .iter()
            .map(|addr| BackendSpec {
                addr: *addr,
                local: true,
                weight: 1,
            })
            .collect(),
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

pub fn socket(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}
