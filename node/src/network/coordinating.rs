//! The coordinator's shell in the event loop: the span offers it plans
//! with, the units it sends (to peers, or run here), the job requests it
//! answers, and the commits of its job database, made on a thread of their
//! own ([`Committer`]) so that a disk flush never holds up the swarm.

use std::collections::HashMap;

use commons_protocol::envelope::Envelope;
use futures::{FutureExt as _, StreamExt as _};
use libp2p::PeerId;

use super::units::UnitReply;
use super::{EventLoop, Reply, now};
use crate::coordinate::{Answer, Coordinating, Outgoing};
use crate::executor::serve;
use crate::jobstore::Committed;
use commons_coordinator::verify::Profile;
use commons_protocol::NodeId;

impl EventLoop {
    /// What the swarm offers now, for the coordinator: connected peers' adverts and our own.
    fn span_offers(
        &self,
        c: &Coordinating<Reply>,
    ) -> Vec<(
        commons_protocol::ModelId,
        commons_coordinator::routing::SpanOffer,
    )> {
        use commons_coordinator::routing::SpanOffer;
        let mut load: HashMap<NodeId, usize> = HashMap::new();
        for (_, node) in self.units_out.values() {
            *load.entry(*node).or_default() += 1;
        }
        let mut offers = Vec::new();
        let mut add = |node: NodeId,
                       model,
                       layers: commons_protocol::messages::LayerRange,
                       mflops,
                       rtt_ms| {
            let ms_per_layer = c.ms_per_layer(&model, mflops);
            let queue_ms = load.get(&node).copied().unwrap_or(0) as f64
                * ms_per_layer
                * f64::from(layers.len());
            offers.push((
                model,
                SpanOffer {
                    node,
                    layers,
                    ms_per_layer,
                    rtt_ms,
                    queue_ms,
                },
            ));
        };
        for entry in self.peers.peers() {
            let Ok(peer) = PeerId::from_bytes(&entry.advert.node.peer_id_bytes()) else {
                continue;
            };
            if !self.swarm.is_connected(&peer) {
                continue;
            }
            let rtt = self.rtts.get(&peer).map_or(1.0, |d| d.as_secs_f64() * 1e3);
            for held in entry.advert.models.iter() {
                add(
                    entry.advert.node,
                    held.model,
                    held.layers,
                    entry.advert.matmul_mflops,
                    rtt,
                );
            }
        }
        if let Some(s) = &self.served {
            add(
                self.identity.node_id(),
                s.model,
                s.layers,
                self.capacity.matmul_mflops,
                0.0,
            );
        }
        offers
    }

    /// Tells the coordinator what the swarm offers now, and which coalitions
    /// each node serves (as its advert says; this node's from its charters).
    fn update_offers(&self, c: &mut Coordinating<Reply>) {
        let offers = self.span_offers(c);
        let mut coalitions: std::collections::BTreeMap<NodeId, _> = self
            .peers
            .peers()
            .into_iter()
            .filter(|e| !e.advert.coalitions.is_empty())
            .map(|e| (e.advert.node, e.advert.coalitions.iter().copied().collect()))
            .collect();
        coalitions.insert(self.identity.node_id(), self.admission.coalitions().ids());
        c.set_offers(&offers, coalitions);
        // Each node is its own operator: a node key is a member's key.
        let mut profiles: std::collections::BTreeMap<NodeId, Profile> = self
            .peers
            .peers()
            .into_iter()
            .map(|e| {
                let profile = Profile {
                    operator: e.advert.node,
                    class: e.advert.determinism.clone(),
                };
                (e.advert.node, profile)
            })
            .collect();
        let me = self.identity.node_id();
        profiles.insert(
            me,
            Profile {
                operator: me,
                class: crate::capacity::determinism_class(),
            },
        );
        c.set_profiles(profiles);
    }

    pub(super) fn coordinate_tick(&mut self) {
        let Some(mut c) = self.coordinating.take() else {
            return;
        };
        self.update_offers(&mut c);
        let t = now();
        c.tick(t);
        for (reply, bytes) in c.expire_watchers(t) {
            self.respond(reply, bytes);
        }
        self.coordinating = Some(c);
    }

    /// Sends what the coordinator decided: units to nodes, reports to watchers.
    pub(super) fn flush_coordinator(&mut self) {
        let Some(c) = self.coordinating.as_mut() else {
            return;
        };
        // Units first: the next hop computes while this node writes the
        // previous step to disk and answers the job's watchers.
        let sends = c.drain_sends(now());
        let sent = !sends.is_empty();
        for out in sends {
            self.send_unit(out);
        }
        if sent {
            // Poll the swarm once, so the units reach their connections'
            // tasks (which write them out) before the disk write below. The
            // main loop polls it again with its own waker right after.
            for _ in 0..16 {
                match self.swarm.select_next_some().now_or_never() {
                    Some(event) => self.on_swarm_event(event),
                    None => break,
                }
            }
        }
        self.commit_coordinator();
    }

    /// Cuts the coordinator's next batch and hands it to the committer (or,
    /// without a job database, answers the watchers it releases at once).
    fn commit_coordinator(&mut self) {
        let Some(c) = self.coordinating.as_mut() else {
            return;
        };
        let (batch, answers) = c.settle(now());
        let mut answers = answers;
        if let Some(batch) = batch {
            match &self.committer {
                Some(committer) => {
                    if let Err(batch) = committer.send(batch) {
                        // The thread is gone: commit here rather than lose it.
                        let outcome = c
                            .store()
                            .map(|s| s.commit_batch(&batch).map_err(|e| format!("{e:#}")))
                            .unwrap_or_else(|| Err("no job database".into()));
                        answers.extend(c.on_committed(outcome, now()));
                    }
                }
                None => answers
                    .extend(c.on_committed(Err("the job database has no writer".into()), now())),
            }
        }
        for (reply, bytes) in answers {
            self.respond(reply, bytes);
        }
    }

    /// A commit the committer finished: answers what it released, and cuts
    /// the next batch from what changed meanwhile.
    pub(super) fn on_committed(&mut self, outcome: Committed) {
        let Some(c) = self.coordinating.as_mut() else {
            return;
        };
        for (reply, bytes) in c.on_committed(outcome, now()) {
            self.respond(reply, bytes);
        }
        self.commit_coordinator();
    }

    /// Before the node stops: waits (bounded) for the commit in flight,
    /// then commits what is left on this thread.
    pub(super) async fn finish_commits(&mut self) {
        if let (Some(rx), Some(c)) = (self.committed_rx.as_mut(), self.coordinating.as_mut())
            && c.commit_in_flight()
            && let Ok(Some(outcome)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await
        {
            let _ = c.on_committed(outcome, now());
        }
        if let Some(c) = self.coordinating.as_mut() {
            for (reply, bytes) in c.commit_now(now()) {
                self.respond(reply, bytes);
            }
        }
    }

    pub(super) fn send_unit(&mut self, out: Outgoing) {
        let Outgoing {
            node,
            bytes,
            pending,
        } = out;
        if node == self.identity.node_id() {
            // A span this node serves itself: run it here.
            let Some(served) = self.served.as_ref() else {
                if let Some(c) = self.coordinating.as_mut() {
                    c.on_failure(pending, "this node serves no model".into(), now());
                }
                return;
            };
            let admitted = serve::open(&mut self.admission, &bytes, now()).and_then(|(id, u)| {
                let expires_at = u.expires_at;
                serve::check_inference(served, id, u.body).map(|unit| (id, unit, expires_at))
            });
            match admitted {
                Err(refusal) => {
                    let answer = serve::UnitAnswer::refusal(&self.identity, &refusal, now());
                    self.answer_unit(UnitReply::Local(pending), answer);
                }
                Ok((id, unit, expires_at)) => {
                    self.arrive_inference(id, unit, expires_at, UnitReply::Local(pending));
                }
            }
            return;
        }
        match PeerId::from_bytes(&node.peer_id_bytes()) {
            Ok(peer) => {
                let id = self.swarm.behaviour_mut().work.send_request(&peer, bytes);
                self.units_out.insert(id, (pending, node));
            }
            Err(e) => {
                if let Some(c) = self.coordinating.as_mut() {
                    c.on_failure(pending, format!("bad peer id: {e}"), now());
                }
            }
        }
    }

    pub(super) fn respond(&mut self, reply: Reply, bytes: Vec<u8>) {
        match reply {
            Reply::Remote(channel) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .jobs
                    .send_response(channel, bytes);
            }
            Reply::Local(tx) => {
                let _ = tx.send(bytes);
            }
        }
    }

    pub(super) fn on_job_request(&mut self, request: Vec<u8>, channel: Reply) {
        let Some(mut c) = self.coordinating.take() else {
            let reply = commons_protocol::messages::ErrorReply {
                code: commons_protocol::messages::ErrorCode::BAD_REQUEST,
                message: "this node is not a coordinator (start it with --coordinator)".into(),
                regarding: None,
                responder: self.identity.node_id(),
                issued_at: now(),
                expires_at: now().plus_millis(60_000),
            };
            let bytes = Envelope::seal(&self.identity, &reply)
                .map(|e| e.to_bytes())
                .unwrap_or_default();
            self.respond(channel, bytes);
            return;
        };
        // Plan with the adverts that arrived since the last tick.
        self.update_offers(&mut c);
        let answer = c.on_request(&request, channel, now());
        self.coordinating = Some(c);
        if let Answer::Now(channel, bytes) = answer {
            self.respond(channel, bytes);
        }
    }
}
