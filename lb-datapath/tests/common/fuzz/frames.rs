//! The seeded frame generator: which program a frame goes through and its bytes, by family.
//! Valid frames are built with the test packet builder (etherparse underneath, every length and
//! checksum right); mutations then work on raw bytes, since what they make is what etherparse
//! refuses to build.
//!
//! The generator remembers the translations it saw (a client's packet as sent, and as the
//! datapath forwarded it), so that it can send the replies of those flows, ICMP errors quoting
//! them, and fragments of their datagrams.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::Icmpv4Type;
use fastrand::Rng;
use lb_common::net::tcp_flags;

use super::{mutate, scenario::*, wire};
use crate::common::{
    harness::{Hook, SCTP, TCP, UDP},
    packet::{HOST_MAC, POD_MAC, Packet},
};

/// What a frame was made as (what it is, the oracle reads from its bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// TCP or UDP from a client to a frontend, or to a frontend address on a port it does not
    /// serve.
    Flow,
    /// TCP, UDP, ICMP or another protocol to an address without a frontend; among them a
    /// flow's client to its backend's own address, from the flow's port.
    Other,
    /// A backend's reply to a flow (to its client, or to the hairpin address).
    Reply,
    /// An ICMP error (or another ICMP message) quoting a flow, towards its frontend or client.
    IcmpError,
    /// The first fragment of a flow's datagram, and right after it its later fragment.
    Fragment,
    /// A later fragment on its own: of an earlier datagram, or of none.
    LaterFragment,
    /// ARP, IPv6, VLAN-tagged IPv4, another EtherType or IP version.
    NotIpv4,
    /// Random bytes, some behind a valid Ethernet and IPv4 start towards a frontend.
    Random,
    /// A frame of the families above with one to three header fields broken.
    Mutant,
    /// A frame of the families above cut short.
    Truncated,
}

impl Family {
    pub const ALL: [Self; 10] = [
        Self::Flow,
        Self::Other,
        Self::Reply,
        Self::IcmpError,
        Self::Fragment,
        Self::LaterFragment,
        Self::NotIpv4,
        Self::Random,
        Self::Mutant,
        Self::Truncated,
    ];
}

/// How often each family comes (relative weights, in [`Family::ALL`]'s order).
#[derive(Clone, Copy, Debug)]
pub struct Mix(pub [u32; Family::ALL.len()]);

/// One frame to run: `bytes` through `hook`, and for a first fragment its later fragment, run
/// right after it through the same program.
#[derive(Clone, Debug)]
pub struct Frame {
    pub family: Family,
    pub hook: Hook,
    pub bytes: Vec<u8>,
    pub later: Option<Vec<u8>>,
}

/// A translation the datapath made: a client's packet as sent, and as it left.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub hook: Hook,
    pub proto: u8,
    pub sent: (SocketAddrV4, SocketAddrV4),
    pub left: (SocketAddrV4, SocketAddrV4),
}

const MEMORY: usize = 256;

pub struct Generator {
    rng: Rng,
    mix: Mix,
    frontends: Vec<(Ipv4Addr, u16, u8)>,
    seen: Vec<Seen>,
    next_seen: usize,
    /// Later fragments of datagrams whose first fragment went through, sent some time after.
    laters: Vec<(Hook, Vec<u8>)>,
}

impl Generator {
    pub fn new(seed: u64, mix: Mix) -> Self {
        Self {
            rng: Rng::with_seed(seed),
            mix,
            frontends: frontends(),
            seen: Vec::new(),
            next_seen: 0,
            laters: Vec::new(),
        }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Remembers a translation, for replies and errors to come.
    pub fn saw(&mut self, seen: Seen) {
        if self.seen.len() < MEMORY {
            self.seen.push(seen);
        } else {
            self.seen[self.next_seen] = seen;
            self.next_seen = (self.next_seen + 1) % MEMORY;
        }
    }

    /// Forgets every translation (the datapath was loaded afresh).
    pub fn forget(&mut self) {
        self.seen.clear();
        self.next_seen = 0;
        self.laters.clear();
    }

    pub fn frame(&mut self) -> Frame {
        let family = self.family();
        let mut frame = match family {
            Family::Flow => self.flow(),
            Family::Other => self.other(),
            Family::Reply => self.reply(),
            Family::IcmpError => self.icmp_error(),
            Family::Fragment => self.fragment(),
            Family::LaterFragment => self.later_fragment(),
            Family::NotIpv4 => self.not_ipv4(),
            Family::Random => self.random(),
            Family::Mutant => {
                let mut base = self.base();
                for _ in 0..self.rng.usize(1..=3) {
                    mutate::any(&mut self.rng, &mut base.bytes);
                }
                base
            }
            Family::Truncated => {
                let mut base = self.base();
                let len = self.rng.usize(wire::ETH_LEN..base.bytes.len());
                base.bytes.truncate(len);
                base
            }
        };
        frame.family = family;
        if self.rng.u8(..32) == 0 {
            // Now and then through any program: a reply at a forward hook, a client's packet at
            // a reply hook.
            frame.hook = self.any_hook();
        }
        frame
    }

    fn family(&mut self) -> Family {
        let total: u32 = self.mix.0.iter().sum();
        let mut pick = self.rng.u32(..total);
        for (family, weight) in Family::ALL.into_iter().zip(self.mix.0) {
            if pick < weight {
                return family;
            }
            pick -= weight;
        }
        unreachable!("the weights add up to the total")
    }

    /// A well-formed frame of one of the IPv4 families, to break.
    fn base(&mut self) -> Frame {
        match self.rng.u8(..6) {
            0 | 1 => self.flow(),
            2 => self.reply(),
            3 => self.icmp_error(),
            4 => {
                let mut first = self.fragment();
                first.later = None;
                first
            }
            _ => self.other(),
        }
    }

    fn any_hook(&mut self) -> Hook {
        pick(
            &mut self.rng,
            &[
                Hook::FromPod,
                Hook::ToPod,
                Hook::Xdp,
                Hook::ExtIn,
                Hook::ExtOut,
            ],
        )
    }

    /// The forward hook a client's packets arrive at: a pod's veth, or an uplink (XDP, or tc
    /// where XDP is off).
    fn client_hook(&mut self, client: Ipv4Addr) -> Hook {
        if POD_CLIENTS.contains(&client) {
            Hook::FromPod
        } else if self.rng.bool() {
            Hook::Xdp
        } else {
            Hook::ExtIn
        }
    }

    /// The reply hook a packet to `client` leaves through.
    fn reply_hook(client: Ipv4Addr) -> Hook {
        if client.octets()[..3] == [10, 0, 1] {
            Hook::ToPod
        } else {
            Hook::ExtOut
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.u8(..8) == 0 {
            self.rng.u16(..)
        } else {
            pick(&mut self.rng, &CLIENT_PORTS)
        }
    }

    fn client(&mut self) -> SocketAddrV4 {
        let addr = match self.rng.u8(..16) {
            0 => Ipv4Addr::from(self.rng.u32(..)),
            1..=8 => pick(&mut self.rng, &POD_CLIENTS),
            _ => pick(&mut self.rng, &EXTERNAL_CLIENTS),
        };
        SocketAddrV4::new(addr, self.port())
    }

    fn tcp_flags(&mut self) -> u8 {
        use tcp_flags::*;
        let any = self.rng.u8(..);
        pick(
            &mut self.rng,
            &[
                SYN,
                SYN,
                SYN | ACK,
                ACK,
                ACK,
                ACK | 0x08,
                FIN | ACK,
                FIN | ACK,
                RST,
                RST | ACK,
                0,
                any,
            ],
        )
    }

    /// A TCP segment, UDP datagram or SCTP packet `src -> dst` with a few payload bytes, now
    /// and then with IPv4 options, a TTL about to run out, a group source MAC or a zero UDP
    /// checksum.
    fn packet(&mut self, src: SocketAddrV4, dst: SocketAddrV4, l4_proto: u8) -> Packet {
        let mut payload = vec![0; self.rng.usize(..48)];
        self.rng.fill(&mut payload);
        let mut pkt = match l4_proto {
            TCP => {
                let flags = self.tcp_flags();
                Packet::tcp(src, dst, flags, &payload)
            }
            SCTP => Packet::sctp(src, dst, self.rng.u32(..), &payload),
            _ => Packet::udp(src, dst, &payload),
        };
        pkt.ip.identification = self.rng.u16(..);
        pkt.ip.dont_fragment = self.rng.bool();
        match self.rng.u8(..32) {
            0 => pkt = pkt.with_ip_options(&[0x94, 0x04, 0, 0]),
            1 => pkt = pkt.with_ip_options(&[1, 1, 1, 1, 0x94, 0x04, 0, 0]),
            2 => pkt.ip.time_to_live = self.rng.u8(..2),
            3 => pkt.eth_src[0] |= 1,
            4 => pkt = pkt.with_zero_udp_checksum(),
            _ => {}
        }
        pkt
    }

    fn flow_packet(&mut self) -> (Hook, Packet) {
        let client = self.client();
        let (addr, mut port, mut l4_proto) = pick(&mut self.rng, &self.frontends);
        match self.rng.u8(..16) {
            0 => port = self.rng.u16(..),
            1 => l4_proto = pick(&mut self.rng, &[TCP, UDP, SCTP]),
            _ => {}
        }
        let hook = self.client_hook(*client.ip());
        (
            hook,
            self.packet(client, SocketAddrV4::new(addr, port), l4_proto),
        )
    }

    fn flow(&mut self) -> Frame {
        let (hook, pkt) = self.flow_packet();
        frame(hook, pkt.bytes())
    }

    fn other(&mut self) -> Frame {
        // A flow's client to its backend's own address, as a pod may connect from the same
        // port: a direct connection that clashes with the flow (`direct.rs`).
        if self.rng.u8(..4) == 0
            && let Some(seen) = self.a_seen()
            && seen.hook == Hook::FromPod
        {
            let (src, backend) = (seen.sent.0, seen.left.1);
            let pkt = if self.rng.bool() && seen.proto == TCP {
                Packet::tcp(src, backend, tcp_flags::SYN, &[])
            } else {
                self.packet(src, backend, seen.proto)
            };
            return frame(Hook::FromPod, pkt.bytes());
        }
        let src = self.client();
        let dst = match self.rng.u8(..4) {
            0 => SocketAddrV4::new(Ipv4Addr::from(self.rng.u32(..)), self.rng.u16(..)),
            _ => SocketAddrV4::new(pick(&mut self.rng, &OTHER_ADDRS), self.port()),
        };
        let pkt = match self.rng.u8(..4) {
            0 => Packet::other(*src.ip(), *dst.ip(), 47, b"gre payload"),
            1 => {
                let echo = Icmpv4Type::Unknown {
                    type_u8: 8,
                    code_u8: 0,
                    bytes5to8: [0, 1, 0, 1],
                };
                let inner = Packet::udp(src, dst, b"");
                Packet::icmp_error(*src.ip(), *dst.ip(), echo, &inner, 8)
            }
            l4 => self.packet(src, dst, if l4 == 2 { TCP } else { UDP }),
        };
        let hook = self.any_hook();
        frame(hook, pkt.bytes())
    }

    fn a_seen(&mut self) -> Option<Seen> {
        (!self.seen.is_empty()).then(|| self.seen[self.rng.usize(..self.seen.len())])
    }

    /// The hook and packet of a backend's reply to a flow seen, or of a backend to a client when
    /// none was seen yet.
    fn reply_packet(&mut self) -> (Hook, Packet) {
        let (src, dst, l4_proto) = match self.a_seen() {
            Some(seen) => (seen.left.1, seen.left.0, seen.proto),
            None => {
                let backend = SocketAddrV4::new(pick(&mut self.rng, &BACKEND_ADDRS), 8080);
                (
                    backend,
                    self.client(),
                    pick(&mut self.rng, &[TCP, UDP, SCTP]),
                )
            }
        };
        let hook = match *dst.ip() {
            // Replies to the hairpin address leave the pod; to the node, arrive from outside.
            HAIRPIN => Hook::FromPod,
            NODE => self.client_hook(NODE),
            client => Self::reply_hook(client),
        };
        let mut pkt = self.packet(src, dst, l4_proto);
        pkt.eth_src = HOST_MAC;
        pkt.eth_dst = POD_MAC;
        (hook, pkt)
    }

    fn reply(&mut self) -> Frame {
        let (hook, pkt) = self.reply_packet();
        frame(hook, pkt.bytes())
    }

    /// An ICMP message quoting a flow seen: towards its frontend (about a reply the client
    /// could not take), or towards its client (about a packet on its way to the backend).
    fn icmp_error(&mut self) -> Frame {
        let seen = self.a_seen().unwrap_or(Seen {
            hook: Hook::FromPod,
            proto: TCP,
            sent: (SocketAddrV4::new(POD_CLIENTS[0], 40_000), vip_web_80()),
            left: (SocketAddrV4::new(POD_CLIENTS[0], 40_000), WEB_BACKENDS[0].0),
        });
        let router = pick(&mut self.rng, &ROUTERS);
        let (hook, from, to, quoted) = if self.rng.bool() {
            let from = if self.rng.bool() {
                *seen.sent.0.ip()
            } else {
                router
            };
            let (frontend, client) = (seen.sent.1, seen.sent.0);
            (seen.hook, from, *frontend.ip(), (frontend, client))
        } else {
            let (client, backend) = seen.left;
            let from = if self.rng.bool() {
                *backend.ip()
            } else {
                router
            };
            let hook = Self::reply_hook(*client.ip());
            (hook, from, *client.ip(), (client, backend))
        };
        let mut inner = match self.rng.u8(..16) {
            // A quote of another protocol, which can belong to no flow.
            0 => Packet::other(*quoted.0.ip(), *quoted.1.ip(), 47, b"gre payload"),
            _ => self.packet(quoted.0, quoted.1, seen.proto),
        };
        if self.rng.u8(..8) == 0 {
            inner = inner.with_ip_options(&[1, 1, 1, 0]);
        }
        let (any_type, any_code) = (self.rng.u8(..), self.rng.u8(..));
        let kind = Icmpv4Type::Unknown {
            // Mostly errors (unreachable, time exceeded, parameter problem, source quench,
            // redirect), sometimes echo or anything.
            type_u8: pick(&mut self.rng, &[3, 3, 3, 11, 12, 4, 5, 0, 8, any_type]),
            code_u8: pick(&mut self.rng, &[3, 4, 0, any_code]),
            bytes5to8: [0, 0, 5, 0xdc],
        };
        let quote_len = match self.rng.u8(..8) {
            0 => self.rng.usize(..8),
            1 => 64,
            _ => 8,
        };
        let mut pkt = Packet::icmp_error(from, to, kind, &inner, quote_len);
        if self.rng.u8(..16) == 0 {
            pkt = pkt.with_ip_options(&[0x94, 0x04, 0, 0]);
        }
        let mut bytes = pkt.bytes();
        if self.rng.u8(..16) == 0 {
            // Any IHL in the quoted header: below the minimum, or past the quote's end.
            let quote = wire::L3 + pkt.ip.header_len() + wire::ICMP_LEN;
            bytes[quote] = 0x40 | self.rng.u8(..16);
        }
        frame(hook, bytes)
    }

    /// The first fragment of a flow's (or a reply's) datagram, with its later fragment.
    fn fragment(&mut self) -> Frame {
        let (hook, mut pkt) = if self.rng.bool() {
            self.flow_packet()
        } else {
            self.reply_packet()
        };
        pkt.ip.identification = self.rng.u16(..);
        pkt.payload.resize(40, 0x5a);
        // 32 bytes carry a whole TCP (or UDP) header; the rest goes in the later fragment.
        let [first, later] = pkt.fragments(32);
        if self.laters.len() < MEMORY {
            self.laters.push((hook, later.clone()));
        } else {
            let at = self.rng.usize(..MEMORY);
            self.laters[at] = (hook, later.clone());
        }
        Frame {
            later: self.rng.bool().then_some(later),
            ..frame(hook, first)
        }
    }

    /// A later fragment of an earlier datagram, or one whose first fragment never came.
    fn later_fragment(&mut self) -> Frame {
        if !self.laters.is_empty() && self.rng.bool() {
            let (hook, bytes) = self.laters[self.rng.usize(..self.laters.len())].clone();
            return frame(hook, bytes);
        }
        let (hook, pkt) = self.flow_packet();
        let mut bytes = pkt.bytes();
        mutate::later_fragment(&mut self.rng, &mut bytes);
        frame(hook, bytes)
    }

    fn not_ipv4(&mut self) -> Frame {
        let (hook, pkt) = self.flow_packet();
        let mut bytes = pkt.bytes();
        let ether_type = self.rng.u16(..).to_be_bytes();
        let version_ihl = pick(&mut self.rng, &[0x45, 0x65, 0x05, 0xf5]);
        let (at, new): (_, &[u8]) = match self.rng.u8(..6) {
            // 802.1Q, or 802.1ad (QinQ): tags in front of the IPv4 EtherType.
            0 => (12..12, &[0x81, 0x00, 0x00, 0x05]),
            1 => (12..12, &[0x88, 0xa8, 0x00, 0x05, 0x81, 0x00, 0x00, 0x06]),
            2 => (12..14, &[0x86, 0xdd]),
            3 => (12..14, &[0x08, 0x06]),
            4 => (12..14, &ether_type),
            // An IPv4 EtherType in front of another IP version.
            _ => (14..15, &[version_ihl]),
        };
        bytes.splice(at, new.iter().copied());
        frame(hook, bytes)
    }

    fn random(&mut self) -> Frame {
        let mut bytes = vec![0; self.rng.usize(wire::ETH_LEN..=200)];
        self.rng.fill(&mut bytes);
        if self.rng.bool() && bytes.len() >= wire::L3 + wire::IPV4_LEN {
            // An IPv4 start towards a frontend, so that random bytes reach the decisions.
            let (addr, _, _) = pick(&mut self.rng, &self.frontends);
            bytes[12..14].copy_from_slice(&[0x08, 0x00]);
            bytes[wire::L3] = 0x40 | (bytes[wire::L3] & 0x0f);
            bytes[wire::DST_OFF..wire::DST_OFF + 4].copy_from_slice(&addr.octets());
        }
        let hook = self.any_hook();
        frame(hook, bytes)
    }
}

fn frame(hook: Hook, bytes: Vec<u8>) -> Frame {
    Frame {
        family: Family::Flow,
        hook,
        bytes,
        later: None,
    }
}

fn vip_web_80() -> SocketAddrV4 {
    SocketAddrV4::new(VIP_WEB, 80)
}

pub fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

/// Whether BPF_PROG_TEST_RUN builds no skb for `frame`: an IPv4 or IPv6 frame shorter than its
/// fixed header (the kernel refuses it with EINVAL). Such frames go through XDP, which shares
/// the tc programs' parser.
pub fn refused_at_tc(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() < wire::L3 + wire::IPV4_LEN,
        Some([0x86, 0xdd]) => frame.len() < wire::L3 + 40,
        _ => false,
    }
}
