//! The guest's root filesystem: busybox, the host tools the tests start with their shared
//! libraries, the release and test binaries at their host paths (the tests name the agent by
//! absolute path), the guest kernel's modules the tests need with their dependencies, and the
//! plan as `/init`. The cloud kernel has no 9p and virtiofsd is not in bookworm, so this is all
//! the guest sees of the host.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{binaries::Built, image::Image, packages::Kernel, plan, which};

/// Where busybox lives in the guest (its applets are linked into `bin/` next to it at boot).
pub(super) const BUSYBOX_DIR: &str = "/opt/busybox";
/// Guest kernel modules the tests need (their dependencies come along): `udp_diag` for the
/// agent closing connected UDP sockets (sock_diag `SOCK_DESTROY`, a module on Debian).
const MODULES: [&str; 5] = ["veth", "bridge", "sch_ingress", "cls_bpf", "udp_diag"];
/// Host programs the tests start, found on PATH and copied with their libraries.
const HOST_TOOLS: [&str; 6] = ["ip", "tc", "nsenter", "sysctl", "netperf", "netserver"];
/// Host files copied as they are.
const HOST_FILES: [&str; 4] = [
    "/etc/iproute2",
    "/etc/protocols",
    "/etc/services",
    "/etc/nsswitch.conf",
];

/// Writes the initramfs to `path`; returns its size.
pub(super) fn build(path: &Path, kernel: &Kernel, busybox: &Path, built: &Built) -> Result<u64> {
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
    if !image.contains("/usr/bin/sh") {
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

    let script = plan::init_script(kernel, built, &insmods);
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
}
