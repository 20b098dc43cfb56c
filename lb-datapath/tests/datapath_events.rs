//! Rare events (`lb_common::events`) in the real programs (BPF_PROG_TEST_RUN): a rare drop reaches
//! userspace as a `log` record naming its reason and flow, a burst of them yields at most the
//! budget's records and the next record counts the rest, established and new flows record
//! nothing, and the event maps stay private to each loaded object while the others are pinned
//! and adopted. Needs root.

mod common;

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    bpffs::TempBpffs,
    harness::{
        Harness, Hook, TCP, UDP, addrs::*, cluster_ip, counts, harness, socket, tc, vip,
        with_external_scope, xdp,
    },
    packet::{Packet, flags},
};
use lb_common::{events, maps};
use lb_datapath::{
    Capacities, EventLog, Pinning, loader::check_pinned_maps, maglev::DEFAULT_TABLE_SIZE,
};

/// One record as a `log` logger receives it.
#[derive(Clone, Debug)]
struct Line {
    level: log::Level,
    target: String,
    message: String,
}

/// A `log` logger that keeps what it receives.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Line>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(Line {
            level: record.level(),
            target: record.target().to_owned(),
            message: record.args().to_string(),
        });
    }

    fn flush(&self) {}
}

/// The event log of `h`'s datapath, read into a [`Capture`].
fn capture(h: &mut Harness) -> (EventLog<Capture>, Capture) {
    let lines = Capture::default();
    let log =
        h.dp.event_log_with(lines.clone())
            .expect("the event log of a freshly loaded datapath");
    (log, lines)
}

/// What arrived since the last call.
fn drain(log: &mut EventLog<Capture>, lines: &Capture) -> Vec<Line> {
    log.flush();
    std::mem::take(&mut *lines.0.lock().unwrap())
}

/// A later fragment from `CLIENT` to `vip(53)` whose first fragment never came.
fn orphan_fragment(ip_id: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..64u8).collect();
    let [_, orphan] = Packet::udp(CLIENT, vip(53), &payload)
        .with_ip_id(ip_id)
        .fragments(32);
    orphan
}

/// The number a record gives of the events left unrecorded before it.
fn unrecorded(line: &Line) -> u64 {
    let (before, _) = line
        .message
        .split_once(" events unrecorded since the previous record")
        .unwrap_or_else(|| panic!("no unrecorded count in {line:?}"));
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unrecorded count in {line:?}"))
}

#[test]
fn a_rare_drop_reaches_userspace_naming_its_reason_and_flow() {
    let Some(mut h) = harness() else { return };
    let (mut log, lines) = capture(&mut h);

    // A later fragment without its first one, to a ClusterIP: dropped and recorded.
    h.program(&cluster_ip("dns", 53, UDP, &BACKENDS));
    assert_eq!(
        h.run(Hook::FromPod, &orphan_fragment(0x9999)).verdict,
        tc::SHOT
    );
    let got = drain(&mut log, &lines);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].level, log::Level::Warn);
    assert_eq!(got[0].target, "lb_ebpf::events");
    assert_eq!(
        got[0].message,
        "drop_fragment_no_state: later fragment 10.0.1.2 -> 172.30.0.41 (IP protocol 17, id \
         39321) dropped: its first fragment was not seen; 0 events unrecorded since the previous \
         record"
    );

    // A single-backend service whose backend slot was emptied behind its back (the agent
    // writes backends first, so only tampering gets here): inconsistent, dropped, recorded.
    let solo = cluster_ip("solo", 81, TCP, &[socket([10, 0, 3, 3], 8081)]);
    h.program(&solo);
    let backend = h.services.backend_id(socket([10, 0, 3, 3], 8081)).unwrap();
    h.maps
        .backends
        .set(backend, maps::Backend::default(), 0)
        .unwrap();
    let syn = Packet::tcp(CLIENT, vip(81), flags::SYN, &[]);
    assert_eq!(h.run(Hook::FromPod, &syn.bytes()).verdict, tc::SHOT);
    let got = drain(&mut log, &lines);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        got[0].message,
        format!(
            "drop_inconsistent_service: new flow 10.0.1.2:40000 -> 172.30.0.41:81 (IP protocol \
             6) dropped: backend set {} has no Maglev table or active backend for it (until the \
             agent's next sync); 0 events unrecorded since the previous record",
            h.set_id(&solo)
        )
    );
    assert_eq!(
        h.verdicts(),
        counts(&[
            ("drop_fragment_no_state", 1),
            ("drop_inconsistent_service", 1)
        ])
    );
}

#[test]
fn a_burst_of_rare_drops_yields_at_most_the_budget_and_the_next_record_counts_the_rest() {
    let Some(mut h) = harness() else { return };
    let (mut log, lines) = capture(&mut h);
    h.program(&cluster_ip("dns", 53, UDP, &BACKENDS));

    const BURST: u16 = 500;
    let start = Instant::now();
    for id in 1..=BURST {
        assert_eq!(h.run(Hook::FromPod, &orphan_fragment(id)).verdict, tc::SHOT);
    }
    let elapsed = start.elapsed();
    // Every drop is counted; the records stop at the budget: the burst, and what the rate
    // added while the packets ran.
    assert_eq!(
        h.verdicts(),
        counts(&[("drop_fragment_no_state", u64::from(BURST))])
    );
    let got = drain(&mut log, &lines);
    let allowed = events::BURST + events::RATE_PER_S * (elapsed.as_millis() as u64 + 999) / 1000;
    assert!(
        !got.is_empty() && got.len() as u64 <= allowed,
        "{} records for {BURST} events in {elapsed:?}, at most {allowed}",
        got.len()
    );
    assert!(
        got.iter()
            .all(|l| l.message.starts_with("drop_fragment_no_state: "))
    );

    // Once the budget has credit again, the next record says how many went unrecorded: with
    // the records, every event is accounted for (one CPU at a time here, so no race).
    std::thread::sleep(Duration::from_nanos(events::LIMIT.cost_ns) + Duration::from_millis(50));
    assert_eq!(h.run(Hook::FromPod, &orphan_fragment(0)).verdict, tc::SHOT);
    let next = drain(&mut log, &lines);
    assert_eq!(next.len(), 1, "{next:#?}");
    let recorded: u64 = got.iter().map(unrecorded).sum::<u64>() + got.len() as u64;
    assert_eq!(recorded + unrecorded(&next[0]), u64::from(BURST));
}

#[test]
fn established_and_new_flows_record_nothing() {
    let Some(mut h) = harness() else { return };
    let (mut log, lines) = capture(&mut h);
    let svc = with_external_scope(cluster_ip("web", 80, TCP, &BACKENDS));
    h.program(&svc);

    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    assert_eq!(h.run(Hook::FromPod, &syn.bytes()).verdict, tc::PASS);
    let data = Packet::tcp(CLIENT, vip(80), flags::ACK | flags::PSH, &[0x55; 64]);
    let reply = data
        .clone()
        .with_dst(backend)
        .reply(flags::ACK | flags::PSH, &[0x66; 64]);
    for _ in 0..100 {
        assert_eq!(h.run(Hook::FromPod, &data.bytes()).verdict, tc::PASS);
        assert_eq!(h.run(Hook::ToPod, &reply.bytes()).verdict, tc::PASS);
    }
    for i in 0..50u8 {
        for (hook, net, pass) in [
            (Hook::FromPod, 9, tc::PASS),
            (Hook::Xdp, 10, xdp::PASS),
            (Hook::ExtIn, 11, tc::PASS),
        ] {
            let client = std::net::SocketAddrV4::new(Ipv4Addr::new(10, 0, net, i), 41_000);
            let syn = Packet::tcp(client, vip(80), flags::SYN, &[]);
            assert_eq!(h.run(hook, &syn.bytes()).verdict, pass, "{hook:?}");
        }
    }
    assert_eq!(
        h.verdicts(),
        counts(&[
            ("new_flow", 1 + 3 * 50),
            ("established", 100),
            ("reply_nat", 100)
        ])
    );
    let got = drain(&mut log, &lines);
    assert!(got.is_empty(), "{got:#?}");
}

fn load_pinned(dir: &Path) -> Harness {
    check_pinned_maps(dir).expect("the pinned maps are adoptable");
    Harness::load(
        &Pinning::Dir(dir.to_owned()),
        Capacities::default(),
        DEFAULT_TABLE_SIZE,
    )
}

#[test]
fn the_event_maps_are_not_pinned_and_each_loaded_datapath_reads_its_own() {
    if !common::require_privileges() {
        return;
    }
    let bpffs = TempBpffs::new("events");
    let mut first = load_pinned(&bpffs.dir);
    first.program(&cluster_ip("dns", 53, UDP, &BACKENDS));
    let mut pinned: Vec<String> = maps::ALL
        .iter()
        .chain(&maps::TAIL_CALLS)
        .map(|n| (*n).to_owned())
        .collect();
    pinned.sort();
    assert_eq!(
        bpffs.pins(),
        pinned,
        "only the shared maps and the program arrays are pinned"
    );

    // A restarted agent adopts the pinned maps and reads its own programs' records.
    drop(first);
    let mut second = load_pinned(&bpffs.dir);
    let (mut log, lines) = capture(&mut second);
    assert_eq!(
        second.run(Hook::FromPod, &orphan_fragment(7)).verdict,
        tc::SHOT
    );
    let got = drain(&mut log, &lines);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].message.starts_with("drop_fragment_no_state: "));
    assert_eq!(bpffs.pins(), pinned);
}

/// Pins an array map `name` of one entry with `value_size`-byte values under `dir`, as an
/// earlier agent made it (raw `bpf()` calls: aya creates maps only from an object).
fn pin_array(dir: &Path, name: &str, value_size: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, value_size, 1]);
    // SAFETY: bpf(BPF_MAP_CREATE) with a zeroed attribute block of ample size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let path =
        std::ffi::CString::new(dir.join(name).into_os_string().into_encoded_bytes()).unwrap();
    let mut pin = [0u64; 2];
    pin[0] = path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: bpf(BPF_OBJ_PIN) with the path and the map's descriptor.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), size_of_val(&pin)) };
    assert_eq!(ret, 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// An earlier agent's 12-byte `LB_CONFIG` (before the node's flags) is replaced by this version's
/// (the agent writes all of it); a map of another shape is still refused.
#[test]
fn an_earlier_node_config_map_is_replaced_and_others_still_refused() {
    if !common::require_privileges() {
        return;
    }
    let bpffs = TempBpffs::new("config");
    pin_array(&bpffs.dir, maps::LB_CONFIG, 12);
    assert_eq!(
        check_pinned_maps(&bpffs.dir).expect("replaced"),
        [maps::LB_CONFIG]
    );
    let mut h = load_pinned(&bpffs.dir);
    h.set_node_flags(true, false);
    let config = lb_datapath::predict::node_config(&h.maps).unwrap();
    assert!(config.masquerade_all() && config.external_cluster_ips());
    drop(h);
    let other = TempBpffs::new("config-other");
    pin_array(&other.dir, maps::LB_ANSWERS, 12);
    assert!(check_pinned_maps(&other.dir).is_err());
}
