//! `lbctl`: inspect the load balancer's datapath through the maps the agent pins on bpffs. Only
//! reads; works while the agent is stopped.
//!
//! It may depend on the datapath's crates (`lb-datapath` for the maps and the decision
//! predictor, `lb-common` for the map layouts), aya, clap, serde and comfy-table. It reads the
//! maps and nothing else (no API server, nothing served), so never kube, k8s-openapi, axum or
//! prometheus: those are the agent's.
//!
//! Layout: `open` finds and opens the pinned maps; `views` builds each command's data as serde
//! structures (the JSON output); `render` turns them into tables and words; `decode` names raw
//! map fields (flags, protocols, scopes). This file is the command line.

use std::{
    io::Write as _,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use views::dump::MapKind;

mod decode;
mod open;
mod render;
mod views;

/// Inspect the load balancer's eBPF datapath: maps, services, conntrack, counters, and what a
/// packet would go through.
#[derive(Debug, Parser)]
#[command(name = "lbctl", version, propagate_version = true)]
struct Cli {
    /// bpffs directory where the agent pins the datapath's maps.
    #[arg(long, global = true, value_name = "DIR", default_value_os_t = default_dir())]
    bpffs_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

fn default_dir() -> PathBuf {
    lb_datapath::loader::default_pin_dir().to_owned()
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Raw map contents, decoded.
    #[command(subcommand)]
    Maps(MapsCommand),
    /// Services and their frontends.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Connection tracking.
    #[command(subcommand)]
    Ct(CtCommand),
    /// Verdict counters by reason, and per-service counters.
    Stats(OutputArgs),
    /// Predict what the datapath does with a packet, from the live maps.
    ///
    /// Forward direction (default): a packet from a client at SRC to DST, as lb_from_pod
    /// (--scope internal) or lb_xdp / lb_ext_in (--scope external) sees it; this includes the
    /// replies of source-NATed flows, which reach the node addressed to its SNAT address and
    /// port, and of hairpin flows, addressed to the hairpin address, and a pod's direct
    /// connection to an address without a frontend (given another source port when a balanced
    /// flow of its port holds its reply path). With --reply: a backend at
    /// SRC answering a client at DST, as lb_to_pod / lb_ext_out see it.
    Trace(TraceArgs),
    /// Predict what socket-level balancing (lb-agent --socket-lb) does with a connect() or an
    /// unconnected UDP sendto() to DST from a process in its cgroup: translated to which backend,
    /// refused at once, or left to the packet path, and why.
    TraceConnect(TraceConnectArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SockOrigin {
    /// A process of the node's own network namespace (host-network pods included).
    Node,
    /// A pod's process.
    Pod,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SockCallArg {
    /// connect() (TCP or UDP).
    Connect,
    /// sendto() on an unconnected UDP socket.
    Sendto,
}

#[derive(Debug, Args)]
struct TraceConnectArgs {
    /// The address and port the application asks for (an IPv6 socket's IPv4-mapped
    /// `[::ffff:a.b.c.d]:PORT` is its IPv4 address, as the hooks read it).
    #[arg(value_name = "DST-IP:PORT", value_parser = socket_destination)]
    dst: SocketAddrV4,
    /// Transport protocol.
    #[arg(value_enum)]
    proto: Proto,
    /// Whose socket.
    #[arg(long, value_enum, default_value_t = SockOrigin::Node)]
    from: SockOrigin,
    /// The call.
    #[arg(long, value_enum, default_value_t = SockCallArg::Connect)]
    call: SockCallArg,
    /// The socket's cookie, which picks its Maglev slot (each socket has its own; any value
    /// shows one possible backend).
    #[arg(long, default_value_t = 1)]
    cookie: u64,
    /// The socket's bound source address, if it bound one (session affinity and source ranges
    /// use it).
    #[arg(long, value_name = "IP")]
    bound: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Subcommand)]
enum MapsCommand {
    /// Every map (or one, with --map), decoded.
    Dump(DumpArgs),
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// One row per frontend: service id, backends and their share of Maglev slots, flags and
    /// counters.
    List(OutputArgs),
}

#[derive(Debug, Subcommand)]
enum CtCommand {
    /// The tracked flows, forward and reply entries paired.
    List(OutputArgs),
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON (stable field names, see lbctl/src/views).
    Json,
}

#[derive(Debug, Args)]
struct OutputArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// Only this map: its name (LB_CT) or alias (addrs, services, backends, maglev, ct, frags,
    /// stats, verdicts, ranges, affinity, config, answers, direct, affinity-scope,
    /// sock-rev, sock-config, sock-stats, filters, and IPv6's addrs6, services6, backends6,
    /// ct6).
    #[arg(long, value_name = "NAME", value_parser = MapKind::parse)]
    map: Option<MapKind>,
    /// Print every Maglev slot instead of slot counts per backend.
    #[arg(long)]
    full: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    /// Balanced without port rewriting (its CRC32c is never recomputed).
    Sctp,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum Scope {
    /// From pods (lb_from_pod).
    #[default]
    Internal,
    /// From outside, on an uplink (lb_xdp, lb_ext_in).
    External,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// Source address and port (the client; with --reply, the backend).
    #[arg(value_name = "SRC-IP:PORT", value_parser = packet_address)]
    src: SocketAddrV4,
    /// Destination address and port (the frontend; with --reply, the client).
    #[arg(value_name = "DST-IP:PORT", value_parser = packet_address)]
    dst: SocketAddrV4,
    /// Transport protocol.
    #[arg(value_enum)]
    proto: Proto,
    /// Which side the packet arrives from (forward direction only).
    #[arg(long, value_enum, default_value_t = Scope::Internal, conflicts_with = "reply")]
    scope: Scope,
    /// The packet is a bare TCP SYN (opens a connection, reopens a closed one); otherwise a
    /// segment without SYN.
    #[arg(long, conflicts_with = "reply")]
    syn: bool,
    /// Trace the reply direction: SRC is a backend answering the client DST.
    #[arg(long)]
    reply: bool,
    #[command(flatten)]
    output: OutputArgs,
}

fn print<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Table => table(value),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // `lbctl ... | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let maps = open::open(&cli.bpffs_dir)?;
    match cli.command {
        Command::Maps(MapsCommand::Dump(args)) => {
            let kinds: Vec<MapKind> = args.map.into_iter().collect();
            let dump = views::dump::dump(&maps, &kinds, args.full).context("reading the maps")?;
            print(args.output.output, &dump, render::dump::text)
        }
        Command::Service(ServiceCommand::List(args)) => {
            let rows = views::services::list(&maps).context("reading the services")?;
            print(args.output, &rows, |r| render::services::text(r))
        }
        Command::Ct(CtCommand::List(args)) => {
            let rows = views::ct::list(&maps).context("reading conntrack")?;
            print(args.output, &rows, |r| render::ct::text(r))
        }
        Command::Stats(args) => {
            let stats = views::stats::read(&maps).context("reading the counters")?;
            print(args.output, &stats, render::stats::text)
        }
        Command::Trace(args) => {
            let proto = decode_proto(args.proto);
            let trace = if args.reply {
                views::trace::reply(&maps, args.src, args.dst, proto)
            } else {
                let scope = match args.scope {
                    Scope::Internal => decode::Scope::Internal,
                    Scope::External => decode::Scope::External,
                };
                views::trace::forward(&maps, args.src, args.dst, proto, scope, args.syn)
            }
            .context("reading the maps")?;
            let explained = render::trace::Explained::new(&trace);
            print(args.output.output, &explained, render::trace::text)
        }
        Command::TraceConnect(args) => {
            let request = views::sock_trace::Request {
                dst: args.dst,
                proto: decode_proto(args.proto),
                call: match args.call {
                    SockCallArg::Connect => lb_datapath::predict_sock::SockCall::Connect,
                    SockCallArg::Sendto => lb_datapath::predict_sock::SockCall::Sendto,
                },
                origin: match args.from {
                    SockOrigin::Node => lb_datapath::predict_sock::Origin::Node,
                    SockOrigin::Pod => lb_datapath::predict_sock::Origin::Pod,
                },
                cookie: args.cookie,
                bound: args.bound,
            };
            let trace = views::sock_trace::trace(&maps, &request).context("reading the maps")?;
            print(args.output.output, &trace, render::sock_trace::text)
        }
    }
}

/// Why an IPv6 address gets no trace.
const IPV6_NOT_TRACED: &str = "IPv6, which lbctl does not trace yet (docs/ipv6.md)";

/// A packet's address and port: IPv4 (the predictor replays the IPv4 programs only).
fn packet_address(text: &str) -> Result<SocketAddrV4, String> {
    match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(addr)) => Ok(addr),
        Ok(SocketAddr::V6(_)) => Err(format!(
            "{text} is {IPV6_NOT_TRACED}: `lbctl service list` and `lbctl maps dump` show the \
             IPv6 frontends and flows"
        )),
        Err(_) => Err(format!("{text:?} is not an address and port (IP:PORT)")),
    }
}

/// The address a socket asks for: IPv4, or IPv4-mapped on an IPv6 socket (what the hooks
/// translate).
fn socket_destination(text: &str) -> Result<SocketAddrV4, String> {
    match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(addr)) => Ok(addr),
        Ok(SocketAddr::V6(addr)) => match addr.ip().to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, addr.port())),
            None => Err(format!(
                "{text} is IPv6: the socket hooks translate IPv4 addresses and IPv4-mapped ones \
                 ([::ffff:a.b.c.d]:PORT) only, and leave this call to the packet path \
                 (docs/ipv6.md)"
            )),
        },
        Err(_) => Err(format!("{text:?} is not an address and port (IP:PORT)")),
    }
}

fn decode_proto(proto: Proto) -> decode::Proto {
    match proto {
        Proto::Tcp => decode::Proto::Tcp,
        Proto::Udp => decode::Proto::Udp,
        Proto::Sctp => decode::Proto::Sctp,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Traces take IPv4 addresses; an IPv6 one is refused with the reason, an IPv4-mapped one
    /// is what the socket hooks read it as.
    #[test]
    fn trace_addresses_are_ipv4_and_ipv6_says_why() {
        let v4: SocketAddrV4 = "10.96.0.10:80".parse().unwrap();
        assert_eq!(packet_address("10.96.0.10:80"), Ok(v4));
        assert_eq!(socket_destination("10.96.0.10:80"), Ok(v4));
        assert_eq!(socket_destination("[::ffff:10.96.0.10]:80"), Ok(v4));
        for text in ["[fd00::10]:80", "[::ffff:10.96.0.10]:80"] {
            let err = packet_address(text).unwrap_err();
            assert!(
                err.contains("IPv6") && err.contains("service list"),
                "{err}"
            );
        }
        let err = socket_destination("[fd00::10]:80").unwrap_err();
        assert!(err.contains("IPv4-mapped"), "{err}");
        assert!(
            packet_address("10.96.0.10")
                .unwrap_err()
                .contains("IP:PORT")
        );
    }

    /// `maps dump --help` names every map's alias (the list is written by hand).
    #[test]
    fn the_dump_help_names_every_map() {
        let mut cli = Cli::command();
        let dump = cli
            .find_subcommand_mut("maps")
            .and_then(|maps| maps.find_subcommand_mut("dump"))
            .expect("maps dump");
        let help = dump
            .get_arguments()
            .find(|arg| arg.get_id() == "map")
            .and_then(|arg| arg.get_help())
            .expect("--map has help")
            .to_string();
        for kind in MapKind::ALL {
            assert!(
                help.contains(kind.alias()),
                "{} is missing from: {help}",
                kind.alias()
            );
        }
    }
}
