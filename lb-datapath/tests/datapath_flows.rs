//! Flows in the real datapath programs (BPF_PROG_TEST_RUN) while their service changes: an
//! established flow keeps its backend when the Maglev table changes and when its backend left
//! (even once its slot holds another backend), and is balanced anew after it closed; a removed
//! service leaves nothing behind; and how long conntrack entries live and when a packet rewrites
//! them. Service changes go through the agent's planner and writer. Needs root.

mod common;

use std::net::SocketAddrV4;

use common::{
    harness::{
        Harness, Hook, TCP, UDP, addrs::*, cluster_ip, counts, setup, socket, tc, vip, web_flow,
    },
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::maps::scope::INTERNAL;
use lb_common::{
    Be32,
    conntrack::{FORWARD, FlowKey, REPLY, ct_flags, timeout},
    stats::Reason,
};
use lb_datapath::{
    Capacities, Pinning,
    maglev::DEFAULT_TABLE_SIZE,
    predict::{self, Forward, SourceNat, flow_key},
    program::{BackendSpec, FrontendKind, FrontendSpec},
};

fn forward_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    flow_key(src, dst, proto, FORWARD)
}

#[test]
fn an_established_flow_keeps_its_backend_when_the_table_changes() {
    let Some((mut h, svc, _, backend)) = web_flow() else {
        return;
    };

    // The flow's backend leaves the table (weight 0) but keeps existing: new flows avoid it,
    // the established flow stays on it.
    let mut changed = svc.clone();
    for b in &mut changed.backends {
        if b.addr == backend {
            b.weight = 0;
        }
    }
    h.program(&changed);
    let ack = Packet::tcp(
        CLIENT,
        vip(80),
        flags::ACK | flags::PSH,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let run = h.run(Hook::FromPod, &ack.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &ack.clone().with_dst(backend).bytes(),
        "established segment",
    );

    for port in 41_000..41_050 {
        let client = SocketAddrV4::new(*CLIENT.ip(), port);
        let run = h.run(
            Hook::FromPod,
            &Packet::tcp(client, vip(80), flags::SYN, &[]).bytes(),
        );
        let chosen = h.expected_backend(&changed, client, vip(80), TCP);
        assert_ne!(chosen, backend);
        assert_frame_eq(
            &run.out,
            &Packet::tcp(client, vip(80), flags::SYN, &[])
                .with_dst(chosen)
                .bytes(),
            "new flow",
        );
    }
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 51), ("established", 1)])
    );
}

/// kube-proxy never flushes TCP conntrack: an established connection keeps its backend when the
/// backend leaves the service (a readiness failure, a relabelling), also once its slot in the
/// backends map holds another backend.
#[test]
fn an_established_flow_keeps_its_backend_after_it_left_and_its_slot_was_reused() {
    let Some((mut h, svc, _, backend)) = web_flow() else {
        return;
    };
    let slot = h.services.backend_id(backend).unwrap();

    // The backend leaves; a new one comes, and the planner gives it the freed slot.
    let mut replaced = svc.clone();
    let gone = replaced
        .backends
        .iter()
        .position(|b| b.addr == backend)
        .unwrap();
    replaced.backends.remove(gone);
    h.program(&replaced);
    let newcomer = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 3, 9), 8080);
    replaced.backends.push(BackendSpec::local(newcomer));
    h.program(&replaced);
    assert_eq!(
        h.services.backend_id(newcomer),
        Some(slot),
        "the slot was reused"
    );

    let ack = Packet::tcp(CLIENT, vip(80), flags::ACK, b"more");
    let run = h.run(Hook::FromPod, &ack.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &ack.with_dst(backend).bytes(),
        "still the backend it opened with",
    );
    assert_eq!(h.verdicts(), counts(&[("new_flow", 1), ("established", 1)]));
}

/// Removing a service goes through the planner too: its frontends, address, table and backend
/// slots go, and new packets to its address pass untouched. The counters it had stay.
#[test]
fn a_removed_service_leaves_nothing_behind() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    let (set_id, table_size) = (h.set_id(&svc), h.services.table_size("web").unwrap());
    assert!(h.maps.maglev_table(set_id, table_size).is_ok());

    h.remove("web");
    assert_eq!(h.maps.services.keys().count(), 0, "no frontend");
    assert!(h.maps.active_backends().unwrap().is_empty(), "no backend");
    assert!(h.maps.maglev_table(set_id, table_size).is_err(), "no table");
    assert!(h.maps.addrs.get(&Be32::from(VIP), 0).is_err(), "no address");
    let other_client = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    let syn = Packet::tcp(other_client, vip(80), flags::SYN, &[]).bytes();
    let run = h.run(Hook::FromPod, &syn);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(&run.out, &syn, "untouched");
    assert_eq!(h.verdicts(), counts(&[("new_flow", 1)]));
}

#[test]
fn a_syn_after_close_balances_the_ports_anew() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    // A retransmitted SYN of the open flow stays put.
    let mut changed = svc.clone();
    for b in &mut changed.backends {
        if b.addr == backend {
            b.weight = 0;
        }
    }
    h.program(&changed);
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    assert_frame_eq(
        &h.run(Hook::FromPod, &syn.bytes()).out,
        &syn.clone().with_dst(backend).bytes(),
        "SYN retransmit",
    );
    // The client closes: half closed, a SYN on these ports is still this connection's.
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::FIN | flags::ACK, &[]).bytes(),
    );
    assert_frame_eq(
        &h.run(Hook::FromPod, &syn.bytes()).out,
        &syn.clone().with_dst(backend).bytes(),
        "SYN after the client's FIN",
    );
    // The backend closes too (its FIN goes through the reply path, which tells the forward
    // entry): closed both ways, a new connection on the same ports goes where Maglev says now.
    h.run(
        Hook::ToPod,
        &Packet::tcp(backend, CLIENT, flags::FIN | flags::ACK, &[]).bytes(),
    );
    let now = h.expected_backend(&changed, CLIENT, vip(80), TCP);
    assert_frame_eq(
        &h.run(Hook::FromPod, &syn.bytes()).out,
        &syn.with_dst(now).bytes(),
        "SYN after both FINs",
    );
}

#[test]
fn an_established_flow_writes_its_entry_only_when_timeouts_need_it() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let key = forward_key(CLIENT, vip(80), TCP);
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    let syn_entry = h.maps.ct.get(&key, 0).unwrap();
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::ACK, &[]).bytes(),
    );
    let established = h.maps.ct.get(&key, 0).unwrap();
    assert!(
        established.deadline_ns > syn_entry.deadline_ns,
        "the handshake extends the lifetime"
    );
    for _ in 0..20 {
        h.run(
            Hook::FromPod,
            &Packet::tcp(CLIENT, vip(80), flags::ACK | flags::PSH, b"data").bytes(),
        );
    }
    assert_eq!(
        h.maps.ct.get(&key, 0).unwrap(),
        established,
        "no rewrite within the refresh interval"
    );
    assert_eq!(h.verdict_count(Reason::Established), 21);
}

/// As with nf_conntrack: a UDP exchange (a DNS query and its answer) holds its entries for 30 s,
/// and a flow still sending 2 s after it opened is a stream, which lives 120 s.
#[test]
fn udp_flows_live_30_s_and_streams_120_s() {
    let svc = cluster_ip("dns", 53, UDP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let key = forward_key(CLIENT, vip(53), UDP);
    let query = Packet::udp(CLIENT, vip(53), b"query");
    let before = predict::coarse_now_ns();
    h.run(Hook::FromPod, &query.bytes());
    let after = predict::coarse_now_ns();
    let opened = h.maps.ct.get(&key, 0).unwrap();
    assert!(
        (before + timeout::UDP..=after + timeout::UDP).contains(&opened.deadline_ns),
        "a new UDP flow lives 30 s"
    );
    assert_eq!(opened.flags & ct_flags::ESTABLISHED, 0);
    h.run(Hook::FromPod, &query.bytes());
    assert_eq!(
        h.maps.ct.get(&key, 0).unwrap(),
        opened,
        "within its first 2 s, a packet writes nothing"
    );

    // Three seconds later, it still sends: a stream.
    let mut aged = opened;
    aged.deadline_ns -= 3_000_000_000;
    h.maps.ct.insert(key, aged, 0).unwrap();
    let before = predict::coarse_now_ns();
    h.run(Hook::FromPod, &query.bytes());
    let after = predict::coarse_now_ns();
    let stream = h.maps.ct.get(&key, 0).unwrap();
    assert_ne!(stream.flags & ct_flags::ESTABLISHED, 0);
    assert!(
        (before + timeout::UDP_STREAM..=after + timeout::UDP_STREAM).contains(&stream.deadline_ns),
        "a UDP stream lives 120 s"
    );
}

/// Each direction learns the other's close and lifetime: a backend that has not answered yet
/// keeps its reply entry as long as the established connection, and once both sides closed the
/// forward entry lives out TIME_WAIT (120 s), not the hour a half-closed flow gets.
#[test]
fn each_direction_learns_the_others_state() {
    let Some((mut h, _svc, _syn, backend)) = web_flow() else {
        return;
    };
    let forward = forward_key(CLIENT, vip(80), TCP);
    let reply = flow_key(backend, CLIENT, TCP, REPLY);
    let lifetime = |h: &Harness, key: &FlowKey| {
        let entry = h.maps.ct.get(key, 0).unwrap();
        entry.deadline_ns.saturating_sub(predict::coarse_now_ns())
    };
    // The client completes the handshake; the backend has not spoken.
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::ACK, &[]).bytes(),
    );
    assert!(
        lifetime(&h, &reply) > timeout::TCP_FIN,
        "the silent backend's entry lives as long as the connection"
    );
    // The client closes, then the backend.
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::FIN | flags::ACK, &[]).bytes(),
    );
    assert!(
        lifetime(&h, &forward) > timeout::TCP_TIME_WAIT,
        "half closed"
    );
    h.run(
        Hook::ToPod,
        &Packet::tcp(backend, CLIENT, flags::FIN | flags::ACK, &[]).bytes(),
    );
    let entry = h.maps.ct.get(&forward, 0).unwrap();
    assert_ne!(entry.flags & ct_flags::PEER_FIN, 0, "{entry:?}");
    assert!(
        lifetime(&h, &forward) <= timeout::TCP_TIME_WAIT,
        "closed both ways: TIME_WAIT"
    );
}

/// Linux gives one local port to connections with different destinations: a pod may reach the
/// same backend from one port through the ClusterIP and through a LoadBalancer IP of the same
/// Service. The second flow must not take the first's reply entry: as nf_nat does, it gets
/// another source port (the client's address kept), and each flow's replies come back from its
/// own frontend to the client's own port. The predictor tells the same.
#[test]
fn two_flows_of_one_client_port_to_one_backend_both_live() {
    let lb_ip = SocketAddrV4::new(std::net::Ipv4Addr::new(192, 168, 77, 10), 80);
    for l4_proto in [TCP, UDP] {
        let mut svc = cluster_ip("web", 80, l4_proto, &BACKENDS[..1]);
        svc.frontends.push(FrontendSpec {
            addr: *lb_ip.ip(),
            kind: FrontendKind::LoadBalancer,
            ..svc.frontends[0]
        });
        let Some(mut h) = setup(&svc) else {
            return;
        };
        let backend = BACKENDS[0];
        let first = |dst| match l4_proto {
            TCP => Packet::tcp(CLIENT, dst, flags::SYN, &[]),
            _ => Packet::udp(CLIENT, dst, b"query"),
        };
        let run = h.run(Hook::FromPod, &first(vip(80)).bytes());
        assert_frame_eq(
            &run.out,
            &first(vip(80)).with_dst(backend).bytes(),
            "the first flow keeps its port",
        );

        // The second flow of the same client port: the predictor and the datapath agree on
        // the port it gets instead.
        let predicted = predict::forward(&h.maps, CLIENT, lb_ip, l4_proto, INTERNAL, true).unwrap();
        let Forward::NewFlow {
            snat: Some(SourceNat::ClientPort(choice)),
            ..
        } = predicted
        else {
            panic!("{l4_proto}: predicted {predicted:?}");
        };
        let remapped = choice.source;
        assert_eq!(remapped.ip(), CLIENT.ip(), "the client keeps its address");
        assert_ne!(remapped.port(), CLIENT.port());
        let run = h.run(Hook::FromPod, &first(lb_ip).bytes());
        assert_eq!(run.verdict, tc::PASS);
        assert_frame_eq(
            &run.out,
            &first(lb_ip).with_dst(backend).with_src(remapped).bytes(),
            "the second flow gets another port",
        );

        // Each flow's replies come back from its own frontend, to the client's own port.
        let answer = |dst| match l4_proto {
            TCP => Packet::tcp(backend, dst, flags::SYN | flags::ACK, &[]),
            _ => Packet::udp(backend, dst, b"answer"),
        };
        for (dst, frontend) in [(CLIENT, vip(80)), (remapped, lb_ip)] {
            assert_eq!(
                predict::reply(&h.maps, backend, dst, l4_proto).unwrap(),
                predict::Reply::ReverseNat {
                    frontend,
                    client: (dst != CLIENT).then_some(CLIENT),
                    set_id: h.set_id(&svc),
                    backend_id: h.services.backend_id(backend).unwrap(),
                    entry: h
                        .maps
                        .ct
                        .get(&flow_key(backend, dst, l4_proto, REPLY), 0)
                        .unwrap(),
                },
            );
            let run = h.run(Hook::ToPod, &answer(dst).bytes());
            assert_eq!(run.verdict, tc::PASS);
            assert_frame_eq(
                &run.out,
                &answer(dst).with_src(frontend).with_dst(CLIENT).bytes(),
                "reply",
            );
        }

        // Both flows go on, each on its own source port.
        let more = |dst| match l4_proto {
            TCP => Packet::tcp(CLIENT, dst, flags::ACK, b"more"),
            _ => Packet::udp(CLIENT, dst, b"more"),
        };
        for (frontend, src) in [(vip(80), CLIENT), (lb_ip, remapped)] {
            let run = h.run(Hook::FromPod, &more(frontend).bytes());
            assert_frame_eq(
                &run.out,
                &more(frontend).with_dst(backend).with_src(src).bytes(),
                "established",
            );
        }
        assert_eq!(
            h.verdicts(),
            counts(&[("new_flow", 2), ("reply_nat", 2), ("established", 2)]),
            "{l4_proto}"
        );
    }
}

/// Conntrack holds its whole capacity whichever CPU flows open on: a burst of flows that all
/// land on one CPU (as RSS puts one busy client's flows) keeps every entry until the map holds
/// the capacity asked for. With per-CPU LRU lists that CPU would get only its share.
#[test]
fn conntrack_holds_its_capacity_whichever_cpu_the_flows_open_on() {
    if !common::require_privileges() {
        return;
    }
    const CAPACITY: u32 = 4_096;
    let capacities = Capacities {
        ct: CAPACITY,
        ..Capacities::default()
    };
    let mut h = Harness::load(&Pinning::None, capacities, DEFAULT_TABLE_SIZE);
    h.program(&cluster_ip("web", 80, TCP, &BACKENDS));
    run_on_cpu(0);
    for flow in 0..CAPACITY / 2 {
        let [hi, lo] = u16::try_from(flow).unwrap().to_be_bytes();
        let client = socket([10, 1, hi, lo], 40_000);
        h.run(
            Hook::FromPod,
            &Packet::tcp(client, vip(80), flags::SYN, &[]).bytes(),
        );
    }
    assert_eq!(h.verdict_count(Reason::NewFlow), u64::from(CAPACITY / 2));
    assert_eq!(
        h.maps.ct.keys().count(),
        CAPACITY as usize,
        "every flow keeps both its entries"
    );
}

/// Moves the calling thread to `cpu` (BPF_PROG_TEST_RUN runs programs on the caller's CPU).
fn run_on_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it; the call reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A source 0.0.0.0 has no port range of its own to move to (`snat::client_port_range` has no
/// address): the second flow of its port to the same backend finds no port and is dropped,
/// and the predictor says so. (Found by the fuzz test: the predictor gave it a port.)
#[test]
fn a_clashing_flow_from_the_unspecified_address_gets_no_port() {
    let lb_ip = SocketAddrV4::new(std::net::Ipv4Addr::new(192, 168, 77, 10), 80);
    let mut svc = cluster_ip("web", 80, TCP, &BACKENDS[..1]);
    svc.frontends.push(FrontendSpec {
        addr: *lb_ip.ip(),
        kind: FrontendKind::LoadBalancer,
        ..svc.frontends[0]
    });
    let Some(mut h) = setup(&svc) else { return };
    let client = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 40_000);
    h.run(
        Hook::FromPod,
        &Packet::tcp(client, vip(80), flags::SYN, &[]).bytes(),
    );

    let predicted = predict::forward(&h.maps, client, lb_ip, TCP, INTERNAL, true).unwrap();
    assert!(
        matches!(
            predicted,
            Forward::DropSnatPorts {
                failure: predict::SnatFailure::ClientPortsTaken { .. },
                ..
            }
        ),
        "{predicted:?}"
    );
    let run = h.run(
        Hook::FromPod,
        &Packet::tcp(client, lb_ip, flags::SYN, &[]).bytes(),
    );
    assert_eq!(run.verdict, tc::SHOT);
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 1), ("drop_snat_ports", 1)])
    );
}
