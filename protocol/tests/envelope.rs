//! Each way an envelope can be wrong is refused with its own error.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_protocol::codec;
use commons_protocol::envelope::{Envelope, HEADER_LEN, MessageKind, OpenError};
use commons_protocol::ids::{JobId, ModelId, Nonce, SessionId};
use commons_protocol::messages::{
    ErrorCode, ErrorReply, InferenceOptions, InferenceUnit, LayerRange, WorkBody, WorkUnit,
};
use commons_protocol::replay::{ReplayError, ReplayGuard};
use commons_protocol::{Hash, Identity, Message, Tensor, UnixMillis};

const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

fn issuer() -> Identity {
    Identity::from_secret([11; 32])
}

fn unit(issuer: &Identity, tokens: usize) -> WorkUnit {
    WorkUnit {
        issuer: issuer.node_id(),
        nonce: Nonce([5; 16]),
        issued_at: NOW,
        expires_at: NOW.plus_millis(30_000),
        body: WorkBody::Inference(InferenceUnit {
            job: JobId([1; 16]),
            model: ModelId(Hash::of(b"model")),
            layers: LayerRange { start: 0, end: 10 },
            session: SessionId([2; 16]),
            step: 0,
            input: Tensor::from_u32(&[1, tokens as u64], &vec![7; tokens]).unwrap(),
            options: InferenceOptions {
                start_pos: 0,
                max_session_tokens: 2048,
                sampling: None,
                close_session: false,
                input_from: None,
                forward_to: None,
                order: 0,
            },
            coalition: None,
        }),
    }
}

#[test]
fn a_good_envelope_opens() {
    let id = issuer();
    let u = unit(&id, 4);
    let bytes = Envelope::seal(&id, &u).unwrap().to_bytes();
    let opened: WorkUnit = Envelope::open_bytes(&bytes, NOW).unwrap();
    assert_eq!(opened, u);
}

#[test]
fn tampered_payload_is_a_bad_signature() {
    let id = issuer();
    let mut bytes = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, NOW),
        Err(OpenError::BadSignature { .. })
    ));
    // Tampering with the signature itself, or swapping in another signer, fails the same way.
    let mut bytes = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    bytes[40] ^= 0x80;
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, NOW),
        Err(OpenError::BadSignature { .. })
    ));
    let mut bytes = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    bytes[4..36].copy_from_slice(&Identity::from_secret([12; 32]).node_id().0);
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, NOW),
        Err(OpenError::BadSignature { .. })
    ));
}

#[test]
fn wrong_kind_is_refused() {
    let id = issuer();
    let reply = ErrorReply {
        code: ErrorCode::OVERLOADED,
        message: "busy".into(),
        regarding: None,
        responder: id.node_id(),
        issued_at: NOW,
        expires_at: NOW.plus_millis(1_000),
    };
    let bytes = Envelope::seal(&id, &reply).unwrap().to_bytes();
    let err = Envelope::open_bytes::<WorkUnit>(&bytes, NOW).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::WrongKind {
                expected: MessageKind::WorkUnit,
                actual: MessageKind::ErrorReply
            }
        ),
        "{err:?}"
    );
    // Relabelling the kind in the header breaks the signature instead of fooling the decoder.
    let mut relabelled = bytes.clone();
    relabelled[2..4].copy_from_slice(&(MessageKind::WorkUnit as u16).to_le_bytes());
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&relabelled, NOW),
        Err(OpenError::BadSignature { .. })
    ));
}

#[test]
fn expired_and_future_envelopes_are_refused() {
    let id = issuer();
    let bytes = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    let later = NOW.plus_millis(30_000);
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, later),
        Err(OpenError::Expired { .. })
    ));
    let long_before = NOW.minus_millis(10 * 60_000);
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, long_before),
        Err(OpenError::NotYetValid { .. })
    ));
    // Kept for the record, an expired envelope still opens as of its issue
    // time, and still only with a valid signature.
    let envelope = Envelope::from_bytes(&bytes).unwrap();
    assert_eq!(envelope.open_archived::<WorkUnit>().unwrap(), unit(&id, 4));
    let mut damaged = bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(
        Envelope::from_bytes(&damaged)
            .and_then(|e| e.open_archived::<WorkUnit>())
            .is_err()
    );
}

#[test]
fn replayed_nonce_is_refused() {
    let id = issuer();
    let bytes = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    let mut guard = ReplayGuard::new(5 * 60_000, 1024);
    for attempt in 0..2 {
        let u: WorkUnit = Envelope::open_bytes(&bytes, NOW).unwrap();
        let verdict = guard.check(u.issuer, u.nonce, u.expires_at, NOW);
        if attempt == 0 {
            verdict.unwrap();
        } else {
            assert_eq!(
                verdict,
                Err(ReplayError::Replayed {
                    signer: id.node_id()
                })
            );
        }
    }
}

#[test]
fn oversized_envelope_is_refused() {
    let id = issuer();
    // Sealing refuses to make one…
    let big = unit(&id, WorkUnit::LIMIT.bytes() / 4 + 1);
    assert!(Envelope::seal(&id, &big).is_err());
    // …and opening refuses one made by hand, before touching the signature.
    let mut bytes = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    bytes.resize(HEADER_LEN + MessageKind::WorkUnit.limit() + 1, 0);
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, NOW),
        Err(OpenError::TooLarge {
            kind: MessageKind::WorkUnit,
            ..
        })
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let id = issuer();
    let mut payload = codec::encode(&unit(&id, 4)).unwrap();
    payload.extend_from_slice(b"extra");
    let bytes = Envelope::seal_payload(&id, MessageKind::WorkUnit, payload)
        .unwrap()
        .to_bytes();
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, NOW),
        Err(OpenError::TrailingBytes { extra: 5 })
    ));
}

#[test]
fn unknown_version_and_kind_and_truncation_are_refused() {
    let id = issuer();
    let good = Envelope::seal(&id, &unit(&id, 4)).unwrap().to_bytes();
    let mut v2 = good.clone();
    v2[0..2].copy_from_slice(&2u16.to_le_bytes());
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&v2, NOW),
        Err(OpenError::UnknownVersion { version: 2 })
    ));
    let mut k99 = good.clone();
    k99[2..4].copy_from_slice(&99u16.to_le_bytes());
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&k99, NOW),
        Err(OpenError::UnknownKind { kind: 99 })
    ));
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&good[..50], NOW),
        Err(OpenError::Truncated { len: 50 })
    ));
}

#[test]
fn someone_else_cannot_sign_my_unit() {
    let id = issuer();
    let mallory = Identity::from_secret([66; 32]);
    let u = unit(&id, 4);
    assert!(Envelope::seal(&mallory, &u).is_err());
    let payload = codec::encode(&u).unwrap();
    let bytes = Envelope::seal_payload(&mallory, MessageKind::WorkUnit, payload)
        .unwrap()
        .to_bytes();
    assert!(matches!(
        Envelope::open_bytes::<WorkUnit>(&bytes, NOW),
        Err(OpenError::SignerMismatch { .. })
    ));
}
