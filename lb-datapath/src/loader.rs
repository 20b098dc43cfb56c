//! Loading the datapath: the BPF object, its maps (pinned or private) and its programs.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupSockAddr, Program, ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::LinkOrder,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use lb_common::{maps, programs};

use crate::{
    LB_EBPF,
    features::{self, TcApi},
    maps::{Maps, MapsError},
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("failed to load the BPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {name} is missing from the BPF object")]
    MissingProgram { name: &'static str },
    #[error("the kernel refused program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach {name} to {iface}")]
    Attach {
        name: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("pinned map {path}: {reason}")]
    Pinned { path: PathBuf, reason: String },
    #[error(
        "socket-level balancing is unavailable: the kernel refused program {name} when the datapath was loaded ({reason}); it needs Linux 6.1 or later"
    )]
    SocketLbUnavailable { name: &'static str, reason: String },
    #[error("cannot read the datapath's event records")]
    EventLog(#[source] aya_log::Error),
}

/// Reads the programs' event records (`lb_common::events`) into a `log` logger: records of level
/// warn whose target is `lb_ebpf::events`. Its descriptor (`AsFd`) becomes readable when records
/// wait; `flush` hands them over.
pub type EventLog<T = &'static dyn log::Log> = aya_log::EbpfLogger<T>;

/// Capacities of the sized maps (entries); the defaults are `lb_common::maps::capacity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub ct: u32,
    /// IPv6 flows (`LB6_CT`).
    pub ct6: u32,
    pub sets: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            ct: maps::capacity::CT,
            ct6: maps::capacity::CT6,
            sets: maps::capacity::SETS,
        }
    }
}

/// Where the maps live.
#[derive(Clone, Debug, Default)]
pub enum Pinning {
    /// Private to this process (tests, benchmarks): gone when it exits.
    #[default]
    None,
    /// Pinned under this bpffs directory, reused when already there (agent restarts).
    Dir(PathBuf),
}

/// The loaded (not yet attached) datapath.
pub struct Datapath {
    ebpf: Ebpf,
    /// Why the socket programs did not load, if they did not (see [`Datapath::load`]).
    sock_refused: Option<(&'static str, String)>,
    /// This load created the backends array (no earlier agent had pinned one).
    backends_created: bool,
}

/// A datapath about to be loaded: [`Datapath::load`]'s first step (see [`Datapath::loader`]).
pub struct Loader {
    loader: EbpfLoader<'static>,
    pinning: Pinning,
    backends_created: bool,
}

impl Datapath {
    /// Loads the BPF object and runs every program through the verifier.
    pub fn load(pinning: &Pinning, capacities: Capacities) -> Result<Self, DatapathError> {
        Self::loader(pinning, capacities).load()
    }

    /// The first step of [`Datapath::load`]: the loader set up, nothing parsed or created yet.
    /// Setting it up reads and parses the kernel's BTF (some 17 MB, let go of at once): an agent
    /// does it before it starts anything else that allocates, so that the two never add up in
    /// its peak memory.
    pub fn loader(pinning: &Pinning, capacities: Capacities) -> Loader {
        let backends_created = match pinning {
            Pinning::None => true,
            Pinning::Dir(dir) => !dir.join(maps::LB_BACKENDS).exists(),
        };
        let mut loader = EbpfLoader::new();
        // The object has no CO-RE relocations (nothing in it depends on the kernel's type
        // layout), so the kernel's BTF the loader reads on creation is dropped at once, and its
        // pages handed back, rather than held through the load.
        loader.btf(None);
        crate::sys::release_freed_memory();
        loader
            .map_max_entries(maps::LB_CT, crate::ct_carry::map_entries(capacities.ct))
            .map_max_entries(maps::LB6_CT, crate::ct_carry::map_entries(capacities.ct6))
            // Every map indexed by set id holds `sets` entries (more services than the
            // defaults allow must not overflow any of them).
            .map_max_entries(maps::LB_MAGLEV, capacities.sets)
            .map_max_entries(maps::LB_SVC_STATS, capacities.sets)
            .map_max_entries(maps::LB_AFFINITY_SCOPE, capacities.sets)
            .map_max_entries(maps::LB_SOCK_STATS, capacities.sets);
        if let Pinning::Dir(dir) = pinning {
            for name in maps::ALL.iter().chain(&maps::TAIL_CALLS) {
                loader.map_pin_path(name, dir.join(name));
            }
            // A conntrack map set aside to be carried over (`ct_carry`): the programs fall back
            // to it while the agent carries its flows over. Otherwise `LB_CT_PREV` stays an
            // empty map of its own.
            if crate::ct_carry::carrying(dir) {
                loader.map_pin_path(maps::LB_CT_PREV, dir.join(crate::ct_carry::OLD_PIN));
            }
        }
        Loader {
            loader,
            pinning: pinning.clone(),
            backends_created,
        }
    }
}

impl Loader {
    /// Parses the BPF object, creates (or opens the pinned) maps and runs every program through
    /// the verifier.
    pub fn load(self) -> Result<Datapath, DatapathError> {
        let mut dp = self.load_unverified()?;
        dp.sock_refused = verify(&mut dp.ebpf)?;
        fill_tail_calls(&mut dp.ebpf)?;
        // And what parsing the object and verifying its programs took, on threads of their own.
        crate::sys::release_freed_memory();
        Ok(dp)
    }

    /// Parses the BPF object and creates (or opens the pinned) maps, but leaves the programs
    /// unverified: [`Datapath::verify_program`] loads each one when it is first needed (test
    /// harnesses, which run one or two programs of the dozen and would otherwise verify all of
    /// them per test: minutes under the VM test's emulation).
    pub(crate) fn load_unverified(self) -> Result<Datapath, DatapathError> {
        let Self {
            mut loader,
            pinning,
            backends_created,
        } = self;
        let mut ebpf = loader.load(LB_EBPF).map_err(DatapathError::Load)?;
        if matches!(pinning, Pinning::None) {
            // Only these programs and this process ever write these maps: the filters are
            // complete from the start (`filters`).
            set_element(
                &mut ebpf,
                maps::LB_FILTERS,
                lb_common::filters::COMPLETE,
                1u8,
            )?;
        }
        Ok(Datapath {
            ebpf,
            sock_refused: None,
            backends_created,
        })
    }
}

impl Datapath {
    /// Loads program `name`, of any of the datapath's kinds, unless it is loaded already: the
    /// on-demand half of [`Loader::load_unverified`]. An IPv6 twin then also takes its slot in
    /// the program array its entry program tail-calls through.
    #[cfg(feature = "test-helpers")]
    pub(crate) fn verify_program(&mut self, name: &'static str) -> Result<(), DatapathError> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?;
        if prog.fd().is_ok() {
            return Ok(());
        }
        load_program(name, prog)?;
        if let Some(&(index, _, array)) = maps::TAIL_PROGRAMS.iter().find(|(_, n, _)| *n == name) {
            fill_tail_call(&mut self.ebpf, index, name, array)?;
        }
        Ok(())
    }
}

impl Datapath {
    /// The socket-level balancing program `name` (one of `lb_common::programs::SOCK`); an error
    /// when the kernel refused them at load.
    pub fn sock_program(
        &mut self,
        name: &'static str,
    ) -> Result<&mut CgroupSockAddr, DatapathError> {
        if let Some((refused, reason)) = &self.sock_refused {
            return Err(DatapathError::SocketLbUnavailable {
                name: refused,
                reason: reason.clone(),
            });
        }
        program(&mut self.ebpf, name)
    }

    pub fn xdp(&mut self) -> &mut Xdp {
        program(&mut self.ebpf, programs::XDP).expect("checked at load")
    }

    pub fn from_pod(&mut self) -> &mut SchedClassifier {
        program(&mut self.ebpf, programs::FROM_POD).expect("checked at load")
    }

    pub fn to_pod(&mut self) -> &mut SchedClassifier {
        program(&mut self.ebpf, programs::TO_POD).expect("checked at load")
    }

    pub fn ext_in(&mut self) -> &mut SchedClassifier {
        program(&mut self.ebpf, programs::EXT_IN).expect("checked at load")
    }

    pub fn ext_out(&mut self) -> &mut SchedClassifier {
        program(&mut self.ebpf, programs::EXT_OUT).expect("checked at load")
    }

    /// The empty XDP program (loaded on first use), for benchmarks.
    pub fn empty_xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        let prog: &mut Xdp = program(&mut self.ebpf, programs::EMPTY_XDP)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program {
                name: programs::EMPTY_XDP,
                source,
            })?;
        }
        Ok(prog)
    }

    /// The empty tc program (loaded on first use), for benchmarks.
    pub fn empty_tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, programs::EMPTY_TC)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program {
                name: programs::EMPTY_TC,
                source,
            })?;
        }
        Ok(prog)
    }

    /// Attaches the pod programs to a pod's host-side veth (`iface`, in the calling thread's
    /// network namespace): load balancing on ingress, reverse NAT on egress. Uses tcx links where
    /// the kernel has them (6.6+), classic clsact filters otherwise (see
    /// [`features::tc_api`]). The attachments last as long as this `Datapath`.
    pub fn attach_pod_iface(&mut self, iface: &str) -> Result<(), DatapathError> {
        let tc_api = features::tc_api();
        if tc_api == TcApi::Netlink {
            // clsact may already exist (another program, an earlier run): that is fine.
            let _ = tc::qdisc_add_clsact(iface);
        }
        let options = || match tc_api {
            TcApi::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            TcApi::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
        };
        let attach = |name: &'static str| {
            move |source| DatapathError::Attach {
                name,
                iface: iface.to_owned(),
                source,
            }
        };
        self.from_pod()
            .attach_with_options(iface, TcAttachType::Ingress, options())
            .map_err(attach(programs::FROM_POD))?;
        self.to_pod()
            .attach_with_options(iface, TcAttachType::Egress, options())
            .map_err(attach(programs::TO_POD))?;
        Ok(())
    }

    /// Starts reading the programs' event records into the `log` crate's logger (see
    /// [`EventLog`]). Once per loaded object: the ring buffer moves into the reader. The records
    /// come from this object's programs only; maps of a pinned datapath are shared, its records
    /// are not (`lb_common::maps::PRIVATE`).
    pub fn event_log(&mut self) -> Result<EventLog, DatapathError> {
        self.event_log_with(log::logger())
    }

    /// [`Datapath::event_log`] into `logger`.
    pub fn event_log_with<T: log::Log>(&mut self, logger: T) -> Result<EventLog<T>, DatapathError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(DatapathError::EventLog)
    }

    /// Sets whether the programs fall back to the conntrack map being carried over
    /// (`LB_CT_PREV`) when `LB_CT` misses: on from before the new programs are attached until the
    /// last copy is done (`ct_carry`).
    pub fn set_ct_carrying(&mut self, on: bool) -> Result<(), DatapathError> {
        set_element(&mut self.ebpf, maps::LB_CT_CARRYING, 0, u32::from(on))
    }

    /// Takes the map handles out of the loaded object (once).
    pub fn take_maps(&mut self) -> Result<Maps, DatapathError> {
        let maps = Maps::take_from(&mut self.ebpf)?;
        if self.backends_created {
            maps.note_backends_created();
        }
        Ok(maps)
    }
}

/// Writes `value` into element `index` of array map `name` of a loaded object (one whose
/// handles have not been taken out yet, or a private one `Maps` does not hold).
fn set_element<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    index: u32,
    value: V,
) -> Result<(), DatapathError> {
    let map = ebpf.map_mut(name).ok_or(MapsError::Missing { name })?;
    let failed = |source| MapsError::Map { name, source };
    let mut array: aya::maps::Array<_, V> = aya::maps::Array::try_from(map).map_err(failed)?;
    array.set(index, value, 0).map_err(failed)?;
    Ok(())
}

/// Checks that maps pinned under `dir` (by an earlier agent) have this version's layout, so that
/// they can be adopted; says what to do when they do not. A map that only holds counters
/// (`LB_VERDICTS`, whose size follows the number of reasons a version counts) is replaced
/// instead: its counts start over, no connection notices. So is `LB_CONFIG` of another value
/// size (before `NodeConfig::flags`, 12 bytes): the agent writes all of it from its flags and
/// Node object before its programs are attached, and the old programs keep the old map until
/// they are swapped out. Returns the maps it replaced.
pub fn check_pinned_maps(dir: &Path) -> Result<Vec<&'static str>, DatapathError> {
    let mut replaced = Vec::new();
    for name in maps::ALL {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| DatapathError::Pinned {
            path: path.clone(),
            reason: source.to_string(),
        })?;
        let found = (info.key_size(), info.value_size());
        let layout = maps::layout_of(name).expect("every map has a layout");
        let expected = (layout.key_size, layout.value_size);
        let replace = match name {
            maps::LB_VERDICTS => {
                found == expected && info.max_entries() != lb_common::stats::Reason::COUNT
            }
            maps::LB_CONFIG => found.0 == expected.0 && found.1 != expected.1,
            // What getpeername() shows of sockets already open: losing it shows them their
            // backend, which is better than refusing to start (its key widened while socket-level
            // balancing was young).
            maps::LB_SOCK_REV => found != expected,
            _ => false,
        };
        if replace {
            std::fs::remove_file(&path).map_err(|e| DatapathError::Pinned {
                path: path.clone(),
                reason: format!("cannot replace it: {e}"),
            })?;
            replaced.push(name);
            continue;
        }
        if found != expected {
            return Err(DatapathError::Pinned {
                path,
                reason: format!(
                    "key/value sizes {found:?}, this version uses {expected:?}: it was made by an incompatible version; `lb-agent cleanup` removes it (established connections are then re-balanced)"
                ),
            });
        }
    }
    Ok(replaced)
}

/// Whether tc programs are attached with tcx (BPF links, Linux 6.6+) rather than classic
/// netlink filters: probed once (see [`features::tc_api`]).
pub fn has_tcx() -> bool {
    features::tc_api() == TcApi::Tcx
}

/// Loads the packet and socket programs, and so runs them through the verifier: the packet
/// programs each on a thread of its own (the kernel verifies one program per call, the three
/// largest take 100-130 ms each, and an agent's start waits for them), the socket programs in
/// turn on one more.
///
/// The socket programs are loaded (and so verified) with the others, but a kernel that refuses
/// them (before 6.1 they lack `bpf_set_retval`) keeps the packet path: only attaching them then
/// fails, with the kernel's reason, returned here.
fn verify(ebpf: &mut Ebpf) -> Result<Option<(&'static str, String)>, DatapathError> {
    let packet_names: Vec<&'static str> = programs::TC
        .into_iter()
        .chain([programs::XDP])
        .chain(programs::IPV6)
        .collect();
    let mut packet = Vec::new();
    let mut sock = Vec::new();
    for (name, prog) in ebpf.programs_mut() {
        if let Some(name) = packet_names.iter().find(|n| **n == name) {
            packet.push((*name, prog));
        } else if let Some(name) = programs::SOCK.iter().find(|n| **n == name) {
            sock.push((*name, prog));
        }
    }
    let missing = packet_names
        .iter()
        .chain(programs::SOCK.iter())
        .find(|n| !packet.iter().chain(sock.iter()).any(|(name, _)| name == *n));
    if let Some(name) = missing {
        return Err(DatapathError::MissingProgram { name });
    }
    // In the order of `programs::SOCK`: the first one refused stops the rest.
    sock.sort_by_key(|(name, _)| programs::SOCK.iter().position(|n| n == name));
    std::thread::scope(|scope| {
        let packet: Vec<_> = packet
            .into_iter()
            .map(|(name, prog)| scope.spawn(move || load_program(name, prog)))
            .collect();
        let sock = scope.spawn(move || {
            for (name, prog) in sock {
                if let Err(e) = load_program(name, prog) {
                    let reason = format!("{:#}", anyhow::Error::from(e));
                    tracing::warn!(program = name, %reason, "socket-level balancing unavailable");
                    return Some((name, reason));
                }
            }
            None
        });
        for loading in packet {
            loading.join().expect("loading a program panicked")?;
        }
        Ok(sock.join().expect("loading a program panicked"))
    })
}

/// Puts the IPv6 twins into the program arrays the entry programs tail-call through
/// (`lb_common::maps::TAIL_PROGRAMS`). A pinned array an earlier agent filled gets this
/// version's twins: the entry programs still attached then hand their IPv6 packets to them
/// until this version's replace them, over the same pinned maps.
fn fill_tail_calls(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for (index, name, array) in maps::TAIL_PROGRAMS {
        fill_tail_call(ebpf, index, name, array)?;
    }
    Ok(())
}

/// Puts the loaded program `name` at `index` of the program array `array`.
fn fill_tail_call(
    ebpf: &mut Ebpf,
    index: u32,
    name: &'static str,
    array: &'static str,
) -> Result<(), DatapathError> {
    let fd = ebpf
        .program(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .fd()
        .map_err(|source| DatapathError::Program { name, source })?
        .try_clone()
        .map_err(|e| DatapathError::Program {
            name,
            source: ProgramError::IOError(e),
        })?;
    let map = ebpf
        .map_mut(array)
        .ok_or(MapsError::Missing { name: array })?;
    let failed = |source| MapsError::Map {
        name: array,
        source,
    };
    let mut slots = aya::maps::ProgramArray::try_from(map).map_err(failed)?;
    slots.set(index, &fd, 0).map_err(failed)?;
    Ok(())
}

/// Loads one of the datapath's programs, whichever its type.
fn load_program(name: &'static str, prog: &mut Program) -> Result<(), DatapathError> {
    let loaded = match prog {
        Program::SchedClassifier(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        _ => return Err(DatapathError::MissingProgram { name }),
    };
    loaded.map_err(|source| DatapathError::Program { name, source })
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut Program>,
{
    ebpf.program_mut(name)
        .and_then(|prog| prog.try_into().ok())
        .ok_or(DatapathError::MissingProgram { name })
}

/// The directory under which a pinned datapath lives by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// [`DEFAULT_PIN_DIR`] as a path.
pub fn default_pin_dir() -> &'static Path {
    Path::new(DEFAULT_PIN_DIR)
}
