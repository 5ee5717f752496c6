//! Routing: for one inference session, the chain of spans through the model
//! with the least expected latency per token.
//!
//! A graph whose vertices are layer boundaries `0..=n_layers`; a node serving
//! `[a, b)` offers an edge from every boundary `s` in `[a, b)` to every `e` in
//! `(s, b]` (it can run any part of its span), costing its round-trip time
//! plus `(e - s)` times its time per layer plus its expected queueing.
//! Dijkstra from 0 to `n_layers`; ties go to fewer hops, then lower node ids,
//! so every coordinator picks the same chain.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap};

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
pub fn route_within(
    range: LayerRange,
    offers: &[SpanOffer],
    banned: &BTreeSet<NodeId>,
    spans: Spans,
) -> Result<Vec<Hop>, RouteError> {
    let (first, n) = (range.start as usize, range.end as usize);
    if range.is_empty() {
        return Ok(Vec::new());
    }
    let mut usable: Vec<&SpanOffer> = offers
        .iter()
        .filter(|o| !banned.contains(&o.node) && o.layers.start < o.layers.end)
        .filter(|o| match spans {
            Spans::Partial => o.layers.start < range.end && o.layers.end > range.start,
            Spans::Whole => o.layers.start >= range.start && o.layers.end <= range.end,
        })
        .filter(|o| o.ms_per_layer.is_finite() && o.rtt_ms.is_finite() && o.queue_ms.is_finite())
        .collect();
    usable.sort_by(|a, b| {
        a.node
            .cmp(&b.node)
            .then(a.layers.start.cmp(&b.layers.start))
    });
    let mut best: Vec<Option<(f64, u32)>> = vec![None; n + 1];
    let mut prev: Vec<Option<(usize, usize)>> = vec![None; n + 1]; // (from boundary, offer index)
    let mut heap = BinaryHeap::new();
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
        for (i, o) in usable.iter().enumerate() {
            let ends = match spans {
                Spans::Partial if o.layers.start as usize <= s && s < o.layers.end as usize => {
                    s + 1..=(o.layers.end as usize).min(n)
                }
                Spans::Whole if o.layers.start as usize == s => {
                    o.layers.end as usize..=o.layers.end as usize
                }
                _ => continue,
            };
            for e in ends {
                let c = cost + o.rtt_ms + o.queue_ms + (e - s) as f64 * o.ms_per_layer;
                let better = match best[e] {
                    None => true,
                    Some((bc, bh)) => c < bc - 1e-9 || ((c - bc).abs() <= 1e-9 && hops + 1 < bh),
                };
                if better {
                    best[e] = Some((c, hops + 1));
                    prev[e] = Some((s, i));
                    heap.push(State {
                        cost: c,
                        hops: hops + 1,
                        boundary: e as u32,
                    });
                }
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
        && let Some((s, i)) = prev[e]
    {
        hops.push(Hop {
            node: usable[i].node,
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
