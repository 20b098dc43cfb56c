//! A seeded fuzz and property test of every datapath program (BPF_PROG_TEST_RUN): a million
//! frames in all (half per test) through `lb_from_pod`, `lb_to_pod`, `lb_xdp`, `lb_ext_in` and
//! `lb_ext_out`, on a node with every kind of frontend (`common::fuzz::scenario`). Valid TCP, UDP
//! and ICMP to frontends and elsewhere, replies, ICMP errors quoting flows, fragments, frames that
//! are no IPv4, random bytes, and all of these broken: cut at any length, any IHL, total lengths
//! shorter and longer than the frame, IPv4 options, fragment bits, TTLs that run out.
//! Needs root.
//!
//! Every frame, through every program, must
//! 1. come out byte for byte and passed, uncounted, when it concerns no frontend (the programs
//!    cannot read it as IPv4, or its destination has no frontend and it is no reply of a flow);
//! 2. get the verdict and translation the maps say, read just before it runs: the predictor's
//!    decision for TCP and UDP (what `lbctl trace` shows), and for fragments and ICMP errors
//!    what their first fragment and the flow they quote call for (`common::fuzz::oracle`).
//!    Packets the node routes after NAT depend on a FIB lookup the maps cannot predict: for
//!    those alone any of the outcomes `lb-ebpf/src/fib.rs` documents is accepted;
//! 3. be counted in LB_VERDICTS exactly once when it reaches a frontend decision (plus
//!    `forwarded` or `answer_suppressed` where they go with it), with its length, and not at all
//!    otherwise; an uncounted frame passes untouched;
//! 4. get a verdict of its program's set (never XDP_ABORTED), and no refusal from the kernel.
//!
//! Each test starts a fresh datapath every `PHASE` frames, so that state stays bounded, and
//! switches `web`'s backends every `CHURN` frames while flows are open.
//!
//! A failure names the seed, the frame's number, family and program, and the frame in hex;
//! `LB_FUZZ_SEED=<seed> LB_FUZZ_FRAMES=<number + 1> cargo xtask test --test datapath_fuzz --
//! <test>` replays up to it. (Generated answers are rate-limited by the clock, so a replay may
//! answer where the first run suppressed, or the other way round; the checks accept both.)

mod common;

use std::time::Instant;

use common::{
    fuzz::{
        FRAMES_VAR, SEED_VAR, Settings,
        check::{self, Observed, Verdict},
        frames::{self, Family, Frame, Generator, Mix, Seen},
        oracle::{self, Expect},
        scenario,
        tally::Tally,
        wire,
    },
    harness::{Harness, Hook, harness},
    packet::hex,
};
use lb_common::{maps::Counter, stats::Reason};

/// Frames per test: the two tests make the million.
const FRAMES: usize = 500_000;
/// Frames per fresh datapath.
const PHASE: usize = 50_000;
/// Frames between two changes of `web`'s backends.
const CHURN: usize = 2_500;
/// Fewer frames than this (a replay) are not asked to reach every decision.
const COVERAGE_FRAMES: usize = 100_000;

/// Mostly well-formed traffic, so that flows open, go on, close and reopen: every frame is
/// checked against the predictor (or the fragment and ICMP rules), every translation byte for
/// byte.
#[test]
fn well_formed_traffic_gets_the_predicted_verdict_and_translation_on_every_program() {
    // Flow, Other, Reply, IcmpError, Fragment, LaterFragment, NotIpv4, Random, Mutant, Truncated.
    let mix = Mix([40, 8, 24, 10, 8, 3, 3, 0, 2, 2]);
    fuzz(
        "well_formed_traffic",
        mix,
        &[
            Reason::NewFlow,
            Reason::Established,
            Reason::ReplyNat,
            Reason::IcmpErrorNat,
            Reason::FragmentNat,
            Reason::RejectNoBackend,
            Reason::RejectUnknownPort,
            Reason::DropNoBackend,
            Reason::DropSourceRange,
            Reason::DropFragment,
            Reason::DropNoRoute,
            Reason::DropTtlExceeded,
            Reason::PortRemapped,
        ],
    );
}

/// Mostly broken and random frames, among enough valid flows that the broken ones hit live
/// state: each is passed untouched, or counted once and decided as the maps say.
#[test]
fn broken_and_random_frames_pass_untouched_or_are_counted_once_on_every_program() {
    let mix = Mix([16, 4, 10, 6, 4, 6, 6, 16, 18, 14]);
    fuzz(
        "broken_and_random_frames",
        mix,
        &[
            Reason::NewFlow,
            Reason::ReplyNat,
            Reason::DropMalformed,
            Reason::DropFragment,
            Reason::RejectUnknownPort,
            Reason::AnswerSuppressed,
        ],
    );
}

fn fuzz(test: &str, mix: Mix, coverage: &[Reason]) {
    if !common::require_privileges() {
        return;
    }
    let settings = Settings::from_env(FRAMES);
    // Each test its own stream of the seed.
    let stream = test
        .bytes()
        .fold(settings.seed, |s, b| s.rotate_left(5) ^ u64::from(b));
    let mut generator = Generator::new(stream, mix);
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut run = Run {
        test,
        settings,
        index: 0,
        phase: 0,
    };
    while run.index < settings.frames {
        run.phase(&mut generator, &mut tally);
        run.phase += 1;
    }
    eprintln!("{}", tally.summary(test, started.elapsed()));
    if settings.frames >= COVERAGE_FRAMES {
        tally.assert_coverage(test, coverage);
    }
}

/// Where a test stands: its settings, the next frame's number, the phase.
struct Run<'a> {
    test: &'a str,
    settings: Settings,
    index: usize,
    phase: usize,
}

/// A datapath and its counters as last read.
struct Node {
    h: Harness,
    counters: Vec<(Reason, Counter)>,
}

impl Node {
    /// The counters bumped since the last read: (reason, packets, bytes).
    fn bumped(&mut self) -> Vec<(Reason, u64, u64)> {
        let counters = self.h.maps.verdict_totals().expect("counters");
        let bumped = counters
            .iter()
            .zip(&self.counters)
            .filter(|((_, now), (_, before))| now.packets != before.packets)
            .map(|((reason, now), (_, before))| {
                let packets = now.packets - before.packets;
                (*reason, packets, now.bytes - before.bytes)
            })
            .collect();
        self.counters = counters;
        bumped
    }
}

impl Run<'_> {
    /// `PHASE` frames through a freshly loaded datapath.
    fn phase(&mut self, generator: &mut Generator, tally: &mut Tally) {
        let mut h = harness().expect("privileged");
        scenario::program(&mut h);
        let counters = h.maps.verdict_totals().expect("counters");
        let mut node = Node { h, counters };
        generator.forget();
        let end = (self.index + PHASE).min(self.settings.frames);
        let mut next_churn = self.index + CHURN;
        while self.index < end {
            if self.index >= next_churn {
                let variant = generator.rng().usize(..scenario::WEB_VARIANTS);
                node.h.program(&scenario::web(variant));
                next_churn += CHURN;
            }
            let frame = generator.frame();
            self.frame(&mut node, generator, tally, &frame);
        }
    }

    /// Runs a frame (and a first fragment's later fragment right after it) and checks it.
    fn frame(
        &mut self,
        node: &mut Node,
        generator: &mut Generator,
        tally: &mut Tally,
        frame: &Frame,
    ) {
        let mut hook = frame.hook;
        if check::is_tc(hook) && frames::refused_at_tc(&frame.bytes) {
            hook = Hook::Xdp;
            tally.moved_to_xdp();
        }
        let expect = oracle::expect(&node.h.maps, hook, &frame.bytes);
        let (first, verdict) = self.check(node, tally, frame.family, hook, &frame.bytes, &expect);
        learn(generator, &first, verdict);
        if let Some(later) = &frame.later {
            let expect = follows(&first, verdict)
                .unwrap_or_else(|| oracle::expect(&node.h.maps, hook, later));
            self.check(node, tally, frame.family, hook, later, &expect);
        }
    }

    /// Runs `bytes` through `hook` and checks every property against `expect`; panics with a
    /// report that replays the failure.
    fn check<'a>(
        &mut self,
        node: &mut Node,
        tally: &mut Tally,
        family: Family,
        hook: Hook,
        bytes: &'a [u8],
        expect: &Expect,
    ) -> (Observed<'a>, Verdict) {
        let index = self.index;
        self.index += 1;
        let fail = |why: &str, seen: Option<&Observed<'_>>| -> ! {
            panic!(
                "{}",
                self.report(index, family, hook, bytes, expect, seen, why)
            )
        };
        let run = match node.h.try_run(hook, bytes) {
            Ok(run) => run,
            Err(e) => fail(&format!("the kernel refused to run it: {e}"), None),
        };
        let seen = Observed {
            hook,
            input: bytes,
            verdict: run.verdict,
            out: run.out,
            counted: node.bumped(),
        };
        let verdict = match seen.universal() {
            Ok(verdict) => verdict,
            Err(why) => fail(&why, Some(&seen)),
        };
        if let Err(why) = seen.expected(verdict, expect) {
            fail(&why, Some(&seen));
        }
        let foreign = oracle::concerns_no_frontend(hook, bytes);
        if foreign && seen.reason().is_some() {
            fail("counted, yet it concerns no frontend", Some(&seen));
        }
        tally.note(family, &seen, verdict, foreign);
        (seen, verdict)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "everything a failure report names"
    )]
    fn report(
        &self,
        index: usize,
        family: Family,
        hook: Hook,
        bytes: &[u8],
        expect: &Expect,
        seen: Option<&Observed<'_>>,
        why: &str,
    ) -> String {
        let got = seen.map_or_else(
            || "no run".to_owned(),
            |r| {
                format!(
                    "verdict {}, counted {:?}, output ({} bytes):\n{}",
                    r.verdict,
                    r.counted,
                    r.out.len(),
                    hex(&r.out)
                )
            },
        );
        format!(
            "{why}\n\
             test {test}, seed {seed:#x}, phase {phase}, frame #{index} ({family:?}) \
             through {hook:?}\n\
             frame ({len} bytes): {frame}\n{rows}\n\
             expected: {expect:?}\n\
             got: {got}\n\
             replay: {SEED_VAR}={seed:#x} {FRAMES_VAR}={next} cargo xtask test --test \
             datapath_fuzz -- {test}",
            test = self.test,
            seed = self.settings.seed,
            phase = self.phase,
            len = bytes.len(),
            frame = wire::hex_string(bytes),
            rows = hex(bytes),
            next = index + 1,
        )
    }
}

/// The addresses of a TCP/UDP packet: (source, destination) with ports.
fn endpoints(frame: &[u8]) -> Option<(std::net::SocketAddrV4, std::net::SocketAddrV4, u8)> {
    let ip = wire::ipv4(frame)?;
    let l4 = wire::l4(&ip, ip.l4_off()?)?;
    Some((l4.src(&ip), l4.dst(&ip), ip.proto()))
}

/// Remembers the translation of a client's packet the datapath let through, so that the
/// generator sends its flow's replies and ICMP errors about it.
fn learn(generator: &mut Generator, seen: &Observed<'_>, verdict: Verdict) {
    let opened = matches!(seen.reason(), Some(Reason::NewFlow | Reason::Established));
    if !opened || verdict == Verdict::Drop {
        return;
    }
    if let (Some(sent), Some(left)) = (endpoints(seen.input), endpoints(&seen.out)) {
        generator.saw(Seen {
            hook: seen.hook,
            proto: sent.2,
            sent: (sent.0, sent.1),
            left: (left.0, left.1),
        });
    }
}

/// What the later fragment of the first fragment `first` must do when it runs right after it
/// through the same program: follow its translation, and go where it went. `None` when the
/// first fragment was not translated, or was routed (the FIB decides, which the test cannot
/// predict).
fn follows(first: &Observed<'_>, verdict: Verdict) -> Option<Expect> {
    let translated = matches!(
        first.reason(),
        Some(Reason::NewFlow | Reason::Established | Reason::ReplyNat)
    );
    if !translated || first.has(Reason::Forwarded) || verdict == Verdict::Drop {
        return None;
    }
    let bounced = verdict != Verdict::Pass;
    let out = wire::ipv4(&first.out)?;
    Some(oracle::follows_first(out.src(), out.dst(), bounced))
}
