//! Decoding never allocates more than the limit of the kind decoded, whatever
//! the input: measured with a counting allocator on hostile and random inputs.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use commons_protocol::codec;
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::{
    CapacityAdvert, CoalitionCharter, ErrorReply, JobReport, JobRequest, Leave, WorkResult,
    WorkUnit,
};
use commons_protocol::{Message, UnixMillis};
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only adds thread-local bookkeeping
// that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + layout.size());
            let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(layout.size())));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Peak bytes allocated by `f` on this thread, beyond what was live before.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

fn check<M: Message>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let peak = peak_of(|| {
        let _ = codec::decode::<M>(bytes, M::LIMIT);
    });
    prop_assert!(
        peak <= M::LIMIT.bytes(),
        "decoding {} bytes allocated {peak}, limit {}",
        bytes.len(),
        M::LIMIT.bytes()
    );
    // And, however large the kind's limit, a short input cannot make the
    // decoder reserve much more than its own size.
    prop_assert!(
        peak <= 16 * bytes.len() + (64 << 10),
        "decoding {} bytes allocated {peak}",
        bytes.len()
    );
    let peak = peak_of(|| {
        let _ = Envelope::open_bytes::<M>(bytes, UnixMillis(0));
    });
    // The envelope keeps a copy of the payload beside the decoded value.
    prop_assert!(
        peak <= 2 * M::LIMIT.bytes() + 4096,
        "opening {} bytes allocated {peak}",
        bytes.len()
    );
    Ok(())
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    // Random bytes sprinkled with varint markers that announce huge lengths.
    proptest::collection::vec(
        prop_oneof![
            any::<u8>(),
            Just(251u8),
            Just(252u8),
            Just(253u8),
            Just(0xffu8)
        ],
        0..512,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_stays_within_the_limit(bytes in hostile()) {
        check::<CapacityAdvert>(&bytes)?;
        check::<WorkUnit>(&bytes)?;
        check::<WorkResult>(&bytes)?;
        check::<CoalitionCharter>(&bytes)?;
        check::<ErrorReply>(&bytes)?;
        check::<Leave>(&bytes)?;
        check::<JobRequest>(&bytes)?;
        check::<JobReport>(&bytes)?;
    }
}

#[test]
fn huge_length_prefix_allocates_nothing_big() {
    // An advert whose first string claims 4 GiB.
    let mut bytes = vec![0u8; 32];
    bytes.push(0); // sequence
    bytes.push(0); // cores
    bytes.push(252);
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    let peak = peak_of(|| {
        assert!(codec::decode::<CapacityAdvert>(&bytes, CapacityAdvert::LIMIT).is_err());
    });
    assert!(peak <= CapacityAdvert::LIMIT.bytes(), "{peak}");
}
