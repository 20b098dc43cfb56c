//! `cargo xtask vm-test`: the datapath and the agent on an older kernel, Debian bookworm's 6.1
//! cloud kernel, booted under qemu (software emulation: no KVM needed).
//!
//! * The kernel package and a static busybox are fetched with `apt-get download` and unpacked
//!   under `<target>/vm-cache/` (`dpkg-deb -x`): a second run downloads nothing.
//! * The cloud kernel has no 9p and virtiofsd is not in bookworm, so the guest gets no view of
//!   the host's files: its root is an initramfs (built here, uncompressed cpio) holding busybox,
//!   the few host tools the tests start (`ip`, `tc`, `nsenter`, `sysctl`, netperf) with their
//!   shared libraries, the release binaries and test binaries at their host paths (the tests
//!   name the agent by absolute path), and the guest kernel's modules the tests need.
//! * `/init` mounts the usual filesystems, loads the modules, runs the plan and powers off. Its
//!   output is the serial console, which this task reads: every step ends with `lb-vm: ok` or
//!   `lb-vm: FAILED`, and the run with `lb-vm: RESULT PASS` or `FAIL`.
//!
//! The plan: the datapath tests (`datapath`, `datapath_flows`, `datapath_reject`,
//! `datapath_packets`, `datapath_external`: every program through the 6.1 verifier, fed crafted
//! packets), lbctl's predictions against the programs (`trace`, `snat`, `hairpin`), the
//! classic-tc test (the agent attaches clsact filters, replaces them on restart, removes them on
//! cleanup), ClusterIP and NodePort end to end with the real agent on a two-node cluster in
//! namespaces, and netperf TCP_RR / TCP_CRR through a ClusterIP versus straight to the backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::util::{self, output};

/// The meta package whose dependency names the current bookworm cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";
/// The whole VM run, boot to power-off, at most (it takes about a minute and a half).
const VM_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// One step of the plan, at most (inside the guest).
const STEP_TIMEOUT_SECS: u32 = 240;
/// Lines of the plan start with this.
const MARK: &str = "lb-vm:";
/// Guest kernel modules the tests need (their dependencies come along).
const MODULES: [&str; 4] = ["veth", "bridge", "sch_ingress", "cls_bpf"];
/// Host programs the tests start, found on PATH and copied with their libraries.
const HOST_TOOLS: [&str; 6] = ["ip", "tc", "nsenter", "sysctl", "netperf", "netserver"];
/// Host files copied as they are.
const HOST_FILES: [&str; 4] = [
    "/etc/iproute2",
    "/etc/protocols",
    "/etc/services",
    "/etc/nsswitch.conf",
];

#[derive(Debug)]
struct Step {
    name: &'static str,
    target: &'static str,
    args: &'static [&'static str],
}

/// What runs inside the VM, in order.
const PLAN: [Step; 12] = [
    Step {
        name: "datapath",
        target: "datapath",
        args: &[],
    },
    Step {
        name: "datapath_flows",
        target: "datapath_flows",
        args: &[],
    },
    Step {
        name: "datapath_reject",
        target: "datapath_reject",
        args: &[],
    },
    Step {
        name: "datapath_packets",
        target: "datapath_packets",
        args: &[],
    },
    Step {
        name: "datapath_external",
        target: "datapath_external",
        args: &[],
    },
    Step {
        name: "lbctl trace",
        target: "trace",
        args: &[],
    },
    Step {
        name: "lbctl trace, source NAT",
        target: "snat",
        args: &[],
    },
    Step {
        name: "lbctl trace, hairpin",
        target: "hairpin",
        args: &[],
    },
    Step {
        name: "classic_tc",
        target: "classic_tc",
        args: &["--nocapture"],
    },
    Step {
        name: "agent restart + cleanup",
        target: "e2e_agent",
        args: &["restarting_the_agent", "cleanup_removes"],
    },
    Step {
        name: "e2e ClusterIP + NodePort",
        target: "e2e_external",
        args: &[
            "cluster_ips_from_pods_on_both_nodes",
            "node_ports_from_outside",
        ],
    },
    Step {
        name: "netperf",
        target: "netperf",
        args: &["--nocapture"],
    },
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    let root = workspace_root()?;
    let target = target_dir(&root);
    let cache = target.join("vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

    let phase = Instant::now();
    let kernel = Kernel::fetch(&cache)?;
    let busybox = fetch_package(&cache, BUSYBOX)?.join("bin/busybox");
    ensure!(busybox.is_file(), "{} has no bin/busybox", BUSYBOX);
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 is missing: `cargo xtask setup` installs qemu-system-x86")?;
    println!(
        "vm-test: kernel {} and busybox ready ({:.1}s)",
        kernel.release,
        phase.elapsed().as_secs_f64()
    );

    let phase = Instant::now();
    let built = build(&root)?;
    println!(
        "vm-test: release binaries and test binaries built ({:.1}s)",
        phase.elapsed().as_secs_f64()
    );

    let phase = Instant::now();
    let initrd = cache.join("initramfs.cpio");
    let size = build_initramfs(&initrd, &kernel, &busybox, &built)?;
    println!(
        "vm-test: initramfs {} ({} MiB, {:.1}s)",
        initrd.display(),
        size >> 20,
        phase.elapsed().as_secs_f64()
    );

    let log = target.join("vm-test.log");
    let phase = Instant::now();
    let outcome = boot(&qemu, &kernel, &initrd, &log)?;
    let vm_time = phase.elapsed();
    println!(
        "vm-test: ---- summary (full console log: {})",
        log.display()
    );
    for line in &outcome.summary {
        println!("vm-test:   {line}");
    }
    println!(
        "vm-test: VM {:.0}s, total {:.0}s",
        vm_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    match outcome.result {
        Some(true) => {
            println!("vm-test: PASS on {}", kernel.release);
            Ok(())
        }
        Some(false) => bail!(
            "vm-test: FAIL on {} (see {})",
            kernel.release,
            log.display()
        ),
        None => bail!(
            "vm-test: the VM stopped without a result (crash or timeout; see {})",
            log.display()
        ),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().context("xtask is not in a workspace")?;
    fs::canonicalize(root).with_context(|| format!("cannot resolve {}", root.display()))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// Packages

/// The unpacked guest kernel.
struct Kernel {
    /// `uname -r` inside the guest, e.g. `6.1.0-56-cloud-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    modules: PathBuf,
}

impl Kernel {
    /// The current bookworm cloud kernel: resolved from the meta package's dependency, fetched
    /// unless cached. Without apt lists (or offline) the newest cached kernel does.
    fn fetch(cache: &Path) -> Result<Self> {
        let package = match kernel_package() {
            Some(p) => p,
            None => {
                match newest_cached(cache, "linux-image-") {
                    Some(p) => {
                        println!("vm-test: apt does not know {KERNEL_META}; using the cached {p}");
                        p
                    }
                    None => {
                        apt_update()?;
                        kernel_package().with_context(|| {
                        format!("apt cannot resolve {KERNEL_META} (is a bookworm source configured?)")
                    })?
                    }
                }
            }
        };
        let dir = fetch_package(cache, &package)?;
        let release = package
            .strip_prefix("linux-image-")
            .context("unexpected kernel package name")?
            .to_owned();
        let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
        let modules = dir.join(format!("lib/modules/{release}"));
        ensure!(
            vmlinuz.is_file() && modules.is_dir(),
            "{} lacks the kernel or its modules",
            dir.display()
        );
        Ok(Self {
            release,
            vmlinuz,
            modules,
        })
    }
}

/// `linux-image-6.1.0-NN-cloud-amd64`, from `apt-cache depends linux-image-cloud-amd64`.
fn kernel_package() -> Option<String> {
    let deps = output(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned)
}

fn apt_update() -> Result<()> {
    println!("vm-test: apt-get update");
    util::run(Command::new("apt-get").args(["-q", "update"]))
}

/// The unpacked directory of `package` under `cache`: `<cache>/<package>/`, complete when it
/// holds `.unpacked`. Downloads the .deb (into `<cache>/debs/`) only when it is not there.
fn fetch_package(cache: &Path, package: &str) -> Result<PathBuf> {
    let dir = cache.join(package);
    let done = dir.join(".unpacked");
    if done.exists() {
        return Ok(dir);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = match cached_deb(&debs, package) {
        Some(deb) => deb,
        None => {
            println!(
                "vm-test: downloading {package} with apt-get download (kept in {}: later runs reuse it)",
                debs.display()
            );
            let download = || {
                Command::new("apt-get")
                    .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
                    .current_dir(&debs)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !download() {
                // Stale or missing lists.
                apt_update()?;
                ensure!(download(), "apt-get download {package} failed");
            }
            cached_deb(&debs, package).with_context(|| {
                format!(
                    "apt-get download {package} left no .deb in {}",
                    debs.display()
                )
            })?
        }
    };
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    fs::write(&done, deb.file_name().unwrap().as_encoded_bytes())?;
    Ok(dir)
}

fn cached_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .max()
}

/// The newest unpacked package in the cache whose name starts with `prefix`.
fn newest_cached(cache: &Path, prefix: &str) -> Option<String> {
    fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.path().join(".unpacked").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .max()
}

// ---------------------------------------------------------------------------------------------
// Building

struct Built {
    /// lb-agent, lbctl.
    bins: Vec<PathBuf>,
    /// Test target name -> executable.
    tests: BTreeMap<String, PathBuf>,
}

/// Release binaries and release test binaries (smaller and much faster under emulation; their
/// `CARGO_BIN_EXE_lb-agent` is the release agent).
fn build(root: &Path) -> Result<Built> {
    let bins = cargo_executables(
        root,
        "bin",
        &[
            "build",
            "--release",
            "-p",
            "lb-agent",
            "-p",
            "lbctl",
            "--bins",
        ],
    )?;
    let targets: BTreeSet<&str> = PLAN.iter().map(|s| s.target).collect();
    let mut args = vec![
        "test",
        "--release",
        "--no-run",
        "-p",
        "lb-datapath",
        "-p",
        "lb-agent",
        "-p",
        "lbctl",
    ];
    for t in &targets {
        args.extend(["--test", t]);
    }
    let tests = cargo_executables(root, "test", &args)?;
    let bins: Vec<PathBuf> = ["lb-agent", "lbctl"]
        .iter()
        .map(|name| {
            bins.get(*name)
                .cloned()
                .with_context(|| format!("cargo built no {name}"))
        })
        .collect::<Result<_>>()?;
    for t in targets {
        ensure!(tests.contains_key(t), "cargo built no test binary {t}");
    }
    Ok(Built { bins, tests })
}

/// Runs cargo with `--message-format=json-render-diagnostics` and returns the executables of
/// targets of `kind` (`bin`, `test`: a test and a binary may share a name) it reports, by name.
fn cargo_executables(root: &Path, kind: &str, args: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run cargo {args:?}"))?;
    ensure!(out.status.success(), "cargo {args:?} failed");
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact"
            || !msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind))
        {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// Where busybox lives in the guest (its applets are linked into `bin/` next to it at boot).
const BUSYBOX_DIR: &str = "/opt/busybox";

fn build_initramfs(path: &Path, kernel: &Kernel, busybox: &Path, built: &Built) -> Result<u64> {
    let mut image = Image::default();
    // Merged /usr: /bin, /lib, ... are symlinks on the host; add_host mirrors them.
    image.dir("/");
    for dir in [
        "/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc", "/var",
    ] {
        image.dir(dir);
    }
    image.symlink("/var/run", "../run");
    image.file_from(&format!("{BUSYBOX_DIR}/busybox"), busybox, 0o755);
    image.dir(&format!("{BUSYBOX_DIR}/bin"));
    image.data(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    image.data("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    image.data(
        "/etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    );

    let mut executables: Vec<PathBuf> = Vec::new();
    for tool in HOST_TOOLS {
        executables.push(which(tool).with_context(|| {
            format!("{tool} is not installed on the host (`cargo xtask setup`)")
        })?);
    }
    executables.extend(built.bins.iter().cloned());
    executables.extend(built.tests.values().cloned());
    let mut libraries = BTreeSet::new();
    for exe in &executables {
        image.add_host(exe)?;
        libraries.extend(shared_libraries(exe)?);
    }
    for lib in &libraries {
        image.add_host(lib)?;
    }
    for file in HOST_FILES {
        if Path::new(file).exists() {
            image.add_host_tree(Path::new(file))?;
        }
    }
    // /bin/sh for anything that shells out.
    if !image.entries.contains_key("usr/bin/sh") {
        image.symlink("/usr/bin/sh", &format!("{BUSYBOX_DIR}/busybox"));
    }

    let modules = module_closure(&kernel.modules, &MODULES)?;
    let guest_modules = format!("/usr/lib/modules/{}", kernel.release);
    let mut insmods = Vec::new();
    for rel in &modules {
        let guest = format!("{guest_modules}/{}", rel.display());
        image.file_from(&guest, &kernel.modules.join(rel), 0o644);
        insmods.push(guest);
    }

    let script = init_script(kernel, built, &insmods);
    image.data("/init", script.into_bytes(), 0o755);
    image.write(path)
}

/// The shared libraries `exe` loads (with the dynamic loader), from `ldd`; none for a static
/// executable.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {line}", exe.display());
        }
    }
    Ok(libs)
}

/// The modules named and everything they depend on, as paths relative to the modules
/// directory, dependencies first. Dependencies come from each module's `depends=` modinfo
/// (the package ships no modules.dep, and the host may have no depmod).
fn module_closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let mut by_name = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                by_name.insert(stem.replace('-', "_"), path);
            }
        }
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, PathBuf>,
        modules_dir: &Path,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        let path = by_name
            .get(&name)
            .with_context(|| format!("module {name} is not in {}", modules_dir.display()))?;
        let bytes = fs::read(path)?;
        for dep in modinfo_depends(&bytes) {
            visit(&dep, by_name, modules_dir, seen, order)?;
        }
        order.push(path.strip_prefix(modules_dir)?.to_owned());
        Ok(())
    }
    for name in wanted {
        visit(name, &by_name, modules_dir, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// The `depends=` list of a module's `.modinfo` strings.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let needle = b"\0depends=";
    let Some(at) = ko.windows(needle.len()).position(|w| w == needle) else {
        return Vec::new();
    };
    let rest = &ko[at + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The VM's /init. /tmp and /run stay directories of the root, which is in memory and writable
/// already: a tmpfs mounted over them would hide the project's files when the checkout lives
/// there (as a CI clone in /tmp does).
fn init_script(kernel: &Kernel, built: &Built, insmods: &[String]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!{BUSYBOX_DIR}/busybox sh
# Generated by `cargo xtask vm-test`.
{BUSYBOX_DIR}/busybox --install -s {BUSYBOX_DIR}/bin
export PATH=/usr/sbin:/usr/bin:{BUSYBOX_DIR}/bin
export HOME=/root RUST_BACKTRACE=1 RUST_LOG=info
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
ln -s /proc/self/fd /dev/fd
ip link set lo up
echo "{MARK} booted $(uname -r) ($(cut -d' ' -f1 /proc/uptime)s after start), $(nproc) CPUs, $(free -m | awk '/Mem:/ {{print $2}}') MiB"
for m in {modules}; do
    insmod "$m" || echo "{MARK} cannot load $m"
done
fails=0
step() {{
    name="$1"; shift
    echo "{MARK} === $name"
    t0=$(cut -d. -f1 /proc/uptime)
    if timeout {STEP_TIMEOUT_SECS} "$@"; then
        echo "{MARK} ok $name ($(( $(cut -d. -f1 /proc/uptime) - t0 ))s)"
    else
        echo "{MARK} FAILED $name ($(( $(cut -d. -f1 /proc/uptime) - t0 ))s)"
        fails=$((fails + 1))
    fi
}}
"#,
        modules = insmods.join(" "),
    ));
    for step in &PLAN {
        let exe = &built.tests[step.target];
        let mut line = format!("step '{}' {}", step.name, exe.display());
        for arg in step.args {
            line.push_str(&format!(" '{arg}'"));
        }
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str(&format!(
        r#"if [ "$fails" = 0 ]; then
    echo "{MARK} RESULT PASS ({release})"
else
    echo "{MARK} RESULT FAIL ($fails steps failed)"
fi
sync
poweroff -f
"#,
        release = kernel.release,
    ));
    s
}

/// An initramfs being assembled: guest path (relative, no leading `/`) -> what goes there.
/// Written sorted, so that every directory comes before what it holds.
#[derive(Default)]
struct Image {
    entries: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    Symlink(String),
    File { source: PathBuf, mode: u32 },
    Data { bytes: Vec<u8>, mode: u32 },
}

fn rel(guest: &str) -> String {
    guest.trim_start_matches('/').to_owned()
}

impl Image {
    fn parents(&mut self, guest: &str) {
        let mut path = String::new();
        let rel = rel(guest);
        let mut parts: Vec<&str> = rel.split('/').collect();
        parts.pop();
        for part in parts {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            self.entries.entry(path.clone()).or_insert(Entry::Dir);
        }
    }

    fn dir(&mut self, guest: &str) {
        self.parents(guest);
        self.entries.entry(rel(guest)).or_insert(Entry::Dir);
    }

    fn symlink(&mut self, guest: &str, target: &str) {
        self.parents(guest);
        self.entries
            .insert(rel(guest), Entry::Symlink(target.to_owned()));
    }

    fn file_from(&mut self, guest: &str, source: &Path, mode: u32) {
        self.parents(guest);
        self.entries.insert(
            rel(guest),
            Entry::File {
                source: source.to_owned(),
                mode,
            },
        );
    }

    fn data(&mut self, guest: &str, bytes: Vec<u8>, mode: u32) {
        self.parents(guest);
        self.entries.insert(rel(guest), Entry::Data { bytes, mode });
    }

    /// Adds the host file at `path` at the same place in the guest, with every symlink met on
    /// the way (merged /usr, library version links), so that the same path resolves the same
    /// way inside.
    fn add_host(&mut self, path: &Path) -> Result<()> {
        self.add_host_depth(path, 0)
    }

    fn add_host_depth(&mut self, path: &Path, depth: u32) -> Result<()> {
        ensure!(depth < 16, "too many symlinks resolving {}", path.display());
        let components: Vec<Component> = path.components().collect();
        ensure!(
            components.first() == Some(&Component::RootDir),
            "{} is not absolute",
            path.display()
        );
        let mut current = PathBuf::from("/");
        for (i, component) in components.iter().enumerate().skip(1) {
            let next = current.join(component);
            let meta = fs::symlink_metadata(&next)
                .with_context(|| format!("cannot stat {}", next.display()))?;
            let guest = next.to_str().context("non-UTF-8 path")?.to_owned();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&next)?;
                self.symlink(&guest, target.to_str().context("non-UTF-8 link")?);
                let resolved = normalize(&current.join(&target));
                let rest: PathBuf = components[i + 1..].iter().collect();
                return self.add_host_depth(&resolved.join(rest), depth + 1);
            }
            if meta.is_dir() {
                self.dir(&guest);
            } else {
                ensure!(
                    i == components.len() - 1,
                    "{} is not a directory",
                    next.display()
                );
                self.file_from(&guest, &next, meta.permissions().mode() & 0o7777);
            }
            current = next;
        }
        Ok(())
    }

    /// Adds a host file or a directory with everything under it.
    fn add_host_tree(&mut self, path: &Path) -> Result<()> {
        self.add_host(path)?;
        if fs::symlink_metadata(path)?.is_dir() {
            for entry in fs::read_dir(path)? {
                self.add_host_tree(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// Writes the archive (cpio "newc", uncompressed); returns its size.
    fn write(&self, path: &Path) -> Result<u64> {
        let file =
            fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = Cpio {
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
            ino: 1,
        };
        for (name, entry) in &self.entries {
            if name.is_empty() {
                continue;
            }
            match entry {
                Entry::Dir => out.entry(name, 0o040_755, &[])?,
                Entry::Symlink(target) => out.entry(name, 0o120_777, target.as_bytes())?,
                Entry::Data { bytes, mode } => out.entry(name, 0o100_000 | mode, bytes)?,
                Entry::File { source, mode } => {
                    let bytes = fs::read(source)
                        .with_context(|| format!("cannot read {}", source.display()))?;
                    out.entry(name, 0o100_000 | mode, &bytes)?;
                }
            }
        }
        out.entry("TRAILER!!!", 0, &[])?;
        out.out.flush()?;
        Ok(out.written)
    }
}

/// Resolves `.` and `..` lexically (the path's directories hold no symlinks: callers resolve
/// them first).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(c) => out.push(c),
            _ => {}
        }
    }
    out
}

struct Cpio<W: std::io::Write> {
    out: W,
    written: u64,
    ino: u32,
}

impl<W: std::io::Write> Cpio<W> {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    fn pad(&mut self) -> Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.out.write_all(&[0; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Booting

struct Outcome {
    /// `Some(passed)` once the plan printed its result.
    result: Option<bool>,
    /// The steps' outcomes and the measurements, for the summary.
    summary: Vec<String>,
}

fn boot(qemu: &Path, kernel: &Kernel, initrd: &Path, log: &Path) -> Result<Outcome> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
        .args(["-m", "2G", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 net.ifnames=0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!(
        "vm-test: booting {} under qemu (TCG, 2 CPUs, 2 GiB); up to {} min",
        kernel.release,
        VM_TIMEOUT.as_secs() / 60
    );
    let mut child = Qemu(
        cmd.spawn()
            .with_context(|| format!("cannot start {qemu:?}"))?,
    );
    let stdout = child.0.stdout.take().expect("piped");
    let stderr = child.0.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                return;
            }
        }
    });

    let mut log_file =
        fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let started = Instant::now();
    let deadline = started + VM_TIMEOUT;
    let mut outcome = Outcome {
        result: None,
        summary: Vec::new(),
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            child.stop();
            println!(
                "vm-test: timeout after {} s: VM killed",
                VM_TIMEOUT.as_secs()
            );
            outcome.summary.push(format!(
                "timeout after {} s: the VM was killed",
                VM_TIMEOUT.as_secs()
            ));
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok(line) => {
                println!("[{:>5.1}] {line}", started.elapsed().as_secs_f64());
                writeln!(
                    log_file,
                    "[{:>6.1}] {line}",
                    started.elapsed().as_secs_f64()
                )?;
                note(&line, &mut outcome);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.0.try_wait()?.is_some() {
                    // Drain what is left.
                    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                        println!("[{:>5.1}] {line}", started.elapsed().as_secs_f64());
                        writeln!(
                            log_file,
                            "[{:>6.1}] {line}",
                            started.elapsed().as_secs_f64()
                        )?;
                        note(&line, &mut outcome);
                    }
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.0.wait();
                break;
            }
        }
    }
    Ok(outcome)
}

/// The running VM: killed when this goes out of scope before it powered off (a timeout, an
/// error while reading its console), so that no qemu outlives the task.
struct Qemu(std::process::Child);

impl Qemu {
    fn stop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Picks the plan's own lines out of the console.
fn note(line: &str, outcome: &mut Outcome) {
    // The netperf results, and what the agent said about the kernel (classic_tc prints it).
    for what in ["netperf TCP_", "has no tcx", "has no batch map"] {
        if line.contains(what) {
            outcome.summary.push(line.trim().to_owned());
            return;
        }
    }
    let Some(at) = line.find(MARK) else { return };
    let text = line[at + MARK.len()..].trim();
    if let Some(result) = text.strip_prefix("RESULT ") {
        outcome.result = Some(result.starts_with("PASS"));
        outcome.summary.push(text.to_owned());
    } else if text.starts_with("ok ") || text.starts_with("FAILED ") || text.starts_with("booted ")
    {
        outcome.summary.push(text.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_reads_the_list() {
        let ko = b"\x7fELF....\0license=GPL\0depends=stp,llc\0intree=Y\0";
        assert_eq!(modinfo_depends(ko), ["stp", "llc"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }

    #[test]
    fn normalize_resolves_parent_components() {
        assert_eq!(
            normalize(Path::new("/usr/lib/../lib64/x")),
            Path::new("/usr/lib64/x")
        );
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut out = Cpio {
            out: Vec::new(),
            written: 0,
            ino: 1,
        };
        out.entry("a", 0o100_644, b"xyz").unwrap();
        out.entry("TRAILER!!!", 0, &[]).unwrap();
        assert_eq!(out.out.len() % 4, 0);
        assert_eq!(out.written as usize, out.out.len());
        assert!(out.out.starts_with(b"070701"));
    }
}
