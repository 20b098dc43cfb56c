//! What the socket programs do with a `connect()` or an unconnected UDP `sendto()` from a
//! process in their cgroup, predicted from the live maps (`lbctl trace-connect`): the same
//! rules, in the same order, as `lb_ebpf::sock`.

use std::net::SocketAddrV4;

use lb_common::{
    Be32,
    maps::{self as names, Backend, Frontend, FrontendKey, scope},
    net::proto,
    sock::{self, Connect, Skip, SockConfig},
};

use crate::{
    maps::{Maps, MapsError},
    predict::{self, Selection, found},
};

/// Whose socket makes the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A process of the node's own network namespace.
    Node,
    /// A pod's process.
    Pod,
}

/// Which call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockCall {
    /// `connect()` (TCP or UDP).
    Connect,
    /// `sendto()` on an unconnected UDP socket.
    Sendto,
}

/// The programs' decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SockDecision {
    /// No frontend of the internal scope on that address and port, and the address is no
    /// ClusterIP: the call goes where it asked.
    NotAFrontend,
    /// The hooks leave this call to the packet path (or, for the node's own sockets, to the
    /// address as it is), for the reason given.
    Left {
        frontend: FrontendKey,
        why: &'static str,
    },
    /// The call fails at once with `ECONNREFUSED`.
    Refused {
        frontend: Option<FrontendKey>,
        why: &'static str,
    },
    /// Sent to `backend` instead; `getpeername()` / `recvfrom()` show the frontend.
    Translated {
        frontend: FrontendKey,
        selection: Selection,
        backend_id: u32,
        backend: SocketAddrV4,
    },
}

/// Predicts the call `call` to `dst` over `l4_proto` from a socket of `origin` whose cookie is
/// `cookie` (it picks the Maglev slot) and whose bound address is `bound` (0.0.0.0: unbound).
pub fn predict(
    maps: &Maps,
    dst: SocketAddrV4,
    l4_proto: u8,
    call: SockCall,
    origin: Origin,
    cookie: u64,
    bound: Be32,
) -> Result<SockDecision, MapsError> {
    let key = FrontendKey::new(*dst.ip(), dst.port(), l4_proto, scope::INTERNAL);
    let hooked = match call {
        SockCall::Connect => l4_proto == proto::TCP || l4_proto == proto::UDP,
        SockCall::Sendto => l4_proto == proto::UDP,
    };
    let frontend = found(names::LB_SERVICES, maps.services.get(&key, 0))?;
    if !hooked {
        return Ok(match frontend {
            Some(_) => SockDecision::Left {
                frontend: key,
                why: "the socket programs translate TCP and UDP connect() and UDP sendto() only",
            },
            None => SockDecision::NotAFrontend,
        });
    }
    let Some(frontend) = frontend else {
        let cluster_ip = found(names::LB_ADDRS, maps.addrs.get(&key.addr, 0))?
            .is_some_and(|a| a.is_cluster_ip());
        return Ok(if cluster_ip {
            SockDecision::Refused {
                frontend: None,
                why: "a port the ClusterIP does not serve",
            }
        } else {
            SockDecision::NotAFrontend
        });
    };
    let config = sock_config(maps)?;
    // A pod's namespace is any but the node's.
    let netns = match origin {
        Origin::Node => config.host_netns_cookie,
        Origin::Pod => !config.host_netns_cookie,
    };
    let is_host = config.is_host(netns);
    let left = |why| Ok(SockDecision::Left { frontend: key, why });
    match config.skips(netns, l4_proto, call == SockCall::Connect) {
        Some(Skip::HostOnly) => return left("--socket-lb host-only: pods keep the packet path"),
        Some(Skip::PodConnectedUdp) => {
            return left("a pod's connected UDP socket: the packet path serves its flow");
        }
        None => {}
    }
    let node = predict::node_config(maps)?.snat_addr;
    let client = sock::client_addr(&frontend, is_host, || bound, || Some(node));
    match sock::on_connect(&frontend, client) {
        Connect::Leave => {
            left("affinity or source ranges need the client's address, unknown before connect()")
        }
        Connect::Refuse => Ok(SockDecision::Refused {
            frontend: Some(key),
            why: "no backend takes new connections",
        }),
        Connect::Balance => balance(
            maps,
            key,
            &frontend,
            client.unwrap_or(Be32::from_raw(0)),
            cookie,
        ),
    }
}

/// `LB_SOCK_CONFIG`'s single entry, as stored.
pub fn sock_config(maps: &Maps) -> Result<SockConfig, MapsError> {
    maps.sock_config
        .get(&0, 0)
        .map_err(|source| MapsError::Map {
            name: names::LB_SOCK_CONFIG,
            source,
        })
}

fn balance(
    maps: &Maps,
    key: FrontendKey,
    frontend: &Frontend,
    client: Be32,
    cookie: u64,
) -> Result<SockDecision, MapsError> {
    if !predict::source_allowed(maps, frontend, client)? {
        return Ok(SockDecision::Refused {
            frontend: Some(key),
            why: "the client's address is outside the loadBalancerSourceRanges",
        });
    }
    let now = predict::coarse_now_ns();
    Ok(
        match predict::select(
            maps,
            frontend,
            client,
            || sock::slot_hash(cookie, &key),
            now,
        )? {
            Ok((selection, backend_id, Backend { addr, port, .. })) => SockDecision::Translated {
                frontend: key,
                selection,
                backend_id,
                backend: SocketAddrV4::new(addr.to_ip(), port.to_host()),
            },
            Err(_) => SockDecision::Refused {
                frontend: Some(key),
                why: "its Maglev table or backend is missing (the datapath refuses such a call)",
            },
        },
    )
}
