//! The built BPF object against `lb-common`: every program and map `lb-common` names exists in it,
//! and every map has the key and value sizes `lb_common::maps::LAYOUTS` (and `PRIVATE`) declares
//! (what userspace reads and writes, and what an agent requires of pinned maps to adopt them).
//! Parses the object without loading it: needs no privileges.

use lb_common::{maps, programs, stats::Reason};
use lb_datapath::LB_EBPF;

fn object() -> aya_obj::Object {
    aya_obj::Object::parse(LB_EBPF).expect("the embedded BPF object parses")
}

#[test]
fn every_named_program_is_in_the_object() {
    let obj = object();
    for name in programs::ALL {
        assert!(
            obj.programs.contains_key(name),
            "program {name} is missing; the object has {:?}",
            obj.programs.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(
        obj.programs.len(),
        programs::ALL.len(),
        "the object has programs lb-common does not name: {:?}",
        obj.programs.keys().collect::<Vec<_>>()
    );
}

#[test]
fn every_map_has_the_declared_layout() {
    let obj = object();
    for layout in maps::LAYOUTS.iter().chain(&maps::PRIVATE) {
        let map = obj.maps.get(layout.name).unwrap_or_else(|| {
            panic!(
                "map {} is missing; the object has {:?}",
                layout.name,
                obj.maps.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(
            (map.key_size(), map.value_size()),
            (layout.key_size, layout.value_size),
            "map {}: (key, value) sizes in the object versus lb-common",
            layout.name
        );
    }
    for name in maps::TAIL_CALLS {
        const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
        assert_eq!(obj.maps[name].map_type(), BPF_MAP_TYPE_PROG_ARRAY, "{name}");
    }
    let extra: Vec<&String> = obj
        .maps
        .keys()
        .filter(|name| maps::layout_of(name).is_none() && !name.starts_with('.'))
        .collect();
    assert!(extra.is_empty(), "maps lb-common does not name: {extra:?}");
}

#[test]
fn the_verdict_counters_have_one_slot_per_reason() {
    let obj = object();
    assert_eq!(obj.maps[maps::LB_VERDICTS].max_entries(), Reason::COUNT);
    assert_eq!(Reason::ALL.len() as u32, Reason::COUNT);
}

#[test]
fn the_event_maps_are_private() {
    // Never pinned: an agent of another version neither adopts nor misses them.
    for layout in maps::PRIVATE {
        assert!(
            !maps::ALL.contains(&layout.name),
            "{} is pinned",
            layout.name
        );
    }
    let obj = object();
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    assert_eq!(obj.maps[maps::AYA_LOGS].map_type(), BPF_MAP_TYPE_RINGBUF);
}
