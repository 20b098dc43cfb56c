//! Clients that are processes of their own: what socket-level balancing needs, since its hooks
//! serve the processes of a cgroup and a thread of the test process cannot leave the test's
//! cgroup. A [`SockClient`] is the test binary itself, run again (`--exact lbt_sock_client`)
//! in a node's or a pod's namespace and cgroup ([`crate::Cluster::node_command`],
//! [`crate::Cluster::pod_command`]); it takes one request per line on its stdin and answers
//! each with one line on its stdout, so that a test can keep sockets open across requests (a
//! connected UDP socket) and run a load while it changes something.
//!
//! A test binary that uses it declares the entry once, at its top level:
//!
//! ```text
//! lb_testbed::sock_client_entry!();
//! ```
//!
//! Every request is answered by the `hostnames` servers' protocol: TCP makes a new connection,
//! reads `getpeername()` and asks one HTTP GET; UDP sends one datagram and reads the answer and
//! the address `recvfrom()` gives. Failures carry the errno and the step that failed.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::Cluster;

/// The name of the test through which the client runs (see [`sock_client_entry!`]).
pub const ENTRY: &str = "lbt_sock_client";
/// Set in the client's environment: without it the entry returns at once.
const ENV: &str = "LBT_SOCK_CLIENT";
/// Starts each line the client answers with (the test harness prints lines of its own).
const MARK: &str = "lbt-sock-client:";
/// How long a TCP connect or a read may take in the client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a UDP answer is waited for (nothing arriving is an outcome, not an error).
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// How many failures of a load are described.
const FAILURES_KEPT: usize = 5;

/// Declares the test through which a [`SockClient`] runs: once per test binary, at its top
/// level (the client runs the binary again with `--exact lbt_sock_client`).
#[macro_export]
macro_rules! sock_client_entry {
    () => {
        /// Not a test of its own: the entry of the client processes
        /// `lb_testbed::sock_client::SockClient` starts (this binary run again); run by the
        /// harness as a test, it returns at once.
        #[test]
        fn lbt_sock_client() {
            $crate::sock_client::serve_if_asked();
        }
    };
}

/// What a backend answered, and from where the client saw it come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// TCP: `getpeername()` after `connect()`; UDP: the source `recvfrom()` gave.
    pub peer: SocketAddrV4,
    /// The backend that answered.
    pub name: String,
    /// The client address the backend saw.
    pub seen: SocketAddrV4,
}

/// How one request failed: the step (`connect`, `send`, `recv`, `read`...) and its errno.
#[derive(Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: String,
    pub errno: i32,
}

/// The step and the errno's text (a test's message then says what happened in words).
impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.errno);
        write!(f, "Failure({}: {text})", self.step)
    }
}

/// One request's outcome and how long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<Answer, Failure>,
    pub elapsed: Duration,
}

impl Outcome {
    /// The answer; panics with the failure (a test's assertion).
    #[track_caller]
    pub fn answer(&self) -> &Answer {
        match &self.result {
            Ok(answer) => answer,
            Err(f) => panic!("{f:?} after {:?}", self.elapsed),
        }
    }

    /// The errno of a failure (`None`: answered).
    pub fn errno(&self) -> Option<i32> {
        self.result.as_ref().err().map(|f| f.errno)
    }
}

/// What a load ([`SockClient::start_load`]) saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadCount {
    pub ok: usize,
    pub failed: usize,
    /// The first failures: when (since the start), which attempt, what.
    pub failures: Vec<String>,
}

/// A client process (see the module's documentation); killed on drop.
pub struct SockClient {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl SockClient {
    /// A client on node `i` of `cluster`: in its namespace and (when the cluster has them) its
    /// cgroup.
    pub fn on_node(cluster: &Cluster, i: usize) -> Result<Self> {
        let cmd = cluster.node_command(i, std::env::current_exe()?)?;
        Self::spawn(cmd, &format!("client on {}", cluster.node_name(i)))
    }

    /// A client in pod `pod` of `cluster`: in its namespace and its node's `pods` cgroup.
    pub fn in_pod(cluster: &Cluster, pod: &str) -> Result<Self> {
        let cmd = cluster.pod_command(pod, std::env::current_exe()?)?;
        Self::spawn(cmd, &format!("client in pod {pod}"))
    }

    /// Runs `cmd` (the test binary, wrapped as the caller wants) as a client.
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        cmd.args(["--exact", ENTRY, "--nocapture", "--test-threads=1", "-q"])
            .env(ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {what}: {cmd:?}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self {
            what: what.to_owned(),
            child,
            stdin,
            stdout,
        })
    }

    /// The client's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A TCP connection to `addr`: `getpeername()` and one HTTP GET.
    pub fn tcp(&mut self, addr: SocketAddrV4) -> Result<Outcome> {
        parse_outcome(&self.request(&format!("tcp {addr}"))?)
    }

    /// A TCP connection to `addr` kept open in the client without a request yet: its id for
    /// [`SockClient::tcp_ask`] and what `getpeername()` shows, or the errno of `connect()`.
    pub fn tcp_open(&mut self, addr: SocketAddrV4) -> Result<Result<(usize, SocketAddrV4), i32>> {
        let line = self.request(&format!("tcp-open {addr}"))?;
        parse_sock(&line)
    }

    /// The HTTP GET on the open connection `id` (once: the server closes after answering).
    pub fn tcp_ask(&mut self, id: usize) -> Result<Outcome> {
        parse_outcome(&self.request(&format!("tcp-ask {id}"))?)
    }

    /// One datagram to `addr` from a new, unconnected socket (`sendto`), and the answer
    /// (`recvfrom`).
    pub fn udp(&mut self, addr: SocketAddrV4) -> Result<Outcome> {
        parse_outcome(&self.request(&format!("udp {addr}"))?)
    }

    /// A new UDP socket connected to `addr`, kept open in the client: its id for
    /// [`SockClient::udp_ask`] and what `getpeername()` shows, or the errno of `connect()`.
    pub fn udp_connect(
        &mut self,
        addr: SocketAddrV4,
    ) -> Result<Result<(usize, SocketAddrV4), i32>> {
        let line = self.request(&format!("udp-connect {addr}"))?;
        parse_sock(&line)
    }

    /// One datagram on the connected socket `id` (`send`), and the answer (`recvfrom`).
    pub fn udp_ask(&mut self, id: usize) -> Result<Outcome> {
        parse_outcome(&self.request(&format!("udp-ask {id}"))?)
    }

    /// Starts TCP requests to `addr` ([`SockClient::tcp`]), one after the other on new
    /// connections, on a thread of the client, until [`SockClient::finish_load`].
    pub fn start_load(&mut self, addr: SocketAddrV4) -> Result<()> {
        let line = self.request(&format!("load-start {addr}"))?;
        anyhow::ensure!(line == "started", "unexpected answer {line:?}");
        Ok(())
    }

    /// How the load is going, while it goes on.
    pub fn load_count(&mut self) -> Result<LoadCount> {
        parse_count(&self.request("load-count")?)
    }

    /// Waits until the load has made `more` successful connections beyond `count` (or 30 s
    /// passed): how long a test lets it run, whatever the machine's speed.
    pub fn wait_for_load(&mut self, count: &LoadCount, more: usize) -> Result<LoadCount> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.load_count()?;
            if now.ok >= count.ok + more || Instant::now() > deadline {
                return Ok(now);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the load and says how it went.
    pub fn finish_load(&mut self) -> Result<LoadCount> {
        parse_count(&self.request("load-stop")?)
    }

    fn request(&mut self, line: &str) -> Result<String> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the client's stdin is closed")?;
        writeln!(stdin, "{line}").with_context(|| format!("the {} is gone", self.what))?;
        stdin.flush()?;
        let mut answer = String::new();
        loop {
            answer.clear();
            if self.stdout.read_line(&mut answer)? == 0 {
                let status = self.child.try_wait()?;
                bail!(
                    "the {} exited ({status:?}) before answering {line:?}",
                    self.what
                );
            }
            if let Some(rest) = answer.trim_end().strip_prefix(MARK) {
                return Ok(rest.trim().to_owned());
            }
        }
    }
}

impl Drop for SockClient {
    fn drop(&mut self) {
        // End of input ends the client; kill it if it does not go at once.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sock <id> <peer>` or `err <errno>`.
fn parse_sock(line: &str) -> Result<Result<(usize, SocketAddrV4), i32>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["sock", id, peer] => Ok(Ok((id.parse()?, peer.parse()?))),
        ["err", errno] => Ok(Err(errno.parse()?)),
        _ => bail!("unexpected answer {line:?}"),
    }
}

fn parse_count(line: &str) -> Result<LoadCount> {
    let mut parts = line.splitn(4, ' ');
    anyhow::ensure!(parts.next() == Some("count"), "unexpected answer {line:?}");
    let ok = parts.next().context("no count")?.parse()?;
    let failed = parts.next().context("no count")?.parse()?;
    let failures = parts
        .next()
        .unwrap_or_default()
        .split(" | ")
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(LoadCount {
        ok,
        failed,
        failures,
    })
}

fn count_line(count: &LoadCount) -> String {
    format!(
        "count {} {} {}",
        count.ok,
        count.failed,
        count.failures.join(" | ")
    )
}

fn parse_outcome(line: &str) -> Result<Outcome> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (result, micros) = match words.as_slice() {
        ["ok", micros, peer, name, seen] => (
            Ok(Answer {
                peer: peer.parse()?,
                name: (*name).to_owned(),
                seen: seen.parse()?,
            }),
            micros,
        ),
        ["err", micros, step, errno] => (
            Err(Failure {
                step: (*step).to_owned(),
                errno: errno.parse()?,
            }),
            micros,
        ),
        _ => bail!("unexpected answer {line:?}"),
    };
    Ok(Outcome {
        result,
        elapsed: Duration::from_micros(micros.parse()?),
    })
}

/// The client's side: serves requests from stdin when the environment asks for it (the entry
/// test of a client process), else returns at once.
pub fn serve_if_asked() {
    if std::env::var_os(ENV).is_none() {
        return;
    }
    let mut udp: Vec<UdpSocket> = Vec::new();
    let mut open_tcp: Vec<Option<(TcpStream, SocketAddrV4)>> = Vec::new();
    let mut load: Option<Load> = None;
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["tcp", addr] => addr.parse().map_or_else(bad, |a| outcome_line(&tcp(a))),
            ["udp", addr] => addr
                .parse()
                .map_or_else(bad, |a| outcome_line(&udp_once(a))),
            ["tcp-open", addr] => addr.parse().map_or_else(bad, |a| match tcp_connect(a) {
                Ok((stream, peer)) => {
                    open_tcp.push(Some((stream, peer)));
                    format!("sock {} {peer}", open_tcp.len() - 1)
                }
                Err(e) => format!("err {}", errno(&e)),
            }),
            ["tcp-ask", id] => match id
                .parse::<usize>()
                .ok()
                .and_then(|i| open_tcp.get_mut(i))
                .and_then(Option::take)
            {
                Some((stream, peer)) => outcome_line(&tcp_ask(stream, peer, Instant::now())),
                None => format!("no open connection {id}"),
            },
            ["udp-connect", addr] => addr.parse().map_or_else(bad, |a| udp_connect(a, &mut udp)),
            ["udp-ask", id] => match id.parse::<usize>().ok().and_then(|i| udp.get(i)) {
                Some(socket) => outcome_line(&udp_ask(socket)),
                None => format!("no socket {id}"),
            },
            ["load-start", addr] => match addr.parse() {
                Ok(addr) if load.is_none() => {
                    load = Some(Load::start(addr));
                    "started".to_owned()
                }
                Ok(_) => "a load runs already".to_owned(),
                Err(e) => bad(e),
            },
            ["load-count"] => load.as_ref().map_or_else(
                || "no load runs".to_owned(),
                |load| count_line(&load.count()),
            ),
            ["load-stop"] => load.take().map_or_else(
                || "no load runs".to_owned(),
                |load| count_line(&load.finish()),
            ),
            _ => format!("unknown request {line:?}"),
        };
        println!("{MARK} {answer}");
    }
}

fn bad(e: impl std::fmt::Display) -> String {
    format!("bad request: {e}")
}

fn outcome_line(outcome: &Outcome) -> String {
    let micros = outcome.elapsed.as_micros();
    match &outcome.result {
        Ok(a) => format!("ok {micros} {} {} {}", a.peer, a.name, a.seen),
        Err(f) => format!("err {micros} {} {}", f.step, f.errno),
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        ErrorKind::TimedOut => libc::ETIMEDOUT,
        ErrorKind::WouldBlock => libc::EAGAIN,
        ErrorKind::UnexpectedEof => libc::ECONNRESET,
        _ => libc::EIO,
    })
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    }
}

/// `<name> <client ip:port>` as the `hostnames` server answers.
fn parse_body(body: &str) -> Option<(String, SocketAddrV4)> {
    let mut words = body.split_whitespace();
    let name = words.next()?.to_owned();
    Some((name, words.next()?.parse().ok()?))
}

fn failed(step: &str, e: &std::io::Error, started: Instant) -> Outcome {
    Outcome {
        result: Err(Failure {
            step: step.to_owned(),
            errno: errno(e),
        }),
        elapsed: started.elapsed(),
    }
}

fn answered(peer: SocketAddrV4, body: &str, started: Instant) -> Outcome {
    let result = match parse_body(body) {
        Some((name, seen)) => Ok(Answer { peer, name, seen }),
        None => Err(Failure {
            step: "parse".to_owned(),
            errno: libc::EPROTO,
        }),
    };
    Outcome {
        result,
        elapsed: started.elapsed(),
    }
}

/// A TCP connection to `addr` and what `getpeername()` shows.
fn tcp_connect(addr: SocketAddrV4) -> std::io::Result<(TcpStream, SocketAddrV4)> {
    let stream = TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT)?;
    let peer = v4(stream.peer_addr()?);
    Ok((stream, peer))
}

fn tcp(addr: SocketAddrV4) -> Outcome {
    let started = Instant::now();
    match tcp_connect(addr) {
        Ok((stream, peer)) => tcp_ask(stream, peer, started),
        Err(e) => failed("connect", &e, started),
    }
}

/// One HTTP GET on `stream`, whose peer is `peer`, and the `hostnames` answer.
fn tcp_ask(mut stream: TcpStream, peer: SocketAddrV4, started: Instant) -> Outcome {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    if let Err(e) = stream.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n") {
        return failed("send", &e, started);
    }
    let mut response = String::new();
    if let Err(e) = stream.read_to_string(&mut response) {
        return failed("read", &e, started);
    }
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    answered(peer, body, started)
}

fn recv_answer(socket: &UdpSocket, started: Instant) -> Outcome {
    let mut buf = [0u8; 2048];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => answered(v4(from), &String::from_utf8_lossy(&buf[..n]), started),
        Err(e) => failed("recv", &e, started),
    }
}

fn udp_once(addr: SocketAddrV4) -> Outcome {
    let started = Instant::now();
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        Ok(s) => s,
        Err(e) => return failed("bind", &e, started),
    };
    let _ = socket.set_read_timeout(Some(UDP_TIMEOUT));
    if let Err(e) = socket.send_to(b"hostname", addr) {
        return failed("send", &e, started);
    }
    recv_answer(&socket, started)
}

fn udp_connect(addr: SocketAddrV4, sockets: &mut Vec<UdpSocket>) -> String {
    let result = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
        s.set_read_timeout(Some(UDP_TIMEOUT))?;
        s.connect(addr)?;
        let peer = s.peer_addr()?;
        Ok((s, peer))
    });
    match result {
        Ok((socket, peer)) => {
            sockets.push(socket);
            format!("sock {} {}", sockets.len() - 1, v4(peer))
        }
        Err(e) => format!("err {}", errno(&e)),
    }
}

fn udp_ask(socket: &UdpSocket) -> Outcome {
    let started = Instant::now();
    if let Err(e) = socket.send(b"hostname") {
        return failed("send", &e, started);
    }
    recv_answer(socket, started)
}

/// The client's side of a load: new connections one after the other on a thread, counted where
/// the client's requests can read them.
struct Load {
    stop: Arc<AtomicBool>,
    count: Arc<Mutex<LoadCount>>,
    thread: JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(Mutex::new(LoadCount::default()));
        let (stopping, counting) = (stop.clone(), count.clone());
        let thread = thread::spawn(move || run_load(addr, &stopping, &counting));
        Self {
            stop,
            count,
            thread,
        }
    }

    fn count(&self) -> LoadCount {
        self.count.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn finish(self) -> LoadCount {
        self.stop.store(true, Ordering::Relaxed);
        let count = self.count.clone();
        let _ = self.thread.join();
        count.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

fn run_load(addr: SocketAddrV4, stop: &AtomicBool, count: &Mutex<LoadCount>) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let at = started.elapsed();
        let outcome = tcp(addr);
        let Ok(mut count) = count.lock() else { return };
        match &outcome.result {
            Ok(_) => count.ok += 1,
            Err(f) => {
                count.failed += 1;
                if count.failures.len() < FAILURES_KEPT {
                    let attempt = count.ok + count.failed;
                    count.failures.push(format!(
                        "at {at:?} (attempt {attempt}): {} errno {}",
                        f.step, f.errno
                    ));
                }
            }
        }
    }
}
