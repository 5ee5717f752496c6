//! The node's state as the control API shows it: `GET /v1/status` serialises
//! [`Status`], `GET /metrics` turns its counters into Prometheus text.

use std::collections::BTreeMap;

use commons_protocol::messages::ErrorCode;
use serde::Serialize;

use crate::capacity::Capacity;

/// The node's state, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// This node's PeerId.
    pub peer_id: String,
    /// Full listen addresses, with `/p2p/<PeerId>`.
    pub listen_addrs: Vec<String>,
    /// Peers connected now.
    pub connected_peers: usize,
    /// Peers known by their adverts.
    pub peers: Vec<PeerStatus>,
    /// Work units running (none until jobs are served).
    pub work_in_progress: usize,
    /// Counters.
    pub counters: Counters,
    /// This node's own advert.
    pub capacity: Capacity,
    /// This node's bandwidth estimate from model blocks it fetched, bytes per second (0: unknown).
    pub bandwidth_bytes_per_sec: u64,
    /// The coalitions it serves (none: open work only).
    pub coalitions: Vec<CoalitionStatus>,
    /// Spot checks of a coordinator (absent on other nodes).
    pub verification: Option<VerificationStatus>,
    /// A coordinator's streamed chains (absent on other nodes).
    pub streaming: Option<StreamingStatus>,
}

/// What a coordinator's streamed chains did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StreamingStatus {
    /// Steps sent to a whole chain at once.
    pub steps: u64,
    /// Results whose input was not the result of the hop before: the job
    /// stopped streaming.
    pub mismatches: u64,
    /// Steps in flight dropped (a failure, a failover, a rollback, the end).
    pub dropped: u64,
}

/// What a coordinator's spot checks did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerificationStatus {
    /// Counts by kind: `sampled`, `check_units`, `compared`, `mismatches`,
    /// `decided`, `undecided`, `exclusions`, `unverifiable`, `rollbacks`.
    #[serde(flatten)]
    pub counts: BTreeMap<String, u64>,
    /// Nodes excluded after losing a dispute.
    pub excluded: Vec<ExcludedStatus>,
    /// Each node's record.
    pub records: Vec<RecordStatus>,
}

/// A node excluded from some work.
#[derive(Debug, Clone, Serialize)]
pub struct ExcludedStatus {
    /// Its PeerId.
    pub peer_id: String,
    /// The coalition whose work it may not do (none: open work).
    pub coalition: Option<String>,
}

/// A node's verification record.
#[derive(Debug, Clone, Serialize)]
pub struct RecordStatus {
    /// Its PeerId.
    pub peer_id: String,
    /// Consecutive results that agreed with a re-execution.
    pub valid_streak: u32,
    /// Results that agreed, in all.
    pub valid: u64,
    /// Disputes it lost.
    pub invalid: u64,
    /// The probability that its next result is checked.
    pub check_probability: f64,
}

/// A coalition a node serves.
#[derive(Debug, Clone, Serialize)]
pub struct CoalitionStatus {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The charter's version.
    pub version: u64,
    /// Members.
    pub members: usize,
    /// Served, but its charter has not reached this node yet.
    pub pending: bool,
}

/// A peer in the status.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Its PeerId.
    pub peer_id: String,
    /// Logical cores.
    pub cpu_cores: u32,
    /// Processor model.
    pub cpu_model: String,
    /// Memory.
    pub ram_bytes: u64,
    /// Matmul MFLOP/s.
    pub matmul_mflops: u64,
    /// Its bandwidth estimate, bytes per second (0: unknown).
    pub bandwidth_bytes_per_sec: u64,
    /// Accelerators.
    pub gpus: usize,
    /// Software version.
    pub software: String,
    /// Layer ranges it serves, as `MODEL LAYERS`.
    pub models: Vec<String>,
    /// Coalitions it says it serves, by id (none: open work only).
    pub coalitions: Vec<String>,
    /// Milliseconds since its latest advert arrived.
    pub last_seen_ms: u64,
    /// Milliseconds until that advert expires.
    pub expires_in_ms: u64,
}

/// Counters of the network.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    /// Adverts this node published.
    pub adverts_published: u64,
    /// Adverts and leave notices accepted.
    pub adverts_accepted: u64,
    /// Messages rejected (forged, expired, stale…).
    pub adverts_rejected: u64,
    /// Connections established since start.
    pub connections_established: u64,
    /// Size of the latest advert envelope this node published.
    pub advert_bytes: u64,
    /// Work units answered with a signed result.
    pub units_served: u64,
    /// Outputs sent straight to the node running the next hop.
    pub outputs_forwarded: u64,
    /// Inputs received from the node running the hop before.
    pub inputs_forwarded: u64,
    /// Peers disconnected for an oversized, malformed or trickled request.
    pub peers_dropped: u64,
    /// Charters taken (new coalitions and newer versions).
    pub charters_accepted: u64,
    /// Charters refused: not sealed by an admin, short of the threshold,
    /// claiming another coalition's id, or changing the threshold.
    pub charters_rejected: u64,
    /// Work units refused, by error code name (`unauthorized`, `overloaded`…).
    pub units_refused: BTreeMap<String, u64>,
    /// Job requests a coordinator refused, by error code name.
    pub jobs_refused: BTreeMap<String, u64>,
    /// Answers to units a coordinator did not take as results, by kind
    /// (`forged_receipt`, `wrong_unit`…).
    pub results_rejected: BTreeMap<String, u64>,
}

impl Counters {
    /// Counts the answer to a unit: a result, or a refusal with `code`.
    pub fn count_unit(&mut self, refused: Option<ErrorCode>) {
        match refused {
            None => self.units_served += 1,
            Some(code) => {
                *self
                    .units_refused
                    .entry(code.name().to_owned())
                    .or_default() += 1
            }
        }
    }
}
