//! kube-proxy's `nftables` mode: the `nft -f -` transactions of `syncProxyRules`, as knftables
//! (≤ v0.0.19, the one kube-proxy 1.33 vendors) renders them.
//!
//! Everything lives in `table ip kube-proxy`: base chains `filter-prerouting`, `filter-input`,
//! `filter-forward`, `filter-output` (priority dstnat-10 = -110), `filter-output-post-dnat`
//! (-90), `nat-prerouting`, `nat-output` (dstnat = -100) and `nat-postrouting` (srcnat = 100);
//! dispatch by the verdict maps `service-ips` (ClusterIP . proto . port) and `service-nodeports`
//! (proto . port, for the addresses of the `nodeport-ips` set) to per-Service-port chains
//! `service-<hash>-<ns>/<name>/<proto>/<port>`, whose `numgen random mod N vmap` picks an
//! `endpoint-<hash>-...__<ip>/<port>` chain that DNATs; `mark-for-masquerade` / `masquerading`
//! with the 0x4000 mark; `no-endpoint-services` / `no-endpoint-nodeports` verdict maps (reject,
//! or drop for ETP Local without local endpoints) checked from the filter chains, and the
//! `cluster-ips-check` that rejects unknown ports of ClusterIPs and drops unallocated addresses
//! of the ServiceCIDR.
//!
//! [`ruleset`] is the first sync of a freshly started kube-proxy (it re-creates the base chains
//! once with an `add`+`delete`, as kube-proxy does on its first sync); [`endpoint_change`] is a
//! partial sync: only the changed Service's chains are re-added, flushed and refilled, map
//! elements are added or deleted only where they changed, and chains gone stale are flushed (kube-proxy
//! deletes them in a later sync, at least a second after, which is left out).
//!
//! Left out, as the model has none of it: externalIPs, LoadBalancer IPs and the `firewall-ips`
//! elements and `firewall-*` chains of `loadBalancerSourceRanges`, session affinity (`affinity-*`
//! sets), `internalTrafficPolicy: Local`, terminating endpoints and topology hints.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt::Write as _,
};

use super::{BenchService, Ep, NodeConfig, PortPlan, plans, sha256_base32, updated_services};

/// knftables' `NameLengthMax` (256) minus the longest chain-name prefix kube-proxy uses (16).
const CHAIN_NAME_BASE_LENGTH_MAX: usize = 240;
const TABLE: &str = "ip kube-proxy";

const MARK_MASQ: &str = "mark-for-masquerade";
const REJECT_CHAIN: &str = "reject-chain";

/// The containers whose elements kube-proxy tracks, in its cleanup order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Container {
    ClusterIps,
    ServiceIps,
    NoEndpointServices,
    NoEndpointNodePorts,
    ServiceNodePorts,
}

impl Container {
    const ALL: [Self; 5] = [
        Self::ClusterIps,
        Self::ServiceIps,
        Self::NoEndpointServices,
        Self::NoEndpointNodePorts,
        Self::ServiceNodePorts,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::ClusterIps => "cluster-ips",
            Self::ServiceIps => "service-ips",
            Self::NoEndpointServices => "no-endpoint-services",
            Self::NoEndpointNodePorts => "no-endpoint-nodeports",
            Self::ServiceNodePorts => "service-nodeports",
        }
    }
}

/// `hashAndTruncate`: the first 8 base32 characters of sha256(`name`), `-`, `name`.
fn hash_and_truncate(name: &str) -> String {
    let mut out = format!("{}-{name}", &sha256_base32(name)[..8]);
    if out.len() > CHAIN_NAME_BASE_LENGTH_MAX {
        out.truncate(CHAIN_NAME_BASE_LENGTH_MAX - 3);
        out.push_str("...");
    }
    out
}

/// `servicePortChainNameBase`: e.g. `ULMVA6XW-ns1/svc1/tcp/p80`.
pub fn service_chain_base(namespace: &str, name: &str, proto: &str, port_name: &str) -> String {
    hash_and_truncate(&format!("{namespace}/{name}/{proto}/{port_name}"))
}

/// `servicePortEndpointChainNameBase`: e.g. `5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80` for the
/// endpoint `10.180.0.1:80`.
pub fn endpoint_chain_base(
    namespace: &str,
    name: &str,
    proto: &str,
    port_name: &str,
    endpoint: &str,
) -> String {
    let (ip, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, ""));
    hash_and_truncate(&format!(
        "{namespace}/{name}/{proto}/{port_name}__{ip}/{port}"
    ))
}

/// The chain names of one Service port.
struct Names {
    service: String,
    local: String,
    external: String,
}

impl Names {
    fn of(p: &PortPlan) -> Self {
        let base = service_chain_base(&p.svc.namespace, &p.svc.name, p.proto, &p.port.name);
        Self {
            service: format!("service-{base}"),
            local: format!("local-{base}"),
            external: format!("external-{base}"),
        }
    }
}

fn endpoint_chain(p: &PortPlan, ep: &Ep) -> String {
    format!(
        "endpoint-{}",
        endpoint_chain_base(
            &p.svc.namespace,
            &p.svc.name,
            p.proto,
            &p.port.name,
            &ep.string()
        )
    )
}

/// The `nft -f` input of kube-proxy's first (full) sync for `services`. Panics on a malformed
/// CIDR in `cfg`.
pub fn ruleset(services: &[BenchService], cfg: &NodeConfig) -> String {
    cfg.check().expect("bad NodeConfig");
    let mut sync = Sync::new(cfg, None, HashMap::new());
    sync.setup();
    sync.services(services);
    sync.finish(&BTreeSet::new());
    sync.tx
}

/// The `nft -f` input of the partial sync after `before` became `after`.
pub fn endpoint_change(
    before: &[BenchService],
    after: &[BenchService],
    cfg: &NodeConfig,
) -> String {
    cfg.check().expect("bad NodeConfig");
    let updated: HashSet<(String, String)> = updated_services(before, after)
        .into_iter()
        .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
        .collect();
    let existing = elements(before, cfg);
    let mut sync = Sync::new(cfg, Some(&updated), existing);
    sync.services(after);
    sync.finish(&service_chains(before, cfg));
    sync.tx
}

/// The per-Service chains kube-proxy keeps for `services`.
pub fn service_chains(services: &[BenchService], cfg: &NodeConfig) -> BTreeSet<String> {
    let mut chains = BTreeSet::new();
    for p in plans(services, cfg) {
        let names = Names::of(&p);
        for ep in &p.endpoints {
            chains.insert(endpoint_chain(&p, ep));
        }
        if p.has_endpoints() {
            chains.insert(names.service);
        }
        if p.uses_local_chain() {
            chains.insert(names.local);
        }
        if p.uses_external_chain() {
            chains.insert(names.external);
        }
    }
    chains
}

/// One map or set element kube-proxy ensures.
struct Element {
    container: Container,
    key: String,
    value: Option<String>,
    comment: Option<String>,
}

/// The elements of one Service port, in kube-proxy's order.
fn port_elements(p: &PortPlan, names: &Names) -> Vec<Element> {
    let ip = p.svc.cluster_ip;
    let (proto, port) = (p.proto, p.port.port);
    let mut out = vec![Element {
        container: Container::ClusterIps,
        key: ip.to_string(),
        value: None,
        comment: None,
    }];
    let key = format!("{ip} . {proto} . {port}");
    if p.has_endpoints() {
        out.push(Element {
            container: Container::ServiceIps,
            key,
            value: Some(format!("goto {}", names.service)),
            comment: None,
        });
    } else {
        out.push(Element {
            container: Container::NoEndpointServices,
            key,
            value: Some(format!("goto {REJECT_CHAIN}")),
            comment: Some(p.name.clone()),
        });
    }
    if let Some(node_port) = p.port.node_port {
        let key = format!("{proto} . {node_port}");
        if p.has_endpoints() {
            out.push(Element {
                container: Container::ServiceNodePorts,
                key: key.clone(),
                value: Some(format!("goto {}", names.external)),
                comment: None,
            });
        }
        if !p.has_external_endpoints() {
            let verdict = if p.has_endpoints() {
                "drop".to_owned()
            } else {
                format!("goto {REJECT_CHAIN}")
            };
            out.push(Element {
                container: Container::NoEndpointNodePorts,
                key,
                value: Some(verdict),
                comment: Some(p.name.clone()),
            });
        }
    }
    out
}

/// Every element kube-proxy holds for `services`: (container, key) -> value.
fn elements(services: &[BenchService], cfg: &NodeConfig) -> HashMap<(Container, String), String> {
    let mut all = HashMap::new();
    for p in plans(services, cfg) {
        let names = Names::of(&p);
        for e in port_elements(&p, &names) {
            all.entry((e.container, e.key))
                .or_insert_with(|| e.value.unwrap_or_default());
        }
    }
    all
}

/// One `syncProxyRules` run building one transaction.
struct Sync<'a> {
    cfg: &'a NodeConfig,
    /// `Some` for a partial sync: the Services whose chains are rewritten.
    updated: Option<&'a HashSet<(String, String)>>,
    /// kube-proxy's element storage: what the kernel holds, (container, key) -> value.
    stored: HashMap<(Container, String), String>,
    /// Stored keys not ensured yet in this sync.
    leftover: HashSet<(Container, String)>,
    active: HashSet<String>,
    mark: String,
    tx: String,
}

impl<'a> Sync<'a> {
    fn new(
        cfg: &'a NodeConfig,
        updated: Option<&'a HashSet<(String, String)>>,
        stored: HashMap<(Container, String), String>,
    ) -> Self {
        let leftover = stored.keys().cloned().collect();
        Self {
            cfg,
            updated,
            stored,
            leftover,
            active: HashSet::new(),
            mark: cfg.masquerade_mark(),
            tx: String::new(),
        }
    }

    fn add_chain(&mut self, chain: &str) {
        let _ = writeln!(self.tx, "add chain {TABLE} {chain}");
    }

    fn flush_chain(&mut self, chain: &str) {
        let _ = writeln!(self.tx, "flush chain {TABLE} {chain}");
    }

    fn rule(&mut self, chain: &str, rule: &str) {
        let _ = writeln!(self.tx, "add rule {TABLE} {chain} {rule}");
    }

    fn rule_commented(&mut self, chain: &str, rule: &str, comment: &str) {
        let _ = writeln!(
            self.tx,
            "add rule {TABLE} {chain} {rule} comment \"{comment}\""
        );
    }

    /// `ensureChain`: add and flush once per sync (or only note it as active when skipped).
    fn ensure_chain(&mut self, chain: &str, skip: bool) {
        if !self.active.insert(chain.to_owned()) || skip {
            return;
        }
        self.add_chain(chain);
        self.flush_chain(chain);
    }

    /// `nftElementStorage.ensureElem`.
    fn ensure_elem(&mut self, e: &Element) {
        let name = e.container.name();
        let stored_key = (e.container, e.key.clone());
        let value = e.value.clone().unwrap_or_default();
        match self.stored.get(&stored_key) {
            Some(existing) => {
                if *existing != value {
                    let _ = writeln!(self.tx, "delete element {TABLE} {name} {{ {} }}", e.key);
                    self.write_add_element(e);
                    self.stored.insert(stored_key.clone(), value);
                }
                self.leftover.remove(&stored_key);
            }
            None => {
                self.write_add_element(e);
                self.stored.insert(stored_key, value);
            }
        }
    }

    fn write_add_element(&mut self, e: &Element) {
        let _ = write!(
            self.tx,
            "add element {TABLE} {} {{ {}",
            e.container.name(),
            e.key
        );
        if let Some(comment) = &e.comment {
            let _ = write!(self.tx, " comment \"{comment}\"");
        }
        if let Some(value) = &e.value {
            let _ = write!(self.tx, " : {value}");
        }
        self.tx.push_str(" }\n");
    }

    /// `setupNFTables`, on kube-proxy's first sync.
    fn setup(&mut self) {
        let cfg = self.cfg;
        let mark = self.mark.clone();
        let _ = writeln!(
            self.tx,
            "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
        );
        let base = [
            ("filter-prerouting", "filter", "prerouting", -110),
            ("filter-input", "filter", "input", -110),
            ("filter-forward", "filter", "forward", -110),
            ("filter-output", "filter", "output", -110),
            ("filter-output-post-dnat", "filter", "output", -90),
            ("nat-prerouting", "nat", "prerouting", -100),
            ("nat-output", "nat", "output", -100),
            ("nat-postrouting", "nat", "postrouting", 100),
        ];
        // The first sync re-creates the base chains, so that a changed priority takes.
        for (name, ..) in base {
            self.add_chain(name);
            let _ = writeln!(self.tx, "delete chain {TABLE} {name}");
        }
        for (name, kind, hook, priority) in base {
            let _ = writeln!(
                self.tx,
                "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
            );
            self.flush_chain(name);
        }
        let jumps = [
            ("nodeport-endpoints-check", "filter-input", "ct state new "),
            ("service-endpoints-check", "filter-input", "ct state new "),
            ("service-endpoints-check", "filter-forward", "ct state new "),
            ("service-endpoints-check", "filter-output", "ct state new "),
            ("firewall-check", "filter-prerouting", "ct state new "),
            ("firewall-check", "filter-output", "ct state new "),
            ("services", "nat-output", ""),
            ("services", "nat-prerouting", ""),
            ("masquerading", "nat-postrouting", ""),
            ("cluster-ips-check", "filter-forward", "ct state new "),
            (
                "cluster-ips-check",
                "filter-output-post-dnat",
                "ct state new ",
            ),
        ];
        for (dst, src, extra) in jumps {
            self.ensure_chain(dst, false);
            self.rule(src, &format!("{extra}jump {dst}"));
        }
        for chain in ["services", "cluster-ips-check", "masquerading", MARK_MASQ] {
            self.ensure_chain(chain, false);
        }
        self.rule(MARK_MASQ, &format!("mark set mark or {mark}"));
        self.rule("masquerading", &format!("mark and {mark} == 0 return"));
        self.rule("masquerading", &format!("mark set mark xor {mark}"));
        self.rule("masquerading", "masquerade fully-random");

        let _ = writeln!(
            self.tx,
            "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
        );
        self.rule_commented(
            "cluster-ips-check",
            "ip daddr @cluster-ips reject",
            "Reject traffic to invalid ports of ClusterIPs",
        );
        self.rule_commented(
            "cluster-ips-check",
            &format!("ip daddr {{ {} }} drop", cfg.service_cidr),
            "Drop traffic to unallocated ClusterIPs",
        );

        // nftables mode's default nodePortAddresses is the node's primary IP.
        let _ = writeln!(
            self.tx,
            "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
        );
        let _ = writeln!(self.tx, "flush set {TABLE} nodeport-ips");
        let _ = writeln!(
            self.tx,
            "add element {TABLE} nodeport-ips {{ {} }}",
            cfg.node_ip
        );

        let _ = writeln!(
            self.tx,
            "add map {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
        );
        let _ = writeln!(
            self.tx,
            "add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
        );
        let _ = writeln!(
            self.tx,
            "add chain {TABLE} {REJECT_CHAIN} {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
        );
        self.flush_chain(REJECT_CHAIN);
        self.rule(REJECT_CHAIN, "reject");
        self.rule(
            "service-endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        );
        self.rule(
            "nodeport-endpoints-check",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        );

        let _ = writeln!(
            self.tx,
            "add map {TABLE} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        );
        self.ensure_chain("firewall-check", false);
        self.rule(
            "firewall-check",
            "ip daddr . meta l4proto . th dport vmap @firewall-ips",
        );

        let _ = writeln!(
            self.tx,
            "add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        );
        let _ = writeln!(
            self.tx,
            "add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
        );
        self.rule(
            "services",
            "ip daddr . meta l4proto . th dport vmap @service-ips",
        );
        self.rule(
            "services",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        );

        // Flush the element containers (their storage starts empty).
        let _ = writeln!(self.tx, "flush set {TABLE} cluster-ips");
        for map in [
            "service-ips",
            "firewall-ips",
            "no-endpoint-services",
            "no-endpoint-nodeports",
            "service-nodeports",
        ] {
            let _ = writeln!(self.tx, "flush map {TABLE} {map}");
        }
        self.stored.clear();
        self.leftover.clear();
    }

    fn services(&mut self, services: &[BenchService]) {
        for p in plans(services, self.cfg) {
            let skip = self
                .updated
                .is_some_and(|u| !u.contains(&(p.svc.namespace.clone(), p.svc.name.clone())));
            self.port(&p, skip);
        }
    }

    fn port(&mut self, p: &PortPlan, skip: bool) {
        let names = Names::of(p);
        let endpoint_chains: Vec<String> =
            p.endpoints.iter().map(|e| endpoint_chain(p, e)).collect();
        for chain in &endpoint_chains {
            self.ensure_chain(chain, skip);
        }
        if p.has_endpoints() {
            self.ensure_chain(&names.service, skip);
        }
        if p.uses_local_chain() {
            self.ensure_chain(&names.local, skip);
        }
        if p.uses_external_chain() {
            self.ensure_chain(&names.external, skip);
        }
        for e in port_elements(p, &names) {
            self.ensure_elem(&e);
        }
        if skip {
            return;
        }

        let cluster_cidr = &self.cfg.cluster_cidr;
        let (proto, port) = (p.proto, p.port.port);
        if p.has_endpoints() {
            self.rule(
                &names.service,
                &format!(
                    "ip daddr {} {proto} dport {port} ip saddr != {cluster_cidr} jump {MARK_MASQ}",
                    p.svc.cluster_ip
                ),
            );
        }
        if p.uses_external_chain() {
            let ext = &names.external;
            if !p.etp_local {
                self.rule(ext, &format!("jump {MARK_MASQ}"));
            } else {
                self.rule_commented(
                    ext,
                    &format!("ip saddr {cluster_cidr} goto {}", names.service),
                    "short-circuit pod traffic",
                );
                self.rule_commented(
                    ext,
                    &format!("fib saddr type local jump {MARK_MASQ}"),
                    "masquerade local traffic",
                );
                self.rule_commented(
                    ext,
                    &format!("fib saddr type local goto {}", names.service),
                    "short-circuit local traffic",
                );
            }
            if p.has_external_endpoints() {
                let policy = if p.etp_local {
                    &names.local
                } else {
                    &names.service
                };
                self.rule(ext, &format!("goto {policy}"));
            }
        }
        if p.has_endpoints() {
            self.service_to_endpoints(&names.service, &endpoint_chains);
        }
        if p.uses_local_chain() {
            let local: Vec<String> = p.local.iter().map(|e| endpoint_chain(p, e)).collect();
            self.service_to_endpoints(&names.local, &local);
        }
        for (ep, chain) in p.endpoints.iter().zip(&endpoint_chains) {
            self.rule(chain, &format!("ip saddr {} jump {MARK_MASQ}", ep.ip));
            self.rule(
                chain,
                &format!("meta l4proto {proto} dnat to {}", ep.string()),
            );
        }
    }

    /// `writeServiceToEndpointRules`: one `numgen` verdict map over the endpoint chains.
    fn service_to_endpoints(&mut self, chain: &str, endpoint_chains: &[String]) {
        let elements: Vec<String> = endpoint_chains
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        self.rule(
            chain,
            &format!(
                "numgen random mod {} vmap {{ {} }}",
                endpoint_chains.len(),
                elements.join(" , ")
            ),
        );
    }

    /// Stale chains are flushed (deleted in a later sync); leftover elements deleted.
    fn finish(&mut self, existing_service_chains: &BTreeSet<String>) {
        let stale: Vec<String> = existing_service_chains
            .iter()
            .filter(|c| !self.active.contains(*c))
            .cloned()
            .collect();
        for chain in stale {
            self.flush_chain(&chain);
        }
        for container in Container::ALL {
            let mut keys: Vec<String> = self
                .leftover
                .iter()
                .filter(|(c, _)| *c == container)
                .map(|(_, k)| k.clone())
                .collect();
            keys.sort();
            for key in keys {
                let _ = writeln!(
                    self.tx,
                    "delete element {TABLE} {} {{ {key} }}",
                    container.name()
                );
                self.stored.remove(&(container, key));
            }
        }
        self.leftover.clear();
    }
}
