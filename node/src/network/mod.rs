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

mod peers;
pub mod work;

pub use peers::{AdvertError, PeerEntry, PeerTable, Update};

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
    noise, ping, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::capacity::Capacity;

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
                .with_max_established_per_peer(Some(2))
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
                .max_transmit_size(64 * 1024)
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
                ping: ping::Behaviour::new(ping::Config::new()),
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
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

/// A request to the event loop.
#[derive(Debug)]
pub enum Command {
    /// A snapshot of the node's state.
    Status(oneshot::Sender<Status>),
}

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
    /// Accelerators.
    pub gpus: usize,
    /// Software version.
    pub software: String,
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
    sequence: u64,
    listen_addrs: Vec<Multiaddr>,
    counters: Counters,
    last_publish: Option<std::time::Instant>,
    publish_pending: bool,
    served: Option<crate::executor::serve::Served>,
    replay: commons_protocol::replay::ReplayGuard,
    responses_tx: mpsc::Sender<(libp2p::request_response::ResponseChannel<Vec<u8>>, Vec<u8>)>,
    responses_rx: mpsc::Receiver<(libp2p::request_response::ResponseChannel<Vec<u8>>, Vec<u8>)>,
    in_progress: Arc<AtomicU64>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer_id", &self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
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
    ) -> anyhow::Result<Self> {
        let mut swarm = build_swarm(&identity, &config)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let (responses_tx, responses_rx) = mpsc::channel(256);
        let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| anyhow::anyhow!("cannot subscribe to adverts: {e}"))?;
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
            sequence: 0,
            listen_addrs: Vec::new(),
            counters: Counters::default(),
            last_publish: None,
            publish_pending: false,
            served,
            // Units may be valid for up to ten minutes; their nonces are kept that long.
            replay: commons_protocol::replay::ReplayGuard::new(10 * 60_000, 1 << 20),
            responses_tx,
            responses_rx,
            in_progress: Arc::new(AtomicU64::new(0)),
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
            bandwidth_bytes_per_sec: 0,
            models: BoundedVec::try_from_vec(
                self.served
                    .iter()
                    .map(|s| commons_protocol::messages::HeldModel {
                        model: s.model,
                        layers: s.layers,
                        total_layers: s.total_layers,
                    })
                    .collect(),
            )
            .unwrap_or_default(),
            determinism: crate::capacity::determinism_class(),
            coalitions: BoundedVec::new(),
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
                    gpus: e.advert.gpus.len(),
                    software: e.advert.software.clone(),
                    last_seen_ms: now.0.saturating_sub(e.received_at.0),
                    expires_in_ms: e.advert.expires_at.0.saturating_sub(now.0),
                })
                .collect(),
            work_in_progress: self.in_progress.load(Ordering::Relaxed) as usize,
            counters: self.counters.clone(),
            capacity: self.capacity.clone(),
        }
    }

    /// Runs until `shutdown` resolves; then publishes a leave notice and returns.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut republish = tokio::time::interval(self.config.advert_ttl / 3);
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        let mut rebootstrap = tokio::time::interval(Duration::from_secs(30));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((channel, bytes)) = self.responses_rx.recv() => {
                    let _ = self.swarm.behaviour_mut().work.send_response(channel, bytes);
                }
                Some(command) = self.commands.recv() => match command {
                    Command::Status(reply) => { let _ = reply.send(self.status()); }
                },
                _ = republish.tick() => self.publish_advert(),
                _ = sweep.tick() => {
                    if self.publish_pending {
                        self.publish_soon();
                    }
                    for gone in self.peers.expire(now()) {
                        tracing::info!(peer_id = %gone, "peer's advert expired");
                    }
                }
                _ = rebootstrap.tick() => { let _ = self.swarm.behaviour_mut().kad.bootstrap(); }
            }
        }
        self.leave().await;
    }

    async fn leave(&mut self) {
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

    /// Admits a work unit here, then runs it off the event loop and answers through it.
    fn on_work(
        &mut self,
        request: Vec<u8>,
        channel: libp2p::request_response::ResponseChannel<Vec<u8>>,
    ) {
        use crate::executor::serve;
        let Some(served) = self.served.clone() else {
            let refusal = serve::refusal(
                commons_protocol::messages::ErrorCode::MODEL_NOT_HELD,
                "this node serves no model",
            );
            let _ = self.swarm.behaviour_mut().work.send_response(
                channel,
                serve::refusal_bytes(&self.identity, &refusal, now()),
            );
            return;
        };
        match serve::admit(&served, &mut self.replay, &request, now()) {
            Err(refusal) => {
                let _ = self.swarm.behaviour_mut().work.send_response(
                    channel,
                    serve::refusal_bytes(&self.identity, &refusal, now()),
                );
            }
            Ok((id, unit)) => {
                let (identity, tx, in_progress) = (
                    self.identity.clone(),
                    self.responses_tx.clone(),
                    self.in_progress.clone(),
                );
                in_progress.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let bytes = serve::run(&served, &identity, id, unit, now).await;
                    in_progress.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send((channel, bytes)).await;
                });
            }
        }
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
                ..
            })) => self.publish_soon(),
            SwarmEvent::Behaviour(BehaviourEvent::Work(
                libp2p::request_response::Event::Message {
                    message:
                        libp2p::request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => self.on_work(request, channel),
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
