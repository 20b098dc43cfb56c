//! Builds the BPF object (the `lb-ebpf` binary) with the nightly toolchain and bpf-linker, and
//! leaves it in OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs both.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
        .context("building the BPF programs failed; `cargo xtask setup` installs what they need")
}
