//! Empty on purpose: the library target exists so that `lb-datapath` can take a
//! build-dependency on this crate and cargo rebuilds the BPF object when it changes. The
//! programs themselves are the `lb-ebpf` binary, built for `bpfel-unknown-none`.
#![no_std]
