//! `lbctl` against a real datapath: the maps are pinned on a private bpffs, real packets go
//! through the programs (BPF_PROG_TEST_RUN), and the real binary reads the pins. The key check:
//! for every kind of packet, `lbctl trace` predicts exactly what the datapath then does with it.
//! Needs root (BPF, mount, network namespaces).
//!
//! Tests with source-NATed flows run in a network namespace of their own whose routing table
//! sends everything out of one interface to a neighbour with a known MAC: such packets are routed
//! by the datapath after a FIB lookup, which then always resolves (XDP_REDIRECT /
//! TC_ACT_REDIRECT), whatever the host's routing table holds; their rewritten bytes are what is
//! checked.

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    maps::lpm_trie::Key,
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FORWARD, FlowKey, REPLY, ct_flags},
    hash::flow_hash,
    maps::{Backend, SourceRange, scope, snat},
    net::proto::{TCP, UDP},
};
use lb_datapath::{
    Capacities, Datapath, Pinning,
    maps::Maps,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec, Services},
};
use lb_testbed::packet::{Packet, assert_frame_eq, flags};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers: privileges, a private bpffs, the datapath, running packets and the binary.

/// Runs `test` on a thread of its own, in a new network namespace where every destination is
/// routed out of `up0` to a neighbour with a permanent MAC, and re-raises its panic. Nothing
/// runs when privileged tests are skipped.
fn in_routed_netns(test: impl FnOnce() + Send + 'static) {
    if !lb_testbed::privileges::require() {
        return;
    }
    let result = std::thread::spawn(move || {
        // SAFETY: plain syscall; it moves only this thread (and the processes it spawns).
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        // `ip` and `sysctl` started from this thread run in its namespace.
        for args in [
            "link add up0 type veth peer name up0p",
            "link set up0p up",
            "link set up0 address 02:00:00:00:00:01 up",
            "addr add 10.255.0.1/24 dev up0",
            "neigh add 10.255.0.2 lladdr 02:00:00:00:00:02 dev up0 nud permanent",
            "route add default via 10.255.0.2",
        ] {
            let status = Command::new("ip").args(args.split(' ')).status().unwrap();
            assert!(status.success(), "ip {args}");
        }
        let status = Command::new("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()
            .unwrap();
        assert!(status.success());
        test();
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// A unique temporary directory, removed on drop; with `bpffs`, a private bpf filesystem is
/// mounted on it (and detached on drop, also when the test panics).
struct TempMount {
    dir: PathBuf,
    mounted: bool,
}

impl TempMount {
    fn new(bpffs: bool) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbctl-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut guard = Self {
            dir,
            mounted: false,
        };
        if bpffs {
            let (src, fstype) = (c"bpf", c"bpf");
            let target = c_path(&guard.dir);
            // SAFETY: valid NUL-terminated strings; no data argument.
            let ret = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert_eq!(
                ret,
                0,
                "mount -t bpf on {}: {}",
                guard.dir.display(),
                std::io::Error::last_os_error()
            );
            guard.mounted = true;
        }
        guard
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if self.mounted {
            let target = c_path(&self.dir);
            // SAFETY: a valid path. MNT_DETACH: pinned maps may still be open in this process.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Verdicts as BPF_PROG_TEST_RUN reports them.
mod verdict {
    pub const TC_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC
    pub const TC_SHOT: u32 = 2;
    pub const TC_REDIRECT: u32 = 7;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// lb_from_pod (internal scope).
    FromPod,
    /// lb_xdp (external scope).
    Xdp,
    /// lb_ext_in (external scope, tc).
    ExtIn,
    /// lb_to_pod (replies).
    ToPod,
}

impl Hook {
    /// The verdict the hook returns for lbctl's `pass` / `drop` / `reject` / `forward` /
    /// `bounce`. A forwarded packet is redirected out of `up0`, the test namespace's route to
    /// everywhere (see `in_routed_netns`).
    fn verdict(self, name: &str) -> u32 {
        use verdict::*;
        match (self, name) {
            (Hook::Xdp, "pass") => XDP_PASS,
            (Hook::Xdp, "forward") => XDP_REDIRECT,
            (Hook::Xdp, "drop") => XDP_DROP,
            (Hook::Xdp, "reject" | "bounce") => XDP_TX,
            (_, "pass") => TC_PASS,
            (_, "forward" | "reject" | "bounce") => TC_REDIRECT,
            (_, "drop") => TC_SHOT,
            _ => panic!("unknown verdict {name}"),
        }
    }
}

/// A datapath whose maps are pinned under `pins` on a private bpffs, programmed through the
/// agent's planner and writer.
struct Fixture {
    dp: Datapath,
    maps: Maps,
    services: Services,
    pins: PathBuf,
    // Last: unmounted after the datapath and maps are closed.
    _mount: TempMount,
}

impl Fixture {
    fn new() -> Option<Self> {
        if !lb_testbed::privileges::require() {
            return None;
        }
        let mount = TempMount::new(true);
        let pins = mount.dir.join("lb");
        std::fs::create_dir(&pins).unwrap();
        let capacities = Capacities {
            ct: 4096,
            service_ids: 1024,
        };
        let mut dp = Datapath::load(&Pinning::Dir(pins.clone()), capacities)
            .unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
        let maps = dp.take_maps().expect("maps");
        Some(Self {
            dp,
            maps,
            services: Services::new(capacities, TABLE),
            pins,
            _mount: mount,
        })
    }

    fn run(&mut self, hook: Hook, input: &[u8]) -> (u32, Vec<u8>) {
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
        }
        .unwrap_or_else(|e| panic!("test run on {hook:?}: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Programs `svc` (adds it, or changes the service of that name).
    fn program(&mut self, svc: &ServiceSpec) {
        self.services
            .program(&mut self.maps, svc)
            .unwrap_or_else(|e| panic!("programming service {}: {e:?}", svc.name));
    }

    /// Programs the node's SNAT address and ports, as the agent does for a node with an
    /// InternalIP.
    fn set_node(&mut self, snat_addr: Ipv4Addr, min: u16, max: u16) {
        self.services.set_node(Some(snat_addr), Some(min..=max));
        self.services
            .apply(&mut self.maps)
            .unwrap_or_else(|e| panic!("programming the node: {e:?}"));
    }

    /// The backend-set id the planner gave `svc`.
    fn set_id(&self, svc: &ServiceSpec) -> u32 {
        self.services
            .set_id(&svc.name)
            .unwrap_or_else(|| panic!("service {} is not programmed", svc.name))
    }

    /// The backend id the planner gave the backend at `addr`.
    fn backend_id(&self, addr: &str) -> u32 {
        self.services
            .backend_id(sock(addr))
            .unwrap_or_else(|| panic!("no backend {addr} is programmed"))
    }

    /// The source-range id the planner gave the frontends of `svc`.
    fn source_range_id(&self, svc: &ServiceSpec) -> u32 {
        self.services
            .frontend(&svc.frontends[0].key())
            .unwrap_or_else(|| panic!("service {} is not programmed", svc.name))
            .source_range_id
    }

    /// Writes a source range straight into the map (for state the planner never writes).
    fn add_source_range(&mut self, range_id: u32, addr: Ipv4Addr, len: u32) {
        let key = Key::new(
            SourceRange::ID_BITS + len,
            SourceRange {
                range_id: Be32::from_host(range_id),
                addr: Be32::from(addr),
            },
        );
        self.maps.src_ranges.insert(&key, 1, 0).unwrap();
    }

    /// Verdict counters (packets) by reason name, zeros left out.
    fn verdicts(&self) -> BTreeMap<&'static str, u64> {
        self.maps
            .verdict_totals()
            .unwrap()
            .into_iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(r, c)| (r.name(), c.packets))
            .collect()
    }

    fn lbctl(&self, args: &[&str]) -> Output {
        lbctl(&self.pins, args)
    }

    /// Runs lbctl with `--output json`, which must succeed, and parses its output.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.lbctl(&all);
        assert!(
            out.status.success(),
            "lbctl {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lbctl {all:?}: invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs lbctl in table mode, which must succeed, and returns its output.
    fn text(&self, args: &[&str]) -> String {
        let out = self.lbctl(args);
        assert!(
            out.status.success(),
            "lbctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn lbctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .arg("--bpffs-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running lbctl")
}

/// Source and destination (with ports, 0 for other protocols) of an output frame.
fn frame_ends(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let (src, dst) = (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
    );
    let (sport, dport) = if ip[9] == TCP || ip[9] == UDP {
        let l4 = &ip[ihl..];
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    } else {
        (0, 0)
    };
    (SocketAddrV4::new(src, sport), SocketAddrV4::new(dst, dport))
}

fn sock(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn json_sock(v: &Value) -> SocketAddrV4 {
    v.as_str()
        .unwrap_or_else(|| panic!("not an address: {v}"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The fixture's services.

const TABLE: u32 = 251;

fn frontend(addr: [u8; 4], port: u16, l4: u8, scope: u8, kind: FrontendKind) -> FrontendSpec {
    FrontendSpec {
        addr: Ipv4Addr::from(addr),
        port,
        proto: l4,
        scope,
        kind,
    }
}

/// Backends at `addrs`; every other one runs on this node, starting with the first when
/// `first_local`.
fn backends(first_local: bool, addrs: &[&str]) -> Vec<BackendSpec> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| BackendSpec {
            addr: sock(a),
            local: (i % 2 == 0) == first_local,
            weight: 1,
        })
        .collect()
}

fn service(name: &str, frontends: Vec<FrontendSpec>, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        frontends,
        backends,
        ..Default::default()
    }
}

/// Multi-backend ClusterIP, reachable internally and externally.
fn svc_web() -> ServiceSpec {
    service(
        "web",
        vec![
            frontend(
                [172, 30, 0, 41],
                80,
                TCP,
                scope::INTERNAL,
                FrontendKind::ClusterIp,
            ),
            frontend(
                [172, 30, 0, 41],
                80,
                TCP,
                scope::EXTERNAL,
                FrontendKind::ClusterIp,
            ),
        ],
        backends(true, &["10.0.1.5:8080", "10.0.1.6:8080", "10.0.2.7:8080"]),
    )
}

/// Single-backend UDP ClusterIP.
fn svc_dns() -> ServiceSpec {
    service(
        "dns",
        vec![frontend(
            [172, 30, 0, 42],
            53,
            UDP,
            scope::INTERNAL,
            FrontendKind::ClusterIp,
        )],
        backends(true, &["10.0.1.8:5353"]),
    )
}

/// No backends: rejects (TCP and UDP frontends). Source ranges on a service without backends:
/// the lack of backends decides first.
fn svc_empty() -> ServiceSpec {
    ServiceSpec {
        source_ranges: source_ranges(),
        ..service(
            "empty",
            vec![
                frontend(
                    [172, 30, 0, 43],
                    80,
                    TCP,
                    scope::INTERNAL,
                    FrontendKind::ClusterIp,
                ),
                frontend(
                    [172, 30, 0, 43],
                    53,
                    UDP,
                    scope::INTERNAL,
                    FrontendKind::ClusterIp,
                ),
            ],
            vec![],
        )
    }
}

/// No backends, drops (traffic policy Local).
fn svc_empty_drop() -> ServiceSpec {
    ServiceSpec {
        drop_when_empty: true,
        ..service(
            "empty-drop",
            vec![frontend(
                [172, 30, 0, 44],
                80,
                TCP,
                scope::INTERNAL,
                FrontendKind::ClusterIp,
            )],
            vec![],
        )
    }
}

/// A LoadBalancer IP (not a ClusterIP), external only, with loadBalancerSourceRanges.
fn svc_ranged() -> ServiceSpec {
    ServiceSpec {
        source_ranges: source_ranges(),
        ..service(
            "ranged",
            vec![frontend(
                [192, 0, 2, 10],
                443,
                TCP,
                scope::EXTERNAL,
                FrontendKind::LoadBalancer,
            )],
            backends(true, &["10.0.3.1:8443", "10.0.3.2:8443"]),
        )
    }
}

fn source_ranges() -> Vec<ipnet::Ipv4Net> {
    ["203.0.113.0/24", "198.51.100.7/32"]
        .map(|net| net.parse().unwrap())
        .to_vec()
}

/// ClusterIP with sessionAffinity ClientIP.
fn svc_sticky() -> ServiceSpec {
    ServiceSpec {
        affinity_timeout_s: AFFINITY_S,
        ..service(
            "sticky",
            vec![frontend(
                [172, 30, 0, 45],
                8080,
                TCP,
                scope::INTERNAL,
                FrontendKind::ClusterIp,
            )],
            backends(true, &["10.0.4.1:80", "10.0.4.2:80", "10.0.4.3:80"]),
        )
    }
}
const AFFINITY_S: u32 = 10_800;

/// This node's address: the agent's SNAT address (its InternalIP), and the address of the
/// NodePort service.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);

/// What the agent programs for a node with an InternalIP: `NODE` as the SNAT address, SNAT
/// ports `min..=max`.
fn configure_snat(f: &mut Fixture, min: u16, max: u16) {
    f.set_node(NODE, min, max);
}

/// The six services above, programmed one after the other (so their ids follow that order).
fn populated() -> Option<Fixture> {
    let mut f = Fixture::new()?;
    for svc in [
        svc_web(),
        svc_dns(),
        svc_empty(),
        svc_empty_drop(),
        svc_ranged(),
        svc_sticky(),
    ] {
        f.program(&svc);
    }
    // Another list admitting everything, which no frontend uses (the planner never writes such
    // a list): range ids must keep lists apart.
    let range_id = f.source_range_id(&svc_ranged());
    f.add_source_range(range_id + 1, Ipv4Addr::UNSPECIFIED, 0);
    // External flows to backends on other nodes are source-NATed.
    configure_snat(&mut f, snat::PORT_MIN, snat::PORT_MAX);
    Some(f)
}

// ---------------------------------------------------------------------------------------------
// Trace versus the datapath.

/// One packet: what lbctl predicts must be what the datapath does.
struct Case {
    what: &'static str,
    hook: Hook,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4: u8,
    tcp_flags: u8,
}

impl Case {
    fn tcp(what: &'static str, hook: Hook, src: &str, dst: &str, tcp_flags: u8) -> Self {
        Self {
            what,
            hook,
            src: sock(src),
            dst: sock(dst),
            l4: TCP,
            tcp_flags,
        }
    }

    fn udp(what: &'static str, hook: Hook, src: &str, dst: &str) -> Self {
        Self {
            what,
            hook,
            src: sock(src),
            dst: sock(dst),
            l4: UDP,
            tcp_flags: 0,
        }
    }

    fn packet(&self) -> Packet {
        if self.l4 == TCP {
            Packet::tcp(self.src, self.dst, self.tcp_flags, b"data")
        } else {
            Packet::udp(self.src, self.dst, b"query")
        }
    }

    fn trace_args(&self) -> Vec<String> {
        let mut args = vec![
            "trace".to_owned(),
            self.src.to_string(),
            self.dst.to_string(),
            if self.l4 == TCP { "tcp" } else { "udp" }.to_owned(),
        ];
        match self.hook {
            Hook::ToPod => args.push("--reply".into()),
            Hook::Xdp | Hook::ExtIn => args.extend(["--scope".into(), "external".into()]),
            Hook::FromPod => {}
        }
        if self.tcp_flags & (flags::SYN | flags::ACK) == flags::SYN {
            args.push("--syn".into());
        }
        args
    }
}

/// Traces `case` with lbctl, runs it through the datapath, and checks that the verdict, the
/// output frame and the counter bumped are the predicted ones. Returns the trace.
fn check(f: &mut Fixture, case: &Case) -> Value {
    let args = case.trace_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let trace = f.json(&args);
    let what = format!("{}: {trace:#}", case.what);

    let before = f.verdicts();
    let pkt = case.packet();
    let (verdict, out) = f.run(case.hook, &pkt.bytes());
    let after = f.verdicts();

    let predicted = trace["verdict"].as_str().unwrap();
    assert_eq!(verdict, case.hook.verdict(predicted), "verdict of {what}");
    match predicted {
        // Forwarded: rewritten the same way, then routed (see `Hook::verdict`); bounced: sent
        // back where it came from, MAC addresses swapped.
        "pass" | "forward" | "bounce" => {
            let o = &trace["output"];
            let (src, dst) = (json_sock(&o["src"]), json_sock(&o["dst"]));
            assert_eq!(frame_ends(&out), (src, dst), "output of {what}");
            let mut expected = pkt.clone().with_src(src).with_dst(dst);
            if predicted == "bounce" {
                std::mem::swap(&mut expected.eth_src, &mut expected.eth_dst);
            }
            if predicted == "forward" {
                // Routed as `in_routed_netns` set up: out of up0 to its neighbour.
                expected.eth_src = [0x02, 0, 0, 0, 0, 0x01];
                expected.eth_dst = [0x02, 0, 0, 0, 0, 0x02];
                expected.ip.time_to_live -= 1;
            }
            assert_frame_eq(&out, &expected.bytes(), case.what);
        }
        "reject" => {
            assert!(trace["output"].is_null(), "{what}");
            let (src, dst) = frame_ends(&out);
            assert_eq!(
                (src.ip(), dst.ip()),
                (case.dst.ip(), case.src.ip()),
                "the reject goes back to the client: {what}"
            );
            let kind = if case.l4 == TCP {
                "tcp_rst"
            } else {
                "icmp_port_unreachable"
            };
            assert_eq!(trace["reject"], kind, "{what}");
        }
        "drop" => assert!(trace["output"].is_null(), "{what}"),
        other => panic!("unknown verdict {other}: {what}"),
    }
    // Exactly the predicted counter moved, by one packet (or none for uncounted packets).
    let moved: BTreeMap<&str, u64> = after
        .iter()
        .map(|(r, n)| (*r, n - before.get(r).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut expected: BTreeMap<&str, u64> = trace["reason"]
        .as_str()
        .map(|r| (r, 1))
        .into_iter()
        .collect();
    if predicted == "forward" {
        expected.insert("forwarded", 1);
    }
    assert_eq!(moved, expected, "counters of {what}");
    trace
}

/// The backend Maglev gives a new TCP flow of `svc`, computed here from the programmed table.
fn maglev_pick(f: &Fixture, svc: &ServiceSpec, src: SocketAddrV4, dst: SocketAddrV4) -> u32 {
    maglev_pick_l4(f, svc, src, dst, TCP)
}

fn maglev_pick_l4(
    f: &Fixture,
    svc: &ServiceSpec,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4: u8,
) -> u32 {
    let size = f.services.table_size(&svc.name).unwrap();
    let table = f.maps.maglev_table(f.set_id(svc), size).unwrap();
    table[(hash_of(src, dst, l4) % size) as usize]
}

fn hash_of(src: SocketAddrV4, dst: SocketAddrV4, l4: u8) -> u32 {
    flow_hash(
        Be32::from(*src.ip()),
        Be32::from(*dst.ip()),
        Be16::from_host(src.port()),
        Be16::from_host(dst.port()),
        l4,
    )
}

/// The address of the backend the planner gave `id`.
fn backend_addr(f: &Fixture, id: u64) -> SocketAddrV4 {
    let id = u32::try_from(id).unwrap();
    f.services
        .backend_addr(id)
        .unwrap_or_else(|| panic!("no backend {id} is programmed"))
}

#[test]
fn trace_predicts_what_the_datapath_does() {
    in_routed_netns(trace_predicts_what_the_datapath_does_here);
}

fn trace_predicts_what_the_datapath_does_here() {
    let Some(mut f) = populated() else { return };
    let range_id = f.source_range_id(&svc_ranged());
    use Hook::*;
    const SYN: u8 = flags::SYN;
    const ACK: u8 = flags::ACK;

    // A new flow to a multi-backend ClusterIP: Maglev.
    let t = check(
        &mut f,
        &Case::tcp("new flow", FromPod, "10.0.1.2:40000", "172.30.0.41:80", SYN),
    );
    assert_eq!(t["decision"], "new_flow");
    assert_eq!(t["reason"], "new_flow");
    assert_eq!(t["service_id"], f.set_id(&svc_web()));
    assert_eq!(t["scope"], "internal");
    assert_eq!(t["selection"]["method"], "maglev");
    assert_eq!(t["selection"]["table_size"], TABLE);
    let hash = t["selection"]["hash"].as_u64().unwrap();
    assert_eq!(t["selection"]["slot"], hash % u64::from(TABLE));
    let web_backend = json_sock(&t["backend"]);
    assert_eq!(
        t["backend_id"],
        maglev_pick(
            &f,
            &svc_web(),
            sock("10.0.1.2:40000"),
            sock("172.30.0.41:80")
        )
    );
    assert_eq!(
        backend_addr(&f, t["backend_id"].as_u64().unwrap()),
        web_backend
    );
    assert_eq!(t["affinity_recorded"], false);
    let explanation = t["explanation"].as_str().unwrap();
    assert!(explanation.contains("Maglev slot"), "{explanation}");

    // The same flow again: established, same backend.
    let t = check(
        &mut f,
        &Case::tcp(
            "established",
            FromPod,
            "10.0.1.2:40000",
            "172.30.0.41:80",
            ACK,
        ),
    );
    assert_eq!(t["decision"], "established");
    assert_eq!(json_sock(&t["backend"]), web_backend);
    assert!(t["selection"].is_null());

    // Its reply is reverse-NATed; a stranger's packet is not.
    let t = check(
        &mut f,
        &Case {
            what: "reply",
            hook: ToPod,
            src: web_backend,
            dst: sock("10.0.1.2:40000"),
            l4: TCP,
            tcp_flags: SYN | ACK,
        },
    );
    assert_eq!(t["decision"], "reverse_nat");
    assert_eq!(t["direction"], "reply");
    assert_eq!(t["output"]["src"], "172.30.0.41:80");
    let t = check(
        &mut f,
        &Case::tcp(
            "untracked reply",
            ToPod,
            "10.0.9.9:8080",
            "10.0.1.2:40000",
            ACK,
        ),
    );
    assert_eq!(t["decision"], "not_tracked");
    assert!(t["reason"].is_null());

    // Single backend, UDP: new, then established.
    let t = check(
        &mut f,
        &Case::udp("single backend", FromPod, "10.0.1.2:5000", "172.30.0.42:53"),
    );
    assert_eq!(
        (&t["decision"], &t["selection"]),
        (&json!("new_flow"), &json!({"method": "single"}))
    );
    assert_eq!(t["backend"], "10.0.1.8:5353");
    let t = check(
        &mut f,
        &Case::udp(
            "single backend again",
            FromPod,
            "10.0.1.2:5000",
            "172.30.0.42:53",
        ),
    );
    assert_eq!(t["decision"], "established");

    // No backend: reject (RST, ICMP) or drop.
    let t = check(
        &mut f,
        &Case::tcp(
            "no backend, tcp",
            FromPod,
            "10.0.1.2:40001",
            "172.30.0.43:80",
            SYN,
        ),
    );
    assert_eq!(
        t["decision"], "reject_no_backend",
        "rejected, whatever the source"
    );
    assert_eq!(t["service"]["source_range_id"], range_id);
    let t = check(
        &mut f,
        &Case::udp(
            "no backend, udp",
            FromPod,
            "10.0.1.2:40001",
            "172.30.0.43:53",
        ),
    );
    assert_eq!(t["decision"], "reject_no_backend");
    let t = check(
        &mut f,
        &Case::tcp(
            "no backend, drop",
            FromPod,
            "10.0.1.2:40001",
            "172.30.0.44:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "drop_no_backend");
    assert_eq!(t["service"]["flags"], json!(["drop_when_empty"]));

    // Unknown port or protocol on a ClusterIP; an address that carries no frontend.
    let t = check(
        &mut f,
        &Case::tcp(
            "unknown port",
            FromPod,
            "10.0.1.2:40002",
            "172.30.0.41:81",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "reject_unknown_port");
    let t = check(
        &mut f,
        &Case::udp(
            "unknown protocol",
            FromPod,
            "10.0.1.2:40002",
            "172.30.0.41:80",
        ),
    );
    assert_eq!(t["decision"], "reject_unknown_port");
    let t = check(
        &mut f,
        &Case::tcp(
            "not a frontend",
            FromPod,
            "10.0.1.2:40002",
            "10.0.2.9:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "not_a_frontend");
    assert!(t["reason"].is_null());

    // loadBalancerSourceRanges, from outside (XDP).
    for (what, client) in [
        ("source in range /24", "203.0.113.5:50000"),
        ("source in range /32", "198.51.100.7:50001"),
    ] {
        let t = check(&mut f, &Case::tcp(what, Xdp, client, "192.0.2.10:443", SYN));
        assert_eq!(t["decision"], "new_flow", "{what}");
        assert_eq!(t["scope"], "external");
        assert_eq!(t["service"]["source_range_id"], range_id);
    }
    let t = check(
        &mut f,
        &Case::tcp(
            "source out of range",
            Xdp,
            "8.8.8.8:50002",
            "192.0.2.10:443",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "drop_source_range");
    assert_eq!(t["reason"], "drop_source_range");
    // A port the LoadBalancer IP does not serve, and the internal scope it has no frontend in:
    // it is no ClusterIP, so both pass to the stack.
    let t = check(
        &mut f,
        &Case::tcp("not served", Xdp, "8.8.8.8:50002", "192.0.2.10:80", SYN),
    );
    assert_eq!(t["decision"], "not_served");
    let t = check(
        &mut f,
        &Case::tcp(
            "other scope",
            FromPod,
            "203.0.113.5:50003",
            "192.0.2.10:443",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "not_served");
    // The ClusterIP from outside.
    let t = check(
        &mut f,
        &Case::tcp(
            "external new flow",
            Xdp,
            "198.18.0.1:1234",
            "172.30.0.41:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "new_flow");

    // Session affinity: a first connection records the backend Maglev gives it; a second one
    // from another port, which Maglev would send elsewhere, sticks to it.
    let sticky = svc_sticky();
    let vip = sock("172.30.0.45:8080");
    let first = sock("10.0.5.5:41000");
    let t = check(
        &mut f,
        &Case {
            what: "affinity, first connection",
            hook: FromPod,
            src: first,
            dst: vip,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["selection"]["method"], "maglev");
    assert_eq!(t["affinity_recorded"], true);
    let sticky_id = t["backend_id"].as_u64().unwrap();
    let second = (41_001..)
        .map(|port| SocketAddrV4::new(*first.ip(), port))
        .find(|src| u64::from(maglev_pick(&f, &sticky, *src, vip)) != sticky_id)
        .unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "affinity hit",
            hook: FromPod,
            src: second,
            dst: vip,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["decision"], "new_flow");
    assert_eq!(t["selection"]["method"], "affinity");
    assert_eq!(t["selection"]["timeout_s"], AFFINITY_S);
    assert!(t["selection"]["age_s"].as_u64().unwrap() < 5);
    assert_eq!(t["backend_id"], sticky_id);
    assert!(t["explanation"].as_str().unwrap().contains("affinity"));

    // A RST closes the web flow; a SYN on the same ports is a new connection, balanced anew.
    let t = check(
        &mut f,
        &Case::tcp(
            "rst",
            FromPod,
            "10.0.1.2:40000",
            "172.30.0.41:80",
            flags::RST | ACK,
        ),
    );
    assert_eq!(t["decision"], "established");
    let t = check(
        &mut f,
        &Case::tcp(
            "syn after rst",
            FromPod,
            "10.0.1.2:40000",
            "172.30.0.41:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "new_flow");

    // A backend slot emptied behind the service's back: flows hashed to it are dropped as
    // inconsistent, and `service list` shows the backend missing.
    let gone = f.backend_id("10.0.4.3:80");
    f.maps.backends.set(gone, Backend::default(), 0).unwrap();
    let orphan = (42_000..)
        .map(|port| SocketAddrV4::new(Ipv4Addr::new(10, 0, 6, 6), port))
        .find(|src| maglev_pick(&f, &sticky, *src, vip) == gone)
        .unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "missing backend",
            hook: FromPod,
            src: orphan,
            dst: vip,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["decision"], "inconsistent");
    assert_eq!(t["reason"], "drop_inconsistent_service");

    check_views(&f, web_backend, sticky_id);
}

/// The other views, against what the fixture did to the maps.
fn check_views(f: &Fixture, web_backend: SocketAddrV4, sticky_id: u64) {
    let [web_id, dns_id, ranged_id, sticky_set_id] =
        [svc_web(), svc_dns(), svc_ranged(), svc_sticky()].map(|svc| f.set_id(&svc));
    let range_id = f.source_range_id(&svc_ranged());
    // stats: exactly the kernel's counters.
    let stats = f.json(&["stats"]);
    let verdicts: Vec<Value> = f
        .maps
        .verdict_totals()
        .unwrap()
        .into_iter()
        .map(|(r, c)| json!({"reason": r.name(), "packets": c.packets, "bytes": c.bytes}))
        .collect();
    assert_eq!(stats["verdicts"], Value::Array(verdicts));
    let mut ids: Vec<u32> = [
        svc_web(),
        svc_dns(),
        svc_empty(),
        svc_empty_drop(),
        svc_ranged(),
        svc_sticky(),
    ]
    .iter()
    .map(|svc| f.set_id(svc))
    .collect();
    ids.sort_unstable();
    let services: Vec<Value> = ids
        .into_iter()
        .map(|id| (id, f.maps.service_totals(id).unwrap()))
        .filter(|(_, s)| s.packets > 0)
        .map(|(id, s)| {
            json!({"service_id": id, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows})
        })
        .collect();
    assert_eq!(stats["services"], Value::Array(services));
    assert_eq!(stats["services"][0]["service_id"], web_id);

    // service list: one row per frontend, sorted by address.
    let rows = f.json(&["service", "list"]);
    let rows = rows.as_array().unwrap();
    let frontends: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}/{} {}",
                r["frontend"].as_str().unwrap(),
                r["proto"].as_str().unwrap(),
                r["scope"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        frontends,
        [
            "172.30.0.41:80/tcp internal",
            "172.30.0.41:80/tcp external",
            "172.30.0.42:53/udp internal",
            "172.30.0.43:53/udp internal",
            "172.30.0.43:80/tcp internal",
            "172.30.0.44:80/tcp internal",
            "172.30.0.45:8080/tcp internal",
            "192.0.2.10:443/tcp external",
        ]
    );
    let web = &rows[0];
    assert_eq!(web["service_id"], web_id);
    assert_eq!(web["cluster_ip"], true);
    assert_eq!(web["backend_count"], 3);
    let web_backends = web["backends"].as_array().unwrap();
    assert_eq!(web_backends.len(), 3);
    let slots: u64 = web_backends
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, u64::from(TABLE));
    for (b, spec) in web_backends.iter().zip(svc_web().backends) {
        assert_eq!(b["backend_id"], f.backend_id(&spec.addr.to_string()));
        assert_eq!(b["state"], "active");
        assert_eq!(b["addr"], spec.addr.to_string());
        assert_eq!(b["local"], spec.local);
        let n = b["slots"].as_u64().unwrap();
        assert!((83..=84).contains(&n), "Maglev gives 251/3 slots each: {b}");
    }
    let web_stats = f.maps.service_totals(web_id).unwrap();
    assert_eq!(
        (&web["packets"], &web["bytes"], &web["new_flows"]),
        (
            &json!(web_stats.packets),
            &json!(web_stats.bytes),
            &json!(web_stats.new_flows)
        )
    );
    assert_eq!(
        rows[2]["backends"],
        json!([{"backend_id": f.backend_id("10.0.1.8:5353"), "state": "active", "addr": "10.0.1.8:5353", "local": true, "slots": null, "percent": 100.0}])
    );
    assert_eq!(rows[4]["backends"], json!([]));
    assert_eq!(rows[4]["flags"], json!([]));
    assert_eq!(rows[5]["flags"], json!(["drop_when_empty"]));
    let sticky = &rows[6];
    assert_eq!(sticky["affinity_timeout_s"], AFFINITY_S);
    let missing: Vec<&Value> = sticky["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "missing")
        .collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0]["backend_id"], f.backend_id("10.0.4.3:80"));
    assert!(missing[0]["addr"].is_null());
    let ranged = &rows[7];
    assert_eq!(ranged["cluster_ip"], false);
    assert_eq!(ranged["source_range_id"], range_id);
    assert_eq!(
        ranged["source_ranges"],
        json!(["198.51.100.7/32", "203.0.113.0/24"])
    );

    // ct list: the web flow (reopened after its RST) with both directions.
    let flows = f.json(&["ct", "list"]);
    let flows = flows.as_array().unwrap();
    let web_flow = flows
        .iter()
        .find(|r| r["client"] == "10.0.1.2:40000" && r["frontend"] == "172.30.0.41:80")
        .unwrap_or_else(|| panic!("no web flow in {flows:#?}"));
    assert_eq!(web_flow["proto"], "tcp");
    assert_eq!(web_flow["service_id"], web_id);
    assert_eq!(json_sock(&web_flow["backend"]), web_backend);
    assert_eq!(web_flow["forward"]["flags"], json!([]), "reopened by a SYN");
    assert!(!web_flow["reply"].is_null(), "paired with its reply entry");
    let expires = web_flow["forward"]["expires_in_s"].as_i64().unwrap();
    assert!((55..=60).contains(&expires), "SYN timeout 60 s: {expires}");
    let dns = flows
        .iter()
        .find(|r| r["frontend"] == "172.30.0.42:53")
        .unwrap();
    assert_eq!(dns["proto"], "udp");
    assert_eq!(dns["backend"], "10.0.1.8:5353");
    let expires = dns["reply"]["expires_in_s"].as_i64().unwrap();
    assert!((25..=30).contains(&expires), "UDP timeout 30 s: {expires}");
    // Every new flow (web x3 incl. the reopened one counted once, dns, ranged x2, external,
    // sticky x2) has its pair; the missing-backend flow none.
    assert_eq!(flows.len(), 7, "{flows:#?}");
    assert!(
        flows
            .iter()
            .all(|r| !r["forward"].is_null() && !r["reply"].is_null())
    );

    // maps dump: every map, decoded.
    let dump = f.json(&["maps", "dump"]);
    for name in lb_common::maps::ALL {
        assert!(dump.get(name).is_some(), "{name} missing from the dump");
    }
    assert_eq!(
        dump["LB_SRC_RANGES"],
        json!([
            {"range_id": range_id, "cidr": "198.51.100.7/32", "value": 1},
            {"range_id": range_id, "cidr": "203.0.113.0/24", "value": 1},
            {"range_id": range_id + 1, "cidr": "0.0.0.0/0", "value": 1},
        ])
    );
    let affinity = dump["LB_AFFINITY"].as_array().unwrap();
    assert_eq!(affinity.len(), 1, "{affinity:#?}");
    assert_eq!(affinity[0]["client"], "10.0.5.5");
    assert_eq!(affinity[0]["service_id"], sticky_set_id);
    assert_eq!(affinity[0]["backend_id"], sticky_id);
    assert_eq!(affinity[0]["timeout_s"], AFFINITY_S);
    assert!(affinity[0]["age_s"].as_u64().unwrap() < 5);
    let active: Vec<u64> = dump["LB_BACKENDS"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend_id"].as_u64().unwrap())
        .collect();
    let programmed: Vec<u64> = [
        "10.0.1.5:8080",
        "10.0.1.6:8080",
        "10.0.2.7:8080",
        "10.0.1.8:5353",
        "10.0.3.1:8443",
        "10.0.3.2:8443",
        "10.0.4.1:80",
        "10.0.4.2:80",
    ]
    .map(|addr| u64::from(f.backend_id(addr)))
    .to_vec();
    assert_eq!(active, programmed);
    assert_eq!(
        dump["LB_BACKENDS"][0],
        json!({"backend_id": f.backend_id("10.0.1.5:8080"), "addr": "10.0.1.5:8080", "flags": ["active", "local"], "flags_raw": 3})
    );
    let tables: Vec<u64> = dump["LB_MAGLEV"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["service_id"].as_u64().unwrap())
        .collect();
    assert_eq!(tables, [web_id, ranged_id, sticky_set_id].map(u64::from));
    assert!(
        dump["LB_MAGLEV"][0].get("table").is_none(),
        "no slots without --full"
    );
    let addrs = dump["LB_ADDRS"].as_array().unwrap();
    assert_eq!(
        addrs.iter().find(|a| a["addr"] == "172.30.0.41").unwrap(),
        &json!({"addr": "172.30.0.41", "flags": ["cluster_ip"], "flags_raw": 1})
    );
    let addr_flags = |addr: &str| &addrs.iter().find(|a| a["addr"] == addr).unwrap()["flags"];
    assert_eq!(addr_flags("192.0.2.10"), &json!([]));
    assert_eq!(
        addr_flags("192.168.50.10"),
        &json!(["snat"]),
        "the SNAT address"
    );
    assert_eq!(
        dump["LB_CONFIG"],
        json!([{
            "snat_addr": "192.168.50.10",
            "snat_port_min": snat::PORT_MIN,
            "snat_port_max": snat::PORT_MAX,
            "snat_enabled": true,
            // The planner's: lb_common::maps::hairpin::DEFAULT_ADDR.
            "hairpin_addr": "169.254.42.1",
        }])
    );
    assert_eq!(dump["LB_SERVICES"].as_array().unwrap().len(), 8);
    assert_eq!(dump["LB_CT"].as_array().unwrap().len(), 14);
    let reply = dump["LB_CT"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dir"] == "reply" && e["dst"] == "10.0.1.2:5000")
        .unwrap();
    assert_eq!(
        (
            &reply["src"],
            &reply["nat"],
            &reply["proto"],
            &reply["backend_id"],
            &reply["service_id"]
        ),
        (
            &json!("10.0.1.8:5353"),
            &json!("172.30.0.42:53"),
            &json!("udp"),
            &json!(f.backend_id("10.0.1.8:5353")),
            &json!(dns_id)
        )
    );
    assert_eq!(dump["LB_FRAGS"], json!([]));
    assert_eq!(dump["LB_VERDICTS"], stats["verdicts"]);
    assert_eq!(dump["LB_SVC_STATS"], stats["services"]);

    // One map, by name or alias; --full lists every slot.
    let ct = f.json(&["maps", "dump", "--map", "ct"]);
    assert_eq!(
        ct.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["LB_CT"]
    );
    let full = f.json(&["maps", "dump", "--map", "LB_MAGLEV", "--full"]);
    let table: Vec<u64> = full["LB_MAGLEV"][0]["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let installed = f.maps.maglev_table(web_id, TABLE).unwrap();
    assert_eq!(
        table,
        installed.iter().map(|&v| u64::from(v)).collect::<Vec<_>>()
    );

    // The table output, smoke-checked.
    let text = f.text(&["maps", "dump"]);
    for needle in [
        "LB_CT (14 entries)",
        "LB_FRAGS (0 entries)",
        "10.0.1.8:5353",
        "203.0.113.0/24",
        "cluster_ip",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let text = f.text(&["maps", "dump", "--map", "maglev", "--full"]);
    assert!(
        text.contains(&format!("service {web_id} table (251 slots):")),
        "{text}"
    );
    let text = f.text(&["service", "list"]);
    for needle in [
        "172.30.0.41:80/tcp internal",
        "missing",
        "affinity 10800s",
        "drop_when_empty",
        "198.51.100.7/32",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let text = f.text(&["ct", "list"]);
    assert!(
        text.contains("10.0.1.2:40000") && text.contains("172.30.0.42:53"),
        "{text}"
    );
    let text = f.text(&["stats"]);
    assert!(
        text.contains("drop_source_range") && text.contains("new flows"),
        "{text}"
    );
    let text = f.text(&["trace", "10.0.1.2:40000", "172.30.0.41:80", "tcp"]);
    assert!(text.contains("decision: established (pass)"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Source NAT of external flows to backends on other nodes.

const NODE_PORT: u16 = 30_080;
const NODE_PORT_UDP: u16 = 30_053;

/// A NodePort on the node's address (external scope), TCP and UDP. The first and last backends
/// run on other nodes, the second on this one.
fn svc_node_port() -> ServiceSpec {
    let node = NODE.octets();
    service(
        "node-port",
        vec![
            frontend(
                node,
                NODE_PORT,
                TCP,
                scope::EXTERNAL,
                FrontendKind::NodePort,
            ),
            frontend(
                node,
                NODE_PORT_UDP,
                UDP,
                scope::EXTERNAL,
                FrontendKind::NodePort,
            ),
        ],
        backends(
            false,
            &["10.10.1.6:8080", "10.10.0.7:8080", "10.10.2.8:8080"],
        ),
    )
}

fn forward_key(client: SocketAddrV4, frontend: SocketAddrV4, l4: u8) -> FlowKey {
    FlowKey {
        src_addr: Be32::from(*client.ip()),
        dst_addr: Be32::from(*frontend.ip()),
        src_port: Be16::from_host(client.port()),
        dst_port: Be16::from_host(frontend.port()),
        proto: l4,
        dir: FORWARD,
        _pad: [0; 2],
    }
}

/// The key of the replies of a flow source-NATed to `NODE:port`.
fn snat_reply_key(backend: SocketAddrV4, port: u16, l4: u8) -> FlowKey {
    FlowKey {
        src_addr: Be32::from(*backend.ip()),
        dst_addr: Be32::from(NODE),
        src_port: Be16::from_host(backend.port()),
        dst_port: Be16::from_host(port),
        proto: l4,
        dir: REPLY,
        _pad: [0; 2],
    }
}

/// The SNAT port candidates of a new flow, in the order the datapath tries them, for the range
/// `min..=max` (the allocation rule, restated independently of lbctl).
fn snat_candidates(
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    l4: u8,
    min: u16,
    max: u16,
) -> Vec<u16> {
    let span = u32::from(max - min) + 1;
    let hash = hash_of(client, frontend, l4);
    (0..snat::PROBES)
        .map(|probe| min + (hash.wrapping_add(probe.wrapping_mul(0x9e37_79b1)) % span) as u16)
        .collect()
}

/// The node address and port the datapath recorded for the flow `client -> frontend`.
fn recorded_snat(
    f: &Fixture,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    l4: u8,
) -> SocketAddrV4 {
    let entry = f
        .maps
        .ct
        .get(&forward_key(client, frontend, l4), 0)
        .unwrap();
    assert_ne!(
        entry.flags & ct_flags::SNAT,
        0,
        "{client} -> {frontend} is source-NATed"
    );
    SocketAddrV4::new(entry.snat_addr.to_ip(), entry.snat_port.to_host())
}

#[test]
fn trace_predicts_source_nat_of_external_flows_to_other_nodes() {
    in_routed_netns(trace_predicts_source_nat_here);
}

fn trace_predicts_source_nat_here() {
    let Some(mut f) = Fixture::new() else { return };
    use Hook::*;
    const SYN: u8 = flags::SYN;
    const ACK: u8 = flags::ACK;
    let svc = svc_node_port();
    f.program(&svc);
    let node_port = SocketAddrV4::new(NODE, NODE_PORT);
    let local_ids: Vec<u32> = svc
        .backends
        .iter()
        .filter(|b| b.local)
        .map(|b| f.backend_id(&b.addr.to_string()))
        .collect();
    let local = |id: u32| local_ids.contains(&id);
    // Client ports from `ip`.
    let clients = |ip: [u8; 4]| (40_000..).map(move |port| SocketAddrV4::new(ip.into(), port));
    // Clients Maglev sends to a backend on another node.
    let remote: Vec<SocketAddrV4> = clients([203, 0, 113, 7])
        .filter(|c| !local(maglev_pick(&f, &svc, *c, node_port)))
        .take(2)
        .collect();

    // The node has no SNAT address yet: such a flow cannot be source-NATed, it is dropped.
    let client = remote[0];
    let t = check(
        &mut f,
        &Case {
            what: "no SNAT address",
            hook: Xdp,
            src: client,
            dst: node_port,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["decision"], "drop_snat_ports");
    assert_eq!(t["reason"], "drop_snat_ports");
    assert!(t["snat"].is_null() && t["output"].is_null());
    assert_eq!(t["backend_id"], maglev_pick(&f, &svc, client, node_port));
    let explanation = t["explanation"].as_str().unwrap();
    assert!(explanation.contains("no SNAT address"), "{explanation}");

    configure_snat(&mut f, snat::PORT_MIN, snat::PORT_MAX);

    // A new flow: DNAT to the backend and SNAT to the node, on the first candidate port (no
    // flow holds any). `check` compares the whole output frame with the prediction.
    let t = check(
        &mut f,
        &Case {
            what: "SNAT new flow",
            hook: Xdp,
            src: client,
            dst: node_port,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"], &t["reason"]),
        (&json!("new_flow"), &json!("forward"), &json!("new_flow"))
    );
    let backend = json_sock(&t["backend"]);
    let node = json_sock(&t["snat"]["addr"]);
    let candidates = snat_candidates(client, node_port, TCP, snat::PORT_MIN, snat::PORT_MAX);
    assert_eq!(node, SocketAddrV4::new(NODE, candidates[0]));
    assert_eq!(
        t["snat"],
        json!({
            "kind": "node",
            "addr": node.to_string(),
            "client": client.to_string(),
            "hash": hash_of(client, node_port, TCP),
            "probe": 0,
            "port_state": "free",
        })
    );
    assert_eq!(json_sock(&t["output"]["src"]), node);
    assert_eq!(recorded_snat(&f, client, node_port, TCP), node);
    let explanation = t["explanation"].as_str().unwrap();
    assert!(
        explanation.contains("SNAT")
            && explanation.contains("routed to its next hop by this node (FIB lookup"),
        "{explanation}"
    );

    // The rest of the flow keeps both translations.
    let t = check(
        &mut f,
        &Case {
            what: "SNAT established",
            hook: Xdp,
            src: client,
            dst: node_port,
            l4: TCP,
            tcp_flags: ACK,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("established"), &json!("forward"))
    );
    assert_eq!(json_sock(&t["output"]["src"]), node);
    assert_eq!(json_sock(&t["snat"]["addr"]), node);

    // The backend's reply reaches the node's SNAT address: the frontend becomes its source, the
    // client its destination (through XDP and through tc).
    for (what, hook, tcp_flags) in [
        ("SNAT reply", Xdp, SYN | ACK),
        ("SNAT reply, tc", ExtIn, ACK),
    ] {
        let t = check(
            &mut f,
            &Case {
                what,
                hook,
                src: backend,
                dst: node,
                l4: TCP,
                tcp_flags,
            },
        );
        assert_eq!(
            (&t["decision"], &t["verdict"], &t["reason"]),
            (&json!("snat_reply"), &json!("forward"), &json!("reply_nat")),
            "{what}"
        );
        assert_eq!(
            (
                json_sock(&t["output"]["src"]),
                json_sock(&t["output"]["dst"])
            ),
            (node_port, client),
            "{what}"
        );
        assert_eq!(json_sock(&t["snat"]["client"]), client);
    }
    // The reply path (pod veth and uplink egress) leaves such replies alone.
    let t = check(
        &mut f,
        &Case {
            what: "SNAT reply on the reply path",
            hook: ToPod,
            src: backend,
            dst: node,
            l4: TCP,
            tcp_flags: ACK,
        },
    );
    assert_eq!(t["decision"], "snat_untouched");
    assert!(t["reason"].is_null());
    // A port of the range no flow holds: not a reply, the node's stack gets it.
    let unused = *candidates.iter().find(|p| **p != node.port()).unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "unknown SNAT port",
            hook: Xdp,
            src: backend,
            dst: SocketAddrV4::new(NODE, unused),
            l4: TCP,
            tcp_flags: ACK,
        },
    );
    assert_eq!(t["decision"], "not_served");

    // Another client whose first candidate port is held by a live flow of someone else and
    // whose second is held by an expired one: it gets the second.
    let second = remote[1];
    let second_backend = backend_addr(&f, u64::from(maglev_pick(&f, &svc, second, node_port)));
    let second_candidates = snat_candidates(second, node_port, TCP, snat::PORT_MIN, snat::PORT_MAX);
    let candidates = &second_candidates;
    let (holder_backend, holder_set) = (f.backend_id("10.10.1.6:8080"), f.set_id(&svc));
    let holder = |deadline_ns: u64| CtEntry {
        deadline_ns,
        backend_id: holder_backend,
        set_id: holder_set,
        nat_addr: Be32::from(NODE),
        nat_port: Be16::from_host(NODE_PORT),
        flags: ct_flags::SNAT,
        snat_addr: Be32::from(Ipv4Addr::new(198, 51, 100, 99)),
        snat_port: Be16::from_host(1234),
        ..Default::default()
    };
    f.maps
        .ct
        .insert(
            snat_reply_key(second_backend, candidates[0], TCP),
            holder(u64::MAX),
            0,
        )
        .unwrap();
    f.maps
        .ct
        .insert(
            snat_reply_key(second_backend, candidates[1], TCP),
            holder(1),
            0,
        )
        .unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "SNAT, first candidate taken",
            hook: Xdp,
            src: second,
            dst: node_port,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["snat"]["probe"], 1);
    assert_eq!(
        json_sock(&t["snat"]["addr"]),
        SocketAddrV4::new(NODE, candidates[1])
    );
    assert_eq!(
        recorded_snat(&f, second, node_port, TCP).port(),
        candidates[1]
    );

    // A connection closed and reopened on the same ports keeps its port.
    check(
        &mut f,
        &Case {
            what: "SNAT rst",
            hook: Xdp,
            src: client,
            dst: node_port,
            l4: TCP,
            tcp_flags: flags::RST | ACK,
        },
    );
    let t = check(
        &mut f,
        &Case {
            what: "SNAT reopened",
            hook: Xdp,
            src: client,
            dst: node_port,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["decision"], "new_flow");
    assert_eq!(json_sock(&t["snat"]["addr"]), node);
    assert_eq!(t["snat"]["port_state"], "reopened");

    // One port in the range, held by the first client's flow: a new flow to the same backend
    // finds no port.
    configure_snat(&mut f, node.port(), node.port());
    let third = clients([203, 0, 113, 8])
        .find(|c| backend_addr(&f, u64::from(maglev_pick(&f, &svc, *c, node_port))) == backend)
        .unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "no free SNAT port",
            hook: Xdp,
            src: third,
            dst: node_port,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(t["decision"], "drop_snat_ports");
    let explanation = t["explanation"].as_str().unwrap();
    assert!(explanation.contains("held by live flows"), "{explanation}");
    configure_snat(&mut f, snat::PORT_MIN, snat::PORT_MAX);

    // A backend on this node sees the client: DNAT only, and the stack delivers.
    let near = clients([203, 0, 113, 7])
        .find(|c| local(maglev_pick(&f, &svc, *c, node_port)))
        .unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "local backend",
            hook: Xdp,
            src: near,
            dst: node_port,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("new_flow"), &json!("pass"))
    );
    assert!(t["snat"].is_null());

    // UDP through tc, and its answer.
    let udp_port = SocketAddrV4::new(NODE, NODE_PORT_UDP);
    let udp_client = clients([203, 0, 113, 9])
        .find(|c| !local(maglev_pick_l4(&f, &svc, *c, udp_port, UDP)))
        .unwrap();
    let t = check(
        &mut f,
        &Case {
            what: "SNAT udp",
            hook: ExtIn,
            src: udp_client,
            dst: udp_port,
            l4: UDP,
            tcp_flags: 0,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("new_flow"), &json!("forward"))
    );
    let udp_node = json_sock(&t["snat"]["addr"]);
    assert_eq!(recorded_snat(&f, udp_client, udp_port, UDP), udp_node);
    let t = check(
        &mut f,
        &Case {
            what: "SNAT udp answer",
            hook: ExtIn,
            src: json_sock(&t["backend"]),
            dst: udp_node,
            l4: UDP,
            tcp_flags: 0,
        },
    );
    assert_eq!(t["decision"], "snat_reply");
    assert_eq!(json_sock(&t["output"]["dst"]), udp_client);

    // The views.
    let flows = f.json(&["ct", "list"]);
    let flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == client.to_string())
        .unwrap_or_else(|| panic!("no flow of {client} in {flows:#}"));
    assert_eq!(
        (&flow["frontend"], &flow["backend"], &flow["snat"]),
        (
            &json!(node_port.to_string()),
            &json!(backend.to_string()),
            &json!(node.to_string())
        )
    );
    assert!(
        !flow["reply"].is_null(),
        "paired with its reply entry: {flow:#}"
    );
    assert_eq!(flow["forward"]["flags"], json!(["snat"]));
    let near_flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == near.to_string())
        .unwrap();
    assert!(near_flow["snat"].is_null() && !near_flow["reply"].is_null());
    // The live planted holder has no forward entry: it shows as a reply-only flow of its
    // client, translated to the node. (The expired one was taken over by the second client.)
    let planted: Vec<&Value> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["forward"].is_null())
        .collect();
    assert_eq!(planted.len(), 1, "{flows:#}");
    assert_eq!(
        (&planted[0]["client"], &planted[0]["snat"]),
        (
            &json!("198.51.100.99:1234"),
            &json!(SocketAddrV4::new(NODE, second_candidates[0]).to_string())
        )
    );

    let ct = f.json(&["maps", "dump", "--map", "ct"]);
    let reply = ct["LB_CT"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dir"] == "reply" && e["dst"] == node.to_string())
        .unwrap();
    assert_eq!(
        (&reply["src"], &reply["nat"], &reply["snat"]),
        (
            &json!(backend.to_string()),
            &json!(node_port.to_string()),
            &json!(client.to_string())
        )
    );
    let config = f.json(&["maps", "dump", "--map", "config"]);
    assert_eq!(config["LB_CONFIG"][0]["snat_addr"], NODE.to_string());
    assert_eq!(config["LB_CONFIG"][0]["snat_enabled"], true);

    let stats = f.json(&["stats"]);
    let count = |reason: &str| {
        stats["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["reason"] == reason)
            .unwrap_or_else(|| panic!("{reason} missing from {stats:#}"))["packets"]
            .clone()
    };
    assert_eq!(count("drop_snat_ports"), 2);
    // Every translated packet of a source-NATed flow went straight out (routed namespace).
    assert_eq!(count("forwarded"), 9);

    for (args, needles) in [
        (
            vec!["ct", "list"],
            vec![node.to_string(), "snat".to_owned()],
        ),
        (
            vec!["maps", "dump", "--map", "config"],
            vec![
                "LB_CONFIG (1 entry)".to_owned(),
                format!("{}-{}", snat::PORT_MIN, snat::PORT_MAX),
            ],
        ),
        (
            vec!["maps", "dump", "--map", "addrs"],
            vec!["snat".to_owned()],
        ),
    ] {
        let text = f.text(&args);
        for needle in needles {
            assert!(text.contains(&needle), "{needle} missing from:\n{text}");
        }
    }
    let trace = [
        "trace",
        &backend.to_string(),
        &node.to_string(),
        "tcp",
        "--scope",
        "external",
    ];
    let text = f.text(&trace);
    assert!(
        text.contains("decision: snat_reply (forward)")
            && text.contains(&format!("output:   {node_port} -> {client}"))
            && text.contains("routed:   routed to its next hop by this node (FIB lookup"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hairpin: a pod balanced to itself.

/// The hairpin address the planner always programs (`lb_common::maps::hairpin::DEFAULT_ADDR`).
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Clears LB_CONFIG's `hairpin_addr`, which the planner never does: a node without a hairpin
/// address, written by hand.
fn clear_hairpin(f: &mut Fixture) {
    let mut config = f.maps.config.get(&0, 0).unwrap();
    config.hairpin_addr = Be32::from_host(0);
    f.maps.config.set(0, config, 0).unwrap();
}

#[test]
fn trace_predicts_hairpin_flows() {
    let Some(mut f) = Fixture::new() else { return };
    use Hook::*;
    const SYN: u8 = flags::SYN;
    const ACK: u8 = flags::ACK;
    // A ClusterIP whose only backend is the pod that connects to it.
    let svc = service(
        "self",
        vec![frontend(
            [172, 30, 0, 48],
            80,
            TCP,
            scope::INTERNAL,
            FrontendKind::ClusterIp,
        )],
        backends(true, &["10.0.8.8:8080"]),
    );
    f.program(&svc);
    let vip = sock("172.30.0.48:80");
    let pod = sock("10.0.8.8:40000");
    let as_seen = SocketAddrV4::new(HAIRPIN, pod.port());

    let t = check(
        &mut f,
        &Case {
            what: "hairpin new flow",
            hook: FromPod,
            src: pod,
            dst: vip,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"], &t["reason"]),
        (&json!("new_flow"), &json!("bounce"), &json!("new_flow"))
    );
    assert_eq!(
        (&t["snat"]["kind"], json_sock(&t["snat"]["addr"])),
        (&json!("hairpin"), as_seen)
    );
    assert_eq!(json_sock(&t["output"]["src"]), as_seen);
    let t = check(
        &mut f,
        &Case {
            what: "hairpin established",
            hook: FromPod,
            src: pod,
            dst: vip,
            l4: TCP,
            tcp_flags: ACK,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("established"), &json!("bounce"))
    );

    // The pod answers the hairpin address: the service answers the pod.
    let backend = sock("10.0.8.8:8080");
    let t = check(
        &mut f,
        &Case {
            what: "hairpin reply",
            hook: FromPod,
            src: backend,
            dst: as_seen,
            l4: TCP,
            tcp_flags: SYN | ACK,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"], &t["reason"]),
        (
            &json!("hairpin_reply"),
            &json!("bounce"),
            &json!("reply_nat")
        )
    );
    assert_eq!(
        (
            json_sock(&t["output"]["src"]),
            json_sock(&t["output"]["dst"])
        ),
        (vip, pod)
    );
    // Left alone on the reply path; anything else to the hairpin address passes untouched.
    let t = check(
        &mut f,
        &Case {
            what: "hairpin reply on the reply path",
            hook: ToPod,
            src: backend,
            dst: as_seen,
            l4: TCP,
            tcp_flags: ACK,
        },
    );
    assert_eq!(t["decision"], "snat_untouched");
    let t = check(
        &mut f,
        &Case {
            what: "hairpin address, no flow",
            hook: FromPod,
            src: backend,
            dst: SocketAddrV4::new(HAIRPIN, 40_001),
            l4: TCP,
            tcp_flags: ACK,
        },
    );
    assert_eq!(t["decision"], "not_served");
    assert!(t["reason"].is_null());

    let flows = f.json(&["ct", "list"]);
    assert_eq!(flows.as_array().unwrap().len(), 1, "{flows:#}");
    assert_eq!(
        (
            &flows[0]["client"],
            &flows[0]["snat"],
            &flows[0]["forward"]["flags"]
        ),
        (
            &json!(pod.to_string()),
            &json!(as_seen.to_string()),
            &json!(["established", "snat", "hairpin"])
        )
    );
    assert!(!flows[0]["reply"].is_null(), "{flows:#}");
    let config = f.json(&["maps", "dump", "--map", "config"]);
    assert_eq!(config["LB_CONFIG"][0]["hairpin_addr"], HAIRPIN.to_string());

    // Without a hairpin address the flow is only DNATed (and fails in the pod).
    clear_hairpin(&mut f);
    let t = check(
        &mut f,
        &Case {
            what: "no hairpin address",
            hook: FromPod,
            src: sock("10.0.8.8:40002"),
            dst: vip,
            l4: TCP,
            tcp_flags: SYN,
        },
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("new_flow"), &json!("pass"))
    );
    assert!(t["snat"].is_null());
}

// ---------------------------------------------------------------------------------------------
// Errors.

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn errors_say_what_to_do() {
    if !lb_testbed::privileges::require() {
        return;
    }
    // A bpffs without pins.
    let empty = TempMount::new(true);
    let out = lbctl(&empty.dir, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    assert!(
        msg.contains(&format!("no datapath is pinned at {}", empty.dir.display())),
        "{msg}"
    );
    assert!(msg.contains("--bpffs-dir"), "{msg}");
    let out = lbctl(&empty.dir.join("lb"), &["service", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no datapath is pinned"),
        "{}",
        stderr(&out)
    );

    // A directory that is no bpffs.
    let plain = TempMount::new(false);
    let out = lbctl(&plain.dir, &["ct", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no bpf filesystem is mounted"),
        "{}",
        stderr(&out)
    );

    // Wrong flags and values: clap's errors, exit code 2.
    let out = lbctl(&empty.dir, &["stats", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected argument '--bogus'"),
        "{}",
        stderr(&out)
    );
    let out = lbctl(&empty.dir, &["maps", "dump", "--map", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let msg = stderr(&out);
    assert!(
        msg.contains("unknown map `nope`") && msg.contains("LB_CT (ct)"),
        "{msg}"
    );
    let out = lbctl(
        &empty.dir,
        &["trace", "--reply", "--syn", "1.2.3.4:5", "5.6.7.8:9", "tcp"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    let out = lbctl(&empty.dir, &["trace", "1.2.3.4", "5.6.7.8:9", "sctp"]);
    assert_eq!(out.status.code(), Some(2));
    let out = lbctl(&empty.dir, &["stats", "--output", "yaml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn without_privileges_it_says_it_needs_root() {
    let Some(f) = Fixture::new() else { return };
    // `nobody` may not open the root-owned pins.
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .arg("--bpffs-dir")
        .arg(&f.pins)
        .arg("stats")
        .uid(65_534)
        .gid(65_534)
        .output()
        .expect("running lbctl as nobody");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
}
