//! Placement properties.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use commons_coordinator::placement::{ModelShape, NodeCapacity, PlanError, plan, rebalance};
use commons_protocol::NodeId;
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
