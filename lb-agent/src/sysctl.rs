//! The one kernel setting the agent changes on its node: the SNAT port range goes into
//! `net.ipv4.ip_local_reserved_ports`, so that the node's own connections never take a port the
//! datapath hands out to source-NATed flows, even where `ip_local_port_range` was widened into
//! it (a common tuning).

use std::ops::RangeInclusive;

use tracing::{info, warn};

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Parses the sysctl's format: comma-separated ports and `a-b` ranges.
fn parse(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            Some(a.trim().parse().ok()?..=b.trim().parse().ok()?)
        })
        .collect()
}

/// Whether `ranges` reserve every port of `wanted`.
fn covers(ranges: &[RangeInclusive<u16>], wanted: &RangeInclusive<u16>) -> bool {
    (*wanted.start()..=*wanted.end()).all(|p| ranges.iter().any(|r| r.contains(&p)))
}

/// The sysctl's new value with `wanted` added (the kernel merges overlapping ranges itself).
fn with_range(current: &str, wanted: &RangeInclusive<u16>) -> String {
    let range = format!("{}-{}", wanted.start(), wanted.end());
    match current.trim() {
        "" => range,
        other => format!("{other},{range}"),
    }
}

/// Reads a sysctl in one `read`: `ip_local_reserved_ports` answers chunked reads (what
/// `read_to_string` does) with its first 32 bytes only.
fn read_whole(path: &str) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; 64 * 1024];
    let n = std::fs::File::open(path)?.read(&mut buf)?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reserves the SNAT port range for the datapath (in the agent's network namespace, the node's).
pub fn reserve_snat_ports(wanted: &RangeInclusive<u16>) {
    let current = match read_whole(RESERVED_PORTS) {
        Ok(text) => text,
        Err(e) => {
            warn!(error = %e, "cannot read {RESERVED_PORTS}; the node's own connections might take SNAT ports");
            return;
        }
    };
    if covers(&parse(&current), wanted) {
        return;
    }
    match std::fs::write(RESERVED_PORTS, with_range(&current, wanted)) {
        Ok(()) => {
            info!(ports = ?wanted, "reserved the SNAT ports (net.ipv4.ip_local_reserved_ports)")
        }
        Err(e) => {
            warn!(error = %e, "cannot reserve the SNAT ports in {RESERVED_PORTS}; the node's own connections might take them")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ranges_are_read_and_extended_as_the_kernel_writes_them() {
        assert_eq!(parse("\n"), Vec::<RangeInclusive<u16>>::new());
        assert_eq!(parse("8080,61000-65535\n"), [8080..=8080, 61000..=65535]);
        assert!(covers(
            &parse("1-2,61000-63000,63001-65535"),
            &(61000..=65535)
        ));
        assert!(!covers(&parse("61000-65534"), &(61000..=65535)));
        assert_eq!(with_range("\n", &(61000..=65535)), "61000-65535");
        assert_eq!(with_range("8080\n", &(61000..=65535)), "8080,61000-65535");
    }
}
