//! Placement properties.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_coordinator::placement::{
    Assignment, ModelShape, NodeCapacity, PlanError, choose_span, plan, rebalance, should_move,
};
use commons_protocol::NodeId;
use commons_protocol::messages::LayerRange;
use proptest::prelude::*;

fn node(i: u8, throughput: f64, layers_fit: u64) -> NodeCapacity {
    NodeCapacity {
        node: NodeId([i; 32]),
        layer_throughput: throughput,
        memory_bytes: layers_fit * 100,
    }
}

const MODEL: ModelShape = ModelShape {
    n_layers: 30,
    layer_bytes: 100,
};

#[test]
fn three_equal_nodes_split_thirty_layers_in_thirds() {
    let p = plan(
        &MODEL,
        &[node(1, 300.0, 10), node(2, 300.0, 10), node(3, 300.0, 10)],
    )
    .unwrap();
    assert!(p.covers_all());
    let mut spans: Vec<(u32, u32)> = p
        .assignments
        .iter()
        .map(|a| (a.layers.start, a.layers.end))
        .collect();
    spans.sort_unstable();
    assert_eq!(spans, vec![(0, 10), (10, 20), (20, 30)]);
    assert!((p.bottleneck() - 30.0).abs() < 1e-9);
}

#[test]
fn spare_nodes_become_replicas_of_the_weakest_spans() {
    let mut nodes = vec![node(1, 300.0, 10), node(2, 300.0, 10), node(3, 300.0, 10)];
    // A fourth node cannot lift the whole pipeline alone, but it doubles one
    // third with a full span rather than wasting itself on a sliver.
    nodes.push(node(4, 300.0, 10));
    let four = plan(&MODEL, &nodes).unwrap();
    assert_eq!(four.of(&NodeId([4; 32])).next().unwrap().layers.len(), 10);
    assert!((four.bottleneck() - 30.0).abs() < 1e-9);
    // Three more, and every third has a replica: the bottleneck doubles.
    nodes.extend([node(5, 300.0, 10), node(6, 300.0, 10)]);
    let six = plan(&MODEL, &nodes).unwrap();
    assert!(
        (six.bottleneck() - 60.0).abs() < 1e-9,
        "{}",
        six.bottleneck()
    );
}

#[test]
fn a_stronger_node_takes_more_layers_when_memory_allows() {
    // A fast node that can hold everything next to two slow ones: the plan
    // beats the even split.
    let nodes = vec![node(1, 900.0, 30), node(2, 100.0, 10), node(3, 100.0, 10)];
    let p = plan(&MODEL, &nodes).unwrap();
    assert!(p.covers_all());
    assert!(p.bottleneck() >= 30.0, "{}", p.bottleneck());
}

#[test]
fn not_enough_memory_is_an_error() {
    assert!(matches!(
        plan(&MODEL, &[node(1, 100.0, 10), node(2, 100.0, 10)]),
        Err(PlanError::Uncovered { .. })
    ));
    assert_eq!(
        plan(&MODEL, &[node(1, 100.0, 0)]),
        Err(PlanError::NoCapacity)
    );
    assert_eq!(
        plan(
            &ModelShape {
                n_layers: 0,
                layer_bytes: 1
            },
            &[node(1, 1.0, 1)]
        ),
        Err(PlanError::EmptyModel)
    );
}

#[test]
fn rebalance_fills_the_gap_a_departed_node_leaves() {
    let nodes = vec![
        node(1, 300.0, 10),
        node(2, 300.0, 10),
        node(3, 300.0, 10),
        node(4, 200.0, 15),
    ];
    let p = plan(&MODEL, &nodes).unwrap();
    let remaining: Vec<NodeCapacity> = nodes
        .iter()
        .filter(|n| n.node != NodeId([2; 32]))
        .cloned()
        .collect();
    let q = rebalance(&MODEL, &p, &remaining, 0.2).unwrap();
    assert!(q.covers_all());
    assert!(q.assignments.iter().all(|a| a.node != NodeId([2; 32])));
    // Nothing changed: the plan stays as it is.
    assert_eq!(rebalance(&MODEL, &p, &nodes, 0.2).unwrap(), p);
}

fn nodes() -> impl Strategy<Value = Vec<NodeCapacity>> {
    proptest::collection::vec((1.0f64..1000.0, 1u64..31), 1..24).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (t, m))| node(i as u8, t, m))
            .collect()
    })
}

proptest! {
    #[test]
    fn plans_cover_every_layer_whenever_memory_allows(nodes in nodes()) {
        let total: u64 = nodes.iter().map(|n| n.memory_bytes / MODEL.layer_bytes).sum();
        match plan(&MODEL, &nodes) {
            Ok(p) => {
                prop_assert!(p.covers_all());
                for a in &p.assignments {
                    prop_assert!(a.layers.start < a.layers.end && a.layers.end <= MODEL.n_layers);
                    let fit = nodes.iter().find(|n| n.node == a.node).unwrap().memory_bytes / MODEL.layer_bytes;
                    prop_assert!(u64::from(a.layers.len()) <= fit);
                }
                // Deterministic, and independent of the order nodes are listed in.
                let mut reversed = nodes.clone();
                reversed.reverse();
                prop_assert_eq!(plan(&MODEL, &reversed).unwrap(), p);
            }
            // A greedy placement can waste memory on overlaps, so only this is
            // promised: a swarm with one node that holds the whole model is covered.
            Err(PlanError::Uncovered { .. }) => {
                prop_assert!(nodes.iter().all(|n| n.memory_bytes / MODEL.layer_bytes < u64::from(MODEL.n_layers)), "total {total}");
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    #[test]
    fn rebalancing_after_a_departure_never_leaves_a_gap(nodes in nodes(), gone in any::<prop::sample::Index>()) {
        if let Ok(p) = plan(&MODEL, &nodes) {
            let leaving = nodes[gone.index(nodes.len())].node;
            let rest: Vec<NodeCapacity> = nodes.iter().filter(|n| n.node != leaving).cloned().collect();
            if let Ok(q) = rebalance(&MODEL, &p, &rest, 0.2) {
                prop_assert!(q.covers_all());
                prop_assert!(q.assignments.iter().all(|a| a.node != leaving));
            }
        }
    }
}

fn serving(i: u8, a: u32, b: u32) -> Assignment {
    Assignment {
        node: NodeId([i; 32]),
        layers: LayerRange { start: a, end: b },
        throughput: 300.0 / f64::from(b - a),
    }
}

fn span(r: Option<LayerRange>) -> Option<(u32, u32)> {
    r.map(|r| (r.start, r.end))
}

#[test]
fn joining_nodes_take_the_weakest_span_they_can_hold() {
    // One by one, three ten-layer nodes build the pipeline.
    let mut swarm = Vec::new();
    for i in 1..=3u8 {
        let s = choose_span(&MODEL, &swarm, &node(i, 300.0, 10)).unwrap();
        swarm.push(serving(i, s.start, s.end));
    }
    let mut spans: Vec<_> = swarm
        .iter()
        .map(|a| (a.layers.start, a.layers.end))
        .collect();
    spans.sort_unstable();
    assert_eq!(spans, vec![(0, 10), (10, 20), (20, 30)]);
    // A fourth becomes a replica of one third; a node with no room gets nothing.
    assert_eq!(
        choose_span(&MODEL, &swarm, &node(4, 300.0, 10)).map(|r| r.len()),
        Some(10)
    );
    assert_eq!(choose_span(&MODEL, &swarm, &node(5, 300.0, 0)), None);
}

#[test]
fn when_a_span_is_lost_one_spare_replica_moves_into_the_gap() {
    // 2 and 4 both serve 0..10; the node serving 10..20 is gone.
    let left = [serving(2, 0, 10), serving(4, 0, 10), serving(3, 20, 30)];
    assert_eq!(
        span(should_move(&MODEL, &left, &node(2, 300.0, 10))),
        Some((10, 20))
    );
    // Only the lowest id moves, so 0..10 keeps a server.
    assert_eq!(should_move(&MODEL, &left, &node(4, 300.0, 10)), None);
    // The only server of a span never leaves it, even for a gap.
    assert_eq!(should_move(&MODEL, &left, &node(3, 300.0, 10)), None);
    // Nothing moves while every layer is served.
    let full = [serving(2, 0, 10), serving(4, 10, 20), serving(3, 20, 30)];
    for i in [2, 3, 4] {
        assert_eq!(should_move(&MODEL, &full, &node(i, 300.0, 10)), None);
    }
}

proptest! {
    /// Moving never opens a gap: after the move every layer served before is still served.
    #[test]
    fn a_move_never_uncovers_a_layer(spans in proptest::collection::vec((0u32..30, 1u32..15), 1..8)) {
        let all: Vec<Assignment> = spans
            .iter()
            .enumerate()
            .map(|(i, &(a, len))| serving(i as u8 + 1, a, (a + len).min(30)))
            .collect();
        for a in &all {
            let me = NodeCapacity { node: a.node, layer_throughput: 300.0, memory_bytes: 1000 };
            if let Some(to) = should_move(&MODEL, &all, &me) {
                let before = commons_coordinator::placement::current(&MODEL, &all);
                let mut after: Vec<Assignment> = all.iter().filter(|x| x.node != a.node).cloned().collect();
                after.push(Assignment { node: a.node, layers: to, throughput: 30.0 });
                let after = commons_coordinator::placement::current(&MODEL, &after);
                for l in 0..30 {
                    prop_assert!(before.layer_throughput[l] <= 0.0 || after.layer_throughput[l] > 0.0, "layer {l} uncovered");
                }
            }
        }
    }
}

/// The plain definition of `should_move`, one node at a time: the reference
/// the linear implementation must match.
fn should_move_reference(
    model: &ModelShape,
    all: &[Assignment],
    me: &NodeCapacity,
) -> Option<LayerRange> {
    use commons_coordinator::placement::current;
    let gaps = |a: &[Assignment]| {
        current(model, a)
            .layer_throughput
            .iter()
            .filter(|t| **t <= 0.0)
            .count()
    };
    if gaps(all) == 0 {
        return None;
    }
    let without =
        |n: &NodeId| -> Vec<Assignment> { all.iter().filter(|a| a.node != *n).cloned().collect() };
    let movable = |n: &NodeId| {
        let rest = current(model, &without(n));
        all.iter().filter(|a| a.node == *n).all(|a| {
            rest.layer_throughput
                [a.layers.start as usize..(a.layers.end as usize).min(rest.layer_throughput.len())]
                .iter()
                .all(|t| *t > 0.0)
        })
    };
    let mut nodes: Vec<NodeId> = all.iter().map(|a| a.node).collect();
    nodes.sort();
    nodes.dedup();
    if nodes.iter().find(|n| movable(n)) != Some(&me.node) {
        return None;
    }
    let span = choose_span(model, &without(&me.node), me)?;
    let mut after = without(&me.node);
    after.push(Assignment {
        node: me.node,
        layers: span,
        throughput: me.layer_throughput / f64::from(span.len().max(1)),
    });
    (gaps(&after) < gaps(all)).then_some(span)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The linear `should_move` decides exactly as its definition does.
    #[test]
    fn should_move_matches_its_definition(
        spans in proptest::collection::vec((0u8..12, 0u32..30, 1u32..12, 0u8..3), 1..20),
        me in 0u8..12,
    ) {
        let all: Vec<Assignment> = spans
            .iter()
            .map(|&(n, start, len, zero)| Assignment {
                node: NodeId([n; 32]),
                layers: LayerRange { start, end: (start + len).min(30) },
                throughput: if zero == 0 { 0.0 } else { 10.0 },
            })
            .collect();
        let me = node(me, 100.0, 10);
        prop_assert_eq!(should_move(&MODEL, &all, &me), should_move_reference(&MODEL, &all, &me));
    }
}
