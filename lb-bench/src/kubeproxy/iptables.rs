//! kube-proxy's `iptables` mode: the `iptables-restore` input of `syncProxyRules`.
//!
//! [`ruleset`] is what a full sync writes (`iptables-restore -w 5 -W 100000 --noflush
//! --counters`, the flags kube-proxy passes): `*filter` then `*nat`, each with the chain lines
//! first (which, under `--noflush`, flush exactly those chains) and the rules after, in the order
//! kube-proxy's line buffers receive them. [`jump_rules`] are the rules kube-proxy installs
//! separately, with `iptables -I` one at a time, on its first sync (PREROUTING/OUTPUT -> KUBE-SERVICES
//! and the like, the canary chains, kubelet's KUBE-FIREWALL jumps); [`full_ruleset`] is both, to
//! bring up an empty namespace in one command. [`endpoint_change`] is a partial sync (kube-proxy
//! 1.28+): the whole filter table and the nat table's top-level chains (KUBE-SERVICES lists every
//! Service, so it is always rewritten), but only the changed Service's KUBE-SVC/KUBE-EXT/KUBE-SEP
//! chains, plus the deletion of chains gone stale.
//!
//! Chain names: `KUBE-SVC-`/`KUBE-SVL-`/`KUBE-EXT-`/`KUBE-FW-` + the first 16 characters of
//! base32(sha256(`ns/name:port` + protocol)), `KUBE-SEP-` likewise over `ns/name:port` + protocol
//! + `ip:port`, the protocol in lower case (kube-proxy lower-cases it since 1.23).
//!
//! "Large cluster mode" is kept: above 1000 endpoints in all, kube-proxy drops the
//! `-m comment` of the endpoint rules, and skips the `iptables-save` that finds stale chains
//! (doing it at most once per `--iptables-sync-period`), which [`endpoint_change`] follows (it
//! deletes stale chains only below the threshold).
//!
//! Left out, as the model has none of it: externalIPs, LoadBalancer IPs and their
//! `loadBalancerSourceRanges` (KUBE-FW-*), session affinity (`-m recent`), health-check node
//! ports, `internalTrafficPolicy: Local`, terminating endpoints and topology hints; also the
//! `-m nfacct` counters kube-proxy adds to two rules when the kernel's nfacct subsystem lets it
//! create them (metrics only).

use std::{collections::BTreeSet, fmt::Write as _};

use super::{
    BenchService, Ep, NodeConfig, PortPlan, plans, sha256_base32, total_endpoints, updated_services,
};

/// kube-proxy's `largeClusterEndpointsThreshold`.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// The flags kube-proxy runs `iptables-restore` with (wait for the xtables lock, keep the
/// chains the input does not name, keep counters).
pub const RESTORE_FLAGS: [&str; 6] = ["-w", "5", "-W", "100000", "--noflush", "--counters"];

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

fn port_proto_hash(port_name: &str, proto: &str) -> String {
    sha256_base32(&format!("{port_name}{proto}"))[..16].to_owned()
}

/// `KUBE-SVC-<hash>`: the Service port's Cluster-policy chain (`servicePortPolicyClusterChain`).
/// `port_name` is `ns/name:port`, `proto` `tcp`/`udp`.
pub fn svc_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(port_name, proto))
}

/// `KUBE-SVL-<hash>`: the Local-policy chain.
pub fn svl_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-SVL-{}", port_proto_hash(port_name, proto))
}

/// `KUBE-EXT-<hash>`: where NodePort (and external) traffic goes first.
pub fn ext_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(port_name, proto))
}

/// `KUBE-FW-<hash>`: the loadBalancerSourceRanges chain (not generated here; for reference).
pub fn fw_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-FW-{}", port_proto_hash(port_name, proto))
}

/// `KUBE-SEP-<hash>` of the endpoint `ip:port` (`servicePortEndpointChainName`).
pub fn sep_chain(port_name: &str, proto: &str, endpoint: &str) -> String {
    let hash = sha256_base32(&format!("{port_name}{proto}{endpoint}"));
    format!("KUBE-SEP-{}", &hash[..16])
}

/// Whether kube-proxy would be in "large cluster mode" for these Services.
pub fn large_cluster_mode(services: &[BenchService]) -> bool {
    total_endpoints(services) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD
}

/// The `iptables-restore` input of a full sync for `services`. Panics on a malformed CIDR in
/// `cfg`.
pub fn ruleset(services: &[BenchService], cfg: &NodeConfig) -> String {
    cfg.check().expect("bad NodeConfig");
    Sync::new(services, cfg, None, &[]).render()
}

/// [`jump_rules`] followed by [`ruleset`]: an empty namespace's whole kube-proxy state in one
/// `iptables-restore --noflush` input.
pub fn full_ruleset(services: &[BenchService], cfg: &NodeConfig) -> String {
    let mut text = jump_rules(cfg);
    text.push_str(&ruleset(services, cfg));
    text
}

/// The partial sync kube-proxy writes after `before` became `after` (one endpoint changed, or
/// any other change of some Services): see the module doc.
pub fn endpoint_change(
    before: &[BenchService],
    after: &[BenchService],
    cfg: &NodeConfig,
) -> String {
    cfg.check().expect("bad NodeConfig");
    let updated: BTreeSet<(String, String)> = updated_services(before, after)
        .into_iter()
        .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
        .collect();
    let stale: Vec<String> = if large_cluster_mode(after) {
        Vec::new()
    } else {
        let now = active_chains(after, cfg);
        active_chains(before, cfg)
            .into_iter()
            .filter(|c| !now.contains(c))
            .collect()
    };
    Sync::new(after, cfg, Some(&updated), &stale).render()
}

/// The nat chains kube-proxy keeps for `services` (its `activeNATChains`).
pub fn active_chains(services: &[BenchService], cfg: &NodeConfig) -> BTreeSet<String> {
    let mut chains = BTreeSet::new();
    for p in plans(services, cfg) {
        if p.uses_external_chain() {
            chains.insert(ext_chain(&p.name, p.proto));
        }
        if p.has_endpoints() {
            chains.insert(svc_chain(&p.name, p.proto));
        }
        if p.uses_local_chain() {
            chains.insert(svl_chain(&p.name, p.proto));
        }
        for ep in &p.endpoints {
            chains.insert(sep_chain(&p.name, p.proto, &ep.string()));
        }
    }
    chains
}

/// The rules kube-proxy (`iptablesJumpChains`, each `EnsureRule(Prepend, ...)` in order, so
/// the last inserted comes first) and kubelet (`KUBE-FIREWALL`) hook into the built-in chains,
/// and the canary chains of kube-proxy's monitor, as `iptables-restore --noflush` input.
pub fn jump_rules(_cfg: &NodeConfig) -> String {
    const NEW: &str = "-m conntrack --ctstate NEW ";
    // (table, built-in chain, target, extra match, comment), in kube-proxy's order.
    let jumps: [(&str, &str, &str, &str, &str); 14] = [
        (
            "filter",
            "INPUT",
            KUBE_EXTERNAL_SERVICES,
            NEW,
            "kubernetes externally-visible service portals",
        ),
        (
            "filter",
            "FORWARD",
            KUBE_EXTERNAL_SERVICES,
            NEW,
            "kubernetes externally-visible service portals",
        ),
        (
            "filter",
            "INPUT",
            KUBE_NODEPORTS,
            "",
            "kubernetes health check service ports",
        ),
        (
            "filter",
            "FORWARD",
            KUBE_SERVICES,
            NEW,
            "kubernetes service portals",
        ),
        (
            "filter",
            "OUTPUT",
            KUBE_SERVICES,
            NEW,
            "kubernetes service portals",
        ),
        (
            "filter",
            "FORWARD",
            KUBE_FORWARD,
            "",
            "kubernetes forwarding rules",
        ),
        (
            "filter",
            "INPUT",
            KUBE_PROXY_FIREWALL,
            NEW,
            "kubernetes load balancer firewall",
        ),
        (
            "filter",
            "OUTPUT",
            KUBE_PROXY_FIREWALL,
            NEW,
            "kubernetes load balancer firewall",
        ),
        (
            "filter",
            "FORWARD",
            KUBE_PROXY_FIREWALL,
            NEW,
            "kubernetes load balancer firewall",
        ),
        (
            "nat",
            "OUTPUT",
            KUBE_SERVICES,
            "",
            "kubernetes service portals",
        ),
        (
            "nat",
            "PREROUTING",
            KUBE_SERVICES,
            "",
            "kubernetes service portals",
        ),
        (
            "nat",
            "POSTROUTING",
            KUBE_POSTROUTING,
            "",
            "kubernetes postrouting rules",
        ),
        // kubelet's, which kube-proxy ensures too (no comment).
        ("filter", "INPUT", KUBE_FIREWALL, "", ""),
        ("filter", "OUTPUT", KUBE_FIREWALL, "", ""),
    ];
    let mut out = String::new();
    let _ = writeln!(out, "*mangle\n:{KUBE_PROXY_CANARY} - [0:0]\nCOMMIT");
    for table in ["filter", "nat"] {
        let _ = writeln!(out, "*{table}\n:{KUBE_PROXY_CANARY} - [0:0]");
        let mut targets: Vec<&str> = Vec::new();
        for (t, _, target, _, _) in &jumps {
            if *t == table && !targets.contains(target) {
                targets.push(target);
            }
        }
        for target in targets {
            let _ = writeln!(out, ":{target} - [0:0]");
        }
        // Prepended one by one: the last one ends up first.
        for (t, chain, target, extra, comment) in jumps.iter().rev() {
            if *t != table {
                continue;
            }
            let comment = if comment.is_empty() {
                String::new()
            } else {
                format!("-m comment --comment \"{comment}\" ")
            };
            let _ = writeln!(out, "-A {chain} {extra}{comment}-j {target}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// One `syncProxyRules` run.
struct Sync<'a> {
    services: &'a [BenchService],
    cfg: &'a NodeConfig,
    /// `Some` for a partial sync: the Services whose chains are rewritten.
    updated: Option<&'a BTreeSet<(String, String)>>,
    /// Chains to flush and delete.
    stale: &'a [String],
    large: bool,
    mark: String,
    filter_chains: String,
    filter_rules: String,
    nat_chains: String,
    nat_rules: String,
}

impl<'a> Sync<'a> {
    fn new(
        services: &'a [BenchService],
        cfg: &'a NodeConfig,
        updated: Option<&'a BTreeSet<(String, String)>>,
        stale: &'a [String],
    ) -> Self {
        Self {
            services,
            cfg,
            updated,
            stale,
            large: large_cluster_mode(services),
            mark: cfg.masquerade_mark(),
            filter_chains: String::new(),
            filter_rules: String::new(),
            nat_chains: String::new(),
            nat_rules: String::new(),
        }
    }

    fn render(mut self) -> String {
        let cfg = self.cfg;
        for chain in [
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_FORWARD,
            KUBE_NODEPORTS,
            KUBE_PROXY_FIREWALL,
        ] {
            chain_line(&mut self.filter_chains, chain);
        }
        for chain in [
            KUBE_SERVICES,
            KUBE_NODEPORTS,
            KUBE_POSTROUTING,
            KUBE_MARK_MASQ,
        ] {
            chain_line(&mut self.nat_chains, chain);
        }
        let mark = self.mark.clone();
        let _ = writeln!(
            self.nat_rules,
            "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
        );
        let _ = writeln!(
            self.nat_rules,
            "-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"
        );
        let _ = writeln!(
            self.nat_rules,
            "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
            if cfg.random_fully {
                " --random-fully"
            } else {
                ""
            }
        );
        let _ = writeln!(
            self.nat_rules,
            "-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"
        );
        if cfg.localhost_node_ports {
            chain_line(&mut self.filter_chains, KUBE_FIREWALL);
            let _ = writeln!(
                self.filter_rules,
                "-A {KUBE_FIREWALL} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            );
        }

        for plan in plans(self.services, cfg) {
            let write_chains = match self.updated {
                None => true,
                Some(updated) => {
                    updated.contains(&(plan.svc.namespace.clone(), plan.svc.name.clone()))
                }
            };
            self.port(&plan, write_chains);
        }

        for chain in self.stale {
            chain_line(&mut self.nat_chains, chain);
            let _ = writeln!(self.nat_rules, "-X {chain}");
        }

        let _ = writeln!(
            self.nat_rules,
            "-A {KUBE_SERVICES} -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL{} -j {KUBE_NODEPORTS}",
            if cfg.localhost_node_ports {
                ""
            } else {
                " ! -d 127.0.0.0/8"
            }
        );
        let _ = writeln!(
            self.filter_rules,
            "-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP"
        );
        let _ = writeln!(
            self.filter_rules,
            "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
        );
        let _ = writeln!(
            self.filter_rules,
            "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );

        let mut out = String::with_capacity(
            self.filter_chains.len()
                + self.filter_rules.len()
                + self.nat_chains.len()
                + self.nat_rules.len()
                + 32,
        );
        out.push_str("*filter\n");
        out.push_str(&self.filter_chains);
        out.push_str(&self.filter_rules);
        out.push_str("COMMIT\n*nat\n");
        out.push_str(&self.nat_chains);
        out.push_str(&self.nat_rules);
        out.push_str("COMMIT\n");
        out
    }

    /// One Service port: the top-level rules always, its own chains when `write_chains`.
    fn port(&mut self, p: &PortPlan, write_chains: bool) {
        let cfg = self.cfg;
        let (name, proto) = (p.name.as_str(), p.proto);
        let (cluster_ip, port) = (p.svc.cluster_ip, p.port.port);
        let svc = svc_chain(name, proto);
        let ext = ext_chain(name, proto);
        let svl = svl_chain(name, proto);
        let has_endpoints = p.has_endpoints();
        let has_external = p.has_external_endpoints();
        let (external_target, external_comment) = if !has_endpoints {
            ("REJECT", format!("\"{name} has no endpoints\""))
        } else {
            ("DROP", format!("\"{name} has no local endpoints\""))
        };

        // Capture the ClusterIP.
        if has_endpoints {
            let _ = writeln!(
                self.nat_rules,
                "-A {KUBE_SERVICES} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {cluster_ip} --dport {port} -j {svc}"
            );
        } else {
            let _ = writeln!(
                self.filter_rules,
                "-A {KUBE_SERVICES} -m comment --comment \"{name} has no endpoints\" -m {proto} -p {proto} -d {cluster_ip} --dport {port} -j REJECT"
            );
        }
        // Capture the node port.
        if let Some(node_port) = p.port.node_port {
            if has_endpoints {
                let _ = writeln!(
                    self.nat_rules,
                    "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {ext}"
                );
            }
            if !has_external {
                let _ = writeln!(
                    self.filter_rules,
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j {external_target}"
                );
            }
        }

        if !write_chains {
            return;
        }
        let cluster_cidr = &cfg.cluster_cidr;
        let chains = &mut self.nat_chains;
        let rules = &mut self.nat_rules;

        // Internal traffic from outside the cluster CIDR is masqueraded.
        if has_endpoints {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {cluster_ip} --dport {port} ! -s {cluster_cidr} -j {KUBE_MARK_MASQ}"
            );
        }
        // External traffic.
        if p.uses_external_chain() {
            chain_line(chains, &ext);
            if !p.etp_local {
                let _ = writeln!(
                    rules,
                    "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {ext} -m comment --comment \"pod traffic for {name} external destinations\" -s {cluster_cidr} -j {svc}"
                );
                let _ = writeln!(
                    rules,
                    "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
                );
                let _ = writeln!(
                    rules,
                    "-A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
                );
            }
            if has_external {
                let policy = if p.etp_local { &svl } else { &svc };
                let _ = writeln!(rules, "-A {ext} -j {policy}");
            }
        }
        if has_endpoints {
            chain_line(chains, &svc);
            service_to_endpoints(rules, self.large, name, proto, &svc, &p.endpoints);
        }
        if p.uses_local_chain() {
            chain_line(chains, &svl);
            service_to_endpoints(rules, self.large, name, proto, &svl, &p.local);
        }
        for ep in &p.endpoints {
            let sep = sep_chain(name, proto, &ep.string());
            chain_line(chains, &sep);
            let comment = if self.large {
                String::new()
            } else {
                format!(" -m comment --comment {name}")
            };
            let _ = writeln!(rules, "-A {sep}{comment} -s {} -j {KUBE_MARK_MASQ}", ep.ip);
            let _ = writeln!(
                rules,
                "-A {sep}{comment} -m {proto} -p {proto} -j DNAT --to-destination {}",
                ep.string()
            );
        }
    }
}

/// `writeServiceToEndpointRules`: one rule per endpoint, all but the last with
/// `-m statistic --mode random --probability 1/(endpoints left)`.
fn service_to_endpoints(
    rules: &mut String,
    large: bool,
    name: &str,
    proto: &str,
    chain: &str,
    endpoints: &[Ep],
) {
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let _ = write!(rules, "-A {chain}");
        if !large {
            let _ = write!(rules, " -m comment --comment \"{name} -> {}\"", ep.string());
        }
        if i < n - 1 {
            let _ = write!(
                rules,
                " -m statistic --mode random --probability {}",
                probability(n - i)
            );
        }
        let _ = writeln!(rules, " -j {}", sep_chain(name, proto, &ep.string()));
    }
}

/// Go's `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

fn chain_line(buf: &mut String, chain: &str) {
    let _ = writeln!(buf, ":{chain} - [0:0]");
}
