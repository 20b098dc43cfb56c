//! Per-packet cost of the real programs, through BPF_PROG_TEST_RUN.
//!
//! `repeat > 1` would re-run a program on the buffer it already rewrote (after the first DNAT the
//! packet no longer goes to the VIP), so every call runs once on a fresh copy of its input: many
//! calls in blocks, the lowest block median of the kernel-reported durations (see [`BLOCKS`]),
//! minus that of an empty program timed the same way in the same run. The kernel's own
//! per-program statistics (`bpf_stats`, which time only the program) are reported beside it as a
//! cross-check. Every call's verdict and output are verified while timing.
//!
//! At the largest scale the established and new-flow cases are also sampled with perf
//! ([`crate::profile`]): where each one's time goes, by the kernel function the program called.
//!
//! The services are programmed through the agent's planner and writer
//! ([`lb_datapath::program`]), so the maps hold what the agent would write for them (ids,
//! table sizes, node configuration).
//!
//! The established and new-flow cases are timed for an IPv6 ClusterIP too, in rounds of their
//! own right after the IPv4 ones ([`ipv6`]).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use lb_common::{
    Be16, Be32,
    hash::flow_hash,
    maps::{maglev::DEFAULT_TABLE_SIZE, scope},
    net::proto,
};
use lb_datapath::{
    Capacities, Datapath, DatapathError, Pinning,
    maps::Maps,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec, Services},
};
use lb_testbed::packet::{Packet, flags};
use serde::Serialize;

use crate::profile::{self, Breakdown};

mod ipv6;
pub mod report;

const TC_PASS: u32 = u32::MAX;
const XDP_PASS: u32 = 2;
const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40_000);
const BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 5), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 6), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 7), 8080),
];
/// The measured service; programmed first, it takes the first ids, the fillers those after.
const MEASURED: &str = "measured";

/// One measured case at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub case: String,
    pub hook: &'static str,
    pub services: u32,
    pub calls: usize,
    /// Median kernel-reported duration of one call, gross (ns).
    pub median_ns: f64,
    /// `median_ns` minus the empty program's median (ns): the program's own cost.
    pub net_ns: f64,
    /// Average run time from the kernel's bpf_stats over the same calls (ns, program only).
    pub bpf_stats_ns: f64,
    /// bpf_stats average minus the empty program's (ns).
    pub bpf_stats_net_ns: f64,
    /// Each block's median, gross (ns), in the order the blocks were taken.
    pub block_medians_ns: Vec<f64>,
}

/// Where the time of one case goes, at the largest scale (see [`crate::profile`]).
#[derive(Clone, Debug, Serialize)]
pub struct Profiled {
    pub case: String,
    pub hook: &'static str,
    /// The program the samples were taken in (its loaded name).
    pub program: &'static str,
    pub services: u32,
    pub calls: usize,
    pub breakdown: Breakdown,
}

/// What the datapath part measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measured {
    pub figures: Vec<Figure>,
    pub profiles: Vec<Profiled>,
    /// Why there are no profiles, when there are none.
    pub profile_error: Option<String>,
}

#[derive(Clone, Copy)]
enum Hook {
    Tc,
    Xdp,
}

impl Hook {
    const fn name(self) -> &'static str {
        match self {
            Self::Tc => "tc",
            Self::Xdp => "xdp",
        }
    }

    const fn pass(self) -> u32 {
        match self {
            Self::Tc => TC_PASS,
            Self::Xdp => XDP_PASS,
        }
    }

    /// The entry program timed on this hook, by its loaded name (which its JIT symbol ends
    /// with).
    const fn program(self) -> &'static str {
        match self {
            Self::Tc => lb_common::programs::FROM_POD,
            Self::Xdp => lb_common::programs::XDP,
        }
    }
}

struct Raw {
    median_ns: f64,
    bpf_stats_ns: f64,
    /// The medians of the blocks `median_ns` is the lowest of (itself, for one block).
    blocks: Vec<f64>,
}

fn median(mut values: Vec<u64>) -> f64 {
    values.sort_unstable();
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) as f64 / 2.0
    } else {
        values[mid] as f64
    }
}

/// Runs `prog` once per input, checking each result with `check`.
fn time_calls<P>(
    prog: &mut P,
    inputs: &[Vec<u8>],
    mut check: impl FnMut(usize, u32, &[u8]) -> Result<()>,
) -> Result<Raw>
where
    P: Timed,
{
    let before = prog.stats()?;
    let mut durations = Vec::with_capacity(inputs.len());
    let mut out = vec![0u8; 2048];
    for (i, input) in inputs.iter().enumerate() {
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        durations.push(result.duration.as_nanos() as u64);
        check(
            i,
            result.return_value,
            &out[..result.data_size_out as usize],
        )
        .with_context(|| format!("call {i}"))?;
    }
    let after = prog.stats()?;
    let runs = after.1.saturating_sub(before.1);
    ensure!(
        runs >= inputs.len() as u64,
        "bpf_stats counted {runs} runs for {} calls (is BPF_ENABLE_STATS on?)",
        inputs.len()
    );
    let median_ns = median(durations);
    Ok(Raw {
        median_ns,
        bpf_stats_ns: (after.0 - before.0) as f64 / runs as f64,
        blocks: vec![median_ns],
    })
}

/// A program BPF_PROG_TEST_RUN runs and the kernel's per-program statistics time.
trait Timed: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult> {
    /// (accumulated run time ns, run count).
    fn stats(&self) -> Result<(u64, u64)>;
}

impl Timed for aya::programs::Xdp {
    fn stats(&self) -> Result<(u64, u64)> {
        let info = self.info()?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

impl Timed for aya::programs::SchedClassifier {
    fn stats(&self) -> Result<(u64, u64)> {
        let info = self.info()?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

fn measured_service() -> ServiceSpec {
    let frontends = [scope::INTERNAL, scope::EXTERNAL]
        .map(|scope| FrontendSpec {
            addr: VIP,
            port: 80,
            proto: proto::TCP,
            scope,
            kind: FrontendKind::ClusterIp,
        })
        .to_vec();
    ServiceSpec {
        name: MEASURED.to_owned(),
        frontends,
        backends: BACKENDS.map(BackendSpec::local).to_vec(),
        ..Default::default()
    }
}

/// Filler service `n` (1-based): its own ClusterIP in 10.128.0.0/10, one backend, no table.
fn filler(n: u32) -> ServiceSpec {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n);
    ServiceSpec {
        name: format!("filler-{n}"),
        frontends: vec![FrontendSpec {
            addr: ip,
            port: 80,
            proto: proto::TCP,
            scope: scope::INTERNAL,
            kind: FrontendKind::ClusterIp,
        }],
        backends: vec![BackendSpec::local(SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + n),
            8080,
        ))],
        ..Default::default()
    }
}

/// Expected backend of a new flow, from the programmed table (as backend addresses) and the
/// shared hash.
fn expected_backend(slots: &[SocketAddrV4], src: SocketAddrV4) -> SocketAddrV4 {
    let hash = flow_hash(
        Be32::from(*src.ip()),
        Be32::from(VIP),
        Be16::from_host(src.port()),
        Be16::from_host(80),
        proto::TCP,
    );
    slots[(hash % slots.len() as u32) as usize]
}

/// Distinct client for new-flow call `i` of `round` (one round per hook).
fn new_client(round: u32, i: usize) -> SocketAddrV4 {
    let base = u32::from(Ipv4Addr::new(10, 2, 0, 0)) + round * 4096 + (i / 16_000) as u32;
    SocketAddrV4::new(Ipv4Addr::from(base), 10_000 + (i % 16_000) as u16)
}

fn check_frame(verdict: u32, pass: u32, out: &[u8], want: &[u8]) -> Result<()> {
    if verdict != pass {
        bail!("verdict {verdict}, expected {pass}");
    }
    if out != want {
        bail!("output frame differs from the expected one");
    }
    Ok(())
}

/// Checks call `i` of a case (its verdict and output).
type Check<'a> = Box<dyn FnMut(usize, u32, &[u8]) -> Result<()> + 'a>;

/// One case of an entry program's interleaved blocks (see [`time_entry`]).
struct Case<'a> {
    name: &'static str,
    /// Timed on the hook's empty program rather than on its entry program.
    empty: bool,
    inputs: &'a [Vec<u8>],
    check: Check<'a>,
}

impl<'a> Case<'a> {
    /// The hook's empty program on `inputs`, unchecked.
    fn empty(name: &'static str, inputs: &'a [Vec<u8>]) -> Self {
        let check = Box::new(|_: usize, _: u32, _: &[u8]| Ok(()));
        Self {
            name,
            empty: true,
            inputs,
            check,
        }
    }

    /// The entry program on `inputs`, every output `want` (verdict `pass`).
    fn each(name: &'static str, inputs: &'a [Vec<u8>], pass: u32, want: &'a [u8]) -> Self {
        let check = Box::new(move |_: usize, v: u32, o: &[u8]| check_frame(v, pass, o, want));
        Self {
            name,
            empty: false,
            inputs,
            check,
        }
    }

    /// The entry program on `inputs`, call `i` checked by `check`.
    fn checked(
        name: &'static str,
        inputs: &'a [Vec<u8>],
        check: impl FnMut(usize, u32, &[u8]) -> Result<()> + 'a,
    ) -> Self {
        Self {
            name,
            empty: false,
            inputs,
            check: Box::new(check),
        }
    }
}

/// Blocks each case's calls are made in. A case's figure is its lowest block median: the
/// program's cost when the rest of the machine (a virtual machine's neighbours, the kernel's own
/// work) interfered least, as a moment of interference only adds time.
const BLOCKS: usize = 5;

/// The calls of block `b` of [`BLOCKS`] over `n` calls.
fn block(b: usize, n: usize) -> std::ops::Range<usize> {
    let size = n.div_ceil(BLOCKS);
    (b * size).min(n)..((b + 1) * size).min(n)
}

/// The figure of a case timed in `blocks`: the lowest median and the lowest bpf_stats average,
/// with every block's median.
fn lowest(blocks: &[Raw]) -> Raw {
    Raw {
        median_ns: blocks
            .iter()
            .map(|r| r.median_ns)
            .fold(f64::INFINITY, f64::min),
        bpf_stats_ns: blocks
            .iter()
            .map(|r| r.bpf_stats_ns)
            .fold(f64::INFINITY, f64::min),
        blocks: blocks
            .iter()
            .flat_map(|r| r.blocks.iter().copied())
            .collect(),
    }
}

/// [`time_calls`] in [`BLOCKS`] blocks, one after the other: [`lowest`] of them.
fn time_blocks<P>(
    prog: &mut P,
    inputs: &[Vec<u8>],
    mut check: impl FnMut(usize, u32, &[u8]) -> Result<()>,
) -> Result<Raw>
where
    P: Timed,
{
    let mut blocks = Vec::with_capacity(BLOCKS);
    for b in 0..BLOCKS {
        let calls = block(b, inputs.len());
        let start = calls.start;
        blocks.push(time_calls(prog, &inputs[calls], |i, v, o| {
            check(start + i, v, o)
        })?);
    }
    Ok(lowest(&blocks))
}

/// Times the cases of an entry program (`entry` of `dp`) and of the empty program of its hook
/// (`empty`): block 1 of each case in their order, then block 2, and so on for [`BLOCKS`], so
/// that each case's blocks spread over the whole measurement rather than one moment of it.
fn time_entry<P>(
    dp: &mut Datapath,
    empty: fn(&mut Datapath) -> Result<&mut P, DatapathError>,
    entry: fn(&mut Datapath) -> &mut P,
    cases: &mut [Case<'_>],
) -> Result<Vec<(&'static str, Raw)>>
where
    P: Timed,
{
    let mut blocks: Vec<Vec<Raw>> = cases.iter().map(|_| Vec::new()).collect();
    for b in 0..BLOCKS {
        for (case, raws) in cases.iter_mut().zip(&mut blocks) {
            let calls = block(b, case.inputs.len());
            let start = calls.start;
            let prog = if case.empty { empty(dp)? } else { entry(dp) };
            let check = &mut case.check;
            raws.push(time_calls(prog, &case.inputs[calls], |i, v, o| {
                check(start + i, v, o)
            })?);
        }
    }
    Ok(cases
        .iter()
        .zip(&blocks)
        .map(|(case, b)| (case.name, lowest(b)))
        .collect())
}

/// [`time_entry`] on `hook`'s entry program.
fn time_hook(
    dp: &mut Datapath,
    hook: Hook,
    cases: &mut [Case<'_>],
) -> Result<Vec<(&'static str, Raw)>> {
    match hook {
        Hook::Tc => time_entry(dp, Datapath::empty_tc, Datapath::from_pod, cases),
        Hook::Xdp => time_entry(dp, Datapath::empty_xdp, Datapath::xdp, cases),
    }
}

/// Runs every case at every scale; `calls` calls per case. Every scale starts from a freshly
/// loaded datapath, so that conntrack occupancy is the same at every scale and the figures differ
/// only by the number of services. At the largest scale, the established and new-flow cases are
/// sampled with perf as well (perf's data in `profile_dir`), ten times as many calls each; a
/// machine without perf gets no profiles and the reason.
pub fn run(
    scales: &[u32],
    calls: usize,
    profile_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Measured> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling bpf_stats")?;
    let mut measured = Measured::default();
    let largest = scales.iter().copied().max();
    for &services in scales {
        let profile = (Some(services) == largest).then_some(profile_dir);
        run_scale(services, calls, profile, &mut measured, progress)?;
    }
    Ok(measured)
}

/// Calls per profiled case, as a multiple of the timed calls.
const PROFILE_FACTOR: usize = 10;

/// SYNs of `n` new flows, each from its own client of `round`.
fn new_flows(round: u32, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            Packet::tcp(
                new_client(round, i),
                SocketAddrV4::new(VIP, 80),
                flags::SYN,
                &[],
            )
            .bytes()
        })
        .collect()
}

/// Flows the `established, many flows` case spreads its packets over. One flow's packets, again
/// and again, find its entry and bucket in the CPU's caches; a node with many connections open
/// finds them there far less often.
const MANY_FLOWS: usize = 100_000;

/// The name the report gives that case.
pub const MANY_FLOWS_CASE: &str = "established, 100k flows";

/// The `established, many flows` case on `entry` (returning `pass`): opens [`MANY_FLOWS`] flows
/// of clients of `round`, sends one data packet of each untimed (its first after the SYN, which
/// may move its state on), then times one more of each in an order that strides across them,
/// so that consecutive calls meet unrelated entries.
fn time_many_flows<P: Timed>(
    prog: &mut P,
    round: u32,
    table: &[SocketAddrV4],
    pass: u32,
) -> Result<Raw> {
    time_calls(
        prog,
        &new_flows(round, MANY_FLOWS),
        new_flow_check(table, round, pass),
    )
    .context("opening the flows of the many-flows case")?;
    let data = |i: usize| {
        Packet::tcp(
            new_client(round, i),
            SocketAddrV4::new(VIP, 80),
            flags::ACK | flags::PSH,
            &[0x55; 64],
        )
    };
    let want = |i: usize| {
        data(i)
            .with_dst(expected_backend(table, new_client(round, i)))
            .bytes()
    };
    let first: Vec<Vec<u8>> = (0..MANY_FLOWS).map(|i| data(i).bytes()).collect();
    time_calls(prog, &first, |i, v, o| check_frame(v, pass, o, &want(i)))
        .context("the first data packets of the many-flows case")?;
    // A stride coprime with the number of flows visits each once.
    const STRIDE: usize = 7_919;
    let order: Vec<usize> = (0..MANY_FLOWS).map(|i| i * STRIDE % MANY_FLOWS).collect();
    let inputs: Vec<Vec<u8>> = order.iter().map(|&i| data(i).bytes()).collect();
    time_blocks(prog, &inputs, |i, v, o| {
        check_frame(v, pass, o, &want(order[i]))
    })
}

/// Checks the output of call `i` of [`new_flows`]`(round, _)`: DNATed to the backend the table
/// gives its client.
fn new_flow_check(
    table: &[SocketAddrV4],
    round: u32,
    pass: u32,
) -> impl FnMut(usize, u32, &[u8]) -> Result<()> + '_ {
    move |i, verdict, out| {
        let client = new_client(round, i);
        let want = Packet::tcp(client, SocketAddrV4::new(VIP, 80), flags::SYN, &[])
            .with_dst(expected_backend(table, client))
            .bytes();
        check_frame(verdict, pass, out, &want)
    }
}

/// Samples `entry` over the established and new-flow cases (new clients of `round`).
#[expect(
    clippy::too_many_arguments,
    reason = "the hook's program and the frames it is sampled on"
)]
fn profile_entry<P>(
    dp: &mut Datapath,
    hook: Hook,
    entry: fn(&mut Datapath) -> &mut P,
    dir: &Path,
    services: u32,
    calls: usize,
    established: (&[u8], &[u8]),
    new: (u32, &[SocketAddrV4]),
) -> Result<Vec<Profiled>>
where
    P: Timed,
{
    let pass = hook.pass();
    let (round, table) = new;
    let mut profiles = Vec::new();
    let est_inputs = vec![established.0.to_vec(); calls];
    let recording = profile::start(dir, hook.name())?;
    time_calls(entry(dp), &est_inputs, |_, v, o| {
        check_frame(v, pass, o, established.1)
    })?;
    profiles.push(("established", recording.finish(hook.program())?));
    let new_inputs = new_flows(round, calls);
    let recording = profile::start(dir, hook.name())?;
    time_calls(entry(dp), &new_inputs, new_flow_check(table, round, pass))?;
    profiles.push(("new flow", recording.finish(hook.program())?));
    Ok(profiles
        .into_iter()
        .map(|(case, breakdown)| Profiled {
            case: case.to_owned(),
            hook: hook.name(),
            program: hook.program(),
            services,
            calls,
            breakdown,
        })
        .collect())
}

fn run_scale(
    services: u32,
    calls: usize,
    profile_dir: Option<&Path>,
    measured: &mut Measured,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    progress(&format!(
        "datapath: loading, programming {services} services"
    ));
    let capacities = Capacities {
        ct: 1 << 20,
        // IPv6's flows in a conntrack map of IPv4's size.
        ct6: 1 << 20,
        // The sets of both families.
        sets: (2 * services + 16).next_power_of_two(),
    };
    let mut dp = Datapath::load(&Pinning::None, capacities)?;
    let mut maps: Maps = dp.take_maps()?;
    let mut programmed = Services::new(capacities, DEFAULT_TABLE_SIZE);
    programmed.program(&mut maps, &measured_service())?;
    // The fillers in one plan, as the agent's first sync would write them.
    for n in 1..services {
        programmed.set(&filler(n))?;
    }
    programmed.apply(&mut maps)?;
    let (Some(set_id), Some(table_size)) =
        (programmed.set_id(MEASURED), programmed.table_size(MEASURED))
    else {
        bail!("the measured service was not programmed");
    };
    let table = maps
        .maglev_table(set_id, table_size)?
        .into_iter()
        .map(|id| {
            programmed
                .backend_addr(id)
                .with_context(|| format!("the measured table names unknown backend {id}"))
        })
        .collect::<Result<Vec<SocketAddrV4>>>()?;

    // The established flow and its reply entry.
    let syn = Packet::tcp(CLIENT, SocketAddrV4::new(VIP, 80), flags::SYN, &[]);
    let backend = expected_backend(&table, CLIENT);
    let first = dp.from_pod().test_run(TestRunOptions {
        data_in: Some(&syn.bytes()),
        ..Default::default()
    })?;
    ensure!(
        first.return_value == TC_PASS,
        "opening the measured flow failed"
    );
    let established = Packet::tcp(
        CLIENT,
        SocketAddrV4::new(VIP, 80),
        flags::ACK | flags::PSH,
        &[0x55; 64],
    );
    let established_want = established.clone().with_dst(backend).bytes();
    let reply = established
        .clone()
        .with_dst(backend)
        .reply(flags::ACK | flags::PSH, &[0x66; 64]);
    let reply_want = reply.clone().with_src(SocketAddrV4::new(VIP, 80)).bytes();
    let other = Packet::tcp(
        CLIENT,
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 9), 80),
        flags::ACK | flags::PSH,
        &[0x77; 64],
    )
    .bytes();
    let v6 = ipv6::Setup::program(&mut dp, &mut maps, services, capacities.sets)?;

    let mut raw: BTreeMap<(&str, &str), Raw> = BTreeMap::new();
    let repeated = |frame: &[u8]| vec![frame.to_vec(); calls];
    for hook in [Hook::Tc, Hook::Xdp] {
        progress(&format!(
            "datapath: {services} services, {} programs",
            hook.name()
        ));
        let pass = hook.pass();
        let round = matches!(hook, Hook::Xdp) as u32;
        let new_inputs = new_flows(round, calls);
        let new_check = new_flow_check(&table, round, pass);
        let other_inputs = repeated(&other);
        let est_inputs = repeated(&established.bytes());
        let mut cases = [
            Case::empty("empty", &other_inputs),
            Case::each("non-service", &other_inputs, pass, &other),
            Case::each("established", &est_inputs, pass, &established_want),
            Case::checked("new flow", &new_inputs, new_check),
        ];
        let mut timed = time_hook(&mut dp, hook, &mut cases)?;
        // The IPv6 cases in rounds of their own, right after: interleaved with the IPv4 blocks,
        // they made the IPv4 new flows slower (some 10% with --quick's blocks of 1,000 calls).
        let v6_inputs = v6.inputs(round, calls);
        timed.extend(time_hook(&mut dp, hook, &mut v6_inputs.cases(&v6, pass))?);
        // Clients of their own, apart from the timed and the profiled new flows.
        let many = match hook {
            Hook::Tc => time_many_flows(dp.from_pod(), round + 4, &table, pass)?,
            Hook::Xdp => time_many_flows(dp.xdp(), round + 4, &table, pass)?,
        };
        timed.push((MANY_FLOWS_CASE, many));
        // Only tc has a reply path.
        if let Hook::Tc = hook {
            let reply_time = time_blocks(dp.to_pod(), &repeated(&reply.bytes()), |_, v, o| {
                check_frame(v, pass, o, &reply_want)
            })?;
            timed.push(("reply", reply_time));
            // What every other packet towards a pod pays on the reply path: the filters (their
            // sources never sent a translated reply).
            let not_reply = time_blocks(dp.to_pod(), &other_inputs, |_, v, o| {
                check_frame(v, pass, o, &other)
            })?;
            timed.push(("not a reply", not_reply));
            // Once the node has given a direct connection another source port, pods' packets
            // to addresses without a frontend look up their flow (`lb-ebpf/src/direct.rs`).
            maps.direct_nat.set(0, 1, 0)?;
            let after_clash = time_blocks(dp.from_pod(), &other_inputs, |_, v, o| {
                check_frame(v, pass, o, &other)
            })?;
            maps.direct_nat.set(0, 0, 0)?;
            timed.push(("non-service, direct NAT on", after_clash));
        }
        raw.extend(timed.into_iter().map(|(case, r)| ((case, hook.name()), r)));
        if let Some(dir) = profile_dir
            && measured.profile_error.is_none()
        {
            progress(&format!(
                "datapath: {services} services, sampling {} with perf",
                hook.program()
            ));
            let established_frame = established.bytes();
            let established = (established_frame.as_slice(), established_want.as_slice());
            // Clients of their own: the timed new flows are established by now.
            let new = (round + 2, table.as_slice());
            let calls = calls * PROFILE_FACTOR;
            let profiled = match hook {
                Hook::Tc => profile_entry(
                    &mut dp,
                    hook,
                    Datapath::from_pod,
                    dir,
                    services,
                    calls,
                    established,
                    new,
                ),
                Hook::Xdp => profile_entry(
                    &mut dp,
                    hook,
                    Datapath::xdp,
                    dir,
                    services,
                    calls,
                    established,
                    new,
                ),
            };
            match profiled {
                Ok(profiles) => measured.profiles.extend(profiles),
                Err(e) => {
                    progress(&format!("datapath: no profile: {e:#}"));
                    measured.profile_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    measured.figures.extend(raw.iter().map(|((case, hook), r)| {
        let empty = &raw[&(ipv6::empty_of(case), *hook)];
        Figure {
            case: (*case).to_owned(),
            hook,
            services,
            calls,
            median_ns: r.median_ns,
            net_ns: r.median_ns - empty.median_ns,
            bpf_stats_ns: r.bpf_stats_ns,
            bpf_stats_net_ns: r.bpf_stats_ns - empty.bpf_stats_ns,
            block_medians_ns: r.blocks.clone(),
        }
    }));
    Ok(())
}
