//! The node's libp2p swarm: one composed behaviour and the event loop that
//! owns it.
//!
//! Behaviours, polled in this order: connection limits; identify
//! (`/ipfs/id/1.0.0`, agent `commons/<version>`); ping (`/ipfs/ping/1.0.0`);
//! Kademlia on `/commons/kad/1.0.0` in server mode; gossipsub (signed
//! messages, strict validation) carrying signed capacity adverts; mDNS when
//! enabled; AutoNAT, the relay client and DCUtR for nodes behind NAT; the
//! work protocol. Transports: TCP (noise, yamux), QUIC v1, and relayed
//! circuits.

pub mod bandwidth;
pub mod blobs;
mod charters;
mod coordinating;
mod forward;
mod peers;
pub mod ping;
mod status;
mod units;
pub mod work;

pub use charters::{
    CHARTER_TOPIC, CoalitionAnswer, CoalitionCommand, CoalitionRequest, MAX_GOSSIP_BYTES,
};
pub use forward::FORWARD_PROTOCOL;
pub use peers::{AdvertError, PeerEntry, PeerTable, Update};
pub use status::{
    CoalitionStatus, Counters, ExcludedStatus, PeerStatus, RecordStatus, Status, StreamingStatus,
    VerificationStatus,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::{CapacityAdvert, Leave};
use commons_protocol::{BoundedVec, Identity, NodeId, UnixMillis};
use futures::StreamExt as _;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, gossipsub, identify, kad, mdns,
    noise, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};

use std::collections::HashMap;

use crate::capacity::Capacity;
use crate::coordinate::{Coordinating, KnownModel, Pending};
use crate::executor::serve;
use crate::jobstore::JobStore;
use commons_coordinator::quota::RateLimit;

/// Kademlia protocol id of the Commons DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/commons/kad/1.0.0");
/// Gossip topic of capacity adverts and leave notices.
pub const ADVERT_TOPIC: &str = "/commons/adverts/1.0.0";

/// The composed behaviour, limits first.
#[allow(missing_debug_implementations)] // several sub-behaviours have no Debug
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    autonat: libp2p::autonat::Behaviour,
    relay_client: libp2p::relay::client::Behaviour,
    dcutr: libp2p::dcutr::Behaviour,
    work: libp2p::request_response::Behaviour<work::WorkCodec>,
    streams: libp2p_stream::Behaviour,
    jobs: libp2p::request_response::Behaviour<work::JobCodec>,
    blobs: libp2p::request_response::Behaviour<blobs::BlobCodec>,
}

/// Settings of the network.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network.
    pub mdns: bool,
    /// How long an advert is valid; it is republished every third of it.
    pub advert_ttl: Duration,
}

/// Whom a node works for, and how much each may ask of it.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// The charters known and the coalitions served (none: open work
    /// only), for units and jobs alike; both change while the node runs.
    pub charters: crate::coalition::Charters,
    /// Work units this node runs per issuer (`None`: no limit).
    pub units_per_issuer: Option<RateLimit>,
    /// Jobs a coordinating node accepts per submitter (`None`: no limit).
    pub jobs_per_member: Option<RateLimit>,
}

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// Builds the swarm for `identity`.
pub fn build_swarm(
    identity: &Identity,
    config: &NetworkConfig,
) -> anyhow::Result<Swarm<Behaviour>> {
    let keypair = crate::identity::libp2p_keypair(identity);
    let mdns_on = config.mdns;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established_per_peer(Some(4))
                .with_max_established(Some(512))
                .with_max_pending_incoming(Some(64));
            let identify = identify::Behaviour::new(
                identify::Config::new("/commons/1.0.0".into(), key.public())
                    .with_agent_version(format!("commons/{}", env!("CARGO_PKG_VERSION"))),
            );
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            // Without a confirmed external address (never on loopback) Kademlia
            // would stay a client; every node serves the DHT.
            kad.set_mode(Some(kad::Mode::Server));
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(700))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .build()
                .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )
            .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
            let mdns = if mdns_on {
                // Ask every 15 s rather than libp2p's default 5 minutes: a LAN
                // member joining later is found within seconds, for a few
                // bytes of multicast.
                let config = mdns::Config {
                    query_interval: Duration::from_secs(15),
                    ..mdns::Config::default()
                };
                Some(mdns::tokio::Behaviour::new(config, peer_id)?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify,
                ping: ping::Behaviour::new(ping::Config::default()),
                kad,
                gossipsub,
                mdns: Toggle::from(mdns),
                // Behind a NAT: AutoNAT finds out whether we are reachable, the
                // relay client lets others reach us through a relay, DCUtR then
                // upgrades relayed connections to direct ones (hole punching).
                autonat: libp2p::autonat::Behaviour::new(
                    peer_id,
                    libp2p::autonat::Config::default(),
                ),
                relay_client,
                dcutr: libp2p::dcutr::Behaviour::new(peer_id),
                work: libp2p::request_response::Behaviour::new(
                    [(
                        work::WORK_PROTOCOL,
                        libp2p::request_response::ProtocolSupport::Full,
                    )],
                    libp2p::request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(120))
                        .with_max_concurrent_streams(16),
                ),
                streams: libp2p_stream::Behaviour::new(),
                // Long polls wait up to 20 s for news.
                jobs: libp2p::request_response::Behaviour::new(
                    [(
                        work::JOB_PROTOCOL,
                        libp2p::request_response::ProtocolSupport::Full,
                    )],
                    libp2p::request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(60))
                        .with_max_concurrent_streams(256),
                ),
                blobs: libp2p::request_response::Behaviour::new(
                    [(
                        blobs::BLOB_PROTOCOL,
                        libp2p::request_response::ProtocolSupport::Full,
                    )],
                    libp2p::request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(60))
                        .with_max_concurrent_streams(16),
                ),
            })
        })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(300))
                // Send a request with its protocol proposal instead of waiting
                // for the answer to the proposal first: one round trip fewer
                // per work unit.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// A request to the event loop.
#[derive(Debug)]
pub enum Command {
    /// A snapshot of the node's state.
    Status(oneshot::Sender<Status>),
    /// A signed job request from this process; the answer is a signed envelope.
    Job {
        /// The `JobRequest` envelope.
        request: Vec<u8>,
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<u8>>,
    },
    /// Sends a signed `WorkUnit` envelope to `node` over `/commons/work/1.0.0`.
    SendUnit {
        /// Where to.
        node: NodeId,
        /// The envelope.
        bytes: Vec<u8>,
        /// The answer (a `WorkResult` or `ErrorReply` envelope), or why none came.
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// Serves the file at `path` over `/commons/blob/1.0.0` as `id` (its
    /// blake3), to whoever asks by id; it is not listed in adverts.
    ShareFile {
        /// The file's blake3.
        id: commons_protocol::ModelId,
        /// Where it is.
        path: std::path::PathBuf,
    },
    /// Stops serving a file shared with [`Command::ShareFile`].
    UnshareFile(commons_protocol::ModelId),
    /// Connected peers whose adverts say they run gradient units for this
    /// coalition (`None`: open work, served by nodes that serve no
    /// coalition), with their determinism classes.
    Trainers {
        /// The coalition.
        coalition: Option<commons_protocol::CoalitionId>,
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<(NodeId, commons_protocol::messages::DeterminismClass)>>,
    },
    /// Takes a charter, or changes the coalitions served.
    Coalition(CoalitionCommand),
}

type Channel = libp2p::request_response::ResponseChannel<Vec<u8>>;

/// Where the answer to a job request goes: a peer, or a caller in this process
/// (the OpenAI-compatible API).
#[derive(Debug)]
pub enum Reply {
    /// A peer's request over `/commons/job/1.0.0`.
    Remote(Channel),
    /// A request from this process.
    Local(oneshot::Sender<Vec<u8>>),
}

/// Owns the swarm; runs until `shutdown` resolves, then announces its leave.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    identity: Arc<Identity>,
    capacity: Capacity,
    config: NetworkConfig,
    peers: PeerTable,
    commands: mpsc::Receiver<Command>,
    topic: gossipsub::IdentTopic,
    charter_topic: gossipsub::IdentTopic,
    charters: crate::coalition::Charters,
    /// A peer subscribed to charters: the next sweep publishes ours.
    charters_due: bool,
    sequence: u64,
    listen_addrs: Vec<Multiaddr>,
    counters: Counters,
    last_publish: Option<std::time::Instant>,
    publish_pending: bool,
    served: Option<crate::executor::serve::Served>,
    admission: serve::Admission,
    /// Answers to units, from the tasks that ran them.
    answers_tx: mpsc::Sender<(units::UnitReply, serve::UnitAnswer)>,
    answers_rx: mpsc::Receiver<(units::UnitReply, serve::UnitAnswer)>,
    /// Units waiting for forwarded inputs, the streams they come by, and
    /// the outputs this node sends on.
    plane: forward::Plane,
    in_progress: Arc<AtomicU64>,
    coordinating: Option<Coordinating<Reply>>,
    units_out: HashMap<libp2p::request_response::OutboundRequestId, (Pending, NodeId)>,
    rtts: HashMap<PeerId, Duration>,
    blob_server: blobs::BlobServer,
    fetching: Option<Fetching>,
    /// Blob requests out: the peer, the block (`None`: the manifest), when,
    /// and the in-memory fetch it serves (`None`: the model file).
    blob_out: HashMap<
        libp2p::request_response::OutboundRequestId,
        (
            PeerId,
            Option<u32>,
            std::time::Instant,
            Option<commons_protocol::ModelId>,
        ),
    >,
    bandwidth: bandwidth::Bandwidth,
    tasks_tx: mpsc::Sender<TaskDone>,
    tasks_rx: mpsc::Receiver<TaskDone>,
    auto: Option<AutoPlace>,
    trainer: Option<crate::train_exec::Trainer>,
    units_sent: HashMap<
        libp2p::request_response::OutboundRequestId,
        oneshot::Sender<Result<Vec<u8>, String>>,
    >,
    blob_fetches: blobs::MemoryFetches,
    fetch_tx: mpsc::Sender<blobs::FetchRequest>,
    fetch_rx: mpsc::Receiver<blobs::FetchRequest>,
    /// Commits the coordinator's job database off the event loop.
    committer: Option<crate::jobstore::Committer>,
    committed_rx: Option<mpsc::Receiver<crate::jobstore::Committed>>,
}

/// The next commit outcome, or never without a committer.
async fn next_commit(
    rx: &mut Option<mpsc::Receiver<crate::jobstore::Committed>>,
) -> Option<crate::jobstore::Committed> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A node that chooses its own layers from what the swarm serves
/// (`--layers auto`), and moves when a span is left without a server.
#[derive(Debug)]
pub struct AutoPlace {
    path: std::path::PathBuf,
    model: commons_protocol::ModelId,
    shape: commons_coordinator::placement::ModelShape,
    max_layers: u32,
    started: std::time::Instant,
    last_check: std::time::Instant,
    loading: bool,
    /// How long to listen to adverts before choosing.
    pub settle: Duration,
    /// How often to look for a lost span to move into.
    pub interval: Duration,
}

impl AutoPlace {
    /// Reads the model's shape from `path` (blocking).
    pub fn for_file(
        path: &std::path::Path,
        max_layers: Option<u32>,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let file = crate::executor::ModelFile::open(path)?;
        let n_layers = file.config().n_layer as u32;
        let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        let now = std::time::Instant::now();
        Ok(Self {
            path: path.to_owned(),
            model: crate::executor::model_id(path)?,
            shape: commons_coordinator::placement::ModelShape {
                n_layers,
                layer_bytes: bytes / u64::from(n_layers.max(1)),
            },
            max_layers: max_layers.unwrap_or(n_layers).min(n_layers),
            started: now,
            last_check: now,
            loading: false,
            settle: Duration::from_secs(3),
            interval,
        })
    }
}
/// A model file this node lacks and fetches from its peers before serving.
#[derive(Debug)]
pub struct FetchPlan {
    /// The file.
    pub model: commons_protocol::ModelId,
    /// Where the verified file goes.
    pub dest: std::path::PathBuf,
    /// The layers to serve once it is here (`None`: all; `auto`: chosen).
    pub layers: Option<String>,
    /// With `auto`: the most layers to hold.
    pub max_layers: Option<u32>,
    /// With `auto`: how often to look for a lost span.
    pub rebalance: Duration,
}

struct Fetching {
    plan: FetchPlan,
    fetch: blobs::Fetch,
    part: std::path::PathBuf,
    file: Option<std::fs::File>,
    resume_checked: bool,
    bar: indicatif::ProgressBar,
    started: std::time::Instant,
}

/// Work finished off the event loop.
enum TaskDone {
    /// The answer to a peer's blob request.
    BlobAnswer(libp2p::request_response::ResponseChannel<Vec<u8>>, Vec<u8>),
    /// Blocks of a partial download found good on disk.
    Resumed(Vec<u32>),
    /// A fetched model ready to be placed automatically.
    AutoReady(anyhow::Result<AutoPlace>),
    /// A model range loaded (or not).
    Loaded(
        anyhow::Result<crate::executor::serve::Served>,
        std::path::PathBuf,
    ),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer_id", &self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
}

/// Blocks of the partial file at `part` that match `manifest`.
fn verified_blocks(
    part: &std::path::Path,
    model: &commons_protocol::ModelId,
    manifest: &commons_protocol::blob::Manifest,
) -> Vec<u32> {
    let Ok(meta) = std::fs::metadata(part) else {
        return Vec::new();
    };
    (0..manifest.block_count() as u32)
        .filter(|&i| {
            let (offset, len) = commons_protocol::blob::block_span(manifest.len, i);
            offset + len <= meta.len()
                && blobs::read_block(part, manifest.len, i)
                    .is_ok_and(|data| manifest.verify_block(model, i, &data).is_ok())
        })
        .collect()
}

fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    NodeId::from_peer_id_bytes(&peer.to_bytes()).ok()
}

impl EventLoop {
    /// Starts listening and dialing; the loop itself runs in [`EventLoop::run`].
    pub fn new(
        identity: Arc<Identity>,
        capacity: Capacity,
        config: NetworkConfig,
        commands: mpsc::Receiver<Command>,
        served: Option<crate::executor::serve::Served>,
        coordinating: Option<(Vec<KnownModel>, Option<JobStore>)>,
    ) -> anyhow::Result<Self> {
        let mut swarm = build_swarm(&identity, &config)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let (answers_tx, answers_rx) = mpsc::channel(256);
        let in_progress = Arc::new(AtomicU64::new(0));
        let plane = forward::Plane::new(
            identity.clone(),
            swarm.behaviour().streams.new_control(),
            answers_tx.clone(),
            in_progress.clone(),
        );
        plane
            .listen()
            .map_err(|e| anyhow::anyhow!("cannot take forward streams: {e}"))?;
        let (tasks_tx, tasks_rx) = mpsc::channel(64);
        let (fetch_tx, fetch_rx) = mpsc::channel(64);
        let coordinating = coordinating
            .map(|(models, store)| Coordinating::new(identity.clone(), models, store, now()));
        let (committer, committed_rx) = match coordinating.as_ref().and_then(Coordinating::store) {
            Some(store) => {
                let (c, rx) = crate::jobstore::Committer::spawn(store)?;
                (Some(c), Some(rx))
            }
            None => (None, None),
        };
        let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| anyhow::anyhow!("cannot subscribe to adverts: {e}"))?;
        let charter_topic = gossipsub::IdentTopic::new(CHARTER_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&charter_topic)
            .map_err(|e| anyhow::anyhow!("cannot subscribe to charters: {e}"))?;
        for addr in &config.bootstrap {
            swarm
                .dial(addr.clone())
                .with_context(|| format!("cannot dial bootstrap peer {addr}"))?;
        }
        Ok(Self {
            swarm,
            identity,
            capacity,
            config,
            peers: PeerTable::new(),
            commands,
            topic,
            charter_topic,
            charters: crate::coalition::Charters::in_memory(),
            charters_due: false,
            sequence: 0,
            listen_addrs: Vec::new(),
            counters: Counters::default(),
            last_publish: None,
            publish_pending: false,
            served,
            // Units may be valid for up to ten minutes; their nonces are kept that long.
            admission: serve::Admission::new(commons_coordinator::trust::Coalitions::open(), None),
            answers_tx,
            answers_rx,
            plane,
            in_progress,
            coordinating,
            units_out: HashMap::new(),
            rtts: HashMap::new(),
            blob_server: blobs::BlobServer::default(),
            fetching: None,
            blob_out: HashMap::new(),
            bandwidth: bandwidth::Bandwidth::default(),
            tasks_tx,
            tasks_rx,
            auto: None,
            trainer: None,
            units_sent: HashMap::new(),
            blob_fetches: blobs::MemoryFetches::default(),
            fetch_tx,
            fetch_rx,
            committer,
            committed_rx,
        })
    }

    fn advert(&mut self) -> CapacityAdvert {
        let now = now();
        // Sequences follow the clock, so a restarted node is never "stale".
        self.sequence = (self.sequence + 1).max(now.0);
        let c = &self.capacity;
        CapacityAdvert {
            node: self.identity.node_id(),
            sequence: self.sequence,
            cpu: c.cpu(),
            ram_bytes: c.ram_bytes,
            gpus: BoundedVec::try_from_vec(crate::capacity::gpus()).unwrap_or_default(),
            matmul_mflops: c.matmul_mflops,
            bandwidth_bytes_per_sec: self.bandwidth.bytes_per_sec(),
            models: BoundedVec::try_from_vec(
                self.served
                    .iter()
                    .map(|s| commons_protocol::messages::HeldModel {
                        model: s.model,
                        layers: s.layers,
                        total_layers: s.total_layers,
                    })
                    // Files shared but not served: an empty layer range says "ask me for the file".
                    .chain(
                        self.blob_server
                            .models()
                            .filter(|m| self.served.as_ref().is_none_or(|s| s.model != *m))
                            .map(|model| commons_protocol::messages::HeldModel {
                                model,
                                layers: commons_protocol::messages::LayerRange { start: 0, end: 0 },
                                total_layers: 0,
                            }),
                    )
                    .collect(),
            )
            .unwrap_or_default(),
            determinism: crate::capacity::determinism_class(),
            coalitions: BoundedVec::try_from_vec(
                self.admission.coalitions().ids().into_iter().collect(),
            )
            .unwrap_or_default(),
            trains: self.trainer.is_some(),
            software: format!("commons/{}", env!("CARGO_PKG_VERSION")),
            issued_at: now,
            expires_at: now.plus_millis(self.config.advert_ttl.as_millis() as u64),
        }
    }

    /// Publishes now unless an advert went out less than a second ago, in
    /// which case the next sweep publishes.
    fn publish_soon(&mut self) {
        if self
            .last_publish
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
        {
            self.publish_advert();
            self.publish_pending = false;
        } else {
            self.publish_pending = true;
        }
    }

    fn publish_advert(&mut self) {
        let advert = self.advert();
        let bytes = match Envelope::seal(&self.identity, &advert) {
            Ok(e) => e.to_bytes(),
            Err(e) => {
                tracing::error!(%e, "cannot seal the advert");
                return;
            }
        };
        self.counters.advert_bytes = bytes.len() as u64;
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)
        {
            Ok(_) => {
                self.counters.adverts_published += 1;
                // Only a publication that went out holds back the next one.
                self.last_publish = Some(std::time::Instant::now());
            }
            Err(e) => tracing::debug!(%e, "advert not published"),
        }
    }

    fn status(&self) -> Status {
        let now = now();
        let peer_id = *self.swarm.local_peer_id();
        Status {
            peer_id: peer_id.to_string(),
            listen_addrs: self
                .listen_addrs
                .iter()
                .map(|a| format!("{a}/p2p/{peer_id}"))
                .collect(),
            connected_peers: self.swarm.connected_peers().count(),
            peers: self
                .peers
                .peers()
                .into_iter()
                .map(|e| PeerStatus {
                    peer_id: e.advert.node.to_string(),
                    cpu_cores: e.advert.cpu.cores,
                    cpu_model: e.advert.cpu.model.clone(),
                    ram_bytes: e.advert.ram_bytes,
                    matmul_mflops: e.advert.matmul_mflops,
                    bandwidth_bytes_per_sec: e.advert.bandwidth_bytes_per_sec,
                    gpus: e.advert.gpus.len(),
                    software: e.advert.software.clone(),
                    models: e
                        .advert
                        .models
                        .iter()
                        .map(|m| format!("{} {}", m.model, m.layers))
                        .collect(),
                    last_seen_ms: now.0.saturating_sub(e.received_at.0),
                    expires_in_ms: e.advert.expires_at.0.saturating_sub(now.0),
                    coalitions: e
                        .advert
                        .coalitions
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                })
                .collect(),
            work_in_progress: self.in_progress.load(Ordering::Relaxed) as usize,
            counters: Counters {
                jobs_refused: self
                    .coordinating
                    .as_ref()
                    .map(Coordinating::refusals)
                    .unwrap_or_default(),
                results_rejected: self
                    .coordinating
                    .as_ref()
                    .map(Coordinating::rejected_results)
                    .unwrap_or_default(),
                outputs_forwarded: self.plane.counts().0,
                inputs_forwarded: self.plane.counts().1,
                ..self.counters.clone()
            },
            capacity: self.capacity.clone(),
            bandwidth_bytes_per_sec: self.bandwidth.bytes_per_sec(),
            coalitions: {
                let served = self.admission.coalitions();
                served
                    .charters()
                    .map(|c| CoalitionStatus {
                        id: c.id.to_string(),
                        name: c.name.clone(),
                        version: c.version,
                        members: c.members.len(),
                        pending: false,
                    })
                    .chain(served.pending().iter().map(|id| CoalitionStatus {
                        id: id.to_string(),
                        name: String::new(),
                        version: 0,
                        members: 0,
                        pending: true,
                    }))
                    .collect()
            },
            verification: self.coordinating.as_ref().map(Coordinating::verification),
            streaming: self.coordinating.as_ref().map(|c| {
                let s = c.stream_stats();
                StreamingStatus {
                    steps: s.waves,
                    mismatches: s.mismatches,
                    dropped: s.dropped,
                }
            }),
        }
    }

    /// Runs until `shutdown` resolves; then publishes a leave notice and returns.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut republish = tokio::time::interval(self.config.advert_ttl / 3);
        let mut republish_charters = tokio::time::interval(self.config.advert_ttl);
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        let mut rebootstrap = tokio::time::interval(Duration::from_secs(30));
        let mut redial = tokio::time::interval(Duration::from_secs(2));
        let mut coordinate = tokio::time::interval(Duration::from_millis(100));
        coordinate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(done) = self.tasks_rx.recv() => self.on_task_done(done),
                Some((reply, answer)) = self.answers_rx.recv() => self.answer_unit(reply, answer),
                _ = coordinate.tick(), if self.coordinating.is_some() => self.coordinate_tick(),
                Some(outcome) = next_commit(&mut self.committed_rx) => self.on_committed(outcome),
                Some(command) = self.commands.recv() => self.on_command(command),
                Some(request) = self.fetch_rx.recv() => self.on_fetch_request(request),
                _ = republish.tick() => self.publish_advert(),
                _ = republish_charters.tick() => self.publish_charters(),
                _ = sweep.tick() => {
                    if self.publish_pending {
                        self.publish_soon();
                    }
                    if std::mem::take(&mut self.charters_due) {
                        self.publish_charters();
                    }
                    for gone in self.peers.expire(now()) {
                        tracing::info!(peer_id = %gone, "peer's advert expired");
                    }
                    self.drive_fetch();
                    self.auto_place();
                    self.plane.expire();
                }
                _ = rebootstrap.tick() => { let _ = self.swarm.behaviour_mut().kad.bootstrap(); }
                _ = redial.tick() => self.redial_bootstrap(),
            }
            self.flush_coordinator();
        }
        self.leave().await;
    }

    /// Shares model files with peers, and fetches one this node lacks.
    pub fn with_files(
        mut self,
        shares: Vec<(commons_protocol::ModelId, std::path::PathBuf)>,
        fetch: Option<FetchPlan>,
    ) -> anyhow::Result<Self> {
        for (model, path) in shares {
            self.blob_server.share(model, path);
            // Hash the blocks now, so the first peer to ask is not kept waiting.
            let server = self.blob_server.clone();
            tokio::spawn(async move {
                if server.prepare(&model).await {
                    println!(
                        "{}",
                        serde_json::json!({ "event": "sharing", "model": model.to_string() })
                    );
                }
            });
        }
        if let Some(plan) = fetch {
            let part = plan.dest.with_extension("part");
            if let Some(dir) = plan.dest.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "fetching {msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("{}…", &plan.model.to_string()[..12]));
            println!(
                "{}",
                serde_json::json!({ "event": "fetching", "model": plan.model.to_string() })
            );
            self.fetching = Some(Fetching {
                fetch: blobs::Fetch::new(plan.model),
                plan,
                part,
                file: None,
                resume_checked: false,
                bar,
                started: std::time::Instant::now(),
            });
        }
        Ok(self)
    }

    /// Steps of a coordinated job's chain in flight at once.
    #[must_use]
    pub fn with_stream_depth(mut self, depth: usize) -> Self {
        if let Some(c) = self.coordinating.as_mut() {
            c.set_stream_depth(depth);
        }
        self
    }

    /// Runs gradient work units on `trainer` (and says so in adverts).
    #[must_use]
    pub fn with_trainer(mut self, trainer: Option<crate::train_exec::Trainer>) -> Self {
        self.trainer = trainer;
        self
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Job { request, reply } => self.on_job_request(request, Reply::Local(reply)),
            Command::SendUnit { node, bytes, reply } => {
                match PeerId::from_bytes(&node.peer_id_bytes()) {
                    Ok(peer) => {
                        let id = self.swarm.behaviour_mut().work.send_request(&peer, bytes);
                        self.units_sent.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("bad peer id: {e}")));
                    }
                }
            }
            Command::Coalition(command) => self.on_coalition_command(command),
            Command::ShareFile { id, path } => self.blob_server.share_unlisted(id, path),
            Command::UnshareFile(id) => self.blob_server.unshare(&id),
            Command::Trainers { coalition, reply } => {
                let trainers = self
                    .peers
                    .peers()
                    .into_iter()
                    .filter(|e| e.advert.trains)
                    .filter(|e| match coalition {
                        Some(c) => e.advert.coalitions.contains(&c),
                        None => e.advert.coalitions.is_empty(),
                    })
                    .filter(|e| {
                        PeerId::from_bytes(&e.advert.node.peer_id_bytes())
                            .is_ok_and(|p| self.swarm.is_connected(&p))
                    })
                    .map(|e| (e.advert.node, e.advert.determinism.clone()))
                    .collect();
                let _ = reply.send(trainers);
            }
        }
    }

    /// Chooses this node's layers by itself (see [`AutoPlace`]).
    pub fn with_auto_placement(mut self, auto: Option<AutoPlace>) -> Self {
        self.auto = auto;
        self
    }

    /// Serves only `trust.coalitions` (as a node and as a coordinator), and
    /// limits each issuer's units and each member's jobs. Without it a node
    /// serves open work, unlimited.
    #[must_use]
    pub fn with_trust(mut self, trust: Trust) -> Self {
        let coalitions = trust.charters.coalitions();
        for c in coalitions.charters() {
            tracing::info!(coalition = %c.id, name = %c.name, version = c.version, "serving coalition");
        }
        for id in coalitions.pending() {
            tracing::info!(coalition = %id, "serving coalition once its charter arrives");
        }
        if let Some(c) = self.coordinating.as_mut() {
            c.set_trust(coalitions.clone(), trust.jobs_per_member);
        }
        self.admission = serve::Admission::new(coalitions, trust.units_per_issuer);
        self.charters = trust.charters;
        self
    }

    /// Places or moves this node's span, when it is time.
    fn auto_place(&mut self) {
        use commons_coordinator::placement::{Assignment, NodeCapacity, choose_span, should_move};
        let me = self.identity.node_id();
        let Some(a) = self.auto.as_mut() else {
            return;
        };
        if a.loading {
            return;
        }
        let per_layer = |mflops: u64, len: u32| mflops as f64 / f64::from(len.max(1));
        let mut all: Vec<Assignment> = self
            .peers
            .peers()
            .into_iter()
            .filter(|e| e.advert.node != me)
            .flat_map(|e| {
                e.advert
                    .models
                    .iter()
                    .filter(|m| m.model == a.model && !m.layers.is_empty())
                    .map(|m| Assignment {
                        node: e.advert.node,
                        layers: m.layers,
                        throughput: per_layer(e.advert.matmul_mflops, m.layers.len()),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let capacity = NodeCapacity {
            node: me,
            layer_throughput: self.capacity.matmul_mflops.max(1) as f64,
            memory_bytes: (self.capacity.ram_bytes / 2)
                .min(u64::from(a.max_layers) * a.shape.layer_bytes.max(1)),
        };
        let span = match &self.served {
            None if a.started.elapsed() >= a.settle => choose_span(&a.shape, &all, &capacity),
            Some(s) if a.last_check.elapsed() >= a.interval => {
                a.last_check = std::time::Instant::now();
                all.push(Assignment {
                    node: me,
                    layers: s.layers,
                    throughput: per_layer(self.capacity.matmul_mflops, s.layers.len()),
                });
                let to = should_move(&a.shape, &all, &capacity);
                if let Some(to) = to {
                    tracing::info!(from = %s.layers, %to, "a span lost its server; moving");
                    println!(
                        "{}",
                        serde_json::json!({ "event": "moving", "from": s.layers.to_string(), "to": to.to_string() })
                    );
                }
                to
            }
            _ => None,
        };
        let Some(span) = span else {
            return;
        };
        a.loading = true;
        let (path, tx) = (a.path.clone(), self.tasks_tx.clone());
        tokio::task::spawn_blocking(move || {
            let served = crate::join::load_served(&path, Some(&span.to_string()));
            let _ = tx.blocking_send(TaskDone::Loaded(served, path));
        });
    }

    /// Asks peers that hold the file being fetched for what is missing.
    fn drive_fetch(&mut self) {
        let Some(f) = self.fetching.as_mut() else {
            return;
        };
        let model = f.fetch.model();
        if f.fetch.manifest().is_some() && !f.resume_checked {
            return;
        }
        let holders: Vec<PeerId> = self
            .peers
            .peers()
            .into_iter()
            .filter(|e| e.advert.models.iter().any(|m| m.model == model))
            .filter_map(|e| PeerId::from_bytes(&e.advert.node.peer_id_bytes()).ok())
            .filter(|p| self.swarm.is_connected(p))
            .collect();
        for ask in f.fetch.next(&holders, 4) {
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
                .insert(id, (peer, index, std::time::Instant::now(), None));
        }
    }

    fn on_blob_response(&mut self, peer: PeerId, index: Option<u32>, bytes: &[u8]) {
        use commons_protocol::blob::BlobResponse;
        let Some(f) = self.fetching.as_mut() else {
            return;
        };
        match commons_protocol::codec::decode::<BlobResponse>(
            bytes,
            commons_protocol::codec::Limit::M64,
        ) {
            Ok(BlobResponse::Manifest(m)) if index.is_none() => {
                match f.fetch.on_manifest(peer, m) {
                    Ok(()) => {
                        let (_, total) = f.fetch.progress();
                        f.bar.set_length(total);
                        // Keep what a previous run verified.
                        let (part, tx) = (f.part.clone(), self.tasks_tx.clone());
                        let (model, manifest) = (f.fetch.model(), f.fetch.manifest().cloned());
                        tokio::task::spawn_blocking(move || {
                            let good = manifest
                                .map(|m| verified_blocks(&part, &model, &m))
                                .unwrap_or_default();
                            let _ = tx.blocking_send(TaskDone::Resumed(good));
                        });
                    }
                    Err(e) => {
                        tracing::warn!(%peer, %e, "manifest rejected; asking another peer");
                    }
                }
            }
            Ok(BlobResponse::Block { index: got, data }) if Some(got) == index => {
                match f.fetch.on_block(peer, got, &data) {
                    Ok(offset) => {
                        let written = f.file.as_ref().map(|file| {
                            use std::os::unix::fs::FileExt as _;
                            file.write_all_at(&data, offset)
                        });
                        if let Some(Err(e)) = written {
                            tracing::error!(%e, "cannot write the model file");
                        }
                        f.bar.set_position(f.fetch.progress().0);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, %e, "block rejected; asking another peer");
                        println!(
                            "{}",
                            serde_json::json!({ "event": "rejected_block", "peer": peer.to_string(), "block": got })
                        );
                    }
                }
            }
            _ => f.fetch.on_failure(peer, index),
        }
        self.finish_fetch();
        self.drive_fetch();
    }

    /// Once every block is verified: the file takes its place and is loaded.
    fn finish_fetch(&mut self) {
        if !self
            .fetching
            .as_ref()
            .is_some_and(|f| f.fetch.is_complete() && f.resume_checked)
        {
            return;
        }
        let Some(mut f) = self.fetching.take() else {
            return;
        };
        let len = f.fetch.manifest().map_or(0, |m| m.len);
        let placed = f
            .file
            .take()
            .map_or(Ok(()), |file| {
                file.set_len(len).and_then(|()| file.sync_all())
            })
            .and_then(|()| std::fs::rename(&f.part, &f.plan.dest));
        f.bar.finish_and_clear();
        if let Err(e) = placed {
            tracing::error!(%e, "cannot put the fetched model in place");
            return;
        }
        println!(
            "{}",
            serde_json::json!({
                "event": "fetched",
                "model": f.plan.model.to_string(),
                "path": f.plan.dest.display().to_string(),
                "bytes": len,
                "resumed_blocks": f.fetch.resumed,
                "rejected_blocks": f.fetch.rejected,
                "seconds": f.started.elapsed().as_secs_f64(),
            })
        );
        let (dest, layers, tx) = (
            f.plan.dest.clone(),
            f.plan.layers.clone(),
            self.tasks_tx.clone(),
        );
        let (max_layers, interval) = (f.plan.max_layers, f.plan.rebalance);
        tokio::task::spawn_blocking(move || {
            if layers.as_deref() == Some("auto") {
                let auto = AutoPlace::for_file(&dest, max_layers, interval);
                let _ = tx.blocking_send(TaskDone::AutoReady(auto));
            } else {
                let served = crate::join::load_served(&dest, layers.as_deref());
                let _ = tx.blocking_send(TaskDone::Loaded(served, dest));
            }
        });
    }

    fn on_task_done(&mut self, done: TaskDone) {
        match done {
            TaskDone::BlobAnswer(channel, bytes) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .blobs
                    .send_response(channel, bytes);
            }
            TaskDone::Resumed(good) => {
                if let Some(f) = self.fetching.as_mut() {
                    for i in good {
                        f.fetch.resume_block(i);
                    }
                    f.resume_checked = true;
                    f.bar.set_position(f.fetch.progress().0);
                    match std::fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(false)
                        .open(&f.part)
                    {
                        Ok(file) => f.file = Some(file),
                        Err(e) => {
                            tracing::error!(%e, path = %f.part.display(), "cannot write the model file")
                        }
                    }
                }
                self.finish_fetch();
                self.drive_fetch();
            }
            TaskDone::AutoReady(Ok(auto)) => self.auto = Some(auto),
            TaskDone::AutoReady(Err(e)) => {
                tracing::error!(%e, "cannot place the fetched model");
            }
            TaskDone::Loaded(Ok(served), path) => {
                if let Some(a) = self.auto.as_mut() {
                    a.loading = false;
                    a.last_check = std::time::Instant::now();
                }
                tracing::info!(model = %served.model, layers = %served.layers, "serving the fetched model");
                println!(
                    "{}",
                    serde_json::json!({ "event": "serving", "model": served.model.to_string(), "layers": served.layers.to_string() })
                );
                self.blob_server.share(served.model, path);
                self.served = Some(served);
                self.publish_soon();
            }
            TaskDone::Loaded(Err(e), path) => {
                if let Some(a) = self.auto.as_mut() {
                    a.loading = false;
                }
                tracing::error!(%e, path = %path.display(), "cannot serve the fetched model");
            }
        }
    }

    /// Dials bootstrap peers we lost (one restarted, say), so the node rejoins
    /// without waiting for the DHT's next round.
    fn redial_bootstrap(&mut self) {
        for addr in self.config.bootstrap.clone() {
            let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
                continue;
            };
            if !self.swarm.is_connected(&peer) {
                let _ = self.swarm.dial(addr);
            }
        }
    }

    async fn leave(&mut self) {
        self.finish_commits().await;
        let now = now();
        let leave = Leave {
            node: self.identity.node_id(),
            issued_at: now,
            expires_at: now.plus_millis(60_000),
        };
        if let Ok(e) = Envelope::seal(&self.identity, &leave)
            && self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.topic.clone(), e.to_bytes())
                .is_ok()
        {
            // Give the notice a moment to leave the machine.
            let deadline = tokio::time::sleep(Duration::from_millis(300));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    event = self.swarm.select_next_some() => self.on_swarm_event(event),
                }
            }
        }
        tracing::info!("left the swarm");
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = format!("{address}/p2p/{}", self.swarm.local_peer_id());
                println!(
                    "{}",
                    serde_json::json!({ "event": "listening", "address": full })
                );
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.counters.connections_established += 1;
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, endpoint.get_remote_address().clone());
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.swarm.is_connected(&peer) => {
                let _ = self.swarm.dial(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(peer);
                    }
                }
            }
            // A newcomer learns about us at once instead of at our next round
            // (at most one extra advert a second: later ones wait for the sweep).
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
                topic,
                ..
            })) => {
                if topic == self.charter_topic.hash() {
                    self.charters_due = true;
                } else {
                    self.publish_soon();
                }
            }
            // A request the codec refused to read (oversized or trickled): the
            // peer goes, with every stream it holds.
            SwarmEvent::Behaviour(
                BehaviourEvent::Work(libp2p::request_response::Event::Message {
                    peer,
                    message: libp2p::request_response::Message::Request { request, .. },
                    ..
                })
                | BehaviourEvent::Jobs(libp2p::request_response::Event::Message {
                    peer,
                    message: libp2p::request_response::Message::Request { request, .. },
                    ..
                })
                | BehaviourEvent::Blobs(libp2p::request_response::Event::Message {
                    peer,
                    message: libp2p::request_response::Message::Request { request, .. },
                    ..
                }),
            ) if request == work::REFUSED_UNREAD => {
                tracing::info!(%peer, "dropping a peer that sent an oversized or trickled request");
                self.counters.peers_dropped += 1;
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Work(
                libp2p::request_response::Event::Message {
                    message:
                        libp2p::request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => self.on_work(request, channel),
            SwarmEvent::Behaviour(BehaviourEvent::Work(
                libp2p::request_response::Event::Message {
                    message:
                        libp2p::request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                },
            )) => {
                if let Some(reply) = self.units_sent.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                } else if let (Some((pending, node)), Some(c)) = (
                    self.units_out.remove(&request_id),
                    self.coordinating.as_mut(),
                ) {
                    c.on_response(pending, node, &response, now());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Work(
                libp2p::request_response::Event::OutboundFailure {
                    request_id, error, ..
                },
            )) => {
                if let Some(reply) = self.units_sent.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                } else if let (Some((pending, _)), Some(c)) = (
                    self.units_out.remove(&request_id),
                    self.coordinating.as_mut(),
                ) {
                    c.on_failure(pending, error.to_string(), now());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Blobs(
                libp2p::request_response::Event::Message { peer, message, .. },
            )) => match message {
                libp2p::request_response::Message::Request {
                    request, channel, ..
                } => {
                    let (server, tx) = (self.blob_server.clone(), self.tasks_tx.clone());
                    tokio::spawn(async move {
                        let bytes = server.answer(&request).await;
                        let _ = tx.send(TaskDone::BlobAnswer(channel, bytes)).await;
                    });
                }
                libp2p::request_response::Message::Response {
                    request_id,
                    response,
                } => match self.blob_out.remove(&request_id) {
                    Some((_, index, asked, None)) => {
                        self.bandwidth.observe(response.len(), asked.elapsed());
                        self.on_blob_response(peer, index, &response);
                    }
                    Some((_, index, asked, Some(model))) => {
                        self.bandwidth.observe(response.len(), asked.elapsed());
                        let asks = self.blob_fetches.on_response(model, peer, index, &response);
                        self.send_blob_asks(asks);
                    }
                    None => {}
                },
            },
            SwarmEvent::Behaviour(BehaviourEvent::Blobs(
                libp2p::request_response::Event::OutboundFailure {
                    request_id, error, ..
                },
            )) => match self.blob_out.remove(&request_id) {
                Some((peer, index, _, None)) => {
                    tracing::debug!(%peer, %error, "blob request failed");
                    if let Some(f) = self.fetching.as_mut() {
                        f.fetch.on_failure(peer, index);
                    }
                    self.drive_fetch();
                }
                Some((peer, index, _, Some(model))) => {
                    tracing::debug!(%peer, %error, "blob request failed");
                    let asks = self.blob_fetches.on_failure(model, peer, index);
                    self.send_blob_asks(asks);
                }
                None => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Jobs(
                libp2p::request_response::Event::Message {
                    message:
                        libp2p::request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => self.on_job_request(request, Reply::Remote(channel)),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) if message.topic == self.charter_topic.hash() => {
                let acceptance = self.on_charter_gossip(&message.data);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let verdict = match message.source.as_ref().and_then(node_id_of) {
                    Some(source) => self.peers.handle(&message.data, source, now()),
                    None => Err(AdvertError::WrongKind(
                        commons_protocol::MessageKind::CapacityAdvert,
                    )),
                };
                let acceptance = match verdict {
                    Ok(update) => {
                        tracing::debug!(?update, "advert accepted");
                        self.counters.adverts_accepted += 1;
                        if let Update::Left(node) = update {
                            tracing::info!(peer_id = %node, "peer left");
                        }
                        gossipsub::MessageAcceptance::Accept
                    }
                    Err(AdvertError::Stale { .. }) => gossipsub::MessageAcceptance::Ignore,
                    Err(e) => {
                        tracing::debug!(%e, from = %propagation_source, "advert rejected");
                        self.counters.adverts_rejected += 1;
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            _ => {}
        }
    }
}
