//! `/ipfs/ping/1.0.0` as the libp2p ping spec describes it: the dialer
//! sends 32 random bytes, the listener echoes them, on the same stream, as
//! often as the dialer likes. A node answers up to [`MAX_INBOUND_STREAMS`]
//! ping streams of one connection at once (the spec's two: one for the
//! current stream, one while a peer replaces it), and measures the round
//! trip to each peer on one stream of its own.
//!
//! rust-libp2p's `ping` answers one inbound stream per connection and
//! closes the older one when a second arrives; this behaviour keeps both.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{AsyncReadExt as _, AsyncWriteExt as _, FutureExt as _};
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, Stream, StreamUpgradeError, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, StreamProtocol};

/// The ping protocol.
pub const PING_PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/ping/1.0.0");
/// Bytes in one ping.
pub const PING_SIZE: usize = 32;
/// Inbound ping streams of one connection answered at once; a stream
/// beyond them is closed at once.
pub const MAX_INBOUND_STREAMS: usize = 2;

/// How often and how patiently to ping.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Between the end of one ping and the next.
    pub interval: Duration,
    /// A ping not answered within this fails.
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(20),
        }
    }
}

/// A ping's outcome on one connection.
#[derive(Debug)]
pub struct Event {
    /// The peer.
    pub peer: PeerId,
    /// The connection.
    pub connection: ConnectionId,
    /// The round trip, or why there is none.
    pub result: Result<Duration, Failure>,
}

/// Why a ping failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// No answer in time.
    #[error("no pong within the timeout")]
    Timeout,
    /// The peer does not speak ping: it is not asked again on this connection.
    #[error("the peer does not support ping")]
    Unsupported,
    /// The stream failed, or the pong was not the ping.
    #[error("ping failed: {0}")]
    Other(#[source] io::Error),
}

/// The ping behaviour.
#[derive(Debug, Default)]
pub struct Behaviour {
    config: Config,
    events: VecDeque<Event>,
}

impl Behaviour {
    /// Pings every peer as `config` says, and answers their pings.
    #[must_use]
    pub fn new(config: Config) -> Self {
        Self {
            config,
            events: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.config))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.config))
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        result: THandlerOutEvent<Self>,
    ) {
        self.events.push_back(Event {
            peer,
            connection,
            result,
        });
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(e) => Poll::Ready(ToSwarm::GenerateEvent(e)),
            None => Poll::Pending,
        }
    }
}

type Pinging = BoxFuture<'static, Result<(Stream, Duration), Failure>>;

enum Outbound {
    /// Waiting for the timer; the stream of the last ping, if it is still good.
    Idle(Option<Stream>),
    /// A stream was asked for.
    Opening,
    /// A ping is out.
    Pinging(Pinging),
    /// The peer does not speak ping.
    Unsupported,
}

/// One connection's pings.
pub struct Handler {
    config: Config,
    timer: Pin<Box<tokio::time::Sleep>>,
    outbound: Outbound,
    /// Echo loops of the inbound streams answered now.
    inbound: Vec<BoxFuture<'static, io::Result<()>>>,
    /// Outcomes to report.
    reports: VecDeque<Result<Duration, Failure>>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("inbound", &self.inbound.len())
            .finish_non_exhaustive()
    }
}

impl Handler {
    fn new(config: Config) -> Self {
        Self {
            config,
            // The first ping goes out at once.
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            outbound: Outbound::Idle(None),
            inbound: Vec::new(),
            reports: VecDeque::new(),
        }
    }

    fn rest(&mut self, stream: Option<Stream>) {
        self.outbound = Outbound::Idle(stream);
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + self.config.interval);
    }
}

/// Echoes pings on `stream` until the peer closes it.
async fn echo(mut stream: Stream) -> io::Result<()> {
    let mut payload = [0u8; PING_SIZE];
    loop {
        match stream.read_exact(&mut payload).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        stream.write_all(&payload).await?;
        stream.flush().await?;
    }
}

/// Sends one ping on `stream` and waits for it to come back.
async fn ping(mut stream: Stream, timeout: Duration) -> Result<(Stream, Duration), Failure> {
    let mut payload = [0u8; PING_SIZE];
    getrandom::fill(&mut payload).map_err(|e| Failure::Other(io::Error::other(e.to_string())))?;
    let exchange = async {
        let started = Instant::now();
        stream.write_all(&payload).await?;
        stream.flush().await?;
        let mut pong = [0u8; PING_SIZE];
        stream.read_exact(&mut pong).await?;
        if pong != payload {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the pong is not the ping",
            ));
        }
        Ok(started.elapsed())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Err(e)) => Err(Failure::Other(e)),
        Ok(Ok(rtt)) => Ok((stream, rtt)),
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = std::convert::Infallible;
    type ToBehaviour = Result<Duration, Failure>;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(PING_PROTOCOL), ())
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        // Answer the pings of the streams we keep; forget the closed ones.
        self.inbound
            .retain_mut(|echoing| match echoing.poll_unpin(cx) {
                Poll::Pending => true,
                Poll::Ready(outcome) => {
                    if let Err(e) = outcome {
                        tracing::trace!(%e, "inbound ping stream failed");
                    }
                    false
                }
            });
        if let Some(report) = self.reports.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(report));
        }
        loop {
            match &mut self.outbound {
                Outbound::Pinging(pinging) => match pinging.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok((stream, rtt))) => {
                        self.rest(Some(stream));
                        return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(Ok(rtt)));
                    }
                    Poll::Ready(Err(e)) => {
                        self.rest(None);
                        return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(Err(e)));
                    }
                },
                Outbound::Idle(stream) => {
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    match stream.take() {
                        Some(stream) => {
                            self.outbound =
                                Outbound::Pinging(ping(stream, self.config.timeout).boxed());
                        }
                        None => {
                            self.outbound = Outbound::Opening;
                            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                                protocol: SubstreamProtocol::new(
                                    ReadyUpgrade::new(PING_PROTOCOL),
                                    (),
                                ),
                            });
                        }
                    }
                }
                Outbound::Opening | Outbound::Unsupported => return Poll::Pending,
            }
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: mut stream,
                ..
            }) => {
                // Pings alone do not keep a connection open.
                stream.ignore_for_keep_alive();
                if self.inbound.len() < MAX_INBOUND_STREAMS {
                    self.inbound.push(echo(stream).boxed());
                } else {
                    tracing::debug!("a third concurrent ping stream: closed");
                    drop(stream);
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: mut stream,
                ..
            }) => {
                stream.ignore_for_keep_alive();
                self.outbound = Outbound::Pinging(ping(stream, self.config.timeout).boxed());
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                let failure = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        self.outbound = Outbound::Unsupported;
                        self.reports.push_back(Err(Failure::Unsupported));
                        return;
                    }
                    StreamUpgradeError::Timeout => Failure::Timeout,
                    StreamUpgradeError::Io(e) => Failure::Other(e),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                self.rest(None);
                self.reports.push_back(Err(failure));
            }
            _ => {}
        }
    }
}
