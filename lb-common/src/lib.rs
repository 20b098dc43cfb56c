//! Everything the kernel programs and userspace must agree on: map and program names, map key
//! and value layouts, flags, counters, timeouts, and the rules both sides apply to them (flow
//! keys and their reply keys, the conntrack state machine, source-NAT port allocation, the flow
//! hash). The datapath (`lb-ebpf`) calls these rules on every packet; the predictor behind
//! `lbctl trace` calls the same functions on the live maps, so a prediction is what the kernel
//! does.
//!
//! Every type here is `#[repr(C)]` with explicit padding and derives `bytemuck::Pod`, whose derive
//! refuses implicit padding at compile time; sizes are pinned with `const` asserts so a layout
//! change is a compile error on both sides at once.
//!
//! `no_std`, and depends on nothing but bytemuck (and aya, for `aya::Pod`, with the `user`
//! feature): every crate of the project may depend on it.
#![no_std]

/// Implements `aya::Pod` (what aya's typed maps require of keys and values) for types that are
/// `bytemuck::Pod`, which the compiler checks: `repr(C)` or transparent, no padding, valid for
/// every bit pattern.
#[cfg(feature = "user")]
macro_rules! aya_pod {
    ($($t:ty),* $(,)?) => {
        $(
            const _: fn() = || {
                fn is_bytemuck_pod<T: bytemuck::Pod>() {}
                is_bytemuck_pod::<$t>();
            };
            // SAFETY: `bytemuck::Pod` (checked just above) promises everything `aya::Pod` needs.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

pub mod answer;
pub mod bucket;
pub mod conntrack;
pub mod csum;
pub mod dsr;
pub mod events;
pub mod filters;
pub mod hash;
pub mod maps;
pub mod net;
pub mod programs;
pub mod snat;
pub mod sock;
pub mod stats;
pub mod time;

pub use net::{Address, Be16, Be32, Be128};
