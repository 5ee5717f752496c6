//! Envelope parsing and opening must never panic, whatever the bytes.
#![no_main]

use commons_protocol::UnixMillis;
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::{
    CapacityAdvert, CoalitionCharter, ErrorReply, JobReport, JobRequest, Leave, WorkResult,
    WorkUnit,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = UnixMillis(1_700_000_000_000);
    if let Ok(envelope) = Envelope::from_bytes(data) {
        let _ = envelope.open::<CapacityAdvert>(now);
        let _ = envelope.open::<WorkUnit>(now);
        let _ = envelope.open::<WorkResult>(now);
        let _ = envelope.open::<CoalitionCharter>(now);
        let _ = envelope.open::<ErrorReply>(now);
        let _ = envelope.open::<Leave>(now);
        let _ = envelope.open::<JobRequest>(now);
        let _ = envelope.open::<JobReport>(now);
    }
});
