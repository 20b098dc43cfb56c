//! Boots the guest under qemu (TCG: no KVM needed) and reads its serial console: every line is
//! shown with the time since boot, logged, and handed to the plan's reader. The VM is killed
//! when it overruns its time or the task stops early.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{packages::Kernel, plan::Outcome};

/// The whole VM run, boot to power-off, at most. Under software emulation on two CPUs it takes
/// about six minutes on a quiet machine and ten on a busy one (each agent loads its programs for
/// up to half a minute), but a machine whose emulation runs slower took 20 minutes for the 25
/// steps (each datapath test binary 30 to 90 s); the limit leaves room for that without letting
/// a hung guest hold CI for long.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub(super) fn boot(qemu: &Path, kernel: &Kernel, initrd: &Path, log: &Path) -> Result<Outcome> {
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
    let mut outcome = Outcome::default();
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
            Ok(line) => show(&line, started, &mut log_file, &mut outcome)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.0.try_wait()?.is_some() {
                    // Drain what is left.
                    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                        show(&line, started, &mut log_file, &mut outcome)?;
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

/// Shows a console line on the terminal, writes it to the log (both timed from `started`) and
/// notes it in the outcome.
fn show(line: &str, started: Instant, log: &mut fs::File, outcome: &mut Outcome) -> Result<()> {
    let at = started.elapsed().as_secs_f64();
    println!("[{at:>5.1}] {line}");
    writeln!(log, "[{at:>6.1}] {line}")?;
    outcome.note(line);
    Ok(())
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
