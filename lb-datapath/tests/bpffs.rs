//! Where the agent's bpffs comes from on a node that has none mounted (needs root: mounts, in a
//! mount namespace of the test's own).

use std::{ffi::CString, path::Path};

use lb_datapath::bpffs::{ensure_bpffs, is_bpffs};

fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong) {
    let source = CString::new(source).unwrap();
    let target = CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    let fstype = CString::new(fstype).unwrap();
    // SAFETY: mount(2) with valid C strings and no data.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    assert_eq!(
        ret,
        0,
        "mount {}: {}",
        target.to_string_lossy(),
        std::io::Error::last_os_error()
    );
}

/// Runs `test` on a thread in a mount namespace of its own, on a fresh empty directory that is
/// read-only, as /sys/fs/bpf is on a node with no bpffs mounted; the namespace, and every mount
/// made in it, goes with the thread.
fn on_read_only_dir(name: &str, test: impl FnOnce(&Path) + Send + 'static) {
    let base = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
    std::fs::create_dir(&base).unwrap();
    let dir = base.clone();
    let result = std::thread::spawn(move || {
        // SAFETY: unshare(2) of this thread's mount namespace; no memory is involved.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
        mount(
            "none",
            Path::new("/"),
            "none",
            libc::MS_REC | libc::MS_PRIVATE,
        );
        mount("none", &dir, "tmpfs", libc::MS_RDONLY);
        test(&dir);
    })
    .join();
    let _ = std::fs::remove_dir(&base);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_bpffs_is_mounted_on_the_empty_directory_its_pins_cannot_be_made_in() {
    on_read_only_dir("bpffs-mount", |base| {
        let pins = base.join("lb");
        assert!(
            std::fs::create_dir(&pins).is_err(),
            "the directory is read-only"
        );
        ensure_bpffs(&pins).unwrap();
        assert!(
            is_bpffs(base),
            "the bpffs is mounted on the empty directory"
        );
        assert!(
            is_bpffs(&pins) && pins.is_dir(),
            "and the pins' directory made in it"
        );
        // Once there, it is used as it is.
        ensure_bpffs(&pins).unwrap();
    });
}

#[test]
fn nothing_is_mounted_over_a_directory_that_holds_something() {
    on_read_only_dir("bpffs-busy", |base| {
        // Something in it: the tmpfs under the read-only one holds a file.
        mount("none", base, "tmpfs", 0);
        std::fs::write(base.join("keep"), "").unwrap();
        mount("none", base, "tmpfs", libc::MS_REMOUNT | libc::MS_RDONLY);
        let pins = base.join("lb");
        let error = format!("{:#}", ensure_bpffs(&pins).unwrap_err());
        assert!(
            error.contains(&format!("cannot create {}", pins.display())),
            "{error}"
        );
        assert!(!is_bpffs(base));
        assert!(base.join("keep").exists());
    });
}
