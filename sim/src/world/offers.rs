//! What the simulated nodes offer the scheduler, kept up to date one node at
//! a time: a join, a leave or a move changes that node's offer alone, and a
//! refresh of the queues touches only the nodes that had work queued. The
//! scheduler sees exactly what a rebuild of every offer would give it.

use commons_coordinator::routing::SpanOffer;

use super::{MODEL, Micros, Simulation, node_id};

/// Which nodes' offers are stale.
#[derive(Debug, Default)]
pub(super) struct OfferBook {
    /// Nodes whose span or presence changed since the scheduler last saw them.
    changed: Vec<u32>,
    /// Nodes whose offered queue may be more than zero, or was given work
    /// since: every other node's queue is zero, as offered.
    queued: Vec<u32>,
    /// Per node: in `changed`, in `queued`.
    marks: Vec<(bool, bool)>,
}

impl OfferBook {
    fn mark(&mut self, i: u32) -> &mut (bool, bool) {
        let i = i as usize;
        if i >= self.marks.len() {
            self.marks.resize(i + 1, (false, false));
        }
        &mut self.marks[i]
    }

    /// Node `i`'s span or presence changed.
    pub(super) fn changed(&mut self, i: u32) {
        if !std::mem::replace(&mut self.mark(i).0, true) {
            self.changed.push(i);
        }
    }

    /// Node `i` was given work: its queue grew.
    pub(super) fn queued(&mut self, i: u32) {
        if !std::mem::replace(&mut self.mark(i).1, true) {
            self.queued.push(i);
        }
    }

    /// Whether some node's span or presence changed since the last refresh.
    pub(super) fn is_dirty(&self) -> bool {
        !self.changed.is_empty()
    }
}

impl Simulation {
    /// Sets when node `i` is next free, as work is given to it.
    pub(super) fn set_busy(&mut self, i: u32, until: Micros) {
        self.nodes[i as usize].busy_until = until;
        self.offers.queued(i);
    }

    /// What node `i` offers now, if it serves.
    fn offer_of(&self, i: u32) -> Option<SpanOffer> {
        let n = &self.nodes[i as usize];
        if !n.online {
            return None;
        }
        Some(SpanOffer {
            node: node_id(i),
            layers: n.span?,
            ms_per_layer: 1000.0 / n.tokens_per_s,
            rtt_ms: self.rtt(i) as f64 / 1000.0,
            queue_ms: self.queue_ms(i),
        })
    }

    fn queue_ms(&self, i: u32) -> f64 {
        self.nodes[i as usize].busy_until.saturating_sub(self.now) as f64 / 1000.0
    }

    /// Gives the scheduler what changed since the last refresh, if anything
    /// did (spans, and with them every queue).
    pub(super) fn refresh_offers(&mut self) {
        self.refresh_profiles();
        if self.offers.is_dirty() {
            self.push_offers();
        }
    }

    /// Brings the offers' queues up to date, as a node's driver does from
    /// its units in flight (done when a job arrives, so new jobs are routed
    /// on the current load, and after a join or leave; not after every unit).
    pub(super) fn refresh_queues(&mut self) {
        self.refresh_profiles();
        self.push_offers();
    }

    /// Gives the scheduler the offers of the nodes that changed, and every
    /// queue as it stands now.
    fn push_offers(&mut self) {
        if self.scheduler.offers_mut(&MODEL).is_none() {
            let (layers, context) = (self.scenario.model.layers, self.scenario.model.context);
            self.scheduler
                .set_offers(MODEL, layers, context, Vec::new());
        }
        let changed = std::mem::take(&mut self.offers.changed);
        for &i in &changed {
            self.offers.marks[i as usize].0 = false;
            let offer = self.offer_of(i);
            let id = node_id(i);
            if let Some(offers) = self.scheduler.offers_mut(&MODEL) {
                offers.remove(&id);
                if let Some(o) = offer {
                    if o.queue_ms > 0.0 {
                        self.offers.queued(i);
                    }
                    offers.insert(o);
                }
            }
        }
        self.offers.changed = changed;
        self.offers.changed.clear();
        let mut queued = std::mem::take(&mut self.offers.queued);
        queued.retain(|&i| {
            let n = &self.nodes[i as usize];
            let q = n.busy_until.saturating_sub(self.now) as f64 / 1000.0;
            let serving = n.online && n.span.is_some();
            if serving && let Some(offers) = self.scheduler.offers_mut(&MODEL) {
                offers.set_queue(&node_id(i), q);
            }
            let keep = serving && q > 0.0;
            self.offers.marks[i as usize].1 = keep;
            keep
        });
        self.offers.queued = queued;
    }
}
