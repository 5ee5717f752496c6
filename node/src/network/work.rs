//! The work protocol, `/commons/work/1.0.0`: one request-response exchange per
//! work unit. The request is a signed `WorkUnit` envelope; the response a
//! signed `WorkResult` or `ErrorReply` envelope. Frames carry a 4-byte length
//! and are refused past the largest envelope their kind allows.
//!
//! A request must also arrive at a pace: its header within
//! [`REQUEST_GRACE`], and the whole frame within that plus its length at
//! [`MIN_REQUEST_RATE`]. A request that breaks the pace or announces more
//! than the limit is read as [`REFUSED_UNREAD`], on which the node drops the
//! peer's connection, with every stream it holds;
//! other peers' streams are not touched. (A failed read reaches no one:
//! request-response reports nothing for a request it never read.)

use std::io;
use std::time::{Duration, Instant};

use commons_protocol::envelope::MessageKind;
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::StreamProtocol;

/// Protocol id of the work exchange.
pub const WORK_PROTOCOL: StreamProtocol = StreamProtocol::new("/commons/work/1.0.0");
/// Protocol id of job requests to a coordinator: a signed `JobRequest`
/// envelope answered by a signed `JobReport` or `ErrorReply` envelope.
pub const JOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/commons/job/1.0.0");

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, limit: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {limit}"),
        ));
    }
    // Grow with the bytes that actually arrive: a peer that announces a large
    // frame and sends nothing makes us reserve nothing.
    let mut buf = Vec::new();
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// What the codec hands on in place of a request it refused to read (too
/// slow or too large). No unit, job request or blob request has these bytes;
/// a peer that sends them anyway is dropped as well.
pub const REFUSED_UNREAD: &[u8] = b"\0commons: request refused unread\0";

/// Time a peer has to start a request, and the slack on top of its pace.
pub const REQUEST_GRACE: Duration = Duration::from_secs(10);
/// The slowest a request's bytes may arrive, bytes per second.
pub const MIN_REQUEST_RATE: u64 = 256 * 1024;

fn too_slow(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// [`read_frame`] for a request from a peer, at [`MIN_REQUEST_RATE`] or faster.
async fn read_request_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut header = [0u8; 4];
    tokio::time::timeout(REQUEST_GRACE, io.read_exact(&mut header))
        .await
        .map_err(|_| too_slow(format!("no request within {REQUEST_GRACE:?}")))??;
    let len = u32::from_be_bytes(header) as usize;
    let budget = REQUEST_GRACE + Duration::from_secs_f64(len as f64 / MIN_REQUEST_RATE as f64);
    let rest = budget.saturating_sub(start.elapsed());
    let mut framed = (&header[..]).chain(io);
    tokio::time::timeout(rest, read_frame(&mut framed, limit))
        .await
        .map_err(|_| {
            too_slow(format!(
                "a request of {len} bytes did not arrive within {budget:?}"
            ))
        })?
}

/// Whether a failed read shows a misbehaving peer (an oversized or trickled
/// frame), not a mishap such as a closed connection.
fn misbehaved(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::TimedOut
    )
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

/// Byte limits of a request-response protocol, one per direction.
pub trait FrameLimits: Default + Clone + Send + 'static {
    /// Most bytes a request frame may announce.
    fn request() -> usize;
    /// Most bytes a response frame may announce.
    fn response() -> usize;
}

/// Length-prefixed frames, refused past the limits `L` sets per direction:
/// the codec of every Commons request-response protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec<L>(std::marker::PhantomData<L>);

impl<L: FrameLimits> libp2p::request_response::Codec for FrameCodec<L> {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        match read_request_frame(io, L::request()).await {
            Err(e) if misbehaved(&e) => {
                tracing::debug!(error = %e, "request refused unread");
                Ok(REFUSED_UNREAD.to_vec())
            }
            other => other,
        }
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, L::response()).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &res).await
    }
}

/// Work units out, results (or error replies) back.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkLimits;

impl FrameLimits for WorkLimits {
    fn request() -> usize {
        MessageKind::WorkUnit.envelope_limit()
    }
    fn response() -> usize {
        MessageKind::WorkResult.envelope_limit()
    }
}

/// Job requests out, reports (or error replies) back.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobLimits;

impl FrameLimits for JobLimits {
    fn request() -> usize {
        MessageKind::JobRequest.envelope_limit()
    }
    fn response() -> usize {
        MessageKind::JobReport.envelope_limit()
    }
}

/// The codec of `/commons/work/1.0.0`.
pub type WorkCodec = FrameCodec<WorkLimits>;
/// The codec of `/commons/job/1.0.0`.
pub type JobCodec = FrameCodec<JobLimits>;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_roundtrip_and_bad_frames_are_refused() {
        let mut out = Cursor::new(Vec::new());
        write_frame(&mut out, b"envelope").await.unwrap();
        let bytes = out.into_inner();
        assert_eq!(
            read_frame(&mut Cursor::new(bytes.clone()), 64)
                .await
                .unwrap(),
            b"envelope"
        );
        // Over the limit: refused at the header.
        assert_eq!(
            read_frame(&mut Cursor::new(bytes.clone()), 4)
                .await
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData
        );
        // A frame that announces more than it carries.
        let mut short = (1000u32).to_be_bytes().to_vec();
        short.extend_from_slice(b"only a few");
        assert_eq!(
            read_frame(&mut Cursor::new(short), 1 << 20)
                .await
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
