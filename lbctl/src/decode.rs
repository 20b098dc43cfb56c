//! Raw map fields as lbctl names them: flag bits, protocols, scopes, conntrack directions,
//! addresses and deadlines.
//!
//! Each fixed set of values is an enum that serializes to the JSON value lbctl has always
//! printed. A value outside the set still reads (a protocol number, `"scope2"`, a flag bit as
//! `"0x.."`) instead of failing: lbctl must be able to show maps that an agent of another
//! version wrote.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use lb_common::{
    Address, Be16, Be32, Be128,
    conntrack::{FORWARD, REPLY, ct_flags},
    maps::{addr_flags, backend_flags, frontend_flags, scope},
    net::proto,
    stats::Reason,
};
use serde::{Serialize, Serializer};

pub use lb_common::time::SECOND_NS;

/// The JSON value of a unit variant: `Display` of the derived-`Serialize` enums goes through it
/// so that tables print exactly what the JSON says, with no second list of names to keep in
/// step with the serde attributes.
pub fn serialized_name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        // Only unit variants come here; were anything else to, it would still print.
        Ok(other) => other.to_string(),
        Err(e) => format!("({e})"),
    }
}

/// `Display` as [`serialized_name`], for enums whose variants are all units.
macro_rules! display_serialized {
    ($($ty:ty),+ $(,)?) => {$(
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&$crate::decode::serialized_name(self))
            }
        }
    )+};
}
pub(crate) use display_serialized;

/// An IP protocol: `"tcp"`, `"udp"`, `"sctp"`, `"icmp"`, or the number (as a string).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Other(u8),
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
            Self::Sctp => proto::SCTP,
            Self::Icmp => proto::ICMP,
            Self::Other(n) => n,
        }
    }
}

impl From<u8> for Proto {
    fn from(n: u8) -> Self {
        match n {
            proto::TCP => Self::Tcp,
            proto::UDP => Self::Udp,
            proto::SCTP => Self::Sctp,
            proto::ICMP => Self::Icmp,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Udp => f.write_str("udp"),
            Self::Sctp => f.write_str("sctp"),
            Self::Icmp => f.write_str("icmp"),
            Self::Other(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Which side a frontend serves: `"internal"` (pods, lb_from_pod), `"external"` (uplinks,
/// lb_xdp and lb_ext_in), or `"scope<n>"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Internal,
    External,
    Other(u8),
}

impl Scope {
    pub const fn number(self) -> u8 {
        match self {
            Self::Internal => scope::INTERNAL,
            Self::External => scope::EXTERNAL,
            Self::Other(n) => n,
        }
    }
}

impl From<u8> for Scope {
    fn from(n: u8) -> Self {
        match n {
            scope::INTERNAL => Self::Internal,
            scope::EXTERNAL => Self::External,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Internal => f.write_str("internal"),
            Self::External => f.write_str("external"),
            Self::Other(n) => write!(f, "scope{n}"),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The direction a conntrack entry is keyed in: `"forward"` (client -> frontend), `"reply"`
/// (backend -> client), or `"dir<n>"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDir {
    Forward,
    Reply,
    Other(u8),
}

impl From<u8> for CtDir {
    fn from(n: u8) -> Self {
        match n {
            FORWARD => Self::Forward,
            REPLY => Self::Reply,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for CtDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forward => f.write_str("forward"),
            Self::Reply => f.write_str("reply"),
            Self::Other(n) => write!(f, "dir{n}"),
        }
    }
}

impl Serialize for CtDir {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The named bits of one flags field.
pub trait FlagBit: Copy + PartialEq + Serialize + 'static {
    /// Each named bit and its name, in the order flags are listed.
    const NAMED: &'static [(u64, Self)];
}

/// One set bit of a flags field: its name, or the bit itself (`"0x.."`) when it has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag<N> {
    Named(N),
    Unnamed(u64),
}

impl<N: Serialize> fmt::Display for Flag<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named(name) => f.write_str(&serialized_name(name)),
            Self::Unnamed(bit) => write!(f, "{bit:#x}"),
        }
    }
}

impl<N: Serialize> Serialize for Flag<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Named(name) => name.serialize(s),
            Self::Unnamed(_) => s.collect_str(self),
        }
    }
}

/// The set bits of a flags field: named bits first (in [`FlagBit::NAMED`] order), then the
/// others from the lowest. `Display` joins them with commas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Flags<N>(Vec<Flag<N>>);

impl<N: FlagBit> Flags<N> {
    pub fn decode(bits: impl Into<u64>) -> Self {
        let bits = bits.into();
        let mut rest = bits;
        let mut out = Vec::new();
        for &(bit, name) in N::NAMED {
            if bits & bit != 0 {
                out.push(Flag::Named(name));
                rest &= !bit;
            }
        }
        for i in 0..64 {
            if rest & (1 << i) != 0 {
                out.push(Flag::Unnamed(1 << i));
            }
        }
        Self(out)
    }

    pub fn contains(&self, name: N) -> bool {
        self.0.contains(&Flag::Named(name))
    }
}

impl<N> Flags<N> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flag<N>> {
        self.0.iter()
    }
}

impl<N: Serialize> fmt::Display for Flags<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, flag) in self.0.iter().enumerate() {
            if i != 0 {
                f.write_str(",")?;
            }
            write!(f, "{flag}")?;
        }
        Ok(())
    }
}

/// A bit of an `LB_ADDRS` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AddrFlag {
    /// A ClusterIP: unknown ports are rejected.
    ClusterIp,
    /// The node's SNAT address.
    Snat,
    /// The hairpin address.
    Hairpin,
}

impl FlagBit for AddrFlag {
    const NAMED: &'static [(u64, Self)] = &[
        (addr_flags::CLUSTER_IP as u64, Self::ClusterIp),
        (addr_flags::SNAT as u64, Self::Snat),
        (addr_flags::HAIRPIN as u64, Self::Hairpin),
    ];
}

/// A bit of an `LB_SERVICES` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendFlag {
    DropWhenEmpty,
    Dsr,
    KeepsClient,
}

impl FlagBit for FrontendFlag {
    const NAMED: &'static [(u64, Self)] = &[
        (frontend_flags::DROP_WHEN_EMPTY as u64, Self::DropWhenEmpty),
        (frontend_flags::DSR as u64, Self::Dsr),
        (frontend_flags::KEEPS_CLIENT as u64, Self::KeepsClient),
    ];
}

/// A bit of an `LB_BACKENDS` slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendFlag {
    Active,
    Local,
}

impl FlagBit for BackendFlag {
    const NAMED: &'static [(u64, Self)] = &[
        (backend_flags::ACTIVE as u64, Self::Active),
        (backend_flags::LOCAL as u64, Self::Local),
    ];
}

/// A bit of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtFlag {
    Established,
    Fin,
    Rst,
    Snat,
    Hairpin,
    PeerFin,
    PeerRst,
    FinFirst,
}

impl FlagBit for CtFlag {
    const NAMED: &'static [(u64, Self)] = &[
        (ct_flags::ESTABLISHED as u64, Self::Established),
        (ct_flags::FIN as u64, Self::Fin),
        (ct_flags::RST as u64, Self::Rst),
        (ct_flags::SNAT as u64, Self::Snat),
        (ct_flags::HAIRPIN as u64, Self::Hairpin),
        (ct_flags::PEER_FIN as u64, Self::PeerFin),
        (ct_flags::PEER_RST as u64, Self::PeerRst),
        (ct_flags::FIN_FIRST as u64, Self::FinFirst),
    ];
}

/// Serializes a verdict counter's reason as its stable name (`lb_common` stays free of serde).
pub fn serialize_reason<S: Serializer>(reason: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(reason.name())
}

/// [`serialize_reason`] for an optional reason (`null` when absent).
pub fn serialize_opt_reason<S: Serializer>(
    reason: &Option<Reason>,
    s: S,
) -> Result<S::Ok, S::Error> {
    reason.map(Reason::name).serialize(s)
}

/// An address as the maps hold it ([`Be32`], [`Be128`]) and the std types lbctl shows it as,
/// so that one row type and one function serve the maps of both address families.
pub trait MapAddress: Address {
    /// `Ipv4Addr` or `Ipv6Addr`: its JSON and text are the address (`"fd00::1"`), and its
    /// order is the addresses' numeric order, which rows sort by.
    type Ip: Copy + Ord + fmt::Debug + fmt::Display + Serialize;
    /// `SocketAddrV4` or `SocketAddrV6`: `"10.0.0.1:80"`, `"[fd00::1]:80"`.
    type Socket: Copy + Ord + fmt::Debug + fmt::Display + Serialize;

    fn ip(self) -> Self::Ip;
    fn with_port(self, port: Be16) -> Self::Socket;
}

impl MapAddress for Be32 {
    type Ip = Ipv4Addr;
    type Socket = SocketAddrV4;

    fn ip(self) -> Ipv4Addr {
        self.to_ip()
    }

    fn with_port(self, port: Be16) -> SocketAddrV4 {
        SocketAddrV4::new(self.to_ip(), port.to_host())
    }
}

impl MapAddress for Be128 {
    type Ip = Ipv6Addr;
    type Socket = SocketAddrV6;

    fn ip(self) -> Ipv6Addr {
        self.to_ip()
    }

    /// No flow label or scope id: the maps key by address and port only.
    fn with_port(self, port: Be16) -> SocketAddrV6 {
        SocketAddrV6::new(self.to_ip(), port.to_host(), 0, 0)
    }
}

/// An address and port of a map as one socket address, of the address's family.
pub fn socket<A: MapAddress>(addr: A, port: Be16) -> A::Socket {
    addr.with_port(port)
}

/// Whole seconds from `now_ns` to `deadline_ns`, negative once past.
pub fn seconds_until(deadline_ns: u64, now_ns: u64) -> i64 {
    if deadline_ns >= now_ns {
        ((deadline_ns - now_ns) / SECOND_NS) as i64
    } else {
        -(((now_ns - deadline_ns) / SECOND_NS) as i64)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn names<N: FlagBit>(bits: u64) -> serde_json::Value {
        serde_json::to_value(Flags::<N>::decode(bits)).unwrap()
    }

    #[test]
    fn flags_name_known_bits_and_show_the_rest() {
        assert_eq!(names::<CtFlag>(0), json!([]));
        assert_eq!(
            names::<CtFlag>((ct_flags::ESTABLISHED | ct_flags::FIN).into()),
            json!(["established", "fin"])
        );
        assert_eq!(
            names::<BackendFlag>((backend_flags::ACTIVE | 0x80).into()),
            json!(["active", "0x80"])
        );
        assert_eq!(names::<AddrFlag>(1), json!(["cluster_ip"]));
        assert_eq!(
            names::<AddrFlag>((addr_flags::CLUSTER_IP | addr_flags::SNAT).into()),
            json!(["cluster_ip", "snat"])
        );
        assert_eq!(
            names::<CtFlag>((ct_flags::ESTABLISHED | ct_flags::SNAT | ct_flags::HAIRPIN).into()),
            json!(["established", "snat", "hairpin"])
        );
        assert_eq!(
            names::<CtFlag>((ct_flags::PEER_FIN | ct_flags::PEER_RST | ct_flags::FIN_FIRST).into()),
            json!(["peer_fin", "peer_rst", "fin_first"])
        );
        assert_eq!(
            names::<AddrFlag>(addr_flags::HAIRPIN.into()),
            json!(["hairpin"])
        );
        assert_eq!(names::<FrontendFlag>(1), json!(["drop_when_empty"]));
        assert_eq!(
            names::<FrontendFlag>(
                (frontend_flags::DROP_WHEN_EMPTY | frontend_flags::KEEPS_CLIENT).into()
            ),
            json!(["drop_when_empty", "keeps_client"])
        );
    }

    #[test]
    fn tables_print_what_the_json_says() {
        let flags =
            Flags::<BackendFlag>::decode(backend_flags::ACTIVE | backend_flags::LOCAL | 0x40);
        assert_eq!(flags.to_string(), "active,local,0x40");
        assert!(flags.contains(BackendFlag::Local));
        for (n, text) in [
            (6, "tcp"),
            (17, "udp"),
            (132, "sctp"),
            (1, "icmp"),
            (47, "47"),
        ] {
            assert_eq!(Proto::from(n).to_string(), text);
            assert_eq!(serde_json::to_value(Proto::from(n)).unwrap(), json!(text));
            assert_eq!(Proto::from(n).number(), n);
        }
        for (n, text) in [(0, "internal"), (1, "external"), (2, "scope2")] {
            assert_eq!(serde_json::to_value(Scope::from(n)).unwrap(), json!(text));
            assert_eq!(Scope::from(n).number(), n);
        }
        for (n, text) in [(FORWARD, "forward"), (REPLY, "reply"), (7, "dir7")] {
            assert_eq!(serde_json::to_value(CtDir::from(n)).unwrap(), json!(text));
        }
    }

    #[test]
    fn addresses_of_both_families_print_as_text() {
        let port = Be16::from_host(80);
        let v4 = socket(Be32::from(Ipv4Addr::new(10, 0, 0, 1)), port);
        assert_eq!(serde_json::to_value(v4).unwrap(), json!("10.0.0.1:80"));
        let ip: Ipv6Addr = "fd00::1".parse().unwrap();
        let v6 = socket(Be128::from(ip), port);
        assert_eq!(serde_json::to_value(v6).unwrap(), json!("[fd00::1]:80"));
        assert_eq!(Be128::from(ip).ip().to_string(), "fd00::1");
    }

    #[test]
    fn lifetimes_round_towards_zero_and_go_negative() {
        assert_eq!(seconds_until(10 * SECOND_NS + 5, 5), 10);
        assert_eq!(seconds_until(5, 5 + 3 * SECOND_NS), -3);
        assert_eq!(seconds_until(5, 5), 0);
    }
}
