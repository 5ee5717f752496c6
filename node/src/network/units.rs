//! Work units arriving at this node: inference steps for the layers it
//! serves (run at once, or parked until the input another node forwards
//! comes: [`super::forward`]), gradient units for the trainer (`--train`),
//! and the files a gradient unit needs, fetched into memory from the unit's
//! issuer.

use std::sync::atomic::Ordering;

use libp2p::PeerId;
use tokio::sync::oneshot;

use super::{EventLoop, blobs, now};
use crate::coordinate::Pending;
use crate::executor::serve;
use commons_protocol::messages::{ErrorCode, InferenceUnit};
use commons_protocol::{NodeId, UnitId, UnixMillis};

/// Where the answer to a unit goes: to the peer that sent it, or to this
/// node's own coordinator.
#[derive(Debug)]
pub(super) enum UnitReply {
    /// A peer's request.
    Remote(libp2p::request_response::ResponseChannel<Vec<u8>>),
    /// A unit this node's coordinator sent itself.
    Local(Pending),
}

/// A work unit admitted here.
enum Work {
    Inference(UnitId, InferenceUnit, UnixMillis),
    Gradient(
        crate::train_exec::Trainer,
        PeerId,
        NodeId,
        commons_protocol::UnitId,
        commons_protocol::messages::GradientUnit,
    ),
}

impl EventLoop {
    /// Admits a work unit here, then runs it off the event loop and answers through it.
    pub(super) fn on_work(
        &mut self,
        request: Vec<u8>,
        channel: libp2p::request_response::ResponseChannel<Vec<u8>>,
    ) {
        use commons_protocol::messages::{ErrorCode, WorkBody};
        let admitted = if self.served.is_none() && self.trainer.is_none() {
            Err(serve::refusal(
                ErrorCode::MODEL_NOT_HELD,
                "this node serves no model",
            ))
        } else {
            serve::open(&mut self.admission, &request, now())
        };
        let admitted = admitted.and_then(|(id, unit)| match unit.body {
            WorkBody::Gradient(g) => self.admit_gradient(id, unit.issuer, g),
            body => match self.served.as_ref() {
                None => Err(serve::Refusal::new(
                    ErrorCode::MODEL_NOT_HELD,
                    "this node serves no model",
                    Some(id),
                )),
                Some(served) => serve::check_inference(served, id, body)
                    .map(|u| Work::Inference(id, u, unit.expires_at)),
            },
        });
        let (identity, tx, in_progress) = (
            self.identity.clone(),
            self.answers_tx.clone(),
            self.in_progress.clone(),
        );
        match admitted {
            Err(refusal) => {
                let answer = serve::UnitAnswer::refusal(&self.identity, &refusal, now());
                self.counters.count_unit(answer.refused);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .work
                    .send_response(channel, answer.bytes);
            }
            Ok(Work::Inference(id, unit, expires_at)) => {
                self.arrive_inference(id, unit, expires_at, UnitReply::Remote(channel));
            }
            Ok(Work::Gradient(trainer, peer, issuer, id, unit)) => {
                let fetch_tx = self.fetch_tx.clone();
                in_progress.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let fetch = |blob: commons_protocol::Hash| {
                        let fetch_tx = fetch_tx.clone();
                        async move {
                            let (reply, rx) = oneshot::channel();
                            let request = blobs::FetchRequest {
                                id: commons_protocol::ModelId(blob),
                                from: peer,
                                reply,
                            };
                            fetch_tx
                                .send(request)
                                .await
                                .map_err(|_| "the node is stopping".to_owned())?;
                            rx.await.map_err(|_| "the node is stopping".to_owned())?
                        }
                    };
                    let answer =
                        crate::train_exec::serve(&trainer, &identity, id, issuer, unit, fetch, now)
                            .await;
                    in_progress.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send((UnitReply::Remote(channel), answer)).await;
                });
            }
        }
    }

    /// An admitted inference unit: runs it, parks it until its forwarded
    /// input comes, or refuses it.
    pub(super) fn arrive_inference(
        &mut self,
        id: UnitId,
        unit: InferenceUnit,
        expires_at: UnixMillis,
        reply: UnitReply,
    ) {
        let Some(served) = self.served.clone() else {
            let refusal = serve::Refusal::new(
                ErrorCode::MODEL_NOT_HELD,
                "this node serves no model",
                Some(id),
            );
            let answer = serve::UnitAnswer::refusal(&self.identity, &refusal, now());
            self.answer_unit(reply, answer);
            return;
        };
        self.plane.on_unit(served, id, unit, expires_at, reply);
    }

    /// Sends the answer to a unit where it goes.
    pub(super) fn answer_unit(&mut self, reply: UnitReply, answer: serve::UnitAnswer) {
        self.counters.count_unit(answer.refused);
        match reply {
            UnitReply::Remote(channel) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .work
                    .send_response(channel, answer.bytes);
            }
            UnitReply::Local(pending) => {
                let me = self.identity.node_id();
                if let Some(c) = self.coordinating.as_mut() {
                    c.on_response(pending, me, &answer.bytes, now());
                }
            }
        }
    }

    /// Checks that a gradient unit can run here: a trainer with room, and an
    /// issuer to fetch its files from.
    fn admit_gradient(
        &self,
        id: commons_protocol::UnitId,
        issuer: NodeId,
        unit: commons_protocol::messages::GradientUnit,
    ) -> Result<Work, serve::Refusal> {
        use commons_protocol::messages::ErrorCode;
        let trainer = match &self.trainer {
            Some(t) if !t.is_full() => t.clone(),
            Some(_) => {
                return Err(serve::Refusal::new(
                    ErrorCode::OVERLOADED,
                    "the trainer's queue is full",
                    Some(id),
                ));
            }
            None => {
                return Err(serve::Refusal::new(
                    ErrorCode::BAD_REQUEST,
                    "this node does not train (start it with --train)",
                    Some(id),
                ));
            }
        };
        let peer = PeerId::from_bytes(&issuer.peer_id_bytes())
            .map_err(|e| serve::Refusal::new(ErrorCode::BAD_REQUEST, e.to_string(), Some(id)))?;
        Ok(Work::Gradient(trainer, peer, issuer, id, unit))
    }

    /// A unit's file wanted in memory: from the cache, or fetched from the
    /// peer that asked for the work.
    pub(super) fn on_fetch_request(&mut self, request: blobs::FetchRequest) {
        let asks = self.blob_fetches.request(request);
        self.send_blob_asks(asks);
    }

    pub(super) fn send_blob_asks(
        &mut self,
        asks: Vec<(commons_protocol::ModelId, blobs::FetchAsk)>,
    ) {
        for (model, ask) in asks {
            let (peer, request, index) = match ask {
                blobs::FetchAsk::Manifest(p) => (
                    p,
                    commons_protocol::blob::BlobRequest::Manifest { model },
                    None,
                ),
                blobs::FetchAsk::Block(p, index) => (
                    p,
                    commons_protocol::blob::BlobRequest::Block { model, index },
                    Some(index),
                ),
            };
            let Ok(bytes) = commons_protocol::codec::encode(&request) else {
                continue;
            };
            let id = self.swarm.behaviour_mut().blobs.send_request(&peer, bytes);
            self.blob_out
                .insert(id, (peer, index, std::time::Instant::now(), Some(model)));
        }
    }
}
