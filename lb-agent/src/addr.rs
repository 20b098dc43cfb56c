//! Addresses read as kube-proxy reads them (`netutils.ParseIPSloppy`, `ParseCIDRSloppy`): an
//! IPv4 octet may carry leading zeros and still means its decimal value (`010.001.002.003` is
//! 10.1.2.3), as in Go before 1.17, because the API server accepted such addresses once and
//! objects holding them still exist. Rust's parser, like Go's since, rejects them.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// An IPv4 address in dotted decimal, leading zeros allowed (read as decimal, never octal).
pub fn ipv4(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0_u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Leading zeros do not count towards the value; anything else above 255 fails.
        let digits = part.trim_start_matches('0');
        *octet = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// An IPv4 CIDR (`address/prefix`), the address read by [`ipv4`].
pub fn ipv4_net(text: &str) -> Option<Ipv4Net> {
    let (addr, prefix) = text.split_once('/')?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Ipv4Net::new(ipv4(addr)?, prefix.parse().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_decimal_as_in_parse_ip_sloppy() {
        assert_eq!(ipv4("010.001.002.003"), Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(ipv4("10.0.0.08"), Some(Ipv4Addr::new(10, 0, 0, 8)));
        assert_eq!(ipv4("0000255.0.0.1"), Some(Ipv4Addr::new(255, 0, 0, 1)));
        assert_eq!(ipv4("192.168.0.2"), Some(Ipv4Addr::new(192, 168, 0, 2)));
        for bad in [
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "1.2.3.4 ",
            "+1.2.3.4",
            "0x1.2.3.4",
            "",
            "2001:db8::1",
        ] {
            assert_eq!(ipv4(bad), None, "{bad:?}");
        }
        assert_eq!(
            ipv4_net("010.000.000.000/08"),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(ipv4_net("10.0.0.0/33"), None);
        assert_eq!(ipv4_net("10.0.0.0"), None);
        assert_eq!(ipv4_net("10.0.0.0/"), None);
    }
}
