//! Upgrading the agent: the previous release's agent programs and pins the datapath, then this
//! version's agent takes it over, while a connection is held open and new ones keep coming.
//! Nothing may be lost: the held connection keeps its backend, every new connection succeeds,
//! and the frontends keep their backend sets (the new agent adopted the maps instead of
//! reprogramming them).
//!
//! The previous release's agent is built from this repository's history by `cargo xtask test`
//! (see `xtask/src/previous.rs`), which names it in `$LB_PREVIOUS_AGENT`. Needs root.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use common::agent::{AgentBed, backend_ip, slice_yaml};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// The previous release's agent, from `$LB_PREVIOUS_AGENT`. Without it the test cannot run, and
/// says so by failing: a green run must mean the upgrade was tried.
fn previous_agent() -> PathBuf {
    let path = std::env::var_os("LB_PREVIOUS_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "LB_PREVIOUS_AGENT is not set: run `cargo xtask test`, which builds the previous \
             release's agent from git and sets it"
            )
        });
    assert!(
        path.is_file(),
        "LB_PREVIOUS_AGENT={} is no file",
        path.display()
    );
    path
}

#[test]
fn an_agent_of_this_version_takes_over_the_previous_releases_datapath_without_losing_a_connection()
{
    let previous = previous_agent();
    let Some(mut bed) = AgentBed::new(3) else {
        return;
    };
    bed.write_web(VIP, "");
    bed.agent_bin = previous;
    bed.ready_addr = "127.0.0.1:10256";
    bed.start_agent();
    let ids_before = bed.set_ids();
    assert!(
        !ids_before.is_empty(),
        "the previous release programmed nothing"
    );
    let mut held = bed.hold(vip());

    // New connections all the time, while the old agent stops and the new one takes over.
    bed.assert_no_connection_refused(vip(), 20, |bed| {
        bed.stop_agent();
        bed.agent_bin = PathBuf::from(common::agent::AGENT);
        bed.ready_addr = common::agent::PROBES;
        bed.start_agent();
    });
    // The previous release made its conntrack map with per-CPU LRU lists: this version's agent
    // replaced it by one of its own kind and carried the flows over. The held connection has
    // sent nothing since, so its entry can only be there because it was carried.
    let ct_pin = bed.bpffs.join(lb_common::maps::LB_CT);
    let info = aya::maps::MapInfo::from_pin(&ct_pin).expect("the conntrack pin");
    assert_eq!(info.map_flags(), lb_common::maps::CT_MAP_FLAGS);
    assert!(!bed.bpffs.join(lb_datapath::ct_carry::OLD_PIN).exists());
    let held_flow = lb_datapath::predict::flow_key(
        held.conn.local_addr().unwrap(),
        vip(),
        lb_common::net::proto::TCP,
        lb_common::conntrack::FORWARD,
    );
    assert!(
        bed.maps().ct.get(&held_flow, 0).is_ok(),
        "the held connection's flow was carried over; log:\n{}",
        bed.log()
    );
    held.assert_kept("the held connection survived the upgrade on its backend");
    assert_eq!(
        bed.set_ids(),
        ids_before,
        "the new agent adopted the frontends and their backend sets; its log:\n{}",
        bed.log()
    );

    // The new agent programs changes into the adopted datapath.
    bed.write("web-slice.yaml", &slice_yaml("web", &[backend_ip(0)]));
    assert!(
        bed.wait_until(Duration::from_secs(5), || {
            bed.names(vip(), 6).iter().all(|n| n == "backend-0")
        }),
        "an endpoint change after the upgrade never reached the datapath; log:\n{}",
        bed.log()
    );
}
