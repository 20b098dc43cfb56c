//! The demo as the README runs it: it must succeed, show what it promises and leave nothing
//! behind; and its command line must refuse what it does not know.

use std::{
    path::Path,
    process::{Command, Output},
};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_demo_shows_every_policy_and_cleans_up() {
    // The build of this test's profile, which runs the lb-agent and lbctl built next to it:
    // cargo builds those for their own packages' tests, so with `--workspace` only.
    let demo = Path::new(env!("CARGO_BIN_EXE_lb-demo"));
    for name in ["lb-agent", "lbctl"] {
        let bin = demo.with_file_name(name);
        assert!(
            bin.is_file(),
            "{} is missing: `cargo test -p lb-demo` alone does not build it; run `cargo xtask \
             test` or build the binaries first (`cargo build --bins`)",
            bin.display()
        );
    }
    let out = Command::new(demo).output().expect("running lb-demo");
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "lb-demo failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    // Every pod answered the ClusterIP, and each policy's client address was shown.
    for line in [
        "hostnames-0 (node-0)",
        "hostnames-1 (node-0)",
        "hostnames-2 (node-1)",
        "(pod client)",
        "(the external client)",
        "(node-0, source NAT)",
        "(node-1, source NAT)",
        "10.96.0.10:80/tcp",
        "cleaned up.",
    ] {
        assert!(
            stdout.contains(line),
            "no {line:?} in the demo's output:\n{stdout}"
        );
    }
    // The demo checks for its own leftovers (namespaces, mounts, temporary directories named
    // after its pid) and fails, saying "NOT cleaned up", when it finds any.
    assert!(!stdout.contains("NOT cleaned up"), "{stdout}");
}

#[test]
fn help_and_wrong_flags() {
    let demo = env!("CARGO_BIN_EXE_lb-demo");
    let help = Command::new(demo).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(text(&help).0.contains("cargo xtask demo"));

    let wrong = Command::new(demo).arg("--nodes=3").output().unwrap();
    assert_eq!(wrong.status.code(), Some(2));
    let (_, stderr) = text(&wrong);
    assert!(
        stderr.contains("unexpected arguments") && stderr.contains("--nodes=3"),
        "{stderr}"
    );
}
