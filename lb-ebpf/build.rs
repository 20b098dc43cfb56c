//! Rebuild the BPF object when the linker changes: building this crate depends on the
//! `bpf-linker` binary, which cargo cannot track by itself.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
