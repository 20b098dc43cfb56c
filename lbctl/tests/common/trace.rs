//! Trace versus the datapath: one packet is traced by `lbctl trace` and run through the programs,
//! and the verdict, the output frame and the counter bumped must be the predicted ones.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{
    Be16, Be32,
    hash::flow_hash,
    net::proto::{TCP, UDP},
};
pub use lb_datapath::testing::Hook;
use lb_datapath::{
    program::ServiceSpec,
    testing::{Run, tc, xdp},
};
use lb_testbed::packet::{Packet, assert_frame_eq, flags};
use serde_json::Value;

use super::{Fixture, sock};

/// The verdict `hook` returns for lbctl's `pass` / `drop` / `reject` / `forward` / `bounce`. A
/// forwarded packet is redirected out of `up0`, the test namespace's route to everywhere (see
/// `in_routed_netns`).
pub fn expected_verdict(hook: Hook, name: &str) -> u32 {
    match (hook, name) {
        (Hook::Xdp, "pass") => xdp::PASS,
        (Hook::Xdp, "forward") => xdp::REDIRECT,
        (Hook::Xdp, "drop") => xdp::DROP,
        (Hook::Xdp, "reject" | "bounce") => xdp::TX,
        (_, "pass") => tc::PASS,
        (_, "forward" | "reject" | "bounce") => tc::REDIRECT,
        (_, "drop") => tc::SHOT,
        _ => panic!("unknown verdict {name}"),
    }
}

/// Source and destination (with ports, 0 for other protocols) of an output frame.
pub fn frame_ends(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let (src, dst) = (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
    );
    let (sport, dport) = if ip[9] == TCP || ip[9] == UDP {
        let l4 = &ip[ihl..];
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    } else {
        (0, 0)
    };
    (SocketAddrV4::new(src, sport), SocketAddrV4::new(dst, dport))
}

/// An address of lbctl's JSON output.
pub fn json_sock(v: &Value) -> SocketAddrV4 {
    v.as_str()
        .unwrap_or_else(|| panic!("not an address: {v}"))
        .parse()
        .unwrap()
}

/// One packet: what lbctl predicts must be what the datapath does.
pub struct Case {
    pub what: &'static str,
    pub hook: Hook,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub l4: u8,
    pub tcp_flags: u8,
}

/// An address as a test writes it: text, or one it already has.
pub trait Addr {
    fn addr(self) -> SocketAddrV4;
}

impl Addr for &str {
    fn addr(self) -> SocketAddrV4 {
        sock(self)
    }
}

impl Addr for SocketAddrV4 {
    fn addr(self) -> SocketAddrV4 {
        self
    }
}

impl Case {
    pub fn tcp(
        what: &'static str,
        hook: Hook,
        src: impl Addr,
        dst: impl Addr,
        tcp_flags: u8,
    ) -> Self {
        Self {
            what,
            hook,
            src: src.addr(),
            dst: dst.addr(),
            l4: TCP,
            tcp_flags,
        }
    }

    pub fn udp(what: &'static str, hook: Hook, src: impl Addr, dst: impl Addr) -> Self {
        Self {
            what,
            hook,
            src: src.addr(),
            dst: dst.addr(),
            l4: UDP,
            tcp_flags: 0,
        }
    }

    pub fn packet(&self) -> Packet {
        if self.l4 == TCP {
            Packet::tcp(self.src, self.dst, self.tcp_flags, b"data")
        } else {
            Packet::udp(self.src, self.dst, b"query")
        }
    }

    pub fn trace_args(&self) -> Vec<String> {
        let mut args = vec![
            "trace".to_owned(),
            self.src.to_string(),
            self.dst.to_string(),
            if self.l4 == TCP { "tcp" } else { "udp" }.to_owned(),
        ];
        match self.hook {
            Hook::ToPod => args.push("--reply".into()),
            Hook::Xdp | Hook::ExtIn => args.extend(["--scope".into(), "external".into()]),
            Hook::FromPod => {}
            Hook::ExtOut => panic!("lbctl traces no packet leaving through an uplink"),
        }
        if self.tcp_flags & (flags::SYN | flags::ACK) == flags::SYN {
            args.push("--syn".into());
        }
        args
    }
}

/// Traces `case` with lbctl, runs it through the datapath, and checks that the verdict, the
/// output frame and the counter bumped are the predicted ones. Returns the trace.
pub fn check(f: &mut Fixture, case: &Case) -> Value {
    let args = case.trace_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let trace = f.json(&args);
    let what = format!("{}: {trace:#}", case.what);

    let before = f.verdicts();
    let pkt = case.packet();
    let Run { verdict, out } = f.run(case.hook, &pkt.bytes());
    let after = f.verdicts();

    let predicted = trace["verdict"].as_str().unwrap();
    assert_eq!(
        verdict,
        expected_verdict(case.hook, predicted),
        "verdict of {what}"
    );
    match predicted {
        // Forwarded: rewritten the same way, then routed (see `expected_verdict`); bounced: sent
        // back where it came from, MAC addresses swapped.
        "pass" | "forward" | "bounce" => {
            let o = &trace["output"];
            let (src, dst) = (json_sock(&o["src"]), json_sock(&o["dst"]));
            assert_eq!(frame_ends(&out), (src, dst), "output of {what}");
            let mut expected = pkt.clone().with_src(src).with_dst(dst);
            if predicted == "bounce" {
                std::mem::swap(&mut expected.eth_src, &mut expected.eth_dst);
            }
            if predicted == "forward" {
                // Routed as `in_routed_netns` set up: out of up0 to its neighbour.
                expected.eth_src = [0x02, 0, 0, 0, 0, 0x01];
                expected.eth_dst = [0x02, 0, 0, 0, 0, 0x02];
                expected.ip.time_to_live -= 1;
            }
            assert_frame_eq(&out, &expected.bytes(), case.what);
        }
        "reject" => {
            assert!(trace["output"].is_null(), "{what}");
            let (src, dst) = frame_ends(&out);
            assert_eq!(
                (src.ip(), dst.ip()),
                (case.dst.ip(), case.src.ip()),
                "the reject goes back to the client: {what}"
            );
            let kind = if case.l4 == TCP {
                "tcp_rst"
            } else {
                "icmp_port_unreachable"
            };
            assert_eq!(trace["reject"], kind, "{what}");
        }
        "drop" => assert!(trace["output"].is_null(), "{what}"),
        other => panic!("unknown verdict {other}: {what}"),
    }
    // Exactly the predicted counter moved, by one packet (or none for uncounted packets).
    let moved: BTreeMap<&str, u64> = after
        .iter()
        .map(|(r, n)| (*r, n - before.get(r).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut expected: BTreeMap<&str, u64> = trace["reason"]
        .as_str()
        .map(|r| (r, 1))
        .into_iter()
        .collect();
    if predicted == "forward" {
        expected.insert("forwarded", 1);
    }
    assert_eq!(moved, expected, "counters of {what}");
    trace
}

/// The backend Maglev gives a new TCP flow of `svc`, computed here from the programmed table.
pub fn maglev_pick(f: &Fixture, svc: &ServiceSpec, src: SocketAddrV4, dst: SocketAddrV4) -> u32 {
    maglev_pick_l4(f, svc, src, dst, TCP)
}

pub fn maglev_pick_l4(
    f: &Fixture,
    svc: &ServiceSpec,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4: u8,
) -> u32 {
    f.maglev_pick(svc, src, dst, l4)
}

pub fn hash_of(src: SocketAddrV4, dst: SocketAddrV4, l4: u8) -> u32 {
    flow_hash(
        Be32::from(*src.ip()),
        Be32::from(*dst.ip()),
        Be16::from_host(src.port()),
        Be16::from_host(dst.port()),
        l4,
    )
}

/// The address of the backend the planner gave `id`.
pub fn backend_addr(f: &Fixture, id: u64) -> SocketAddrV4 {
    let id = u32::try_from(id).unwrap();
    f.services
        .backend_addr(id)
        .unwrap_or_else(|| panic!("no backend {id} is programmed"))
}
