//! Where a program's time goes: CPU samples of this process taken by `perf record` (a software
//! clock, which every virtual machine has) while it runs the program through BPF_PROG_TEST_RUN,
//! each sample inside the program charged to the kernel function the program had called (the
//! frame next to the program's in the sample's call chain) or to the program's own instructions.
//!
//! The share of samples is the share of the program's time: the test run's own work (the syscall,
//! copying the packet in and out) lies outside the program's frames and is not counted.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

/// Samples per second: about one per 50 µs of a call, so a case of 50,000 calls of a few hundred
/// ns each gets several hundred samples inside the program.
const FREQUENCY: &str = "20000";
/// How long perf takes to start sampling after it is spawned.
const SETTLE: Duration = Duration::from_millis(500);

/// What the kernel functions a program calls do, as the report names them. Functions not listed
/// are reported under their own name.
const PARTS: [(&str, &str); 14] = [
    ("htab_lru_map_update_elem", "conntrack writes"),
    ("__htab_map_lookup_elem", "hash lookups"),
    ("lookup_nulls_elem_raw", "hash lookups"),
    ("htab_map_hash", "hash lookups"),
    ("bpf_ktime_get_coarse_ns", "clock"),
    ("bpf_ktime_get_ns", "clock"),
    ("array_map_lookup_elem", "array lookups"),
    ("percpu_array_map_lookup_elem", "array lookups"),
    ("bpf_l4_csum_replace", "checksum helpers"),
    ("bpf_l3_csum_replace", "checksum helpers"),
    ("bpf_csum_diff", "checksum helpers"),
    ("bpf_skb_store_bytes", "checksum helpers"),
    ("bpf_xdp_fib_lookup", "FIB lookup"),
    ("bpf_skb_fib_lookup", "FIB lookup"),
];
/// The program's own instructions.
pub const OWN: &str = "own instructions";

/// The samples of one program over one case, by part.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    /// Samples inside the program (its own and its callees').
    pub samples: u64,
    /// Samples per part, largest first.
    pub parts: Vec<(String, u64)>,
}

impl Breakdown {
    /// The share of `part` in the program's samples (0 when it had none).
    pub fn share(&self, part: &str) -> f64 {
        let n = self
            .parts
            .iter()
            .find(|(p, _)| p == part)
            .map_or(0, |(_, n)| *n);
        if self.samples == 0 {
            0.0
        } else {
            n as f64 / self.samples as f64
        }
    }
}

/// A running `perf record` of this process.
pub struct Recording {
    perf: Child,
    data: PathBuf,
}

/// Starts sampling this process into `dir`/`name`.perf.data.
pub fn start(dir: &Path, name: &str) -> Result<Recording> {
    let data = dir.join(format!("{name}.perf.data"));
    let perf = Command::new("perf")
        .args([
            "record",
            "-q",
            "-g",
            "-e",
            "cpu-clock",
            "-F",
            FREQUENCY,
            "-o",
        ])
        .arg(&data)
        .args(["-p", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run perf (Debian's linux-perf; `cargo xtask setup` installs it)")?;
    thread::sleep(SETTLE);
    Ok(Recording { perf, data })
}

impl Recording {
    /// Stops sampling and charges the samples inside the program named `program` (the name it
    /// was loaded with, as its JIT symbol ends) to its parts.
    pub fn finish(self, program: &str) -> Result<Breakdown> {
        // SAFETY: plain kill(2) on the child's pid; perf writes its data file on SIGINT.
        unsafe {
            libc::kill(self.perf.id() as libc::pid_t, libc::SIGINT);
        }
        let out = self.perf.wait_with_output().context("waiting for perf")?;
        // perf exits with SIGINT's status when interrupted; only a missing file is a failure.
        ensure!(
            self.data.exists(),
            "perf record wrote nothing: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let script = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&self.data)
            .output()
            .context("cannot run perf script")?;
        let _ = std::fs::remove_file(&self.data);
        if !script.status.success() {
            bail!(
                "perf script failed: {}",
                String::from_utf8_lossy(&script.stderr).trim()
            );
        }
        Ok(charge(&String::from_utf8_lossy(&script.stdout), program))
    }
}

/// Charges each sample of `perf script -F ip,sym` output (call chains, leaf first, samples apart
/// by blank lines) that passes through `program` to the function the program called, or to
/// [`OWN`].
pub fn charge(script: &str, program: &str) -> Breakdown {
    let suffix = format!("_{program}");
    let mut parts: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = 0;
    for sample in script.split("\n\n") {
        let symbols: Vec<&str> = sample
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .map(|sym| sym.split('+').next().unwrap_or(sym))
            .collect();
        let Some(at) = symbols
            .iter()
            .position(|s| s.starts_with("bpf_prog_") && s.ends_with(&suffix))
        else {
            continue;
        };
        samples += 1;
        let part = match at.checked_sub(1).map(|callee| symbols[callee]) {
            // Its own BPF subprograms (`memset`, say) are its own instructions too.
            None => OWN,
            Some(callee) if callee.starts_with("bpf_prog_") => OWN,
            // The retpoline and SRSO thunks a call to a helper passes through.
            Some(callee) if callee.contains("_thunk") => "call thunks",
            Some(callee) => PARTS
                .iter()
                .find(|(function, _)| *function == callee)
                .map_or(callee, |(_, part)| part),
        };
        *parts.entry(part.to_owned()).or_default() += 1;
    }
    let mut parts: Vec<(String, u64)> = parts.into_iter().collect();
    parts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Breakdown { samples, parts }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
\tffffffff815330ea htab_map_hash+0x1a
\tffffffff81533c84 __htab_map_lookup_elem
\tffffffffc002dd05 bpf_prog_bf0df340e7f88ba4_lb_xdp
\tffffffff81f568de bpf_test_run

\tffffffffc002dd08 bpf_prog_bf0df340e7f88ba4_lb_xdp+0x20
\tffffffff81f568de bpf_test_run

\tffffffff81533111 htab_lru_map_update_elem
\tffffffffc002dd05 bpf_prog_bf0df340e7f88ba4_lb_xdp

\tffffffff81f568de bpf_test_run
\tffffffff814f14ea __sys_bpf

\tffffffff81533111 some_helper
\tffffffffc00aaaaa bpf_prog_0123456789abcdef_lb_from_pod

\tffffffffc00bbbbb bpf_prog_4f9302ba65b90ccd_memset
\tffffffffc00aaaaa bpf_prog_0123456789abcdef_lb_from_pod

\tffffffff822539ca __x86_indirect_thunk_rdx
\tffffffffc00aaaaa bpf_prog_0123456789abcdef_lb_from_pod
";

    #[test]
    fn samples_are_charged_to_the_function_the_program_called() {
        let b = charge(SCRIPT, "lb_xdp");
        assert_eq!(b.samples, 3);
        assert_eq!(
            b.parts,
            vec![
                ("conntrack writes".to_owned(), 1),
                ("hash lookups".to_owned(), 1),
                (OWN.to_owned(), 1),
            ]
        );
        assert!((b.share("hash lookups") - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(b.share("clock"), 0.0);
        let other = charge(SCRIPT, "lb_from_pod");
        assert_eq!(
            other.parts,
            vec![
                ("call thunks".to_owned(), 1),
                (OWN.to_owned(), 1),
                ("some_helper".to_owned(), 1),
            ]
        );
    }
}
