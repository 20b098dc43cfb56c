//! What the manifests render parses as the Kubernetes objects they stand for.

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::*;

fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("does not parse: {e}\n---\n{yaml}"))
}

#[test]
fn a_yaml_stream_becomes_one_json_list_of_its_objects() {
    let yaml = documents([
        ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .port(ServicePort::tcp("http", 80, 8080))
            .yaml(),
        EndpointSliceManifest::new("web").yaml(),
    ]);
    let list: serde_json::Value = serde_json::from_str(&json_list(&yaml).unwrap()).unwrap();
    assert_eq!(list["kind"], "List");
    let kinds: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Service", "EndpointSlice"]);
    let svc: Service = serde_json::from_value(list["items"][0].clone()).unwrap();
    assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
}

#[test]
fn cluster_ip_service_has_the_api_defaults() {
    let yaml = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
        .port(ServicePort::tcp("http", 80, 8080))
        .port(ServicePort::udp("dns", 53, 5353))
        .yaml();
    let svc: Service = parse(&yaml);
    assert_eq!(svc.metadata.name.as_deref(), Some("web"));
    assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.10".to_owned()]));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.external_traffic_policy, None);
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(ports[0].port, 80);
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(8080)));
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
    assert_eq!(ports[1].node_port, None);
}

#[test]
fn load_balancer_service_carries_every_field() {
    let yaml = ServiceManifest::new("lb", Ipv4Addr::new(10, 96, 0, 20))
        .namespace("shop")
        .service_type(ServiceType::LoadBalancer)
        .port(ServicePort::tcp("http", 80, 8080).node_port(30080))
        .external_traffic_policy(TrafficPolicy::Local)
        .internal_traffic_policy(TrafficPolicy::Local)
        .health_check_node_port(31000)
        .external_ip(Ipv4Addr::new(203, 0, 113, 20))
        .source_range("192.168.50.2/32")
        .client_ip_affinity(60)
        .ingress_ip(Ipv4Addr::new(203, 0, 113, 10))
        .yaml();
    let svc: Service = parse(&yaml);
    assert_eq!(svc.metadata.namespace.as_deref(), Some("shop"));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.ports.unwrap()[0].node_port, Some(30080));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(spec.health_check_node_port, Some(31000));
    assert_eq!(spec.allocate_load_balancer_node_ports, Some(true));
    assert_eq!(spec.external_ips, Some(vec!["203.0.113.20".to_owned()]));
    assert_eq!(
        spec.load_balancer_source_ranges,
        Some(vec!["192.168.50.2/32".to_owned()])
    );
    assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
    let timeout = spec
        .session_affinity_config
        .and_then(|c| c.client_ip)
        .and_then(|c| c.timeout_seconds);
    assert_eq!(timeout, Some(60));
    let ingress = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0].ip.as_deref(), Some("203.0.113.10"));
    assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
}

#[test]
fn node_port_service_without_ports_or_ingress() {
    let yaml = ServiceManifest::new("empty", Ipv4Addr::new(10, 96, 0, 30))
        .service_type(ServiceType::NodePort)
        .yaml();
    let svc: Service = parse(&yaml);
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.allocate_load_balancer_node_ports, None);
    assert_eq!(spec.ports, Some(vec![]));
    assert_eq!(svc.status.unwrap().load_balancer.unwrap().ingress, None);
}

#[test]
fn endpoint_slice_with_conditions() {
    let yaml = endpoint_slice_yaml(
        "web",
        "shop",
        &[("http", 8080, Protocol::Tcp), ("", 53, Protocol::Udp)],
        &[
            Endpoint::ready(Ipv4Addr::new(10, 10, 0, 2), "node-0"),
            Endpoint::not_ready(Ipv4Addr::new(10, 10, 1, 2), "node-1"),
            Endpoint::terminating(Ipv4Addr::new(10, 10, 1, 3), "node-1", true),
        ],
    );
    let slice: EndpointSlice = parse(&yaml);
    assert_eq!(slice.metadata.name.as_deref(), Some("web-1"));
    assert_eq!(slice.metadata.namespace.as_deref(), Some("shop"));
    let labels = slice.metadata.labels.unwrap();
    assert_eq!(
        labels.get("kubernetes.io/service-name").map(String::as_str),
        Some("web")
    );
    assert_eq!(slice.address_type, "IPv4");
    let ports = slice.ports.unwrap();
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(ports[0].port, Some(8080));
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(ports[1].name.as_deref(), Some(""));
    let conditions: Vec<_> = slice
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap();
            (
                e.addresses.clone(),
                e.node_name.clone().unwrap(),
                c.ready,
                c.serving,
                c.terminating,
            )
        })
        .collect();
    let (t, f) = (Some(true), Some(false));
    assert_eq!(
        conditions,
        [
            (vec!["10.10.0.2".to_owned()], "node-0".to_owned(), t, t, f),
            (vec!["10.10.1.2".to_owned()], "node-1".to_owned(), f, f, f),
            (vec!["10.10.1.3".to_owned()], "node-1".to_owned(), f, t, t),
        ]
    );
}

#[test]
fn empty_endpoint_slice() {
    let yaml = EndpointSliceManifest::new("none").name("none-abcde").yaml();
    let slice: EndpointSlice = parse(&yaml);
    assert_eq!(slice.metadata.name.as_deref(), Some("none-abcde"));
    assert!(slice.endpoints.is_empty());
    assert_eq!(slice.ports, Some(vec![]));
}

#[test]
fn node_with_internal_ip_and_pod_cidr() {
    let node: Node = parse(&node_yaml("node-0", Ipv4Addr::new(192, 168, 50, 10)));
    assert_eq!(node.metadata.name.as_deref(), Some("node-0"));
    let addresses = node.status.unwrap().addresses.unwrap();
    assert_eq!(addresses[0].type_, "InternalIP");
    assert_eq!(addresses[0].address, "192.168.50.10");
    assert_eq!(addresses[1].type_, "Hostname");
    assert!(node.spec.is_none());

    let yaml = NodeManifest::new("node-1", Ipv4Addr::new(192, 168, 50, 11))
        .pod_cidr("10.10.1.0/24")
        .yaml();
    let node: Node = parse(&yaml);
    assert_eq!(node.spec.unwrap().pod_cidr.as_deref(), Some("10.10.1.0/24"));
}

#[test]
fn documents_join_into_one_stream() {
    let stream = documents([
        node_yaml("node-0", Ipv4Addr::new(192, 168, 50, 10)),
        node_yaml("node-1", Ipv4Addr::new(192, 168, 50, 11)),
    ]);
    assert_eq!(stream.matches("\n---\n").count(), 1);
    let docs: Vec<Node> = stream.split("---\n").map(parse::<Node>).collect();
    assert_eq!(docs[1].metadata.name.as_deref(), Some("node-1"));
}

#[test]
fn strings_that_yaml_would_misread_are_quoted() {
    assert_eq!(scalar("web"), "web");
    assert_eq!(scalar("10.0.0.0/8"), "\"10.0.0.0/8\"");
    assert_eq!(scalar(""), "\"\"");
    assert_eq!(scalar("on"), "\"on\"");
    assert_eq!(scalar("a: b"), "\"a: b\"");
    assert_eq!(scalar("say \"hi\""), "\"say \\\"hi\\\"\"");
    let svc: Service = parse(
        &ServiceManifest::new("true", Ipv4Addr::new(10, 96, 0, 1))
            .namespace("null")
            .yaml(),
    );
    assert_eq!(svc.metadata.name.as_deref(), Some("true"));
    assert_eq!(svc.metadata.namespace.as_deref(), Some("null"));
}

#[test]
fn ipv6_and_dual_stack_services_name_their_families() {
    let vip6: Ipv6Addr = "fd00:96::41".parse().unwrap();
    let svc: Service = parse(
        &ServiceManifest::new_ipv6("web6", vip6)
            .port(ServicePort::tcp("http", 80, 8080))
            .yaml(),
    );
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:96::41"));
    assert_eq!(spec.cluster_ips, Some(vec!["fd00:96::41".to_owned()]));
    assert_eq!(spec.ip_families, Some(vec!["IPv6".to_owned()]));
    assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));

    let svc: Service = parse(
        &ServiceManifest::new("both", Ipv4Addr::new(10, 96, 0, 42))
            .dual_stack(vip6)
            .yaml(),
    );
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.42"));
    assert_eq!(
        spec.cluster_ips,
        Some(vec!["10.96.0.42".to_owned(), "fd00:96::41".to_owned()])
    );
    assert_eq!(
        spec.ip_families,
        Some(vec!["IPv4".to_owned(), "IPv6".to_owned()])
    );
    assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));

    let svc: Service = parse(
        &ServiceManifest::new_ipv6("prefer", vip6)
            .dual_stack(Ipv4Addr::new(10, 96, 0, 43))
            .ip_family_policy(IpFamilyPolicy::PreferDualStack)
            .yaml(),
    );
    let spec = svc.spec.unwrap();
    assert_eq!(
        spec.ip_families,
        Some(vec!["IPv6".to_owned(), "IPv4".to_owned()])
    );
    assert_eq!(spec.ip_family_policy.as_deref(), Some("PreferDualStack"));
}

#[test]
#[should_panic(expected = "is of the family of")]
fn a_dual_stack_service_needs_both_families() {
    let _ = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
        .dual_stack(Ipv4Addr::new(10, 96, 0, 11));
}

#[test]
fn ipv6_endpoint_slice() {
    let ip: Ipv6Addr = "fd00:10:10:1::2".parse().unwrap();
    let yaml = EndpointSliceManifest::new("web6")
        .name("web6-v6")
        .address_type(IpFamily::IPv6)
        .port("http", 8080, Protocol::Tcp)
        .endpoint(Endpoint::ready(ip, "node-1"))
        .yaml();
    let slice: EndpointSlice = parse(&yaml);
    assert_eq!(slice.address_type, "IPv6");
    assert_eq!(
        slice.endpoints[0].addresses,
        vec!["fd00:10:10:1::2".to_owned()]
    );
    // The default stays IPv4, as it renders unchanged.
    assert!(
        EndpointSliceManifest::new("web")
            .yaml()
            .contains("\naddressType: IPv4\n")
    );
}

#[test]
fn dual_stack_node() {
    let yaml = NodeManifest::new("node-1", Ipv4Addr::new(192, 168, 50, 11))
        .internal_ip("fd00:192:168:50::11".parse::<Ipv6Addr>().unwrap())
        .pod_cidr("10.10.1.0/24")
        .pod_cidr("fd00:10:10:1::/64")
        .yaml();
    let node: Node = parse(&yaml);
    let spec = node.spec.unwrap();
    assert_eq!(spec.pod_cidr.as_deref(), Some("10.10.1.0/24"));
    assert_eq!(
        spec.pod_cidrs,
        Some(vec![
            "10.10.1.0/24".to_owned(),
            "fd00:10:10:1::/64".to_owned()
        ])
    );
    let addresses: Vec<(String, String)> = node
        .status
        .unwrap()
        .addresses
        .unwrap()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_owned(), "192.168.50.11".to_owned()),
            ("InternalIP".to_owned(), "fd00:192:168:50::11".to_owned()),
            ("Hostname".to_owned(), "node-1".to_owned()),
        ]
    );
}
