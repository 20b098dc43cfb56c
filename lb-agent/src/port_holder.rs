//! Who holds a TCP address the agent cannot listen on: the listening socket in this network
//! namespace's `/proc/net/tcp{,6}`, and the process whose file descriptors include it (the
//! agent runs privileged on the host network, so it can read every process's descriptors). Only
//! for a log line: any failure just means "unknown".

use std::{fs, net::SocketAddr};

/// `st` of a listening socket in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// The process (`name (pid N)`) holding a socket that listens where `addr` would, if one can
/// be found.
pub fn holder_of(addr: SocketAddr) -> Option<String> {
    let inodes = listening_inodes(addr.port());
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path())
                .is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        });
        if holds {
            let name = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("{} (pid {pid})", name.trim()));
        }
    }
    None
}

/// The inodes of the sockets listening on `port`, any address, either family.
fn listening_inodes(port: u16) -> Vec<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .flat_map(|table| listening_on(&table, port))
        .collect()
}

/// The inodes of the sockets of `table` (`/proc/net/tcp` format) listening on `port`.
fn listening_on(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?.parse().ok()?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (*state == TCP_LISTEN && local_port == port).then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_by_port() {
        // Two lines of a real /proc/net/tcp: 0.0.0.0:10256 listening, and an established
        // connection from port 10256.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:2810 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:2810 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 51299 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(listening_on(table, 10256), [51234]);
        assert!(listening_on(table, 10249).is_empty());
    }

    #[test]
    fn the_holder_of_a_port_this_process_listens_on_is_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let holder = holder_of(addr).expect("found");
        assert!(
            holder.ends_with(&format!("(pid {})", std::process::id())),
            "{holder}"
        );
    }
}
