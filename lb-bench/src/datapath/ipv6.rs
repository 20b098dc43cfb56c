//! The IPv6 cases: an IPv6 ClusterIP timed as the IPv4 one, in rounds of their own right after
//! the IPv4 ones.
//!
//! The test helper [`lb_datapath::program`] programs IPv4 services only, so the IPv6 service is
//! written straight into the `LB6_*` maps, in the writer's order (backends, Maglev table,
//! frontends, addresses), as the packet test `lb-datapath/tests/datapath_ipv6.rs` does. At each
//! scale the measured service comes with as many filler frontends as the IPv4 cases have, so
//! that `LB6_SERVICES` holds as many entries as `LB_SERVICES`; its set and backend ids follow
//! the IPv4 ones (the two families share both id spaces), and its Maglev table is built as the
//! planner builds the IPv4 one: the size for three backends, each placed by its IPv6 key.
//!
//! As the IPv4 service, it has an internal frontend (`lb_from_pod`: a pod's flow) and an
//! external one (`lb_xdp`: a flow from outside) over backends on this node. IPv6 has no source
//! NAT yet, so a flow from outside is balanced to local backends only.
//!
//! The packets enter the same entry programs as the IPv4 ones, which hand them to their IPv6
//! twin by a tail call; the kernel's statistics of the entry program count the twin's time.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use anyhow::{Context as _, Result, ensure};
use aya::{
    maps::MapError,
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{
    Be16, Be128,
    conntrack::{FORWARD, FlowKey6},
    maps::{
        AddrInfo, Backend6, Frontend, FrontendKey6, LB6_ADDRS, LB6_BACKENDS, LB6_SERVICES,
        addr_flags, backend_flags, capacity, scope,
    },
    net::proto,
};
use lb_datapath::{
    Datapath,
    maglev::{self, MaglevBackend},
    maps::Maps,
};
use lb_testbed::packet::{flags, tcp6 as tcp};

use super::{Case, Figure, TC_PASS, check_frame};
use crate::stats::{self, Ratio};

/// The IPv6 cases, by the name of the report's rows.
pub(super) const EMPTY: &str = "empty (IPv6)";
pub(super) const NON_SERVICE: &str = "non-service (IPv6)";
pub(super) const ESTABLISHED: &str = "established (IPv6)";
pub(super) const NEW_FLOW: &str = "new flow (IPv6)";
/// Ends the name of every IPv6 case.
const SUFFIX: &str = " (IPv6)";
/// The IPv4 cases compared with IPv6, each with its IPv6 twin.
pub(super) const TWINS: [(&str, &str); 2] = [("established", ESTABLISHED), ("new flow", NEW_FLOW)];

const fn v6(segments: [u16; 8], port: u16) -> SocketAddrV6 {
    let [a, b, c, d, e, f, g, h] = segments;
    SocketAddrV6::new(Ipv6Addr::new(a, b, c, d, e, f, g, h), port, 0, 0)
}

pub(super) const VIP: SocketAddrV6 = v6([0xfd00, 0x96, 0, 0, 0, 0, 0, 0x41], 80);
const CLIENT: SocketAddrV6 = v6([0xfd00, 0x10, 1, 0, 0, 0, 0, 2], 40_000);
const BACKENDS: [SocketAddrV6; 3] = [
    v6([0xfd00, 0x10, 1, 0, 0, 0, 0, 5], 8080),
    v6([0xfd00, 0x10, 1, 0, 0, 0, 0, 6], 8080),
    v6([0xfd00, 0x10, 2, 0, 0, 0, 0, 7], 8080),
];
/// No frontend's address.
const OTHER: SocketAddrV6 = v6([0xfd00, 0x10, 2, 0, 0, 0, 0, 9], 80);
/// Where filler `n`'s frontend, filler `n`'s backend and new-flow clients are numbered from.
const FILLER_FRONTENDS: u128 = 0xfd00_0128 << 96;
const FILLER_BACKENDS: u128 = 0xfd00_0064 << 96;
const NEW_CLIENTS: u128 = 0xfd00_0002 << 96;

fn nth(base: u128, n: u32) -> Ipv6Addr {
    Ipv6Addr::from(base + u128::from(n))
}

/// Distinct client for new-flow call `i` of `round` (as [`super::new_client`]).
fn new_client(round: u32, i: usize) -> SocketAddrV6 {
    let ip = nth(NEW_CLIENTS, round * 4096 + (i / 16_000) as u32);
    SocketAddrV6::new(ip, 10_000 + (i % 16_000) as u16, 0, 0)
}

/// Expected backend of the flow from `client`: the table's slot for the flow's hash, which
/// `lb_common` computes for both sides.
fn expected_backend(table: &[SocketAddrV6], client: SocketAddrV6) -> SocketAddrV6 {
    let flow = FlowKey6::new(
        Be128::from_ip(*client.ip()),
        Be16::from_host(client.port()),
        Be128::from_ip(*VIP.ip()),
        Be16::from_host(VIP.port()),
        proto::TCP,
        FORWARD,
    );
    table[(flow.hash() % table.len() as u32) as usize]
}

fn backend(addr: SocketAddrV6) -> Backend6 {
    Backend6 {
        addr: Be128::from_ip(*addr.ip()),
        port: Be16::from_host(addr.port()),
        flags: backend_flags::ACTIVE | backend_flags::LOCAL,
        _pad: 0,
    }
}

fn frontend_key(addr: Ipv6Addr, scope: u8) -> FrontendKey6 {
    FrontendKey6 {
        addr: Be128::from_ip(addr),
        port: Be16::from_host(80),
        proto: proto::TCP,
        scope,
    }
}

/// Writes `keys[i] -> values[i]` into map `name` with one batch update, or with `one` entry at
/// a time on kernels without.
fn write<K: aya::Pod, V: aya::Pod>(
    maps: &mut Maps,
    name: &'static str,
    keys: &[K],
    values: &[V],
    one: fn(&mut Maps, K, V) -> Result<(), MapError>,
) -> Result<()> {
    if !maps.update_batch(name, keys, values)? {
        for (key, value) in keys.iter().zip(values) {
            one(maps, *key, *value).with_context(|| format!("writing {name}"))?;
        }
    }
    Ok(())
}

/// The IPv6 service of one scale and the frames of its established flow.
pub(super) struct Setup {
    /// The measured Maglev table, as backend addresses.
    table: Vec<SocketAddrV6>,
    established: Vec<u8>,
    established_want: Vec<u8>,
    other: Vec<u8>,
}

impl Setup {
    /// Programs the measured IPv6 service and `services - 1` fillers (one frontend and one
    /// backend each, no table), with set ids below `sets`, and opens the established flow
    /// through `lb_from_pod`.
    pub(super) fn program(
        dp: &mut Datapath,
        maps: &mut Maps,
        services: u32,
        sets: u32,
    ) -> Result<Self> {
        let mut last_set = 0;
        maps.frontends(|_, f| last_set = last_set.max(f.set_id))?;
        let last_backend = maps.active_backends()?.iter().map(|(id, _)| *id).max();
        // The measured service's set and backends, then filler n's at offset n.
        let set_id = last_set + 1;
        let first = last_backend.unwrap_or(0) + 1;
        let filler_backend = |n: u32| first + BACKENDS.len() as u32 - 1 + n;
        ensure!(
            set_id + services <= sets,
            "no room for {services} IPv6 sets"
        );
        ensure!(
            filler_backend(services) <= capacity::BACKENDS,
            "no room for the IPv6 backends"
        );

        let (mut ids, mut values): (Vec<u32>, Vec<Backend6>) =
            (first..).zip(BACKENDS.map(backend)).unzip();
        for n in 1..services {
            ids.push(filler_backend(n));
            values.push(backend(SocketAddrV6::new(
                nth(FILLER_BACKENDS, n),
                8080,
                0,
                0,
            )));
        }
        write(maps, LB6_BACKENDS, &ids, &values, |m, k, v| {
            m.backends6.set(k, v, 0)
        })?;

        let members: Vec<MaglevBackend> = (first..)
            .zip(BACKENDS)
            .map(|(id, addr)| MaglevBackend {
                id,
                key: maglev::backend_key(SocketAddr::V6(addr)),
                weight: 1,
            })
            .collect();
        let table_size = maglev::table_size_for(BACKENDS.len(), maglev::DEFAULT_TABLE_SIZE);
        let table = maglev::build_table(&members, table_size)?;
        maps.install_maglev_maps(&[(set_id, Maps::build_maglev_map(set_id, &table)?)])?;

        let measured = Frontend {
            set_id,
            backend_count: BACKENDS.len() as u32,
            table_size,
            ..Frontend::default()
        };
        let (mut keys, mut values): (Vec<FrontendKey6>, Vec<Frontend>) =
            [scope::INTERNAL, scope::EXTERNAL]
                .map(|s| (frontend_key(*VIP.ip(), s), measured))
                .into_iter()
                .unzip();
        for n in 1..services {
            keys.push(frontend_key(nth(FILLER_FRONTENDS, n), scope::INTERNAL));
            values.push(Frontend {
                set_id: set_id + n,
                backend_count: 1,
                backend_id: filler_backend(n),
                ..Frontend::default()
            });
        }
        write(maps, LB6_SERVICES, &keys, &values, |m, k, v| {
            m.services6.insert(k, v, 0)
        })?;

        let addrs: Vec<Be128> = std::iter::once(*VIP.ip())
            .chain((1..services).map(|n| nth(FILLER_FRONTENDS, n)))
            .map(Be128::from_ip)
            .collect();
        let info = vec![
            AddrInfo {
                flags: addr_flags::CLUSTER_IP,
            };
            addrs.len()
        ];
        write(maps, LB6_ADDRS, &addrs, &info, |m, k, v| {
            m.addrs6.insert(k, v, 0)
        })?;

        let table: Vec<SocketAddrV6> = table
            .iter()
            .map(|id| BACKENDS[(id - first) as usize])
            .collect();
        let backend = expected_backend(&table, CLIENT);
        // The established flow and its reply entry, its SYN checked as a new flow's.
        let mut out = vec![0u8; 2048];
        let opened = dp.from_pod().test_run(TestRunOptions {
            data_in: Some(&tcp(CLIENT, VIP, flags::SYN, &[])),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        check_frame(
            opened.return_value,
            TC_PASS,
            &out[..opened.data_size_out as usize],
            &tcp(CLIENT, backend, flags::SYN, &[]),
        )
        .context("opening the measured IPv6 flow")?;
        let data = |dst| tcp(CLIENT, dst, flags::ACK | flags::PSH, &[0x55; 64]);
        Ok(Self {
            established: data(VIP),
            established_want: data(backend),
            other: tcp(CLIENT, OTHER, flags::ACK | flags::PSH, &[0x77; 64]),
            table,
        })
    }

    /// The frames of one hook's cases, `calls` each; new flows from clients of `round`.
    pub(super) fn inputs(&self, round: u32, calls: usize) -> Inputs {
        Inputs {
            round,
            other: vec![self.other.clone(); calls],
            established: vec![self.established.clone(); calls],
            new: (0..calls)
                .map(|i| tcp(new_client(round, i), VIP, flags::SYN, &[]))
                .collect(),
        }
    }
}

/// The frames of one hook's IPv6 cases.
pub(super) struct Inputs {
    round: u32,
    other: Vec<Vec<u8>>,
    established: Vec<Vec<u8>>,
    new: Vec<Vec<u8>>,
}

impl Inputs {
    /// The IPv6 cases, as the IPv4 ones: the empty program on frames to no frontend (of the
    /// established packets' size), the entry program on those (untouched), on the established
    /// flow (DNATed to its backend) and on SYNs of new flows (DNATed to the backend the table
    /// gives each client), every call verified.
    pub(super) fn cases<'a>(&'a self, setup: &'a Setup, pass: u32) -> Vec<Case<'a>> {
        let round = self.round;
        let new_check = move |i, verdict, out: &[u8]| {
            let client = new_client(round, i);
            let backend = expected_backend(&setup.table, client);
            check_frame(verdict, pass, out, &tcp(client, backend, flags::SYN, &[]))
        };
        vec![
            Case::empty(EMPTY, &self.other),
            Case::each(NON_SERVICE, &self.other, pass, &setup.other),
            Case::each(
                ESTABLISHED,
                &self.established,
                pass,
                &setup.established_want,
            ),
            Case::checked(NEW_FLOW, &self.new, new_check),
        ]
    }
}

/// The empty program's case a case's figure is net of.
pub(super) fn empty_of(case: &str) -> &'static str {
    if case.ends_with(SUFFIX) {
        EMPTY
    } else {
        "empty"
    }
}

/// IPv6 over IPv4 for the IPv4 case `case` and its twin on `hook` at `services`: round by
/// round, the IPv6 block's net median over that of the IPv4 block of the same round number
/// (each net of its family's empty program in its round), their geometric mean and its 95%
/// interval.
pub(super) fn ratio(figures: &[Figure], case: &str, hook: &str, services: u32) -> Option<Ratio> {
    let (_, twin) = TWINS.iter().find(|(c, _)| *c == case)?;
    let find = |case: &str| {
        figures
            .iter()
            .find(|f| f.case == case && f.hook == hook && f.services == services)
    };
    let net = |case: &str| -> Option<Vec<f64>> {
        let (f, empty) = (find(case)?, find(empty_of(case))?);
        let blocks = f.block_medians_ns.iter().zip(&empty.block_medians_ns);
        Some(blocks.map(|(ns, empty)| ns - empty).collect())
    };
    let pairs: Vec<(f64, f64)> = net(twin)?.into_iter().zip(net(case)?).collect();
    stats::paired_ratio(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(case: &str, blocks: [f64; 3]) -> Figure {
        Figure {
            case: case.to_owned(),
            hook: "tc",
            services: 1,
            calls: 3,
            median_ns: blocks.into_iter().fold(f64::INFINITY, f64::min),
            net_ns: 0.0,
            bpf_stats_ns: 0.0,
            bpf_stats_net_ns: 0.0,
            block_medians_ns: blocks.to_vec(),
        }
    }

    #[test]
    fn the_ratio_pairs_rounds_each_net_of_its_familys_empty_program() {
        // Net of their empty programs: IPv4 50, 60 and 40 ns; IPv6 75, 90 and 60 ns.
        let figures = [
            figure("empty", [70.0, 80.0, 60.0]),
            figure("established", [120.0, 140.0, 100.0]),
            figure(EMPTY, [72.0, 70.0, 75.0]),
            figure(ESTABLISHED, [147.0, 160.0, 135.0]),
        ];
        let r = ratio(&figures, "established", "tc", 1).expect("a ratio");
        assert_eq!(r.pairs, 3);
        for x in [r.ratio, r.low.unwrap(), r.high.unwrap()] {
            assert!((x - 1.5).abs() < 1e-9, "{x}");
        }
        // Nothing measured: no ratio.
        assert_eq!(ratio(&figures, "new flow", "tc", 1), None);
        assert_eq!(ratio(&figures, "established", "xdp", 1), None);
        assert_eq!(ratio(&figures, "established", "tc", 10), None);
    }

    #[test]
    fn each_case_is_net_of_its_familys_empty_program() {
        assert_eq!(empty_of("new flow"), "empty");
        assert_eq!(empty_of(NEW_FLOW), EMPTY);
        assert_eq!(empty_of(EMPTY), EMPTY);
        assert_eq!(empty_of("empty"), "empty");
    }
}
