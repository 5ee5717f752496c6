//! Routing: for one inference session, the chain of spans through the model
//! with the least expected latency per token.
//!
//! A graph whose vertices are layer boundaries `0..=n_layers`; a node serving
//! `[a, b)` offers an edge from every boundary `s` in `[a, b)` to every `e` in
//! `(s, b]` (it can run any part of its span), costing its round-trip time
//! plus `(e - s)` times its time per layer plus its expected queueing.
//! Dijkstra from 0 to `n_layers`; ties go to fewer hops, then lower node ids,
//! so every coordinator picks the same chain.
//!
//! [`route_within`] is the plain definition, looking at every offer from
//! every boundary. The scheduler keeps its offers in [`Offers`], indexed by
//! the layer each starts at, and routes whole spans from there: each offer
//! is looked at once per route, and the same chain comes out (a property
//! test holds the two together).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use commons_protocol::NodeId;
use commons_protocol::messages::LayerRange;

/// A span on offer, with what it is expected to cost now.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanOffer {
    /// The node.
    pub node: NodeId,
    /// Its layers.
    pub layers: LayerRange,
    /// Milliseconds per token per layer on that node.
    pub ms_per_layer: f64,
    /// Round-trip time to it, milliseconds.
    pub rtt_ms: f64,
    /// Expected wait in its queue, milliseconds (load).
    pub queue_ms: f64,
}

/// One hop of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    /// The node.
    pub node: NodeId,
    /// The layers it runs for this session.
    pub layers: LayerRange,
}

/// No route through the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// Nobody usable serves this layer.
    #[error("no usable node serves layer {layer}")]
    Gap {
        /// The first layer that cannot be reached past.
        layer: u32,
    },
}

#[derive(PartialEq)]
struct State {
    cost: f64,
    hops: u32,
    boundary: u32,
}

impl Eq for State {}

impl Ord for State {
    fn cmp(&self, other: &Self) -> Ordering {
        // A min-heap on (cost, hops, boundary).
        other
            .cost
            .total_cmp(&self.cost)
            .then(other.hops.cmp(&self.hops))
            .then(other.boundary.cmp(&self.boundary))
    }
}

impl PartialOrd for State {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The cheapest chain of hops covering layers `0..n_layers`, avoiding `banned`
/// nodes; a hop may run any part of a node's span.
pub fn route(
    n_layers: u32,
    offers: &[SpanOffer],
    banned: &BTreeSet<NodeId>,
) -> Result<Vec<Hop>, RouteError> {
    route_within(
        LayerRange {
            start: 0,
            end: n_layers,
        },
        offers,
        banned,
        Spans::Partial,
    )
}

/// Whether a hop may run part of a node's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spans {
    /// Any contiguous part of a span.
    Partial,
    /// Only whole spans, exactly as offered (for executors that load one fixed range).
    Whole,
}

/// The cheapest chain of hops covering `range` exactly, avoiding `banned` nodes.
///
/// This is the plain definition: every offer is looked at from every
/// boundary. [`Offers::route`] finds the same chain from an index.
pub fn route_within(
    range: LayerRange,
    offers: &[SpanOffer],
    banned: &BTreeSet<NodeId>,
    spans: Spans,
) -> Result<Vec<Hop>, RouteError> {
    if range.is_empty() {
        return Ok(Vec::new());
    }
    let n = range.end as usize;
    let mut usable: Vec<&SpanOffer> = offers
        .iter()
        .filter(|o| !banned.contains(&o.node) && o.layers.start < o.layers.end)
        .filter(|o| match spans {
            Spans::Partial => o.layers.start < range.end && o.layers.end > range.start,
            Spans::Whole => o.layers.start >= range.start && o.layers.end <= range.end,
        })
        .filter(|o| finite(o))
        .collect();
    usable.sort_by(|a, b| {
        a.node
            .cmp(&b.node)
            .then(a.layers.start.cmp(&b.layers.start))
    });
    cheapest(range, |s, edges| {
        for &o in &usable {
            match spans {
                Spans::Partial if o.layers.start as usize <= s && s < o.layers.end as usize => {
                    edges.extend((s + 1..=(o.layers.end as usize).min(n)).map(|e| (o, e)));
                }
                Spans::Whole if o.layers.start as usize == s => {
                    edges.push((o, o.layers.end as usize));
                }
                _ => {}
            }
        }
    })
}

fn finite(o: &SpanOffer) -> bool {
    o.ms_per_layer.is_finite() && o.rtt_ms.is_finite() && o.queue_ms.is_finite()
}

/// Dijkstra over the boundaries of `range` (which is not empty), where
/// `edges(s, out)` puts in `out` the hops that start at boundary `s`, as
/// (offer, end boundary), in the order they are tried: an equally cheap
/// later one never replaces an earlier one.
fn cheapest<'a>(
    range: LayerRange,
    mut edges: impl FnMut(usize, &mut Vec<(&'a SpanOffer, usize)>),
) -> Result<Vec<Hop>, RouteError> {
    let (first, n) = (range.start as usize, range.end as usize);
    let mut best: Vec<Option<(f64, u32)>> = vec![None; n + 1];
    // How each boundary was reached: (from boundary, offer).
    let mut prev: Vec<Option<(usize, &'a SpanOffer)>> = vec![None; n + 1];
    let mut heap = BinaryHeap::new();
    let mut out = Vec::new();
    best[first] = Some((0.0, 0));
    heap.push(State {
        cost: 0.0,
        hops: 0,
        boundary: range.start,
    });
    while let Some(State {
        cost,
        hops,
        boundary,
    }) = heap.pop()
    {
        let s = boundary as usize;
        if best[s].is_some_and(|(c, h)| (c, h) < (cost, hops)) {
            continue;
        }
        if s == n {
            break;
        }
        out.clear();
        edges(s, &mut out);
        for &(o, e) in &out {
            let c = cost + o.rtt_ms + o.queue_ms + (e - s) as f64 * o.ms_per_layer;
            let better = match best[e] {
                None => true,
                Some((bc, bh)) => c < bc - 1e-9 || ((c - bc).abs() <= 1e-9 && hops + 1 < bh),
            };
            if better {
                best[e] = Some((c, hops + 1));
                prev[e] = Some((s, o));
                heap.push(State {
                    cost: c,
                    hops: hops + 1,
                    boundary: e as u32,
                });
            }
        }
    }
    if best[n].is_none() {
        // The furthest boundary reached is where the gap starts.
        let reached = (first..=n)
            .rev()
            .find(|&b| best[b].is_some())
            .unwrap_or(first);
        return Err(RouteError::Gap {
            layer: reached as u32,
        });
    }
    let mut hops = Vec::new();
    let mut e = n;
    while e > first
        && let Some((s, o)) = prev[e]
    {
        hops.push(Hop {
            node: o.node,
            layers: LayerRange {
                start: s as u32,
                end: e as u32,
            },
        });
        e = s;
    }
    hops.reverse();
    Ok(hops)
}

/// Span offers indexed by the layer each starts at, then by node: a chain
/// of whole spans looks only at the offers that start where it stands, so
/// routing costs the offers once, not once per layer boundary; and the
/// offers change one node at a time, without rebuilding the rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Offers {
    /// Every offer, by (first layer, node, order of arrival).
    by_start: BTreeMap<(u32, NodeId, u64), SpanOffer>,
    /// The keys of each node's offers.
    by_node: BTreeSet<(NodeId, u32, u64)>,
    /// The next order of arrival.
    next: u64,
}

const NO_NODE: NodeId = NodeId([0; 32]);
const LAST_NODE: NodeId = NodeId([u8::MAX; 32]);

impl Offers {
    /// No offers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many offers there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// Adds `offer` (a node may offer several spans).
    pub fn insert(&mut self, offer: SpanOffer) {
        let key = (offer.layers.start, offer.node, self.next);
        self.next += 1;
        self.by_node.insert((key.1, key.0, key.2));
        self.by_start.insert(key, offer);
    }

    /// Removes every offer of `node`.
    pub fn remove(&mut self, node: &NodeId) {
        let keys: Vec<_> = self.keys_of(node).collect();
        for (node, start, seq) in keys {
            self.by_node.remove(&(node, start, seq));
            self.by_start.remove(&(start, node, seq));
        }
    }

    /// Sets the expected queueing of every offer of `node`, milliseconds.
    pub fn set_queue(&mut self, node: &NodeId, queue_ms: f64) {
        let keys = self
            .by_node
            .range((*node, 0, 0)..=(*node, u32::MAX, u64::MAX));
        for &(node, start, seq) in keys {
            if let Some(o) = self.by_start.get_mut(&(start, node, seq)) {
                o.queue_ms = queue_ms;
            }
        }
    }

    fn keys_of(&self, node: &NodeId) -> impl Iterator<Item = (NodeId, u32, u64)> + '_ {
        self.by_node
            .range((*node, 0, 0)..=(*node, u32::MAX, u64::MAX))
            .copied()
    }

    /// Every offer, by first layer, then node, then order of arrival.
    pub fn iter(&self) -> impl Iterator<Item = &SpanOffer> {
        self.by_start.values()
    }

    /// The offers whose span starts at layer `start`, by node, then order of arrival.
    pub fn starting_at(&self, start: u32) -> impl Iterator<Item = &SpanOffer> {
        self.by_start
            .range((start, NO_NODE, 0)..=(start, LAST_NODE, u64::MAX))
            .map(|(_, o)| o)
    }

    /// The offers whose span holds every layer of `layers`.
    pub fn containing(&self, layers: LayerRange) -> impl Iterator<Item = &SpanOffer> {
        self.by_start
            .range(..=(layers.start, LAST_NODE, u64::MAX))
            .map(|(_, o)| o)
            .filter(move |o| o.layers.end >= layers.end)
    }

    /// [`route_within`] over the offers that pass `usable`: the same chain,
    /// found for whole spans from the index.
    pub fn route(
        &self,
        range: LayerRange,
        banned: &BTreeSet<NodeId>,
        spans: Spans,
        usable: impl Fn(&SpanOffer) -> bool,
    ) -> Result<Vec<Hop>, RouteError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if spans == Spans::Partial {
            // By node and first layer, as the plain definition takes them.
            let mut all: Vec<(&(u32, NodeId, u64), &SpanOffer)> =
                self.by_start.iter().filter(|(_, o)| usable(o)).collect();
            all.sort_by_key(|((start, node, seq), _)| (*node, *start, *seq));
            let offers: Vec<SpanOffer> = all.into_iter().map(|(_, o)| o.clone()).collect();
            return route_within(range, &offers, banned, spans);
        }
        cheapest(range, |s, edges| {
            for o in self.starting_at(s as u32) {
                if o.layers.start < o.layers.end
                    && o.layers.end <= range.end
                    && finite(o)
                    && (banned.is_empty() || !banned.contains(&o.node))
                    && usable(o)
                {
                    edges.push((o, o.layers.end as usize));
                }
            }
        })
    }
}

impl FromIterator<SpanOffer> for Offers {
    fn from_iter<I: IntoIterator<Item = SpanOffer>>(offers: I) -> Self {
        let mut index = Self::new();
        for o in offers {
            index.insert(o);
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(node: u8, a: u32, b: u32, ms_per_layer: f64, rtt: f64) -> SpanOffer {
        SpanOffer {
            node: NodeId([node; 32]),
            layers: LayerRange { start: a, end: b },
            ms_per_layer,
            rtt_ms: rtt,
            queue_ms: 0.0,
        }
    }

    fn nodes(r: &[Hop]) -> Vec<(u8, u32, u32)> {
        r.iter()
            .map(|h| (h.node.0[0], h.layers.start, h.layers.end))
            .collect()
    }

    #[test]
    fn picks_the_fastest_chain_and_splits_spans_where_it_pays() {
        let offers = [
            offer(1, 0, 10, 1.0, 5.0),
            offer(2, 10, 30, 1.0, 5.0),
            offer(3, 0, 30, 3.0, 5.0),
            offer(4, 5, 30, 0.5, 5.0),
        ];
        // 1 for 0..5 then 4 for 5..30: 5 + 5 + 5 + 12.5 = 27.5, the cheapest.
        assert_eq!(
            nodes(&route(30, &offers, &BTreeSet::new()).unwrap()),
            vec![(1, 0, 5), (4, 5, 30)]
        );
    }

    #[test]
    fn avoids_banned_and_loaded_nodes() {
        let mut offers = vec![offer(1, 0, 30, 1.0, 5.0), offer(2, 0, 30, 1.2, 5.0)];
        assert_eq!(
            nodes(&route(30, &offers, &BTreeSet::new()).unwrap()),
            vec![(1, 0, 30)]
        );
        assert_eq!(
            nodes(&route(30, &offers, &BTreeSet::from([NodeId([1; 32])])).unwrap()),
            vec![(2, 0, 30)]
        );
        // A long queue on 1 sends the session to 2.
        offers[0].queue_ms = 50.0;
        assert_eq!(
            nodes(&route(30, &offers, &BTreeSet::new()).unwrap()),
            vec![(2, 0, 30)]
        );
    }

    #[test]
    fn whole_spans_reroute_a_sub_range() {
        let offers = [
            offer(1, 0, 10, 1.0, 1.0),
            offer(2, 10, 20, 1.0, 1.0),
            offer(3, 10, 20, 1.5, 1.0),
            offer(4, 10, 15, 0.1, 1.0),
            offer(5, 20, 30, 1.0, 1.0),
            offer(6, 5, 25, 0.1, 1.0),
        ];
        let middle = LayerRange { start: 10, end: 20 };
        let banned = BTreeSet::from([NodeId([2; 32])]);
        // 4 cannot finish the range and 6 overhangs it: only 3 runs 10..20 whole.
        assert_eq!(
            nodes(&route_within(middle, &offers, &banned, Spans::Whole).unwrap()),
            vec![(3, 10, 20)]
        );
        // Partial spans may use 4 then 6.
        assert_eq!(
            nodes(&route_within(middle, &offers, &banned, Spans::Partial).unwrap()),
            vec![(6, 10, 20)]
        );
        let all = BTreeSet::from([NodeId([2; 32]), NodeId([3; 32])]);
        assert_eq!(
            route_within(middle, &offers, &all, Spans::Whole),
            Err(RouteError::Gap { layer: 15 })
        );
    }

    #[test]
    fn fewer_hops_win_ties_and_gaps_are_errors() {
        let offers = [
            offer(1, 0, 30, 1.0, 0.0),
            offer(2, 0, 15, 1.0, 0.0),
            offer(3, 15, 30, 1.0, 0.0),
        ];
        assert_eq!(
            nodes(&route(30, &offers, &BTreeSet::new()).unwrap()),
            vec![(1, 0, 30)]
        );
        let broken = [offer(2, 0, 15, 1.0, 0.0), offer(3, 16, 30, 1.0, 0.0)];
        assert_eq!(
            route(30, &broken, &BTreeSet::new()),
            Err(RouteError::Gap { layer: 15 })
        );
        assert_eq!(
            route(30, &[], &BTreeSet::new()),
            Err(RouteError::Gap { layer: 0 })
        );
    }
}

#[cfg(test)]
mod fast_paths {
    use super::*;
    use proptest::prelude::*;

    /// What is done to the offers: add one, take a node's away, set a node's queue.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(SpanOffer),
        Remove(u8),
        Queue(u8, f64),
    }

    fn offer() -> impl Strategy<Value = SpanOffer> {
        // Few distinct values, so equal costs and shared starts are common;
        // some spans empty or past the range, some costs not finite.
        (
            0u8..6,
            0u32..6,
            prop::sample::select(vec![0, 1, 1, 2, 2, 3, 4, 9]),
            prop::sample::select(vec![0.5, 1.0, 1.0, f64::INFINITY]),
            prop::sample::select(vec![0.0, 1.0]),
            prop::sample::select(vec![0.0, 0.5]),
        )
            .prop_map(
                |(node, start, len, ms_per_layer, rtt_ms, queue_ms)| SpanOffer {
                    node: NodeId([node; 32]),
                    layers: LayerRange {
                        start,
                        end: start + len,
                    },
                    ms_per_layer,
                    rtt_ms,
                    queue_ms,
                },
            )
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => offer().prop_map(Op::Insert),
            1 => (0u8..6).prop_map(Op::Remove),
            1 => (0u8..6, prop::sample::select(vec![0.0, 0.5, 3.0])).prop_map(|(n, q)| Op::Queue(n, q)),
        ]
    }

    fn key(o: &SpanOffer) -> (NodeId, u32, u32, u64, u64, u64) {
        (
            o.node,
            o.layers.start,
            o.layers.end,
            o.ms_per_layer.to_bits(),
            o.rtt_ms.to_bits(),
            o.queue_ms.to_bits(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn indexed_routes_equal_the_plain_definition(
            ops in proptest::collection::vec(op(), 0..60),
            banned in proptest::collection::btree_set(0u8..6, 0..3),
            unusable in proptest::collection::btree_set(0u8..6, 0..3),
            start in 0u32..3,
            len in 0u32..7,
            whole in any::<bool>(),
        ) {
            // The same changes to the index and to a plain list.
            let mut index = Offers::new();
            let mut plain: Vec<SpanOffer> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(o) => {
                        plain.push(o.clone());
                        index.insert(o);
                    }
                    Op::Remove(n) => {
                        plain.retain(|o| o.node != NodeId([n; 32]));
                        index.remove(&NodeId([n; 32]));
                    }
                    Op::Queue(n, q) => {
                        for o in plain.iter_mut().filter(|o| o.node == NodeId([n; 32])) {
                            o.queue_ms = q;
                        }
                        index.set_queue(&NodeId([n; 32]), q);
                    }
                }
            }
            prop_assert_eq!(index.len(), plain.len());
            let banned: BTreeSet<NodeId> = banned.into_iter().map(|n| NodeId([n; 32])).collect();
            let usable = |o: &SpanOffer| !unusable.contains(&o.node.0[0]);
            let range = LayerRange { start, end: start + len };
            let spans = if whole { Spans::Whole } else { Spans::Partial };
            let kept: Vec<SpanOffer> = plain.iter().filter(|o| usable(o)).cloned().collect();
            prop_assert_eq!(
                index.route(range, &banned, spans, usable),
                route_within(range, &kept, &banned, spans)
            );
            let mut held: Vec<_> = index.containing(range).map(key).collect();
            let mut want: Vec<_> = plain
                .iter()
                .filter(|o| o.layers.start <= range.start && range.end <= o.layers.end)
                .map(key)
                .collect();
            held.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(held, want);
        }
    }
}
