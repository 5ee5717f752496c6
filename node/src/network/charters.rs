//! Charters through the swarm. A node passes on every valid charter newer
//! than the one it knows over gossipsub (the topic [`CHARTER_TOPIC`]), and
//! republishes its served coalitions' charters when a peer subscribes and
//! every advert lifetime, so a node that joins later, or serves a coalition
//! by its id alone, learns the current membership within seconds.
//!
//! Gossip is only the carrier: a charter is taken when its admins' threshold
//! signed it, its id is the one its name and admins founded, its version is
//! newer and its threshold unchanged (see
//! [`CharterBook`](commons_coordinator::trust::CharterBook)). Whoever relays it
//! is irrelevant; a relay of an invalid charter is rejected, which lowers the
//! relaying peer's gossip score.
//!
//! The control API changes what a node serves while it runs (`commons node
//! serve | drop`) and hands it new versions (`commons coalition publish`).

use commons_coordinator::trust::NotLearned;
use commons_protocol::CoalitionId;
use libp2p::gossipsub;
use tokio::sync::oneshot;

use super::{EventLoop, now};
use crate::coalition::OfferError;

/// Gossip topic of coalition charters.
pub const CHARTER_TOPIC: &str = "/commons/charters/1.0.0";

/// Largest gossip message: a charter at its bounds (4,096 members, 64
/// admins and signatures) sealed in an envelope, with room to spare.
pub const MAX_GOSSIP_BYTES: usize = 256 * 1024;

/// What the control API asks of a node's coalitions.
#[derive(Debug)]
pub enum CoalitionRequest {
    /// Take this sealed charter (a charter file's bytes) and pass it on.
    Charter(Vec<u8>),
    /// Serve this coalition from now on.
    Serve(CoalitionId),
    /// Stop serving this coalition.
    Drop(CoalitionId),
}

/// The answer: JSON for the caller, or why not, for people.
pub type CoalitionAnswer = Result<serde_json::Value, String>;

/// A coalition request and where its answer goes.
#[derive(Debug)]
pub struct CoalitionCommand {
    /// The request.
    pub request: CoalitionRequest,
    /// Where the answer goes.
    pub reply: oneshot::Sender<CoalitionAnswer>,
}

impl EventLoop {
    pub(super) fn on_coalition_command(&mut self, command: CoalitionCommand) {
        let answer = match command.request {
            CoalitionRequest::Charter(bytes) => self.take_charter(&bytes),
            CoalitionRequest::Serve(id) => {
                let newly = self.charters.serve(id);
                self.coalitions_changed();
                self.publish_charters();
                Ok(self.coalition_json(id, newly))
            }
            CoalitionRequest::Drop(id) => {
                if self.charters.drop_coalition(&id) {
                    tracing::info!(coalition = %id, "no longer serving coalition");
                    self.coalitions_changed();
                    Ok(self.coalition_json(id, true))
                } else {
                    Err(format!("coalition {id} is not served here"))
                }
            }
        };
        let _ = command.reply.send(answer);
    }

    fn take_charter(&mut self, bytes: &[u8]) -> CoalitionAnswer {
        match self.charters.offer(bytes, now()) {
            Ok((charter, learned)) => {
                tracing::info!(coalition = %charter.id, name = %charter.name, version = charter.version, ?learned, "charter taken");
                self.counters.charters_accepted += 1;
                if self.charters.book().is_served(&charter.id) {
                    self.coalitions_changed();
                }
                let sent = self.publish_sealed(bytes.to_vec());
                let mut json = self.coalition_json(charter.id, true);
                json["published"] = serde_json::Value::Bool(sent);
                Ok(json)
            }
            // A version known already: nothing changes here, but it is
            // passed on, as asked (a peer may have missed it).
            Err(OfferError::NotLearned(e @ NotLearned::Stale { id, .. })) => {
                let sent = self.publish_sealed(bytes.to_vec());
                let mut json = self.coalition_json(id, false);
                json["published"] = serde_json::Value::Bool(sent);
                json["note"] = serde_json::Value::String(e.to_string());
                Ok(json)
            }
            Err(e) => {
                self.counters.charters_rejected += 1;
                Err(format!("{e:#}"))
            }
        }
    }

    /// A charter from the swarm: taken and passed on when new, ignored when
    /// known, rejected (and the relay penalised) when invalid.
    pub(super) fn on_charter_gossip(&mut self, data: &[u8]) -> gossipsub::MessageAcceptance {
        match self.charters.offer(data, now()) {
            Ok((charter, learned)) => {
                self.counters.charters_accepted += 1;
                let served = self.charters.book().is_served(&charter.id);
                tracing::info!(coalition = %charter.id, name = %charter.name, version = charter.version, ?learned, served, "charter from the swarm");
                if served {
                    self.coalitions_changed();
                }
                gossipsub::MessageAcceptance::Accept
            }
            Err(e) if e.is_stale() => gossipsub::MessageAcceptance::Ignore,
            Err(e @ (OfferError::Open(_) | OfferError::NotLearned(_))) => {
                tracing::debug!(%e, "charter rejected");
                self.counters.charters_rejected += 1;
                gossipsub::MessageAcceptance::Reject
            }
        }
    }

    /// Serves what the charters say now: the node's admission and, when it
    /// coordinates, its jobs; the advert says which coalitions it serves.
    fn coalitions_changed(&mut self) {
        let coalitions = self.charters.coalitions();
        if let Some(c) = self.coordinating.as_mut() {
            c.set_coalitions(coalitions.clone());
        }
        self.admission.set_coalitions(coalitions);
        self.publish_soon();
    }

    /// Publishes the served coalitions' charters (to newcomers, and now and
    /// then for anyone who missed one).
    pub(super) fn publish_charters(&mut self) {
        let sealed: Vec<Vec<u8>> = self.charters.served_sealed().map(<[u8]>::to_vec).collect();
        for bytes in sealed {
            self.publish_sealed(bytes);
        }
    }

    fn publish_sealed(&mut self, bytes: Vec<u8>) -> bool {
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.charter_topic.clone(), bytes)
        {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(%e, "charter not published");
                false
            }
        }
    }

    fn coalition_json(&self, id: CoalitionId, changed: bool) -> serde_json::Value {
        let charter = self.charters.book().get(&id);
        serde_json::json!({
            "id": id.to_string(),
            "name": charter.map(|c| c.name.clone()),
            "version": charter.map(|c| c.version),
            "members": charter.map(|c| c.members.len()),
            "served": self.charters.book().is_served(&id),
            "pending": charter.is_none(),
            "changed": changed,
        })
    }
}
