//! The table of peers and their capacity, fed by signed adverts from gossip.
//!
//! Sans I/O: the event loop hands it message bytes, the gossip source and the
//! time; it verifies the envelope (signature, kind, expiry), checks that the
//! advert describes the peer that published it and is newer than what it
//! holds, and answers whether gossip should accept or reject the message.

use std::collections::HashMap;

use commons_protocol::envelope::{Envelope, MessageKind, OpenError};
use commons_protocol::messages::{CapacityAdvert, Leave};
use commons_protocol::{NodeId, UnixMillis};

/// What a peer told the swarm about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerEntry {
    /// Its latest advert.
    pub advert: CapacityAdvert,
    /// When that advert arrived.
    pub received_at: UnixMillis,
}

/// Why a gossip message was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdvertError {
    /// The envelope does not open (bad signature, wrong kind, expired, malformed…).
    #[error(transparent)]
    Envelope(#[from] OpenError),
    /// The advert describes a node other than the one that published it.
    #[error("advert for {advert} published by {publisher}")]
    NotFromItsNode {
        /// Node the advert describes.
        advert: NodeId,
        /// Node that published it.
        publisher: NodeId,
    },
    /// An advert no newer than the one held (a replay or a reordering).
    #[error("stale advert (sequence {got}, holding {held})")]
    Stale {
        /// Sequence received.
        got: u64,
        /// Sequence held.
        held: u64,
    },
    /// A message kind that does not belong on the advert topic.
    #[error("{0:?} does not belong on the advert topic")]
    WrongKind(MessageKind),
}

/// What an accepted message changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A peer joined or refreshed its advert.
    Advert(NodeId),
    /// A peer left.
    Left(NodeId),
}

/// Peers and their capacity.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: HashMap<NodeId, PeerEntry>,
    /// Highest advert sequence seen per node, kept after it leaves so old adverts cannot resurrect it.
    sequences: HashMap<NodeId, u64>,
}

impl PeerTable {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles a message from the advert topic published by `source`.
    pub fn handle(
        &mut self,
        data: &[u8],
        source: NodeId,
        now: UnixMillis,
    ) -> Result<Update, AdvertError> {
        let envelope = Envelope::from_bytes(data)?;
        match envelope.kind() {
            MessageKind::CapacityAdvert => {
                let advert: CapacityAdvert = envelope.open(now)?;
                if advert.node != source {
                    return Err(AdvertError::NotFromItsNode {
                        advert: advert.node,
                        publisher: source,
                    });
                }
                let held = self.sequences.get(&advert.node).copied();
                if let Some(held) = held
                    && advert.sequence <= held
                {
                    return Err(AdvertError::Stale {
                        got: advert.sequence,
                        held,
                    });
                }
                let node = advert.node;
                self.sequences.insert(node, advert.sequence);
                self.peers.insert(
                    node,
                    PeerEntry {
                        advert,
                        received_at: now,
                    },
                );
                Ok(Update::Advert(node))
            }
            MessageKind::Leave => {
                let leave: Leave = envelope.open(now)?;
                if leave.node != source {
                    return Err(AdvertError::NotFromItsNode {
                        advert: leave.node,
                        publisher: source,
                    });
                }
                self.peers.remove(&leave.node);
                Ok(Update::Left(leave.node))
            }
            other => Err(AdvertError::WrongKind(other)),
        }
    }

    /// Drops peers whose adverts have expired; returns them.
    pub fn expire(&mut self, now: UnixMillis) -> Vec<NodeId> {
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.advert.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.peers.remove(id);
        }
        gone
    }

    /// The peers, in id order.
    #[must_use]
    pub fn peers(&self) -> Vec<&PeerEntry> {
        let mut v: Vec<&PeerEntry> = self.peers.values().collect();
        v.sort_by_key(|e| e.advert.node);
        v
    }

    /// Peers held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when no peer is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commons_protocol::Identity;
    use commons_protocol::messages::{CpuInfo, DeterminismClass};

    fn advert(id: &Identity, sequence: u64, issued: u64, ttl: u64) -> CapacityAdvert {
        CapacityAdvert {
            node: id.node_id(),
            sequence,
            cpu: CpuInfo {
                cores: 2,
                model: "test".into(),
            },
            ram_bytes: 1 << 30,
            gpus: Default::default(),
            matmul_mflops: 1000,
            bandwidth_bytes_per_sec: 0,
            models: Default::default(),
            determinism: DeterminismClass {
                kernel: "cpu".into(),
                build: "test".into(),
            },
            coalitions: Default::default(),
            trains: false,
            software: "commons/test".into(),
            issued_at: UnixMillis(issued),
            expires_at: UnixMillis(issued + ttl),
        }
    }

    fn sealed(id: &Identity, a: &CapacityAdvert) -> Vec<u8> {
        Envelope::seal(id, a).unwrap().to_bytes()
    }

    #[test]
    fn adverts_join_refresh_and_expire() {
        let (a, b) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        );
        let mut t = PeerTable::new();
        assert_eq!(
            t.handle(
                &sealed(&a, &advert(&a, 1, 1000, 30_000)),
                a.node_id(),
                UnixMillis(1000)
            )
            .unwrap(),
            Update::Advert(a.node_id())
        );
        t.handle(
            &sealed(&b, &advert(&b, 1, 1000, 30_000)),
            b.node_id(),
            UnixMillis(1000),
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        // A refresh with a higher sequence extends a's life; b expires.
        t.handle(
            &sealed(&a, &advert(&a, 2, 20_000, 30_000)),
            a.node_id(),
            UnixMillis(20_000),
        )
        .unwrap();
        assert_eq!(t.expire(UnixMillis(31_000)), vec![b.node_id()]);
        assert_eq!(t.peers()[0].advert.sequence, 2);
    }

    #[test]
    fn forged_expired_stale_and_misattributed_adverts_are_dropped() {
        let (a, mallory) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([9; 32]),
        );
        let mut t = PeerTable::new();
        // Forged: an advert for a, signed with mallory's key.
        let payload = commons_protocol::codec::encode(&advert(&a, 1, 1000, 30_000)).unwrap();
        let forged = Envelope::seal_payload(&mallory, MessageKind::CapacityAdvert, payload)
            .unwrap()
            .to_bytes();
        assert!(matches!(
            t.handle(&forged, a.node_id(), UnixMillis(1000)),
            Err(AdvertError::Envelope(OpenError::SignerMismatch { .. }))
        ));
        // Tampered bytes.
        let mut tampered = sealed(&a, &advert(&a, 1, 1000, 30_000));
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            t.handle(&tampered, a.node_id(), UnixMillis(1000)),
            Err(AdvertError::Envelope(OpenError::BadSignature { .. }))
        ));
        // Expired.
        let old = sealed(&a, &advert(&a, 1, 1000, 30_000));
        assert!(matches!(
            t.handle(&old, a.node_id(), UnixMillis(40_000)),
            Err(AdvertError::Envelope(OpenError::Expired { .. }))
        ));
        // Published by someone else (a relayed copy re-published as mallory's own).
        assert!(matches!(
            t.handle(&old, mallory.node_id(), UnixMillis(1000)),
            Err(AdvertError::NotFromItsNode { .. })
        ));
        assert!(t.is_empty());
        // Stale: a replay of an older sequence.
        t.handle(
            &sealed(&a, &advert(&a, 5, 1000, 30_000)),
            a.node_id(),
            UnixMillis(1000),
        )
        .unwrap();
        assert!(matches!(
            t.handle(
                &sealed(&a, &advert(&a, 4, 1000, 30_000)),
                a.node_id(),
                UnixMillis(1000)
            ),
            Err(AdvertError::Stale { got: 4, held: 5 })
        ));
    }

    #[test]
    fn leave_removes_at_once_and_only_for_its_node() {
        let (a, b) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        );
        let mut t = PeerTable::new();
        t.handle(
            &sealed(&a, &advert(&a, 1, 1000, 30_000)),
            a.node_id(),
            UnixMillis(1000),
        )
        .unwrap();
        let leave = Leave {
            node: a.node_id(),
            issued_at: UnixMillis(2000),
            expires_at: UnixMillis(32_000),
        };
        let bytes = Envelope::seal(&a, &leave).unwrap().to_bytes();
        assert!(matches!(
            t.handle(&bytes, b.node_id(), UnixMillis(2000)),
            Err(AdvertError::NotFromItsNode { .. })
        ));
        assert_eq!(
            t.handle(&bytes, a.node_id(), UnixMillis(2000)).unwrap(),
            Update::Left(a.node_id())
        );
        assert!(t.is_empty());
        // Its old advert cannot bring it back.
        assert!(
            t.handle(
                &sealed(&a, &advert(&a, 1, 1000, 30_000)),
                a.node_id(),
                UnixMillis(2500)
            )
            .is_err()
        );
    }
}
