//! `lbctl`'s errors: no datapath pinned, no bpffs, wrong flags and values, and no privileges;
//! each says what to do. Needs root (mount, and a user to drop to).

mod common;

use std::{
    fs::{self, Permissions},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Output},
};

use common::{Fixture, TempMount, lbctl};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn errors_say_what_to_do() {
    if !lb_testbed::privileges::require() {
        return;
    }
    // A bpffs without pins.
    let empty = TempMount::new(true);
    let out = lbctl(&empty.dir, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    assert!(
        msg.contains(&format!("no datapath is pinned at {}", empty.dir.display())),
        "{msg}"
    );
    assert!(msg.contains("--bpffs-dir"), "{msg}");
    let out = lbctl(&empty.dir.join("lb"), &["service", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no datapath is pinned"),
        "{}",
        stderr(&out)
    );

    // A directory that is no bpffs.
    let plain = TempMount::new(false);
    let out = lbctl(&plain.dir, &["ct", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no bpf filesystem is mounted"),
        "{}",
        stderr(&out)
    );

    // Wrong flags and values: clap's errors, exit code 2, and what the message must say.
    let usage_errors: [(&[&str], &[&str]); 5] = [
        (&["stats", "--bogus"], &["unexpected argument '--bogus'"]),
        (
            &["maps", "dump", "--map", "nope"],
            &["unknown map `nope`", "LB_CT (ct)"],
        ),
        (
            &["trace", "--reply", "--syn", "1.2.3.4:5", "5.6.7.8:9", "tcp"],
            &["cannot be used with"],
        ),
        (&["trace", "1.2.3.4", "5.6.7.8:9", "sctp"], &[]),
        (&["stats", "--output", "yaml"], &[]),
    ];
    for (args, says) in usage_errors {
        let out = lbctl(&empty.dir, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let msg = stderr(&out);
        assert!(says.iter().all(|s| msg.contains(s)), "{args:?}: {msg}");
    }
}

/// Whether users other than root may walk down to `path`: every directory above it lets them
/// through.
fn reachable_by_others(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .all(|dir| fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

#[test]
fn without_privileges_it_says_it_needs_root() {
    let Some(f) = Fixture::new() else { return };
    // `nobody` runs a copy of lbctl from a directory it may enter: the build may live where only
    // root may (a checkout in a `mktemp -d` directory, mode 0700), where running it fails with
    // EACCES before lbctl even starts. The copy goes when the test ends, also when it fails.
    let reachable = TempMount::new(false);
    let copy = reachable.dir.join("lbctl");
    fs::copy(env!("CARGO_BIN_EXE_lbctl"), &copy).expect("copying lbctl");
    // Whatever the umask made of them.
    for path in [&reachable.dir, &copy] {
        fs::set_permissions(path, Permissions::from_mode(0o755)).unwrap();
    }
    assert!(
        reachable_by_others(&copy),
        "other users cannot reach {}: point TMPDIR at a directory they may enter",
        reachable.dir.display()
    );
    // `nobody` may not open the root-owned pins.
    let out = Command::new(&copy)
        .arg("--bpffs-dir")
        .arg(&f.pins)
        .arg("stats")
        .uid(65_534)
        .gid(65_534)
        .output()
        .expect("running lbctl as nobody");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
}
