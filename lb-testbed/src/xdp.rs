//! Minimal XDP programs, loaded with raw `bpf(2)` calls (a few instructions each, no ELF, no
//! aya): the bed needs one to make veths receive XDP_TX frames, and tests use the others to
//! check that it does.
//!
//! Why an XDP program and not only GRO (measured on the 6.18 kernel here): frames that XDP
//! sends into a veth wait in the peer's NAPI ring, which exists when the peer has an XDP program
//! or GRO on. XDP_REDIRECT (`ndo_xdp_xmit` with a flush) then kicks the peer's NAPI either way,
//! but XDP_TX's flush (`veth_xdp_flush`) only kicks it when the peer has an XDP program: with
//! GRO alone, XDP_TX frames sit in the ring, uncounted and undelivered.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// XDP verdicts (`enum xdp_action`).
pub mod action {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
}

// From <linux/bpf.h>.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_FUNC_REDIRECT: i32 = 23;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r<reg> = imm`
const fn mov64_imm(reg: u8, imm: i32) -> Insn {
    Insn {
        code: 0xb7,
        regs: reg,
        off: 0,
        imm,
    }
}

const fn call(helper: i32) -> Insn {
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper,
    }
}

const EXIT: Insn = Insn {
    code: 0x95,
    regs: 0,
    off: 0,
    imm: 0,
};

/// The head of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-fills the rest).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The head of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// An XDP program attached to an interface; detached when dropped (or when the interface or
/// its namespace goes away).
#[derive(Debug)]
pub struct XdpLink {
    _link: OwnedFd,
}

/// Attaches a program that returns `verdict` for every frame to `iface` in `ns` (native mode).
pub fn attach_verdict(ns: &Netns, iface: &str, verdict: u32) -> Result<XdpLink> {
    let verdict = i32::try_from(verdict).context("XDP verdict out of range")?;
    attach(ns, iface, vec![mov64_imm(0, verdict), EXIT])
}

/// Attaches to `from` in `ns` a program that redirects every frame to `to` (in the same
/// namespace) with `bpf_redirect`.
pub fn attach_redirect(ns: &Netns, from: &str, to: &str) -> Result<XdpLink> {
    let to_name = to.to_owned();
    let to_index = ns
        .enter(move || ifindex(&to_name))?
        .with_context(|| format!("no interface {to} in netns {}", ns.name()))?;
    let to_index = i32::try_from(to_index).context("ifindex out of range")?;
    attach(
        ns,
        from,
        vec![
            mov64_imm(1, to_index),
            mov64_imm(2, 0),
            call(BPF_FUNC_REDIRECT),
            EXIT,
        ],
    )
}

fn attach(ns: &Netns, iface: &str, insns: Vec<Insn>) -> Result<XdpLink> {
    let name = iface.to_owned();
    let link = ns
        .enter(move || -> Result<OwnedFd> {
            let index = ifindex(&name)?;
            let prog = load(&insns).context("loading the XDP program")?;
            link_create(&prog, index).context("attaching the XDP program")
        })?
        .with_context(|| format!("XDP on {iface} in netns {}", ns.name()))?;
    Ok(XdpLink { _link: link })
}

fn ifindex(iface: &str) -> Result<u32> {
    let name = CString::new(iface)?;
    // SAFETY: if_nametoindex with a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}: {}", io::Error::last_os_error());
    }
    Ok(index)
}

fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..7].copy_from_slice(b"lbt_xdp");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    bpf(BPF_PROG_LOAD, &attr)
}

fn link_create(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &attr)
}

/// A `bpf(2)` command that returns a new file descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a #[repr(C)] head of `union bpf_attr` of the size passed; the pointers
    // it holds outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
