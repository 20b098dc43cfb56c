//! Everything the kernel programs and userspace must agree on: map names, map key and value
//! layouts, flags, counters, timeouts and the flow hash.
//!
//! Every type here is `#[repr(C)]` with explicit padding and derives `bytemuck::Pod`, whose derive
//! refuses implicit padding at compile time; sizes are pinned with `const` asserts so a layout
//! change is a compile error on both sides at once.
#![no_std]

pub mod conntrack;
pub mod csum;
pub mod hash;
pub mod maps;
pub mod net;
pub mod stats;

pub use net::{Be16, Be32};
