//! What a run of a program must satisfy: the properties every frame has (a verdict of the
//! hook's set, counted at most once, untouched when not counted), and the expectation the
//! oracle read from the maps.

use etherparse::{NetHeaders, PacketHeaders, TransportHeader, checksum::Sum16BitWords};
use lb_common::stats::Reason;

use super::{
    oracle::{Answer, Expect, Nat, Outcome},
    wire,
};
use crate::common::harness::{Hook, tc, xdp};

/// What one run of a program did with `input`: its verdict, output, and the counters it bumped
/// (reason, packets, bytes).
#[derive(Debug)]
pub struct Observed<'a> {
    pub hook: Hook,
    pub input: &'a [u8],
    pub verdict: u32,
    pub out: Vec<u8>,
    pub counted: Vec<(Reason, u64, u64)>,
}

/// A verdict's meaning at its hook. At tc, a packet sent back out and one redirected elsewhere
/// are both `TC_ACT_REDIRECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// XDP_TX: back out of the interface it came in on.
    Tx,
    /// XDP_REDIRECT, or TC_ACT_REDIRECT.
    Redirect,
}

pub fn is_tc(hook: Hook) -> bool {
    hook != Hook::Xdp
}

/// Whether `hook` runs the forward path (a client's packets), else the reply path.
pub fn is_forward(hook: Hook) -> bool {
    matches!(hook, Hook::FromPod | Hook::Xdp | Hook::ExtIn)
}

/// The verdict `code` means at `hook`; an error for anything outside the hook's set (XDP_ABORTED
/// included).
pub fn verdict(hook: Hook, code: u32) -> Result<Verdict, String> {
    let verdict = match (is_tc(hook), code) {
        (true, tc::PASS) | (false, xdp::PASS) => Verdict::Pass,
        (true, tc::SHOT) | (false, xdp::DROP) => Verdict::Drop,
        (true, tc::REDIRECT) | (false, xdp::REDIRECT) => Verdict::Redirect,
        (false, xdp::TX) => Verdict::Tx,
        _ => return Err(format!("verdict {code} is none of {hook:?}'s")),
    };
    Ok(verdict)
}

/// The verdict of a packet sent back out where it came in.
fn bounced(hook: Hook) -> Verdict {
    if is_tc(hook) {
        Verdict::Redirect
    } else {
        Verdict::Tx
    }
}

/// Counted on top of the reason a packet is counted under.
const EXTRAS: [Reason; 2] = [Reason::Forwarded, Reason::AnswerSuppressed];

impl Observed<'_> {
    /// The reason the frame was counted under (not an extra), if any.
    pub fn reason(&self) -> Option<Reason> {
        self.counted
            .iter()
            .map(|&(r, _, _)| r)
            .find(|r| !EXTRAS.contains(r))
    }

    pub fn has(&self, reason: Reason) -> bool {
        self.counted.iter().any(|&(r, _, _)| r == reason)
    }

    fn reasons(&self) -> Vec<Reason> {
        self.counted.iter().map(|&(r, _, _)| r).collect()
    }

    /// The properties of every frame: a verdict of the hook's set; counted under one reason at
    /// most (once, with the frame's length), the extras only with a reason they go with;
    /// dropped only when counted; untouched and passed when not counted.
    pub fn universal(&self) -> Result<Verdict, String> {
        let verdict = verdict(self.hook, self.verdict)?;
        let len = self.input.len() as u64;
        for &(reason, packets, bytes) in &self.counted {
            if (packets, bytes) != (1, len) {
                return Err(format!(
                    "{reason:?} counted {packets} packets of {bytes} bytes for one frame of {len}"
                ));
            }
        }
        let primary = self.counted.len() - EXTRAS.iter().filter(|&&r| self.has(r)).count();
        if primary > 1 {
            return Err(format!(
                "counted under several reasons: {:?}",
                self.reasons()
            ));
        }
        let extras_fit = match self.reason() {
            None => self.counted.is_empty(),
            Some(r) => {
                (!self.has(Reason::Forwarded)
                    || matches!(r, Reason::NewFlow | Reason::Established | Reason::ReplyNat))
                    && (!self.has(Reason::AnswerSuppressed)
                        || matches!(
                            r,
                            Reason::RejectNoBackend
                                | Reason::RejectUnknownPort
                                | Reason::DropTtlExceeded
                                | Reason::DropTooBig
                        ))
            }
        };
        if !extras_fit {
            return Err(format!(
                "counters that do not go together: {:?}",
                self.reasons()
            ));
        }
        if self.reason().is_none() && (verdict != Verdict::Pass || self.out != self.input) {
            return Err(format!(
                "not counted, yet {verdict:?} and {}",
                if self.out == self.input {
                    "untouched"
                } else {
                    "changed"
                }
            ));
        }
        Ok(verdict)
    }

    /// The expectation.
    pub fn expected(&self, verdict: Verdict, expect: &Expect) -> Result<(), String> {
        match expect {
            // `universal` checks the rest.
            Expect::Untouched => self.counted_as(None),
            Expect::Counted(reason, outcome) => {
                self.counted_as(Some(*reason))?;
                self.outcome(verdict, outcome)
            }
            Expect::Reject(reason, answer) => self.answered(verdict, *reason, answer, (3, 3)),
            Expect::Routed {
                ttl_expired,
                answer,
                then,
            } => self.routed(verdict, *ttl_expired, answer, then),
        }
    }

    fn counted_as(&self, reason: Option<Reason>) -> Result<(), String> {
        let extras = self.counted.iter().filter(|(r, _, _)| EXTRAS.contains(r));
        if self.reason() != reason || extras.count() > 0 {
            return Err(format!("counted {:?}, expected {reason:?}", self.reasons()));
        }
        Ok(())
    }

    fn outcome(&self, verdict: Verdict, outcome: &Outcome) -> Result<(), String> {
        let (wanted, nat, macs) = match outcome {
            Outcome::Drop => (Verdict::Drop, None, Macs::Kept),
            Outcome::Pass(nat) => (Verdict::Pass, Some(nat), Macs::Kept),
            Outcome::Bounce(nat) => (bounced(self.hook), Some(nat), Macs::Swapped),
            Outcome::Forward(nat) => {
                if !matches!(verdict, Verdict::Tx | Verdict::Redirect) {
                    return Err(format!("{verdict:?}, expected it forwarded"));
                }
                return self.translated(nat, Macs::Routed);
            }
        };
        if verdict != wanted {
            return Err(format!("{verdict:?}, expected {wanted:?}"));
        }
        nat.map_or(Ok(()), |nat| self.translated(nat, macs))
    }

    /// A refused packet: counted under `reason`; answered by bouncing the answer (a RST, or an
    /// ICMP error of `icmp` type and code), or dropped when the answer was suppressed (counted
    /// too) or cannot be built.
    fn answered(
        &self,
        verdict: Verdict,
        reason: Reason,
        answer: &Answer,
        icmp: (u8, u8),
    ) -> Result<(), String> {
        if self.reason() != Some(reason) || self.has(Reason::Forwarded) {
            return Err(format!("counted {:?}, expected {reason:?}", self.reasons()));
        }
        if answer.suppressed && !self.has(Reason::AnswerSuppressed) {
            return Err("answered a source that must not be answered".to_owned());
        }
        if self.has(Reason::AnswerSuppressed) || !answer.builds {
            return match verdict {
                Verdict::Drop => Ok(()),
                _ => Err(format!("{verdict:?}, expected a drop (no answer)")),
            };
        }
        if verdict != bounced(self.hook) {
            return Err(format!("{verdict:?}, expected the answer bounced"));
        }
        self.answer(answer.reset, icmp)
    }

    /// A packet the node routes after NAT: the TTL check, then whatever the FIB lookup says
    /// (`lb-ebpf/src/fib.rs`): no route (dropped, counted), the next hop unresolved or the
    /// packet too big at XDP (left to tc, untouched), too big at tc (dropped, answered when DF),
    /// or a route (`then`).
    fn routed(
        &self,
        verdict: Verdict,
        ttl_expired: bool,
        answer: &Answer,
        then: &Expect,
    ) -> Result<(), String> {
        if ttl_expired {
            return self.answered(verdict, Reason::DropTtlExceeded, answer, (11, 0));
        }
        match self.reason() {
            Some(Reason::DropNoRoute) => {
                self.counted_as(Some(Reason::DropNoRoute))?;
                match verdict {
                    Verdict::Drop => Ok(()),
                    _ => Err(format!("{verdict:?} without a route")),
                }
            }
            None if !is_tc(self.hook) => Ok(()),
            Some(Reason::DropTooBig) if is_tc(self.hook) => {
                let df = wire::ipv4(self.input).is_some_and(|ip| ip.dont_fragment());
                let answer = Answer {
                    builds: answer.builds && df,
                    ..*answer
                };
                self.answered(verdict, Reason::DropTooBig, &answer, (3, 4))
            }
            _ => match then {
                Expect::Counted(reason, outcome @ Outcome::Forward(_)) => {
                    let mut counted = self.reasons();
                    counted.sort();
                    let mut wanted = vec![*reason, Reason::Forwarded];
                    wanted.sort();
                    if counted != wanted {
                        return Err(format!("counted {counted:?}, expected {wanted:?}"));
                    }
                    self.outcome(verdict, outcome)
                }
                then => self.expected(verdict, then),
            },
        }
    }

    /// The output is the input with `nat` applied: its writes made, its checksums' sums kept,
    /// every other byte as it was (the MACs as `macs` says).
    fn translated(&self, nat: &Nat, macs: Macs) -> Result<(), String> {
        let (input, out) = (self.input, &self.out[..]);
        if out.len() != input.len() {
            return Err(format!("{} bytes out of {}", out.len(), input.len()));
        }
        let mut want = input.to_vec();
        let mut free = vec![false; input.len()];
        for (off, bytes) in &nat.writes {
            want[*off..off + bytes.len()].copy_from_slice(bytes);
        }
        match macs {
            Macs::Kept => {}
            Macs::Swapped => {
                want[..6].copy_from_slice(&input[6..12]);
                want[6..12].copy_from_slice(&input[..6]);
            }
            Macs::Routed => {
                free[..12].fill(true);
                want[wire::TTL_OFF] = input[wire::TTL_OFF].wrapping_sub(1);
            }
        }
        for sum in &nat.sums {
            free[sum[0]..sum[0] + 2].fill(true);
        }
        let mut sums = nat.sums.clone();
        if macs == Macs::Routed {
            // The TTL shares a word of the IPv4 header's sum with the protocol.
            if let Some(ip) = sums.iter_mut().find(|s| s[0] == wire::IP_CSUM_OFF) {
                ip.push(wire::TTL_OFF);
            }
        }
        if let Some(at) = (0..input.len()).find(|&i| !free[i] && out[i] != want[i]) {
            return Err(format!(
                "byte {at} is {:#04x}, expected {:#04x}",
                out[at], want[at]
            ));
        }
        for words in &sums {
            if sum_of(out, words) != sum_of(input, words) {
                return Err(format!(
                    "the checksum at {} does not follow the rewrite",
                    words[0]
                ));
            }
        }
        Ok(())
    }

    /// The answer bounced in place of the packet: a RST or an ICMP error (`icmp`: type, code)
    /// from the address the packet went to, back to its source and MAC, quoting its start, with
    /// every checksum right.
    fn answer(&self, reset: bool, icmp: (u8, u8)) -> Result<(), String> {
        let (input, out) = (self.input, &self.out[..]);
        let headers = PacketHeaders::from_ethernet_slice(out)
            .map_err(|e| format!("the answer does not parse: {e}"))?;
        let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
            return Err("the answer is no IPv4".to_owned());
        };
        let sent_back = out[..6] == input[6..12]
            && out[6..12] == input[..6]
            && ip.source == input[wire::DST_OFF..wire::DST_OFF + 4]
            && ip.destination == input[wire::SRC_OFF..wire::SRC_OFF + 4];
        if !sent_back || ip.calc_header_checksum() != ip.header_checksum {
            return Err(
                "the answer is not addressed back, or its IPv4 checksum is wrong".to_owned(),
            );
        }
        let payload = headers.payload.slice();
        let fine = match (&headers.transport, reset) {
            (Some(TransportHeader::Tcp(tcp)), true) => {
                // The RST comes from the port the segment went to.
                let dst_port = wire::ipv4(input)
                    .and_then(|ip| ip.l4_off())
                    .map(|off| wire::u16_at(input, off + 2));
                tcp.rst
                    && Some(tcp.source_port) == dst_port
                    && Ok(tcp.checksum) == tcp.calc_checksum_ipv4(ip, payload)
            }
            (Some(TransportHeader::Icmpv4(_)), false) => {
                // The message: its header, then the packet's IPv4 header and 8 bytes of L4.
                let message = &out[wire::L3 + wire::IPV4_LEN..];
                message.len() == wire::ICMP_LEN + 28
                    && (message[0], message[1]) == icmp
                    && message[wire::ICMP_LEN..] == input[wire::L3..wire::L3 + 28]
                    && Sum16BitWords::new().add_slice(message).ones_complement() == 0
            }
            _ => false,
        };
        let kind = if reset { "RST" } else { "ICMP error" };
        fine.then_some(())
            .ok_or_else(|| format!("the answer is not the {kind} expected"))
    }
}

/// What happens to the Ethernet addresses of a translated packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Macs {
    Kept,
    /// Swapped: sent back where it came from.
    Swapped,
    /// The route's (not predictable here), with the TTL decremented.
    Routed,
}

/// The one's complement sum of the 16-bit words at `words` (0 and 0xffff both zero).
fn sum_of(frame: &[u8], words: &[usize]) -> u16 {
    let sum = words
        .iter()
        .fold(Sum16BitWords::new(), |sum, &at| {
            sum.add_2bytes([frame[at], frame[at + 1]])
        })
        .ones_complement();
    if sum == 0xffff { 0 } else { sum }
}
