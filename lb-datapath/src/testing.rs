//! Test helpers (feature `test-helpers`, as aya has its own): the real programs run on crafted
//! frames through BPF_PROG_TEST_RUN, over maps programmed through [`crate::program`], the
//! agent's planner and writer. The packet tests of this crate and `lbctl`'s tests share them;
//! what differs is where the maps live (private, or pinned where `lbctl` reads them).
//!
//! Every method panics with what failed, as test code does.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions};
use lb_common::{Be16, Be32, hash::flow_hash, stats::Reason};

use crate::{
    Capacities, Datapath, Pinning,
    maps::Maps,
    program::{ServiceSpec, Services},
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

/// The program a frame goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `lb_from_pod`: tc ingress of a pod's veth (internal scope).
    FromPod,
    /// `lb_to_pod`: tc egress of a pod's veth (replies).
    ToPod,
    /// `lb_xdp`: XDP on an uplink (external scope).
    Xdp,
    /// `lb_ext_in`: tc ingress of an uplink, where XDP is off (external scope).
    ExtIn,
    /// `lb_ext_out`: tc egress of an uplink.
    ExtOut,
}

/// The datapath with only its socket-level programs verified, for the tests of those: the
/// packet programs stay unloaded (see [`Harness::load`]).
pub fn load_socket_programs(pinning: &Pinning, capacities: Capacities) -> Datapath {
    let mut dp = Datapath::loader(pinning, capacities)
        .load_unverified()
        .unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
    for name in lb_common::programs::SOCK {
        dp.verify_program(name)
            .unwrap_or_else(|e| panic!("verifying {name}: {e:?}"));
    }
    dp
}

impl Hook {
    /// The hook's program and the IPv6 twin it hands IPv6 frames to.
    fn programs(self) -> [&'static str; 2] {
        use lb_common::programs::{
            EXT_IN, EXT_IN6, EXT_OUT, FROM_POD, FROM_POD6, TO_CLIENT6, TO_POD, XDP, XDP6,
        };
        match self {
            Self::FromPod => [FROM_POD, FROM_POD6],
            Self::ToPod => [TO_POD, TO_CLIENT6],
            Self::Xdp => [XDP, XDP6],
            Self::ExtIn => [EXT_IN, EXT_IN6],
            Self::ExtOut => [EXT_OUT, TO_CLIENT6],
        }
    }
}

/// What a program did with one frame.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
}

/// A loaded datapath, its maps, and the services programmed into them.
pub struct Harness {
    pub dp: Datapath,
    pub maps: Maps,
    /// What is programmed, and the ids the planner gave it.
    pub services: Services,
}

impl Harness {
    /// Loads the datapath with its maps private or pinned, for `capacities`, with Maglev tables
    /// of at most `table_size` slots (the agent's `--maglev-table-size`).
    pub fn load(pinning: &Pinning, capacities: Capacities, table_size: u32) -> Self {
        // Each program is verified when a frame first goes through it (`try_run`): a test runs
        // one or two of them, and verifying all of them per test would cost the VM test minutes.
        let mut dp = Datapath::loader(pinning, capacities)
            .load_unverified()
            .unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
        let maps = dp.take_maps().expect("maps");
        Self {
            dp,
            maps,
            services: Services::new(capacities, table_size),
        }
    }

    /// Runs the program at `hook` once on `input`.
    pub fn run(&mut self, hook: Hook, input: &[u8]) -> Run {
        self.try_run(hook, input)
            .unwrap_or_else(|e| panic!("test run on {hook:?}: {e:?}"))
    }

    /// Runs the program at `hook` once on `input`, or says why the kernel refused to (at tc, an
    /// IPv4 or IPv6 frame shorter than its fixed header gets no skb), for tests that feed
    /// arbitrary frames and report a refusal with the frame.
    pub fn try_run(&mut self, hook: Hook, input: &[u8]) -> Result<Run, ProgramError> {
        for name in hook.programs() {
            self.dp
                .verify_program(name)
                .unwrap_or_else(|e| panic!("verifying {name}: {e:?}"));
        }
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let result = match hook {
            Hook::FromPod => self.dp.from_pod().test_run(opts),
            Hook::ToPod => self.dp.to_pod().test_run(opts),
            Hook::Xdp => self.dp.xdp().test_run(opts),
            Hook::ExtIn => self.dp.ext_in().test_run(opts),
            Hook::ExtOut => self.dp.ext_out().test_run(opts),
        }?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value,
            out,
        })
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

    /// Programs the node's SNAT address and ports, as the agent does for a node with an
    /// InternalIP.
    pub fn set_node(&mut self, snat_addr: Ipv4Addr, snat_ports: RangeInclusive<u16>) {
        self.services.set_node(Some(snat_addr), Some(snat_ports));
        self.services
            .apply(&mut self.maps)
            .unwrap_or_else(|e| panic!("programming the node: {e:?}"));
    }

    /// Programs the node's flags, as `lb-agent --masquerade-all` and
    /// `--external-cluster-ips=false` do (see [`crate::program::Services::set_node_flags`]).
    pub fn set_node_flags(&mut self, masquerade_all: bool, no_external_cluster_ips: bool) {
        self.services
            .set_node_flags(masquerade_all, no_external_cluster_ips);
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

    /// The backend id Maglev gives a new flow `src -> dst` of `svc` (which has a table),
    /// computed here from the programmed table and the shared flow hash.
    pub fn maglev_pick(
        &self,
        svc: &ServiceSpec,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        l4_proto: u8,
    ) -> u32 {
        let size = self.services.table_size(&svc.name).unwrap();
        let table = self.maps.maglev_table(self.set_id(svc), size).unwrap();
        let hash = flow_hash(
            Be32::from(*src.ip()),
            Be32::from(*dst.ip()),
            Be16::from_host(src.port()),
            Be16::from_host(dst.port()),
            l4_proto,
        );
        table[(hash % size) as usize]
    }

    /// The backend the datapath must pick for a new flow `src -> dst` of `svc` (as last
    /// programmed): its only backend that takes new flows, or the Maglev pick.
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
                let chosen = self.maglev_pick(svc, src, dst, l4_proto);
                self.services.backend_addr(chosen).unwrap()
            }
        }
    }
}
