//! Placement: which node serves which contiguous layer range of a model.
//!
//! The reference is Petals' block selection. Each node, strongest first,
//! takes the contiguous span (as long as its memory allows) whose layers
//! currently have the least throughput, and adds its own throughput, spread
//! over the span, to them. The pipeline's throughput is that of its weakest
//! layer; nodes beyond what coverage needs become replicas of the weakest
//! spans. Everything is deterministic: ties go to the lower layer index and
//! the lower node id, so the simulator and every coordinator agree.

use std::collections::BTreeMap;

use commons_protocol::NodeId;
use commons_protocol::messages::LayerRange;

/// What a node can give to one model.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCapacity {
    /// The node.
    pub node: NodeId,
    /// Tokens per second it can push through a single layer of this model.
    pub layer_throughput: f64,
    /// Bytes of memory it offers for weights and caches of this model.
    pub memory_bytes: u64,
}

/// The model's cost per layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Transformer blocks.
    pub n_layers: u32,
    /// Memory one layer needs (weights plus its share of KV cache).
    pub layer_bytes: u64,
}

/// A node's span.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The node.
    pub node: NodeId,
    /// Its layers.
    pub layers: LayerRange,
    /// Tokens per second it adds to each of its layers.
    pub throughput: f64,
}

/// A placement of a model over nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Who serves what, in the order nodes were placed.
    pub assignments: Vec<Assignment>,
    /// Throughput of each layer: the sum over the nodes serving it.
    pub layer_throughput: Vec<f64>,
}

impl Plan {
    /// The pipeline's throughput: its weakest layer's.
    #[must_use]
    pub fn bottleneck(&self) -> f64 {
        self.layer_throughput
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    /// Whether every layer is served by someone.
    #[must_use]
    pub fn covers_all(&self) -> bool {
        self.layer_throughput.iter().all(|t| *t > 0.0)
    }

    /// The assignments of `node`.
    pub fn of(&self, node: &NodeId) -> impl Iterator<Item = &Assignment> {
        self.assignments.iter().filter(move |a| a.node == *node)
    }
}

/// A model that cannot be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// No node can hold even one layer.
    #[error("no node can hold a layer of this model")]
    NoCapacity,
    /// The nodes together cannot hold every layer once.
    #[error("layer {layer} is left without a node (not enough memory in the swarm)")]
    Uncovered {
        /// The first layer nobody serves.
        layer: u32,
    },
    /// The model has no layers.
    #[error("the model has no layers")]
    EmptyModel,
}

fn max_span(model: &ModelShape, node: &NodeCapacity) -> u32 {
    if model.layer_bytes == 0 {
        return model.n_layers;
    }
    (node.memory_bytes / model.layer_bytes).min(u64::from(model.n_layers)) as u32
}

/// The start of the window of `len` layers with the least total throughput;
/// among equals, the first.
fn weakest_window(layer_throughput: &[f64], len: usize) -> usize {
    let mut best = (f64::INFINITY, 0);
    let mut sum: f64 = layer_throughput[..len].iter().sum();
    for start in 0..=layer_throughput.len() - len {
        if start > 0 {
            sum += layer_throughput[start + len - 1] - layer_throughput[start - 1];
        }
        // The weakest layer decides, then the window's total.
        let weakest = layer_throughput[start..start + len]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let key = weakest * 1e9 + sum;
        if key < best.0 {
            best = (key, start);
        }
    }
    best.1
}

/// Places `model` over `nodes`.
pub fn plan(model: &ModelShape, nodes: &[NodeCapacity]) -> Result<Plan, PlanError> {
    if model.n_layers == 0 {
        return Err(PlanError::EmptyModel);
    }
    let mut order: Vec<&NodeCapacity> = nodes
        .iter()
        .filter(|n| max_span(model, n) > 0 && n.layer_throughput > 0.0)
        .collect();
    if order.is_empty() {
        return Err(PlanError::NoCapacity);
    }
    // Strongest first (by what it adds to a full span), then by id.
    order.sort_by(|a, b| {
        b.layer_throughput
            .total_cmp(&a.layer_throughput)
            .then(a.node.cmp(&b.node))
    });
    let mut plan = Plan {
        assignments: Vec::new(),
        layer_throughput: vec![0.0; model.n_layers as usize],
    };
    for node in order {
        place(&mut plan, model, node);
    }
    first_gap(&plan).map_or(Ok(plan), |layer| Err(PlanError::Uncovered { layer }))
}

fn first_gap(plan: &Plan) -> Option<u32> {
    plan.layer_throughput
        .iter()
        .position(|t| *t <= 0.0)
        .map(|l| l as u32)
}

/// Where `node` goes in `plan`, as (length, start): where the plan is weakest.
fn span_in(plan: &Plan, model: &ModelShape, node: &NodeCapacity) -> (usize, usize) {
    let n = model.n_layers as usize;
    // While coverage is incomplete, a node takes as many layers as it can; once
    // everything is covered, it takes the span that lifts the bottleneck most.
    let len = (max_span(model, node) as usize).min(n);
    if first_gap(plan).is_some() {
        (len, weakest_window(&plan.layer_throughput, len))
    } else {
        best_replica(plan, node, len)
    }
}

/// Adds `node` where the plan is weakest.
fn place(plan: &mut Plan, model: &ModelShape, node: &NodeCapacity) {
    let (len, start) = span_in(plan, model, node);
    let per_layer = node.layer_throughput / len as f64;
    for t in &mut plan.layer_throughput[start..start + len] {
        *t += per_layer;
    }
    plan.assignments.push(Assignment {
        node: node.node,
        layers: LayerRange {
            start: start as u32,
            end: (start + len) as u32,
        },
        throughput: per_layer,
    });
}

/// For a replica: the span length (up to `max_len`) that leaves the highest
/// bottleneck when placed on the weakest window of that length; among equals
/// the longest, which adds the most capacity for later. Returns the length
/// and that window's start. [`best_replica_clear`] answers in the common case
/// (one layer clearly weakest) from prefix sums; otherwise
/// [`best_replica_scan`] computes every window. Both give the same answer.
fn best_replica(plan: &Plan, node: &NodeCapacity, max_len: usize) -> (usize, usize) {
    let (t, throughput) = (&plan.layer_throughput, node.layer_throughput);
    // Scratch sized to the model: small models clear less of it.
    let clear = if t.len() < 32 {
        best_replica_clear::<32>(t, throughput, max_len)
    } else {
        best_replica_clear::<CLEAR_LAYERS>(t, throughput, max_len)
    };
    clear.unwrap_or_else(|| best_replica_scan(plan, node, max_len))
}

/// [`best_replica`] by computing every length's weakest window. The
/// bottleneck after a placement is the least of the layers before the window,
/// after it (from prefix and suffix minima) and inside it with the span's
/// share added: the same values as adding and scanning, in linear time per
/// length.
fn best_replica_scan(plan: &Plan, node: &NodeCapacity, max_len: usize) -> (usize, usize) {
    let t = &plan.layer_throughput;
    let n = t.len();
    // prefix[i]: least of t[..i]; suffix[i]: least of t[i..].
    let mut prefix = vec![f64::INFINITY; n + 1];
    let mut suffix = vec![f64::INFINITY; n + 1];
    for i in 0..n {
        prefix[i + 1] = lesser(prefix[i], t[i]);
        suffix[n - 1 - i] = lesser(suffix[n - i], t[n - 1 - i]);
    }
    let starts = weakest_windows(t, max_len);
    let mut best = (f64::NEG_INFINITY, max_len, starts[max_len - 1]);
    for len in (1..=max_len).rev() {
        let start = starts[len - 1];
        let add = node.layer_throughput / len as f64;
        let inside = t[start..start + len]
            .iter()
            .map(|x| *x + add)
            .fold(f64::INFINITY, lesser);
        let bottleneck = lesser(lesser(prefix[start], suffix[start + len]), inside);
        if bottleneck > best.0 + 1e-12 {
            best = (bottleneck, len, start);
        }
    }
    (best.1, best.2)
}

/// One more than the layers [`best_replica_clear`] handles (its scratch
/// lives on the stack).
const CLEAR_LAYERS: usize = 129;

/// The unit roundoff of `f64`: a correctly rounded operation's relative error.
const UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;

/// [`best_replica`] without computing every window, when one layer is
/// clearly the weakest and each length's window is clearly decided; `None`
/// when that cannot be shown (then [`best_replica_scan`] decides), or when
/// the model has `N` layers or more (`N` sizes its scratch).
///
/// [`weakest_windows`] ranks a window by `weakest * 1e9 + sum`, its sum kept
/// as a running sum along the starts. Let `g` be the least layer, at `m`,
/// `P` the layers' total and `E` a bound on how far the running sum and the
/// prefix-sum difference `p[s + len] - p[s]` each stray from the window's
/// true total: both are recursive sums of at most `n` terms whose sizes add
/// up to at most `P + n · max`, so each strays by at most about
/// `n · u · (P + n · max)` (`u` the unit roundoff), and `E` below is four
/// times that or more. When every other layer is at least `g + δ` with
/// `δ · 1e9` above `2P + 4E` and the products' rounding, a window without `m`
/// ranks above every window with it: those hold `g` and sums of at most
/// `P + E`, the others a weakest layer of at least `g + δ` and sums of at
/// least `-E`. Among the windows holding `m` (their weakest is `g` exactly)
/// ranks follow the sums; when the least prefix-sum difference is below every
/// other by more than `4E` and the rounding of adding `g · 1e9`, the running
/// sums rank that window first too, alone, whatever their rounding, so it is
/// [`weakest_windows`]' for the length. Its weakest layer is `g`, so with the
/// span's share added it is `g + add` (rounding is monotonic); the rest is
/// [`best_replica_scan`]'s arithmetic.
fn best_replica_clear<const N: usize>(
    t: &[f64],
    throughput: f64,
    max_len: usize,
) -> Option<(usize, usize)> {
    let n = t.len();
    if n >= N || max_len == 0 || max_len > n || !throughput.is_finite() {
        return None;
    }
    // p[i]: the sum of t[..i]. outside[i]: the least of t[..i] up to the
    // least layer and of t[i..] after it (best_replica_scan's prefix and
    // suffix minima, where a window holding that layer reads them). Running
    // values stay in registers, and choices are selects, not branches.
    let mut p = [0.0; N];
    let mut outside = [f64::INFINITY; N];
    // The least layer, where it is, the next least, and the most.
    let (mut g, mut m, mut next, mut max) = (f64::INFINITY, 0, f64::INFINITY, 0.0);
    let (mut sum, mut least) = (0.0, f64::INFINITY);
    for (i, &x) in t.iter().enumerate() {
        // Positive and far from overflow (keys multiply by 1e9), else the scan.
        if x.is_nan() || x <= 0.0 || x >= 1e280 {
            return None;
        }
        let lower = x < g;
        next = lesser(next, if lower { g } else { x });
        m = if lower { i } else { m };
        g = lesser(g, x);
        max = if x > max { x } else { max };
        sum += x;
        p[i + 1] = sum;
        least = lesser(least, x);
        outside[i + 1] = least;
    }
    least = f64::INFINITY;
    outside[n] = least;
    for i in (m + 1..n).rev() {
        least = lesser(least, t[i]);
        outside[i] = least;
    }
    let (total, layers) = (sum, n as f64 + 1.0);
    let e = 8.0 * layers * UNIT_ROUNDOFF * (total + layers * max);
    let delta = 2e-9 * (1.01 * total + 2.0 * e) + 10.0 * UNIT_ROUNDOFF * g;
    // Every other layer at least g + δ.
    if next < g + 2.0 * delta {
        return None;
    }
    let margin = 5.0 * e + 3.0 * UNIT_ROUNDOFF * (g * 1e9 + total);
    let mut best = (f64::NEG_INFINITY, max_len, 0);
    for len in (1..=max_len).rev() {
        let add = throughput / len as f64;
        // A window of this length holding m leaves at most its share added
        // to g, and at most the least layer `len` or more away from m: when
        // that is no better than the best so far, the length cannot win.
        let far = lesser(
            outside[(m + 1).saturating_sub(len)],
            outside[(m + len).min(n)],
        );
        if lesser(far, g + add) <= best.0 + 1e-12 {
            continue;
        }
        // The windows holding m: the least sum, and the next least.
        let (mut least, mut next, mut start) = (f64::INFINITY, f64::INFINITY, 0);
        for s in m.saturating_sub(len - 1)..=m.min(n - len) {
            let sum = p[s + len] - p[s];
            let lower = sum < least;
            next = lesser(next, if lower { least } else { sum });
            start = if lower { s } else { start };
            least = lesser(least, sum);
        }
        // (One candidate leaves `next` infinite: clear.)
        if next - least <= margin {
            return None;
        }
        let bottleneck = lesser(lesser(outside[start], outside[start + len]), g + add);
        if bottleneck > best.0 + 1e-12 {
            best = (bottleneck, len, start);
        }
    }
    Some((best.1, best.2))
}

/// The lesser of `a` and `b` where `a` is not NaN: [`f64::min`] then, in a
/// single instruction (a NaN `b` is passed over, as [`f64::min`] does; of
/// two zeros either may come back, and no comparison tells them apart).
fn lesser(a: f64, b: f64) -> f64 {
    if b < a { b } else { a }
}

/// [`weakest_window`] for every length from 1 to `max_len` at once (entry
/// `len - 1`), with the same arithmetic in the same order, so the starts are
/// exactly [`weakest_window`]'s: the weakest layer of each window is that of
/// the window one layer shorter at the same start, folded with its last
/// layer, and each length's total is the same running sum. Lengths go two at
/// a time through one pass over the starts, so their running sums are
/// independent chains of additions that the processor overlaps.
fn weakest_windows(layer_throughput: &[f64], max_len: usize) -> Vec<usize> {
    let t = layer_throughput;
    let n = t.len();
    let lens = max_len.min(n);
    // mins[s]: the weakest layer of the window at s of the longest length done.
    let mut mins = vec![f64::INFINITY; n];
    // The total of the first window of each length, as `Iterator::sum` folds it.
    let mut first: f64 = t[..0].iter().sum();
    let mut starts = Vec::with_capacity(lens);
    let mut len = 1;
    while len <= lens {
        let first_a = first + t[len - 1];
        if len == lens {
            // One length left, alone.
            let (mut sum, mut best) = (first_a, (f64::INFINITY, 0));
            for s in 0..=n - len {
                let weakest = lesser(mins[s], t[s + len - 1]);
                if s > 0 {
                    sum += t[s + len - 1] - t[s - 1];
                }
                let key = weakest * 1e9 + sum;
                if key < best.0 {
                    best = (key, s);
                }
            }
            starts.push(best.1);
            break;
        }
        // Lengths `len` (a) and `len + 1` (b) side by side.
        let first_b = first_a + t[len];
        let (mut sum_a, mut sum_b) = (first_a, first_b);
        let (mut best_a, mut best_b) = ((f64::INFINITY, 0), (f64::INFINITY, 0));
        for s in 0..=n - len {
            let weakest_a = lesser(mins[s], t[s + len - 1]);
            if s > 0 {
                sum_a += t[s + len - 1] - t[s - 1];
            }
            let key_a = weakest_a * 1e9 + sum_a;
            if key_a < best_a.0 {
                best_a = (key_a, s);
            }
            if s + len < n {
                let weakest_b = lesser(weakest_a, t[s + len]);
                mins[s] = weakest_b;
                if s > 0 {
                    sum_b += t[s + len] - t[s - 1];
                }
                let key_b = weakest_b * 1e9 + sum_b;
                if key_b < best_b.0 {
                    best_b = (key_b, s);
                }
            }
        }
        starts.push(best_a.1);
        starts.push(best_b.1);
        first = first_b;
        len += 2;
    }
    starts
}

/// Adjusts `current` to the nodes now present: drops departed nodes and places
/// new ones where the plan is weakest; if that leaves a gap, or a fresh plan's
/// bottleneck is better by more than `threshold` (e.g. 0.2 for 20%), returns
/// the fresh plan instead (moving spans costs loading weights, so small gains
/// are not worth it).
pub fn rebalance(
    model: &ModelShape,
    current: &Plan,
    nodes: &[NodeCapacity],
    threshold: f64,
) -> Result<Plan, PlanError> {
    let mut kept = Plan {
        assignments: Vec::new(),
        layer_throughput: vec![0.0; model.n_layers as usize],
    };
    for a in &current.assignments {
        if nodes.iter().any(|n| n.node == a.node) {
            for t in &mut kept.layer_throughput[a.layers.start as usize..a.layers.end as usize] {
                *t += a.throughput;
            }
            kept.assignments.push(a.clone());
        }
    }
    let mut newcomers: Vec<&NodeCapacity> = nodes
        .iter()
        .filter(|n| {
            !kept.assignments.iter().any(|a| a.node == n.node)
                && max_span(model, n) > 0
                && n.layer_throughput > 0.0
        })
        .collect();
    newcomers.sort_by(|a, b| {
        b.layer_throughput
            .total_cmp(&a.layer_throughput)
            .then(a.node.cmp(&b.node))
    });
    for node in newcomers {
        place(&mut kept, model, node);
    }
    let fresh = plan(model, nodes)?;
    if !kept.covers_all() || fresh.bottleneck() > kept.bottleneck() * (1.0 + threshold) {
        return Ok(fresh);
    }
    Ok(kept)
}

/// The plan that `assignments` (what nodes serve now, e.g. from their adverts) make.
#[must_use]
pub fn current(model: &ModelShape, assignments: &[Assignment]) -> Plan {
    let n = model.n_layers as usize;
    let mut plan = Plan {
        assignments: Vec::new(),
        layer_throughput: vec![0.0; n],
    };
    for a in assignments {
        let (start, end) = (a.layers.start as usize, (a.layers.end as usize).min(n));
        if start >= end {
            continue;
        }
        for t in &mut plan.layer_throughput[start..end] {
            *t += a.throughput;
        }
        plan.assignments.push(a.clone());
    }
    plan
}

/// The span a node joining should load, given what `others` serve: the
/// weakest window it can hold (Petals' choice for a new server). `None` when
/// it cannot hold a single layer.
#[must_use]
pub fn choose_span(
    model: &ModelShape,
    others: &[Assignment],
    me: &NodeCapacity,
) -> Option<LayerRange> {
    if model.n_layers == 0 || max_span(model, me) == 0 || me.layer_throughput <= 0.0 {
        return None;
    }
    let others: Vec<Assignment> = others
        .iter()
        .filter(|a| a.node != me.node)
        .cloned()
        .collect();
    choose_span_in(model, &current(model, &others), me)
}

/// [`choose_span`] against a plan kept up to date by the caller (what
/// everyone else serves), in time proportional to the layers, not the nodes.
#[must_use]
pub fn choose_span_in(model: &ModelShape, others: &Plan, me: &NodeCapacity) -> Option<LayerRange> {
    if model.n_layers == 0
        || max_span(model, me) == 0
        || me.layer_throughput <= 0.0
        || others.layer_throughput.len() != model.n_layers as usize
    {
        return None;
    }
    // Where `place` would put it, without copying the plan to place it.
    let (len, start) = span_in(others, model, me);
    Some(LayerRange {
        start: start as u32,
        end: (start + len) as u32,
    })
}

/// Whether `me` should move to another span, and where: only while some layer
/// has no server, only if every layer `me` serves now stays served without
/// it, only if the move serves layers nobody serves, and only if no node with
/// a lower id could move instead (every node sees the same adverts, so one
/// node moves per round and replicas never all leave a span at once).
#[must_use]
pub fn should_move(
    model: &ModelShape,
    all: &[Assignment],
    me: &NodeCapacity,
) -> Option<LayerRange> {
    let now = current(model, all);
    let gaps = |p: &Plan| p.layer_throughput.iter().filter(|t| **t <= 0.0).count();
    if gaps(&now) == 0 {
        return None;
    }
    let without = |node: &NodeId| -> Vec<Assignment> {
        all.iter().filter(|a| a.node != *node).cloned().collect()
    };
    // How many serving assignments cover each layer; a node may leave when
    // every layer it serves keeps a server of its own. One pass over the
    // assignments, then one per node over its own layers: linear, not
    // quadratic, in the swarm's size.
    let n = model.n_layers as usize;
    let clip = |a: &Assignment| (a.layers.start as usize).min(n)..(a.layers.end as usize).min(n);
    let mut cover = vec![0u32; n];
    let mut by_node: BTreeMap<NodeId, Vec<&Assignment>> = BTreeMap::new();
    for a in all {
        if a.throughput > 0.0 {
            for c in &mut cover[clip(a)] {
                *c += 1;
            }
        }
        by_node.entry(a.node).or_default().push(a);
    }
    let movable = |mine: &[&Assignment]| {
        let mut own: BTreeMap<usize, u32> = BTreeMap::new();
        for a in mine.iter().filter(|a| a.throughput > 0.0) {
            for l in clip(a) {
                *own.entry(l).or_default() += 1;
            }
        }
        mine.iter()
            .flat_map(|a| clip(a))
            .all(|l| cover[l] > own.get(&l).copied().unwrap_or(0))
    };
    if by_node
        .iter()
        .find(|(_, mine)| movable(mine))
        .map(|(n, _)| n)
        != Some(&me.node)
    {
        return None;
    }
    let span = choose_span(model, &without(&me.node), me)?;
    let mut after = without(&me.node);
    after.push(Assignment {
        node: me.node,
        layers: span,
        throughput: me.layer_throughput / f64::from(span.len().max(1)),
    });
    (gaps(&current(model, &after)) < gaps(&now)).then_some(span)
}

#[cfg(test)]
mod fast_paths {
    use super::*;
    use proptest::prelude::*;

    /// The plain definition the fast path must equal.
    fn best_replica_len_plain(plan: &Plan, node: &NodeCapacity, max_len: usize) -> usize {
        let mut best = (f64::NEG_INFINITY, max_len);
        for len in (1..=max_len).rev() {
            let start = weakest_window(&plan.layer_throughput, len);
            let mut t = plan.layer_throughput.clone();
            for x in &mut t[start..start + len] {
                *x += node.layer_throughput / len as f64;
            }
            let bottleneck = t.iter().copied().fold(f64::INFINITY, f64::min);
            if bottleneck > best.0 + 1e-12 {
                best = (bottleneck, len);
            }
        }
        best.1
    }

    proptest! {
        #[test]
        fn the_replica_length_equals_its_plain_definition(
            // Few distinct values, so ties and equal minima are common; now
            // and then a NaN or a negative zero (from a bad advert).
            t in proptest::collection::vec((0u32..8).prop_map(|v| match v {
                6 => f64::NAN,
                7 => -0.0,
                v => f64::from(v) * 1.5,
            }), 1..40),
            len in 1usize..40,
            throughput in 0.1f64..50.0,
        ) {
            let len = len.min(t.len());
            let starts = weakest_windows(&t, len);
            for (k, start) in starts.iter().enumerate() {
                prop_assert_eq!(*start, weakest_window(&t, k + 1));
            }
            let plan = Plan {
                assignments: Vec::new(),
                layer_throughput: t.clone(),
            };
            let node = NodeCapacity {
                node: commons_protocol::NodeId([1; 32]),
                layer_throughput: throughput,
                memory_bytes: 1,
            };
            let (best_len, start) = best_replica(&plan, &node, len);
            prop_assert_eq!(best_len, best_replica_len_plain(&plan, &node, len));
            prop_assert_eq!(start, weakest_window(&t, best_len));
        }

        #[test]
        fn the_clear_replica_equals_its_plain_definition(
            // Layers as in a large swarm: a common base, each layer some
            // node shares above it (few distinct ones, so sums tie), nudged by
            // steps near the rounding of the ranking keys and by a few units
            // in the last place, at magnitudes from tiny to huge.
            base in prop::sample::select(vec![1e-3, 1.0, 4e5, 4e6, 1e12, 1e200]),
            share in 1e-6f64..1e-2,
            layers in proptest::collection::vec((0u32..6, 0u32..8, 0u64..3), 1..40),
            len in 1usize..40,
            throughput in 0.1f64..5e4,
        ) {
            let t: Vec<f64> = layers
                .iter()
                .map(|&(k, j, ulps)| {
                    let x = base * (1.0 + f64::from(k) * share + f64::from(j) * 1e-7);
                    f64::from_bits(x.to_bits() + ulps)
                })
                .collect();
            let len = len.min(t.len());
            let plan = Plan {
                assignments: Vec::new(),
                layer_throughput: t.clone(),
            };
            let node = NodeCapacity {
                node: commons_protocol::NodeId([1; 32]),
                layer_throughput: throughput * base,
                memory_bytes: 1,
            };
            let scan = best_replica_scan(&plan, &node, len);
            if let Some(clear) = best_replica_clear::<CLEAR_LAYERS>(&t, node.layer_throughput, len) {
                prop_assert_eq!(clear, scan);
            }
            let (best_len, start) = best_replica(&plan, &node, len);
            prop_assert_eq!(best_len, best_replica_len_plain(&plan, &node, len));
            prop_assert_eq!(start, weakest_window(&t, best_len));
        }
    }

    #[test]
    fn a_swarm_like_plan_takes_the_clear_path() {
        // Thirty layers of a large swarm: distinct throughputs around 4e5.
        let t: Vec<f64> = (0..30u32)
            .map(|i| 4e5 + f64::from(i * 7919 % 31) * 97.5)
            .collect();
        for len in 1..=16 {
            let clear = best_replica_clear::<32>(&t, 1200.0, len);
            assert!(clear.is_some(), "length {len} fell back to the scan");
        }
    }
}
