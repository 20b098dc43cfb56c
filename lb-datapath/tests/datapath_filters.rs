//! The filters in front of the datapath's lookups (`lb_common::filters`) in the real programs
//! (BPF_PROG_TEST_RUN): replies of translated flows are restored and frontends served as
//! before, a packet whose source never sent a reply or whose destination is no flow's or
//! frontend's skips the lookups, and an agent that replaces programs which did not mark
//! completes the filters from what the maps hold. Needs root.

mod common;

use std::net::SocketAddrV4;

use common::{
    bpffs::TempBpffs,
    harness::{Harness, Hook, TCP, addrs::*, cluster_ip, setup, vip, web_flow},
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::{
    Be16,
    conntrack::{FORWARD, REPLY},
    maps::{FrontendKey, scope},
    stats::Reason,
};
use lb_datapath::{
    Capacities, Pinning, filters,
    maglev::DEFAULT_TABLE_SIZE,
    model::FrontendKind,
    predict::{self, Forward, Reply},
};

/// The reply entry of `CLIENT`'s flow to `backend`, copied under the key of `source` instead:
/// what a program that does not mark (an earlier version's) would have written for a flow to
/// `source`.
fn unmarked_reply(h: &mut Harness, backend: SocketAddrV4, source: SocketAddrV4) {
    let key = predict::flow_key(backend, CLIENT, TCP, REPLY);
    let entry = h.maps.ct.get(&key, 0).expect("the flow's reply entry");
    let copy = predict::flow_key(source, CLIENT, TCP, REPLY);
    h.maps.ct.insert(copy, entry, 0).unwrap();
}

fn may_be_reply(h: &Harness, source: SocketAddrV4) -> bool {
    filters::may_be_reply(
        &h.maps,
        (*source.ip()).into(),
        Be16::from_host(source.port()),
        TCP,
    )
    .unwrap()
}

#[test]
fn a_flow_marks_its_backend_and_only_marked_sources_are_looked_up() {
    let Some((mut h, _svc, _syn, backend)) = web_flow() else {
        return;
    };
    assert_eq!(
        filters::state(&h.maps).unwrap(),
        (true, 1, 1),
        "complete from the load; the flow marked its backend, the frontend its destination"
    );
    assert!(may_be_reply(&h, backend));

    // The backend's answer is restored to the frontend, as before the filter.
    let answer = Packet::tcp(backend, CLIENT, flags::SYN | flags::ACK, &[]);
    let run = h.run(Hook::ToPod, &answer.bytes());
    assert_frame_eq(
        &run.out,
        &answer.clone().with_src(vip(80)).bytes(),
        "the reply",
    );

    // A source no flow marked: even a conntrack entry under its key is not looked for.
    let other = SocketAddrV4::new(*backend.ip(), backend.port() + 1);
    assert!(!may_be_reply(&h, other), "another slot (the test's ports)");
    unmarked_reply(&mut h, backend, other);
    let stray = Packet::tcp(other, CLIENT, flags::ACK, &[]);
    let replies = h.verdict_count(Reason::ReplyNat);
    let run = h.run(Hook::ToPod, &stray.bytes());
    assert_frame_eq(
        &run.out,
        &stray.bytes(),
        "an unmarked source passes as it is",
    );
    assert_eq!(h.verdict_count(Reason::ReplyNat), replies);
    assert!(matches!(
        predict::reply(&h.maps, other, CLIENT, TCP).unwrap(),
        Reply::NotTracked
    ));

    // Marked (what every writer of a reply entry does first), it is restored.
    let key = predict::flow_key(other, CLIENT, TCP, REPLY);
    filters::mark_reply(&mut h.maps, &key).unwrap();
    let run = h.run(Hook::ToPod, &stray.bytes());
    assert_frame_eq(
        &run.out,
        &stray.clone().with_src(vip(80)).bytes(),
        "a marked source is looked up",
    );
    assert!(matches!(
        predict::reply(&h.maps, other, CLIENT, TCP).unwrap(),
        Reply::ReverseNat { .. }
    ));
}

#[test]
fn an_agent_completes_the_filter_from_the_flows_earlier_programs_recorded() {
    if !common::require_privileges() {
        return;
    }
    let bpffs = TempBpffs::new("replysrc");
    let mut h = Harness::load(
        &Pinning::Dir(bpffs.dir.clone()),
        Capacities::default(),
        DEFAULT_TABLE_SIZE,
    );
    let svc = cluster_ip("web", 80, TCP, &BACKENDS[..1]);
    h.program(&svc);
    let backend = BACKENDS[0];
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    // A flow recorded by a program that did not mark.
    let earlier = SocketAddrV4::new(*backend.ip(), backend.port() + 1);
    unmarked_reply(&mut h, backend, earlier);
    let answer = Packet::tcp(earlier, CLIENT, flags::ACK, &[]);
    let restored = answer.clone().with_src(vip(80)).bytes();

    // Pinned maps may hold such flows: until the agent completes the filter, every packet is
    // looked up.
    filters::suspend(&mut h.maps).unwrap();
    assert_eq!(filters::state(&h.maps).unwrap(), (false, 1, 1));
    let run = h.run(Hook::ToPod, &answer.bytes());
    assert_frame_eq(&run.out, &restored, "while the filter is withdrawn");

    // The agent marks what conntrack holds and puts the filter back: the flow keeps its
    // translation.
    assert_eq!(
        filters::complete(&mut h.maps).unwrap(),
        3,
        "two reply sources, one destination (the frontend's and its flow's)"
    );
    assert_eq!(filters::state(&h.maps).unwrap(), (true, 2, 1));
    let run = h.run(Hook::ToPod, &answer.bytes());
    assert_frame_eq(&run.out, &restored, "after the agent completed the filter");
}

#[test]
fn packets_to_a_frontends_address_on_another_port_skip_the_lookups() {
    // An externalIP (an address that may carry other traffic than its frontends, unlike a
    // ClusterIP).
    let mut svc = cluster_ip("web", 80, TCP, &BACKENDS[..1]);
    svc.frontends[0].kind = FrontendKind::ExternalIp;
    let Some(mut h) = setup(&svc) else {
        return;
    };
    let backend = BACKENDS[0];
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let run = h.run(Hook::FromPod, &syn.bytes());
    assert_frame_eq(&run.out, &syn.clone().with_dst(backend).bytes(), "balanced");

    // A flow to another port of the address, recorded by a program that did not mark: not
    // looked for, the port is no frontend's: the packet passes as it is.
    let forward = predict::flow_key(CLIENT, vip(80), TCP, FORWARD);
    let entry = h.maps.ct.get(&forward, 0).unwrap();
    let other = predict::flow_key(CLIENT, vip(81), TCP, FORWARD);
    h.maps.ct.insert(other, entry, 0).unwrap();
    let stray = Packet::tcp(CLIENT, vip(81), flags::ACK, b"GET /");
    let run = h.run(Hook::FromPod, &stray.bytes());
    assert_frame_eq(&run.out, &stray.bytes(), "an unmarked destination passes");
    assert!(matches!(
        predict::forward(&h.maps, CLIENT, vip(81), TCP, scope::INTERNAL, false).unwrap(),
        Forward::PassNotServed { .. }
    ));

    // Its destination marked (as the programs do before they write a forward entry), the flow
    // is found and continues.
    let key = FrontendKey {
        addr: (*vip(81).ip()).into(),
        port: Be16::from_host(81),
        proto: TCP,
        scope: scope::INTERNAL,
    };
    filters::mark_frontends(&mut h.maps, &[key.into()]).unwrap();
    let run = h.run(Hook::FromPod, &stray.bytes());
    assert_frame_eq(
        &run.out,
        &stray.clone().with_dst(backend).bytes(),
        "a marked destination is looked up",
    );
    assert!(matches!(
        predict::forward(&h.maps, CLIENT, vip(81), TCP, scope::INTERNAL, false).unwrap(),
        Forward::Established { .. }
    ));
}
