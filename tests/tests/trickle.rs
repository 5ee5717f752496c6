//! Peers that hold streams open: one trickles a work request a byte at a
//! time, another announces a frame far over the limit. The node drops both
//! connections, while an honest peer's request is answered at once.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::io;
use std::time::{Duration, Instant};

use commons_node::network::work::{REQUEST_GRACE, WORK_PROTOCOL, WorkCodec};
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_tests::node::{Node, Transports};
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, StreamExt as _};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};

/// How a hostile client writes its request.
#[derive(Debug, Clone, Copy, Default)]
enum Misbehaviour {
    /// Announce 1,000 bytes and send one every 400 ms.
    #[default]
    Trickle,
    /// Announce 2 GiB.
    Oversized,
}

#[derive(Debug, Clone, Copy, Default)]
struct HostileCodec(Misbehaviour);

impl request_response::Codec for HostileCodec {
    type Protocol = StreamProtocol;
    type Request = ();
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<()> {
        Err(io::Error::other("this client serves nothing"))
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        (): (),
    ) -> io::Result<()> {
        match self.0 {
            Misbehaviour::Oversized => {
                io.write_all(&(2u32 << 30).to_be_bytes()).await?;
                io.flush().await?;
                tokio::time::sleep(Duration::from_secs(8)).await;
            }
            Misbehaviour::Trickle => {
                io.write_all(&1000u32.to_be_bytes()).await?;
                io.flush().await?;
                for _ in 0..1000 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    io.write_all(&[0]).await?;
                    io.flush().await?;
                }
            }
        }
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()> {
        Err(io::Error::other("this client serves nothing"))
    }
}

fn swarm<C>(codec: C) -> Swarm<request_response::Behaviour<C>>
where
    C: request_response::Codec<Protocol = StreamProtocol> + Clone + Send + 'static,
{
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                codec,
                [(WORK_PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(120)),
            )
        })
        .unwrap()
        .build()
}

/// Drives `s` until its connection to `peer` closes, or `limit` passes.
async fn until_closed<C>(
    s: &mut Swarm<request_response::Behaviour<C>>,
    peer: PeerId,
    limit: Duration,
) -> Option<Duration>
where
    C: request_response::Codec<Protocol = StreamProtocol> + Clone + Send + 'static,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        match tokio::time::timeout(Duration::from_millis(500), s.select_next_some()).await {
            Ok(SwarmEvent::ConnectionClosed { peer_id, .. }) if peer_id == peer => {
                return Some(start.elapsed());
            }
            _ => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_and_oversized_requests_cost_the_peer_its_connection_not_others_their_work() {
    let home = tempfile::tempdir().unwrap();
    let node = Node::start(
        home.path(),
        &home.path().join("node"),
        &[],
        Transports::Tcp,
        30,
    );
    let target: PeerId = node.peer_id.parse().unwrap();
    let addr: Multiaddr = node.addrs[0].parse().unwrap();

    let mut trickler = swarm(HostileCodec(Misbehaviour::Trickle));
    trickler.add_peer_address(target, addr.clone());
    trickler.behaviour_mut().send_request(&target, ());
    let trickle = tokio::spawn(async move {
        until_closed(
            &mut trickler,
            target,
            REQUEST_GRACE + Duration::from_secs(20),
        )
        .await
    });

    // Meanwhile an honest peer is answered at once (with a typed refusal:
    // garbage is not a unit), on a connection of its own.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut honest = swarm(WorkCodec::default());
    honest.add_peer_address(target, addr.clone());
    honest
        .behaviour_mut()
        .send_request(&target, b"not a unit".to_vec());
    let asked = Instant::now();
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(10), honest.select_next_some()).await {
            Ok(SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            })) => break response,
            Ok(SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                error, ..
            })) => panic!("the honest request failed: {error}"),
            Ok(_) => {}
            Err(_) => panic!("no answer to the honest peer within 10 s"),
        }
    };
    assert!(asked.elapsed() < Duration::from_secs(5));
    let reply = Envelope::from_bytes(&answer).unwrap();
    assert_eq!(reply.kind(), MessageKind::ErrorReply);

    let closed = trickle.await.unwrap();
    let closed = closed.expect("the trickling peer was not disconnected");
    // Dropped at the request's deadline, long before its 400 s of trickle.
    assert!(
        closed >= REQUEST_GRACE - Duration::from_secs(1),
        "{closed:?}"
    );
    eprintln!("trickling peer dropped after {closed:?}");

    let mut oversized = swarm(HostileCodec(Misbehaviour::Oversized));
    oversized.add_peer_address(target, addr);
    oversized.behaviour_mut().send_request(&target, ());
    let closed = until_closed(&mut oversized, target, Duration::from_secs(15)).await;
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(5)),
        "{closed:?}"
    );

    let status = node.status(home.path()).unwrap();
    assert_eq!(status["counters"]["peers_dropped"], 2, "{status}");
}
