//! A bpffs of a test's own, for datapaths that pin their maps.

use std::path::PathBuf;

use lb_datapath::bpffs;

/// A bpffs mounted on a fresh temporary directory, unmounted and removed on drop; the datapath
/// pins into its `lb` directory (the root of a bpffs holds the kernel's own `maps.debug` and
/// `progs.debug`).
pub struct TempBpffs {
    mount: PathBuf,
    /// Where the datapath pins its maps.
    pub dir: PathBuf,
}

impl TempBpffs {
    pub fn new(test: &str) -> Self {
        let mount = std::env::temp_dir().join(format!("lb-{test}-{}", std::process::id()));
        bpffs::ensure_bpffs(&mount).expect("mounting a bpffs");
        let pins = mount.join("lb");
        std::fs::create_dir(&pins).unwrap();
        Self { mount, dir: pins }
    }

    pub fn pins(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.mount.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a valid C string.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.mount);
    }
}
