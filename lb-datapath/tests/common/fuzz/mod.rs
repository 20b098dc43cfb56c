//! The seeded fuzz and property test of every datapath program (`tests/datapath_fuzz.rs`):
//! the node it runs on ([`scenario`]), the frames it sends ([`frames`], [`mutate`]), what each
//! must do ([`oracle`], reading frames as the programs do with [`wire`]), the checks of each run
//! ([`check`]) and the summary ([`tally`]).

pub mod check;
pub mod frames;
pub mod mutate;
pub mod oracle;
pub mod scenario;
pub mod tally;
pub mod wire;

/// The fixed default seed; `LB_FUZZ_SEED` (decimal, or hex with `0x`) picks another.
pub const DEFAULT_SEED: u64 = 0x5eed_da7a;
pub const SEED_VAR: &str = "LB_FUZZ_SEED";
/// Frames per test; `LB_FUZZ_FRAMES` picks another count (a failure's frame number plus one
/// replays up to it).
pub const FRAMES_VAR: &str = "LB_FUZZ_FRAMES";

/// A run's seed and frame count, from the environment or the defaults.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub seed: u64,
    pub frames: usize,
}

impl Settings {
    pub fn from_env(default_frames: usize) -> Self {
        let seed = std::env::var(SEED_VAR).map_or(DEFAULT_SEED, |s| {
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{SEED_VAR}={s}: {e}"))
        });
        let frames = std::env::var(FRAMES_VAR).map_or(default_frames, |s| {
            s.parse()
                .unwrap_or_else(|e| panic!("{FRAMES_VAR}={s}: {e}"))
        });
        Self { seed, frames }
    }
}
