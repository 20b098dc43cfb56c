//! Conntrack carried over into a map of another shape. An agent adopts the maps an earlier one
//! pinned as they are, so that no connection notices a restart. A conntrack map of another
//! shape (its capacity changed with `--conntrack-max`, the CPU count changed, or an earlier
//! version made it with per-CPU LRU lists) is replaced by one of the configured shape instead,
//! and its live flows are copied into it:
//!
//! 1. [`set_aside`], before the load: the old map's pin moves to `LB_CT_OLD` (bpffs cannot
//!    rename, so it is pinned again under that name, then unpinned), so that the load creates
//!    the new map. The old programs, still attached, keep using the old map.
//!    The load gives the new programs the old map too, as `LB_CT_PREV`.
//! 2. [`copy_old`], before the new programs are attached: the flows are in the new map by the
//!    time its first packet arrives. Then the agent sets `LB_CT_CARRYING`: until the last copy,
//!    a program that misses a flow in the new map looks for it in the old one (and copies it),
//!    so that a flow an old program opened meanwhile is known to the new programs at once.
//! 3. [`finish`], once they are attached and nothing writes the old map any more: a last copy
//!    of what the old programs recorded in between, then the old pin goes (and the agent clears
//!    `LB_CT_CARRYING`; the old map's memory goes with the programs, at the next restart). An
//!    agent that stops before this step finds `LB_CT_OLD` on its next start and copies from it
//!    then.
//!
//! Entries the new map already holds are never overwritten: they are newer.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapInfo};
use lb_common::{
    conntrack::{CtEntry, FlowKey},
    maps::{self, CT_MAP_FLAGS, capacity},
};

use crate::{DatapathError, predict::coarse_now_ns};

/// Where the old map is pinned while its flows are carried over (bpffs names have no dots).
pub const OLD_PIN: &str = "LB_CT_OLD";

/// `BPF_NOEXIST` (`include/uapi/linux/bpf.h`): an update that fails when the key is there.
const BPF_NOEXIST: u64 = 1;

/// The `max_entries` of a conntrack map meant to hold `capacity` entries before evicting any.
pub fn map_entries(capacity: u32) -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
    capacity.saturating_add(capacity::ct_lru_slack(cpus))
}

/// Moves the conntrack map pinned under `dir` aside when it is not of the shape this agent
/// makes (`entries`, [`CT_MAP_FLAGS`]), so that the load creates a new one. Returns the shape
/// it had (entries, flags) when it did.
pub fn set_aside(dir: &Path, entries: u32) -> Result<Option<(u32, u32)>, DatapathError> {
    let path = dir.join(maps::LB_CT);
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(&path).map_err(|e| pinned(&path, e))?;
    let shape = (info.max_entries(), info.map_flags());
    if shape == (entries, CT_MAP_FLAGS) {
        return Ok(None);
    }
    let old = dir.join(OLD_PIN);
    if old.exists() {
        // An earlier carry-over did not finish; its flows are older than these.
        std::fs::remove_file(&old).map_err(|e| pinned(&old, e))?;
    }
    let map = MapData::from_pin(&path).map_err(|e| pinned(&path, e))?;
    map.pin(&old).map_err(|e| pinned(&old, e))?;
    std::fs::remove_file(&path).map_err(|e| pinned(&path, e))?;
    Ok(Some(shape))
}

/// Whether a conntrack map set aside under `dir` waits to be carried over (a load then gives it
/// to the programs as `LB_CT_PREV`).
pub fn carrying(dir: &Path) -> bool {
    dir.join(OLD_PIN).exists()
}

/// Copies the live flows of the map set aside under `dir` (if any) into `ct`, leaving what `ct`
/// holds; returns how many it copied.
pub fn copy_old(
    dir: &Path,
    ct: &mut HashMap<MapData, FlowKey, CtEntry>,
) -> Result<usize, DatapathError> {
    let path = dir.join(OLD_PIN);
    if !path.exists() {
        return Ok(0);
    }
    let old: HashMap<MapData, FlowKey, CtEntry> = MapData::from_pin(&path)
        .map_err(|e| pinned(&path, e))
        .and_then(|data| {
            HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(|e| pinned(&path, e))
        })?;
    let now = coarse_now_ns();
    let mut copied = 0;
    for item in old.iter() {
        // An entry may go (evicted, replaced) while we walk: skip it.
        let Ok((key, entry)) = item else { continue };
        if !entry.live(now) {
            continue;
        }
        // BPF_NOEXIST: what the new map holds is newer. A full map evicts its oldest entries,
        // as it would for a new flow.
        if ct.insert(key, entry, BPF_NOEXIST).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}

/// The last copy from the map set aside under `dir`, once nothing writes it any more, then
/// its pin goes; returns how many flows this copy carried over.
pub fn finish(
    dir: &Path,
    ct: &mut HashMap<MapData, FlowKey, CtEntry>,
) -> Result<usize, DatapathError> {
    let copied = copy_old(dir, ct)?;
    let path = dir.join(OLD_PIN);
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| pinned(&path, e))?;
    }
    Ok(copied)
}

fn pinned(path: &Path, reason: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pinned {
        path: PathBuf::from(path),
        reason: reason.to_string(),
    }
}
