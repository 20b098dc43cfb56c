//! `cargo xtask demo`: one node in a network namespace with a client pod and three `hostnames`
//! pods behind a ClusterIP, the datapath attached to the pods' veths, and curl from the client.
//! Everything lives in namespaces created for the run and is removed at the end.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result, bail};
use lb::{
    datapath::{Capacities, Datapath, Pinning},
    install::{self, BackendSpec, FrontendSpec, ServiceSpec},
};
use lb_common::{
    maps::{maglev::DEFAULT_TABLE_SIZE, scope},
    net::proto,
    stats::Reason,
};
use lb_testbed::{Node, server::Server};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
const REQUESTS: usize = 12;

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "lb-demo: brings up pods in network namespaces, balances a ClusterIP across three of them and curls it.\nRun it through `cargo xtask demo` (it needs root)."
        );
        return Ok(());
    }
    let started = Instant::now();
    println!(
        "Bringing up node \"node-1\" with pods client, hostnames-0, hostnames-1, hostnames-2 (network namespaces)..."
    );
    let mut node = Node::new("node-1")?;
    node.add_pod("client", Ipv4Addr::new(10, 0, 1, 2))?;
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for i in 0..3u8 {
        let name = format!("hostnames-{i}");
        let ip = Ipv4Addr::new(10, 0, 1, 10 + i);
        let pod = node.add_pod(&name, ip)?;
        servers.push(Server::hostnames(&node.pods[pod].ns, &name, 9376)?);
        backends.push(BackendSpec {
            id: u32::from(i) + 1,
            addr: ip,
            port: 9376,
            local: true,
            weight: 1,
        });
    }

    println!("Loading the datapath and attaching it to the pods' veths...");
    let ifaces: Vec<String> = node.pods.iter().map(|p| p.host_iface.clone()).collect();
    let (_datapath, mut maps) = node.ns.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&Pinning::None, Capacities::default())?;
        for iface in &ifaces {
            dp.attach_pod_iface(iface)?;
        }
        let maps = dp.take_maps()?;
        Ok((dp, maps))
    })??;
    let service = ServiceSpec {
        id: 1,
        frontends: vec![FrontendSpec {
            addr: VIP,
            port: 80,
            proto: proto::TCP,
            scope: scope::INTERNAL,
            cluster_ip: true,
        }],
        backends,
        table_size: DEFAULT_TABLE_SIZE,
        flags: 0,
    };
    install::install(&mut maps, &service)?;
    println!(
        "Service hostnames: ClusterIP {VIP}:80/TCP -> 10.0.1.10-12:9376 (Maglev, {DEFAULT_TABLE_SIZE} slots)\n"
    );

    println!("curl http://{VIP}/ from pod \"client\" ({REQUESTS} new connections):");
    let mut answered = BTreeMap::<String, usize>::new();
    let client = node.pod("client");
    for _ in 0..REQUESTS {
        let out = client
            .ns
            .command("curl")
            .args(["-sS", "--max-time", "3", &format!("http://{VIP}/")])
            .output()
            .context("running curl (`cargo xtask setup` installs it)")?;
        if !out.status.success() {
            bail!(
                "curl failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("  {body}");
        let name = body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        *answered.entry(name).or_default() += 1;
    }
    println!(
        "\nAnswered by: {answered:?} (each line shows the backend and the client address it saw: the client's own)"
    );

    let totals = maps.service_totals(service.id)?;
    println!(
        "Service counters: {} packets, {} bytes, {} flows",
        totals.packets, totals.bytes, totals.new_flows
    );
    let verdicts: Vec<String> = maps
        .verdict_totals()?
        .into_iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|(r, c): (Reason, _)| format!("{}={}", r.name(), c.packets))
        .collect();
    println!("Datapath verdicts: {}", verdicts.join(" "));
    drop(servers);
    drop(node);
    println!(
        "\nCleaned up. Done in {:.1}s.",
        started.elapsed().as_secs_f64()
    );
    if answered.len() != 3 {
        bail!("expected all three backends to answer, got {answered:?}");
    }
    Ok(())
}
