//! Which SNAT port an external flow gets under sustained load (BPF_PROG_TEST_RUN): each port of a
//! client has a home port of its own, which the client's next connection from that port takes
//! again over the backend's TIME_WAIT of the one before; and replies to ports of the previous
//! default range still find the flows an agent of that default left. Needs root; every test runs
//! in a routed namespace of its own (`common::external`).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    external::*,
    harness::{Hook, TCP, xdp},
    packet::{assert_frame_eq, flags},
};
use lb_common::{
    Be32,
    conntrack::ct_flags,
    maps::snat::{PORT_MAX, PORT_MIN, PREVIOUS_PORT_MIN},
    stats::Reason,
};

/// The home port of `client` in the default range.
fn home(client: SocketAddrV4) -> u16 {
    home_port(client, PORT_MIN, PORT_MAX)
}

/// A client cycling through its ports (netperf TCP_CRR, any busy HTTP client) comes back to
/// each port every few seconds, while the backend still holds the previous connection of that
/// port in TIME_WAIT. Each of its ports has a home port of its own, the next one's the next
/// port, and the new connection takes its home again: the backend sees the same four addresses
/// and ports as before, whose TCP timestamps are newer, and takes the SYN at once. Another
/// client's flow never takes a home held in TIME_WAIT while a free port is left.
#[test]
fn a_client_port_that_comes_back_gets_its_home_port_again_over_the_backends_time_wait() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, PORT_MIN, PORT_MAX);
        let client = CLIENT;
        let next = SocketAddrV4::new(*client.ip(), client.port() + 1);
        let port = open_snat_flow(h, client);
        assert_eq!(port, home(client));
        assert_eq!(open_snat_flow(h, next), home(next));
        let after = if port == PORT_MAX { PORT_MIN } else { port + 1 };
        assert_eq!(home(next), after, "consecutive ports, consecutive homes");
        close_backend_first(h, client, port);

        // Another client whose home is that port finds it in TIME_WAIT and takes a free one.
        let other = (1..=u16::MAX)
            .map(|p| SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 3), p))
            .find(|c| home(*c) == port)
            .unwrap();
        let other_port = open_snat_flow(h, other);
        assert_ne!(
            other_port, port,
            "a free port before another client's TIME_WAIT"
        );
        close_backend_first(h, other, other_port);

        // The client's port comes again: its home, over its own TIME_WAIT.
        let reopened = open_snat_flow(h, client);
        assert_eq!(reopened, port, "the same port as the connection before");
        let entry = h.maps.ct.get(&remote_reply_key(port), 0).unwrap();
        assert_eq!(entry.snat_addr, Be32::from(*client.ip()));
        assert!(!ct_flags::closed(entry.flags), "flags {:#x}", entry.flags);
        assert_eq!(h.verdict_count(Reason::DropSnatPorts), 0);
    });
}

/// An agent upgraded from a release whose default range was 61000-65535 serves the new range,
/// but replies to the ports of the flows the old one source-NATed still reach their clients.
#[test]
fn replies_to_ports_of_the_previous_default_range_still_find_their_flows() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, PREVIOUS_PORT_MIN, PREVIOUS_PORT_MIN);
        let port = open_snat_flow(h, CLIENT);
        assert_eq!(port, PREVIOUS_PORT_MIN);
        // The new agent's range.
        configure_snat(h, PORT_MIN, PORT_MAX);

        let reply = from_remote_pod(port, flags::ACK | flags::PSH);
        let run = h.run(Hook::Xdp, &reply.bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_frame_eq(
            &run.out,
            &routed(reply.with_src(node_port()).with_dst(CLIENT), CLIENT_MAC),
            "the reply reversed",
        );
        let ack = from_client(CLIENT, flags::ACK);
        let run = h.run(Hook::Xdp, &ack.bytes());
        assert_frame_eq(
            &run.out,
            &routed(
                ack.with_dst(REMOTE_POD)
                    .with_src(SocketAddrV4::new(NODE, port)),
                OTHER_NODE_MAC,
            ),
            "the client's next segment keeps the old port",
        );
        // A new flow gets a port of the new range.
        let new = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
        assert!((PORT_MIN..=PORT_MAX).contains(&open_snat_flow(h, new)));
    });
}
