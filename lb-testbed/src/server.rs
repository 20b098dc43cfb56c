//! The `hostnames` server, and clients that talk to it.
//!
//! Over TCP it answers any request with an HTTP response whose body is `<name> <client ip:port>`;
//! over UDP it answers each datagram with the same text. So a client learns which backend
//! answered and which address that backend saw. It also moves bulk data both ways
//! ([`upload`], [`download`]), checking every byte, so that large segments, GSO and GRO cross
//! every path the datapath translates.
//!
//! Servers answer in both families (an IPv4 and an IPv6-only socket per protocol, so that an
//! IPv4 client is seen as `a.b.c.d:port`, never as an IPv4-mapped IPv6 address), and the
//! clients take an address of either family.

use std::{
    io::{BufRead as _, ErrorKind, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
    },
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// How often a server thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(5);

/// Servers running in a namespace; stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts a `hostnames` server in `ns` on `port` for both TCP and UDP, in both families
    /// (every address of the namespace), answering as `name`.
    pub fn hostnames(ns: &Netns, name: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        type Sockets = ([TcpListener; 2], [UdpSocket; 2]);
        let (tcp, udp) = ns.enter(move || -> Result<Sockets> {
            let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            let tcp = TcpListener::bind(any).context("binding the TCP server")?;
            let udp = UdpSocket::bind(any).context("binding the UDP server")?;
            let tcp6 = bind_ipv6_only(socket2::Type::STREAM, port)
                .context("binding the TCP server to [::]")?;
            let udp6 = bind_ipv6_only(socket2::Type::DGRAM, port)
                .context("binding the UDP server to [::]")?;
            let (tcp, udp) = ([tcp, tcp6.into()], [udp, udp6.into()]);
            for listener in &tcp {
                listener.set_nonblocking(true)?;
            }
            for socket in &udp {
                socket.set_nonblocking(true)?;
            }
            Ok((tcp, udp))
        })??;
        let mut threads = Vec::new();
        let (n, s) = (name.to_owned(), stop.clone());
        threads.push(thread::spawn(move || serve_tcp(&tcp, &n, &s)));
        let (n, s) = (name.to_owned(), stop.clone());
        threads.push(thread::spawn(move || serve_udp(&udp, &n, &s)));
        Ok(Self { stop, threads })
    }
}

/// A socket bound to `[::]:port` that serves IPv6 alone (a listening one for TCP).
fn bind_ipv6_only(ty: socket2::Type, port: u16) -> Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, ty, None)?;
    socket.set_only_v6(true)?;
    if ty == socket2::Type::STREAM {
        // As `TcpListener::bind` does.
        socket.set_reuse_address(true)?;
    }
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    if ty == socket2::Type::STREAM {
        socket.listen(1024)?;
    }
    Ok(socket)
}

/// Waits until one of `fds` is readable, or [`POLL`] passes.
fn wait_readable(fds: &[RawFd]) {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll over an array of `polled.len()` pollfds of descriptors the caller holds open.
    let ready = unsafe {
        libc::poll(
            polled.as_mut_ptr(),
            polled.len() as libc::nfds_t,
            POLL.as_millis() as libc::c_int,
        )
    };
    if ready < 0 {
        // Interrupted: as if the time had passed.
        thread::sleep(POLL);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn answer(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}")
}

fn serve_tcp(listeners: &[TcpListener], name: &str, stop: &AtomicBool) {
    let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    while !stop.load(Ordering::Relaxed) {
        wait_readable(&fds);
        for listener in listeners {
            // Nothing to accept (WouldBlock) or a failed accept: the next round tries again.
            if let Ok((stream, peer)) = listener.accept() {
                let name = name.to_owned();
                thread::spawn(move || {
                    let _ = respond(stream, &answer(&name, peer));
                });
            }
        }
    }
}

/// Answers one connection: an HTTP request gets one response and the connection closes; any
/// other first line starts line mode, where every line gets the answer and the connection stays
/// open (a held connection, to watch a flow keep its backend).
fn respond(mut stream: TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(None)?;
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
        return Ok(());
    }
    if let Some(bytes) = bulk_request(&line, "UPLOAD ") {
        let received = receive_pattern(&mut reader, bytes)?;
        return stream.write_all(format!("{body} {received}\n").as_bytes());
    }
    if let Some(bytes) = bulk_request(&line, "DOWNLOAD ") {
        stream.write_all(format!("{body}\n").as_bytes())?;
        return send_pattern(&mut stream, bytes);
    }
    if line.starts_with("GET ") {
        // Read the rest of the request's headers, then answer and close.
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        while line.trim_end() != "" {
            line.clear();
            if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
                break;
            }
        }
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
            body.len() + 1
        );
        return stream.write_all(response.as_bytes());
    }
    loop {
        stream.write_all(format!("{body}\n").as_bytes())?;
        line.clear();
        if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
            return Ok(());
        }
    }
}

/// `<verb><bytes>` as a bulk request's first line.
fn bulk_request(line: &str, verb: &str) -> Option<u64> {
    line.trim_end().strip_prefix(verb)?.parse().ok()
}

/// The bytes of a bulk transfer: byte `i` is `i % 251`, a prime period, so that a lost, doubled
/// or shifted segment shows as a wrong byte.
fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

const BULK_CHUNK: usize = 1 << 16;

fn send_pattern(stream: &mut impl Write, bytes: u64) -> std::io::Result<()> {
    let mut chunk = vec![0u8; BULK_CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(BULK_CHUNK as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern_byte(sent + i as u64);
        }
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.flush()
}

/// Reads `bytes` bytes of the pattern (or until the peer closes); how many arrived intact. A
/// wrong byte is an error naming its offset.
fn receive_pattern(stream: &mut impl Read, bytes: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut received = 0u64;
    while received < bytes {
        let want = (bytes - received).min(BULK_CHUNK as u64) as usize;
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        if let Some(at) = (0..n).find(|&i| buf[i] != pattern_byte(received + i as u64)) {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("byte {} is corrupt", received + at as u64),
            ));
        }
        received += n as u64;
    }
    Ok(received)
}

/// Sends `bytes` bytes to the `hostnames` server at `addr` over a new TCP connection and checks
/// that it received them all, intact; returns its answer (`<name> <client ip:port>`).
pub fn upload(addr: impl Into<SocketAddr>, bytes: u64, timeout: Duration) -> Result<String> {
    let addr = addr.into();
    let mut stream = bulk_stream(addr, timeout)?;
    stream.write_all(format!("UPLOAD {bytes}\n").as_bytes())?;
    send_pattern(&mut stream, bytes)
        .with_context(|| format!("uploading {bytes} bytes to {addr}"))?;
    let mut answer = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut answer)
        .with_context(|| format!("the count of the upload to {addr}"))?;
    let (name, received) = answer
        .trim_end()
        .rsplit_once(' ')
        .with_context(|| format!("{addr} answered the upload with {answer:?}"))?;
    anyhow::ensure!(
        received == bytes.to_string(),
        "{addr} ({name}) received {received} of {bytes} bytes"
    );
    Ok(name.to_owned())
}

/// Asks the `hostnames` server at `addr` for `bytes` bytes over a new TCP connection and checks
/// that they all arrive, intact; returns its answer (`<name> <client ip:port>`).
pub fn download(addr: impl Into<SocketAddr>, bytes: u64, timeout: Duration) -> Result<String> {
    let addr = addr.into();
    let mut stream = bulk_stream(addr, timeout)?;
    stream.write_all(format!("DOWNLOAD {bytes}\n").as_bytes())?;
    let mut reader = std::io::BufReader::with_capacity(BULK_CHUNK, stream);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .with_context(|| format!("the start of the download from {addr}"))?;
    let received = receive_pattern(&mut reader, bytes)
        .with_context(|| format!("downloading {bytes} bytes from {addr}"))?;
    anyhow::ensure!(
        received == bytes,
        "{addr} ({}) sent {received} of {bytes} bytes",
        name.trim_end()
    );
    Ok(name.trim_end().to_owned())
}

/// A connection for a bulk transfer: generous timeouts, as a transfer that stalls must fail
/// rather than hang, but one that merely takes a while must not.
fn bulk_stream(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

fn serve_udp(sockets: &[UdpSocket], name: &str, stop: &AtomicBool) {
    let fds: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        wait_readable(&fds);
        for socket in sockets {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(answer(name, peer).as_bytes(), peer);
            }
        }
    }
}

/// One HTTP GET over a new TCP connection from the calling thread's namespace; returns the body.
pub fn http_get(addr: impl Into<SocketAddr>, timeout: Duration) -> Result<String> {
    let addr = addr.into();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    get(&mut stream, addr, timeout)
}

/// [`http_get`], and the address the client's socket is connected to (`getpeername()`): the
/// frontend it connected to, when the datapath translates the flow as it should.
pub fn http_get_peer(
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    let addr = addr.into();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    let peer = stream
        .peer_addr()
        .with_context(|| format!("getpeername of the connection to {addr}"))?;
    Ok((get(&mut stream, addr, timeout)?, peer))
}

/// [`http_get`] from the local address `local` (one of several addresses of the namespace,
/// e.g. to be inside or outside a Service's loadBalancerSourceRanges).
pub fn http_get_from(
    local: impl Into<IpAddr>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<String> {
    let addr = addr.into();
    get(&mut connect_from(local, addr, timeout)?, addr, timeout)
}

/// [`http_get`] from `local`, address and port (a client that reuses its ports): the body,
/// and how many segments the client sent again (TCP_INFO's `tcpi_total_retrans`, its SYN's
/// retransmissions included).
pub fn http_get_bound(
    local: impl Into<SocketAddr>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<(String, u32)> {
    let addr = addr.into();
    let mut stream = connect_bound(local, addr, timeout)?;
    let body = get(&mut stream, addr, timeout)?;
    Ok((body, total_retransmissions(&stream)?))
}

/// The segments `stream` sent again so far (TCP_INFO).
fn total_retransmissions(stream: &TcpStream) -> Result<u32> {
    // SAFETY: tcp_info is plain old data; the kernel fills up to `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt with a buffer of the length given.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if ret < 0 {
        return Err(anyhow::Error::new(std::io::Error::last_os_error()).context("TCP_INFO"));
    }
    Ok(info.tcpi_total_retrans)
}

fn get(stream: &mut TcpStream, addr: SocketAddr, timeout: Duration) -> Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading from {addr}"))?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.trim().to_owned()),
        _ => bail!("unexpected response from {addr}: {response:?}"),
    }
}

/// `GET <path>` to any HTTP server (the agent's /readyz, /metrics...) from the calling
/// thread's namespace; returns the status code and the body.
pub fn http_request(
    addr: impl Into<SocketAddr>,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let addr = addr.into();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading from {addr}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}{path}: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A TCP connection from `local` (any port) to `addr`, from the calling thread's namespace.
pub fn connect_from(
    local: impl Into<IpAddr>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    connect_bound(SocketAddr::new(local.into(), 0), addr, timeout)
}

/// A TCP connection from `local` (its port too, unless 0), which other sockets may share
/// (`SO_REUSEADDR`: a client port comes again as soon as its last connection is closed, and
/// Linux gives one local port to connections to different destinations), to `addr`, from the
/// calling thread's namespace.
pub fn connect_bound(
    local: impl Into<SocketAddr>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    let (local, addr) = (local.into(), addr.into());
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&local.into())
        .with_context(|| format!("binding to {local}"))?;
    socket
        .connect_timeout(&addr.into(), timeout)
        .with_context(|| format!("connecting from {local} to {addr}"))?;
    Ok(socket.into())
}

/// One UDP request/response from the calling thread's namespace (from `local_port`, or an
/// ephemeral port when 0).
pub fn udp_request(
    addr: impl Into<SocketAddr>,
    local_port: u16,
    timeout: Duration,
) -> Result<String> {
    let addr = addr.into();
    udp_request_from(
        SocketAddr::new(unspecified(addr), local_port),
        addr,
        timeout,
    )
}

/// The unspecified address of `addr`'s family.
fn unspecified(addr: SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// One UDP request from an unconnected socket (an ephemeral port) of the calling thread's
/// namespace: the answer, and the address it came from (`recvfrom()`): the frontend asked,
/// when the datapath translates the flow as it should.
pub fn udp_request_source(
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    let addr = addr.into();
    let local = SocketAddr::new(unspecified(addr), 0);
    let socket = UdpSocket::bind(local).with_context(|| format!("binding UDP to {local}"))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hostname", addr)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {addr}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// [`udp_request`] from the local address and port `local` (port 0: ephemeral).
pub fn udp_request_from(
    local: impl Into<SocketAddr>,
    addr: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<String> {
    let (local, addr) = (local.into(), addr.into());
    let socket = UdpSocket::bind(local).with_context(|| format!("binding UDP to {local}"))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr)?;
    socket.send(b"hostname")?;
    let mut buf = [0u8; 2048];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no UDP answer from {addr}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A long-lived TCP connection to a `hostnames` server in line mode: each [`Held::ask`] gets
/// the answer of whichever backend the connection is on.
pub struct Held {
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
}

impl Held {
    /// Connects from the calling thread's namespace.
    pub fn connect(addr: impl Into<SocketAddr>, timeout: Duration) -> Result<Self> {
        let addr = addr.into();
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Connects from `local` (address and port), which other sockets may share
    /// ([`connect_bound`]), as any client does once its ephemeral ports run short.
    pub fn connect_from(
        local: impl Into<SocketAddr>,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = connect_bound(local, addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// The connection's own address (the client side of its flow).
    pub fn local_addr(&self) -> Result<SocketAddrV4> {
        match self.stream.local_addr()? {
            SocketAddr::V4(addr) => Ok(addr),
            other => anyhow::bail!("the held connection is not IPv4: {other}"),
        }
    }

    /// Sends a line and returns the answer.
    pub fn ask(&mut self) -> Result<String> {
        self.stream
            .write_all(b"ping\n")
            .context("sending on the held connection")?;
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut self.reader, &mut line)
            .context("reading on the held connection")?;
        anyhow::ensure!(n > 0, "the held connection was closed");
        Ok(line.trim().to_owned())
    }
}

/// New HTTP connections to one address, one after the other, from a thread in a namespace,
/// until stopped: what a test keeps up while it restarts or changes something, to count the
/// connections that failed meanwhile.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<LoadCount>,
}

/// What a [`Load`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadCount {
    pub ok: usize,
    pub failed: usize,
    /// The first failures, with when they happened (since the start) and why.
    pub failures: Vec<String>,
}

/// How many failures a [`LoadCount`] describes.
const FAILURES_KEPT: usize = 5;

impl Load {
    /// Starts requesting `target` from `ns`, each request on a new connection.
    pub fn start(ns: &Netns, target: impl Into<SocketAddr>, timeout: Duration) -> Result<Self> {
        let target = target.into();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = ns.spawn(move || {
            let mut count = LoadCount::default();
            let started = std::time::Instant::now();
            while !stopping.load(Ordering::Relaxed) {
                let attempt = started.elapsed();
                match http_get(target, timeout) {
                    Ok(_) => count.ok += 1,
                    Err(e) => {
                        count.failed += 1;
                        if count.failures.len() < FAILURES_KEPT {
                            count.failures.push(format!(
                                "at {attempt:?} (attempt {}): {e:#}",
                                count.ok + count.failed
                            ));
                        }
                    }
                }
            }
            count
        })?;
        Ok(Self { stop, thread })
    }

    /// Stops the requests and says how they went.
    pub fn finish(self) -> LoadCount {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the load thread panicked")
    }
}
