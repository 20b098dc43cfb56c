//! Conntrack carried over into a map of another shape (`lb_datapath::ct_carry`), as an agent
//! upgrade does it, in the real programs (BPF_PROG_TEST_RUN): between the bulk copy and the last
//! one, the old programs (still attached on some interfaces) keep opening flows in the old map;
//! the new programs must know those flows at once. Needs root.

mod common;

use std::net::SocketAddrV4;

use common::{
    bpffs::TempBpffs,
    harness::{Harness, Hook, TCP, addrs::*, cluster_ip, vip},
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::stats::Reason;
use lb_datapath::{Capacities, Pinning, ct_carry, maglev::DEFAULT_TABLE_SIZE};

fn load(bpffs: &TempBpffs, capacities: Capacities) -> Harness {
    Harness::load(
        &Pinning::Dir(bpffs.dir.clone()),
        capacities,
        DEFAULT_TABLE_SIZE,
    )
}

/// The verdict counters (shared by both datapaths: the counters' pin is adopted).
fn counted(h: &Harness) -> [u64; 3] {
    [Reason::NewFlow, Reason::Established, Reason::ReplyNat].map(|r| h.verdict_count(r))
}

#[test]
fn a_flow_the_old_programs_open_while_flows_are_carried_over_is_known_to_the_new_ones() {
    if !common::require_privileges() {
        return;
    }
    let bpffs = TempBpffs::new("carry");
    let backend = BACKENDS[0];
    // The earlier agent's datapath, its conntrack map of another capacity, one flow open.
    let mut old = load(
        &bpffs,
        Capacities {
            ct: 4096,
            ..Capacities::default()
        },
    );
    old.program(&cluster_ip("web", 80, TCP, &BACKENDS[..1]));
    old.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );

    // The new agent, as it starts: the old map set aside, the load, the bulk copy, and the
    // fallback on before its programs are attached.
    let capacities = Capacities::default();
    let set_aside = ct_carry::set_aside(&bpffs.dir, ct_carry::map_entries(capacities.ct));
    assert!(
        set_aside.unwrap().is_some(),
        "the old map is of another shape"
    );
    let mut new = load(&bpffs, capacities);
    assert_eq!(ct_carry::copy_old(&bpffs.dir, &mut new.maps.ct).unwrap(), 2);
    new.dp.set_ct_carrying(true).unwrap();

    // An old program opens a flow after the bulk copy; its answer and next packets meet new
    // programs: the reply is reverse-NATed, the client's packet continues the flow.
    let late = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    let syn = Packet::tcp(late, vip(80), flags::SYN, &[]);
    let run = old.run(Hook::FromPod, &syn.bytes());
    assert_frame_eq(&run.out, &syn.clone().with_dst(backend).bytes(), "old");
    let before = counted(&new);
    let answer = Packet::tcp(backend, late, flags::SYN | flags::ACK, &[]);
    let run = new.run(Hook::ToPod, &answer.bytes());
    assert_frame_eq(
        &run.out,
        &answer.clone().with_src(vip(80)).bytes(),
        "the answer to a flow only the old map held",
    );
    let ack = Packet::tcp(late, vip(80), flags::ACK, b"GET /");
    let run = new.run(Hook::FromPod, &ack.bytes());
    assert_frame_eq(&run.out, &ack.clone().with_dst(backend).bytes(), "next");
    let after = counted(&new);
    assert_eq!(
        [0, 1, 2].map(|i| after[i] - before[i]),
        [0, 1, 1],
        "(new_flow, established, reply_nat): the flow continued"
    );

    // The last copy; then the new programs no longer look at the old map.
    ct_carry::finish(&bpffs.dir, &mut new.maps.ct).unwrap();
    new.dp.set_ct_carrying(false).unwrap();
    assert!(!bpffs.dir.join(ct_carry::OLD_PIN).exists());
    let later = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 2);
    old.run(
        Hook::FromPod,
        &Packet::tcp(later, vip(80), flags::SYN, &[]).bytes(),
    );
    let stray = Packet::tcp(backend, later, flags::SYN | flags::ACK, &[]);
    let run = new.run(Hook::ToPod, &stray.bytes());
    assert_frame_eq(
        &run.out,
        &stray.bytes(),
        "after the carry-over, the old map is not read",
    );
}
