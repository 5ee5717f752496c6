//! Model files between peers over `/commons/blob/1.0.0`: serving the files a
//! node holds, and fetching one it lacks, block by block, each block checked
//! against the file's blake3 id (see [`commons_protocol::blob`]).
//!
//! [`Fetch`] decides what to ask whom; it does no I/O, so its rules (spread
//! the blocks over the peers that hold the file, drop a peer whose manifest or
//! block does not check out and ask another, resume from the blocks already
//! on disk) are tested on their own.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use commons_protocol::ModelId;
use commons_protocol::blob::{
    BLOCK_LEN, BlobError, BlobRequest, BlobResponse, Manifest, ManifestBuilder, block_span,
};
use commons_protocol::codec::{self, Limit};
use libp2p::{PeerId, StreamProtocol};

/// Protocol id of the file exchange.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/commons/blob/1.0.0");

/// Blob requests are small; responses carry a block or a manifest.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlobLimits;

impl super::work::FrameLimits for BlobLimits {
    fn request() -> usize {
        Limit::K4.bytes()
    }
    fn response() -> usize {
        Limit::M64.bytes()
    }
}

/// The codec of `/commons/blob/1.0.0`.
pub type BlobCodec = super::work::FrameCodec<BlobLimits>;

/// Reads block `index` of the file at `path` (`len` bytes in all).
pub fn read_block(path: &std::path::Path, len: u64, index: u32) -> io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let (offset, size) = block_span(len, index);
    let mut f = std::fs::File::open(path)?;
    f.seek(io::SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; size as usize];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// The manifest of the file at `path`.
pub fn manifest_of(path: &std::path::Path) -> Result<Manifest, String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut builder = ManifestBuilder::new();
    let mut buf = vec![0u8; BLOCK_LEN as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        builder.push(&buf[..filled]).map_err(|e| e.to_string())?;
        if filled < buf.len() {
            break;
        }
    }
    builder.finish().map_err(|e| e.to_string())
}

/// A shared file: where it is, its manifest once computed, and whether
/// adverts list it.
type Shared = (PathBuf, Arc<tokio::sync::OnceCell<Manifest>>, bool);

/// Files this node shares, with their manifests computed once, on first ask.
#[derive(Debug, Clone, Default)]
pub struct BlobServer {
    files: BTreeMap<ModelId, Shared>,
}

impl BlobServer {
    /// Shares the file at `path` as `model`, listed in adverts.
    pub fn share(&mut self, model: ModelId, path: PathBuf) {
        self.files
            .insert(model, (path, Arc::new(tokio::sync::OnceCell::new()), true));
    }

    /// Shares the file at `path` as `id` with whoever asks for it by id, not
    /// listed in adverts (a training run's parameters and data).
    pub fn share_unlisted(&mut self, id: ModelId, path: PathBuf) {
        self.files
            .insert(id, (path, Arc::new(tokio::sync::OnceCell::new()), false));
    }

    /// Stops sharing `id`.
    pub fn unshare(&mut self, id: &ModelId) {
        self.files.remove(id);
    }

    /// The files shared and listed in adverts.
    pub fn models(&self) -> impl Iterator<Item = ModelId> + '_ {
        self.files
            .iter()
            .filter(|(_, (_, _, listed))| *listed)
            .map(|(id, _)| *id)
    }

    /// Whether the node shares `model`.
    #[must_use]
    pub fn has(&self, model: &ModelId) -> bool {
        self.files.contains_key(model)
    }

    /// The encoded answer to an encoded request (runs file reads off the runtime).
    pub async fn answer(&self, request: &[u8]) -> Vec<u8> {
        let response = match codec::decode::<BlobRequest>(request, Limit::K4) {
            Err(_) => BlobResponse::NotHeld,
            Ok(BlobRequest::Manifest { model }) => match self.manifest(&model).await {
                Some(m) => BlobResponse::Manifest(m),
                None => BlobResponse::NotHeld,
            },
            Ok(BlobRequest::Block { model, index }) => {
                match (self.manifest(&model).await, self.files.get(&model)) {
                    (Some(m), Some((path, _, _))) if (index as usize) < m.block_count() => {
                        let path = path.clone();
                        match tokio::task::spawn_blocking(move || read_block(&path, m.len, index))
                            .await
                        {
                            Ok(Ok(data)) => BlobResponse::Block { index, data },
                            _ => BlobResponse::NotHeld,
                        }
                    }
                    _ => BlobResponse::NotHeld,
                }
            }
            Ok(_) => BlobResponse::NotHeld,
        };
        codec::encode(&response).unwrap_or_default()
    }

    /// Computes the manifest of `model` now rather than on the first request.
    pub async fn prepare(&self, model: &ModelId) -> bool {
        self.manifest(model).await.is_some()
    }

    async fn manifest(&self, model: &ModelId) -> Option<Manifest> {
        let (path, cell, _) = self.files.get(model)?;
        let path = path.clone();
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || manifest_of(&path))
                .await
                .map_err(|e| e.to_string())?
        })
        .await
        .ok()
        .cloned()
    }
}

/// What a fetch wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAsk {
    /// Ask `peer` for the manifest.
    Manifest(PeerId),
    /// Ask `peer` for block `index`.
    Block(PeerId, u32),
}

/// The state of fetching one file from the peers that hold it.
#[derive(Debug)]
pub struct Fetch {
    model: ModelId,
    manifest: Option<Manifest>,
    done: Vec<bool>,
    in_flight: BTreeMap<u32, PeerId>,
    manifest_from: Option<PeerId>,
    bad: BTreeSet<PeerId>,
    failures: BTreeMap<PeerId, u32>,
    /// Blocks that did not match the manifest.
    pub rejected: u32,
    /// Blocks found good on disk when the fetch resumed.
    pub resumed: usize,
}

/// A peer is dropped from a fetch after this many failed exchanges in a row.
const MAX_FAILURES: u32 = 3;

impl Fetch {
    /// A fetch of `model`.
    #[must_use]
    pub fn new(model: ModelId) -> Self {
        Self {
            model,
            manifest: None,
            done: Vec::new(),
            in_flight: BTreeMap::new(),
            manifest_from: None,
            bad: BTreeSet::new(),
            failures: BTreeMap::new(),
            rejected: 0,
            resumed: 0,
        }
    }

    /// The file being fetched.
    #[must_use]
    pub fn model(&self) -> ModelId {
        self.model
    }

    /// The checked manifest, once one arrived.
    #[must_use]
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// Peers dropped for bad data or repeated failures.
    #[must_use]
    pub fn bad_peers(&self) -> &BTreeSet<PeerId> {
        &self.bad
    }

    /// Bytes verified so far, and in all (0 until the manifest is known).
    #[must_use]
    pub fn progress(&self) -> (u64, u64) {
        let Some(m) = &self.manifest else {
            return (0, 0);
        };
        let done = (0..m.block_count())
            .filter(|&i| self.done[i])
            .map(|i| block_span(m.len, i as u32).1)
            .sum();
        (done, m.len)
    }

    /// True once every block is verified.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some() && self.done.iter().all(|d| *d)
    }

    /// What to ask next of `holders` (peers that advertise the file), keeping
    /// at most `max_in_flight` blocks asked for at once.
    pub fn next(&mut self, holders: &[PeerId], max_in_flight: usize) -> Vec<FetchAsk> {
        let usable: Vec<PeerId> = holders
            .iter()
            .filter(|p| !self.bad.contains(p))
            .copied()
            .collect();
        if usable.is_empty() {
            return Vec::new();
        }
        let Some(m) = &self.manifest else {
            if self.manifest_from.is_some() {
                return Vec::new();
            }
            let peer = usable[0];
            self.manifest_from = Some(peer);
            return vec![FetchAsk::Manifest(peer)];
        };
        let mut asks = Vec::new();
        for index in 0..m.block_count() as u32 {
            if self.in_flight.len() >= max_in_flight {
                break;
            }
            if self.done[index as usize] || self.in_flight.contains_key(&index) {
                continue;
            }
            // The usable peer with the fewest blocks asked of it.
            let Some(&peer) = usable
                .iter()
                .min_by_key(|p| self.in_flight.values().filter(|q| q == p).count())
            else {
                break;
            };
            self.in_flight.insert(index, peer);
            asks.push(FetchAsk::Block(peer, index));
        }
        asks
    }

    /// A manifest from `peer`; one that does not match the id drops the peer.
    pub fn on_manifest(&mut self, peer: PeerId, manifest: Manifest) -> Result<(), BlobError> {
        self.manifest_from = None;
        if self.manifest.is_some() {
            return Ok(());
        }
        if let Err(e) = manifest.check(&self.model) {
            self.bad.insert(peer);
            return Err(e);
        }
        self.done = vec![false; manifest.block_count()];
        self.manifest = Some(manifest);
        Ok(())
    }

    /// Marks block `index` as already on disk and verified (a resumed fetch).
    pub fn resume_block(&mut self, index: u32) {
        if let Some(d) = self.done.get_mut(index as usize)
            && !*d
        {
            *d = true;
            self.resumed += 1;
        }
    }

    /// A block from `peer`: checked, and its byte offset returned for writing.
    /// A block that does not match drops the peer; the block is asked elsewhere.
    pub fn on_block(&mut self, peer: PeerId, index: u32, data: &[u8]) -> Result<u64, BlobError> {
        if self.in_flight.get(&index) == Some(&peer) {
            self.in_flight.remove(&index);
        }
        let Some(m) = &mut self.manifest else {
            return Err(BlobError::CorruptBlock { index });
        };
        if let Err(e) = m.verify_block(&self.model, index, data) {
            self.rejected += 1;
            self.bad.insert(peer);
            return Err(e);
        }
        if index as usize + 1 == m.block_count() {
            m.settle_len(data.len());
        }
        self.failures.remove(&peer);
        self.done[index as usize] = true;
        Ok(u64::from(index) * BLOCK_LEN)
    }

    /// An exchange with `peer` failed (unreachable, timed out, does not hold the file).
    pub fn on_failure(&mut self, peer: PeerId, index: Option<u32>) {
        match index {
            Some(i) if self.in_flight.get(&i) == Some(&peer) => {
                self.in_flight.remove(&i);
            }
            None if self.manifest_from == Some(peer) => self.manifest_from = None,
            _ => {}
        }
        let n = self.failures.entry(peer).or_default();
        *n += 1;
        if *n >= MAX_FAILURES {
            self.bad.insert(peer);
        }
    }
}

/// A file wanted in memory by a gradient unit: `id` from `from`, the
/// verified bytes (or why not) sent on `reply`.
#[derive(Debug)]
pub struct FetchRequest {
    /// The file's blake3.
    pub id: ModelId,
    /// The peer that holds it (the unit's issuer).
    pub from: PeerId,
    /// Where the bytes go.
    pub reply: tokio::sync::oneshot::Sender<Result<Arc<Vec<u8>>, String>>,
}

/// Most bytes a file fetched into memory may have.
pub const MAX_MEMORY_FILE: u64 = 1 << 30;
/// Files fetched into memory at once.
const MAX_MEMORY_FETCHES: usize = 16;
/// Files kept in memory once fetched, and their most bytes in all.
const CACHE_FILES: usize = 8;
const CACHE_BYTES: usize = 2 << 30;

struct MemoryFetch {
    fetch: Fetch,
    from: PeerId,
    data: Vec<u8>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<Arc<Vec<u8>>, String>>>,
}

/// Files fetched into memory from one peer each, verified block by block as
/// [`Fetch`] does, and the last few kept: a training node's parameters and
/// data shards. Requests for a file already coming wait for it.
#[derive(Default)]
pub struct MemoryFetches {
    active: BTreeMap<ModelId, MemoryFetch>,
    /// Kept files, oldest first, with their manifests when they were fetched.
    cache: std::collections::VecDeque<Kept>,
    /// Bytes taken from kept files instead of fetched.
    reused: u64,
}

impl std::fmt::Debug for MemoryFetches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFetches")
            .field("active", &self.active.keys().collect::<Vec<_>>())
            .field("cached", &self.cache.len())
            .finish()
    }
}

/// Asks to send: the file and what to ask of whom.
pub type Asks = Vec<(ModelId, FetchAsk)>;

impl MemoryFetches {
    /// The bytes of `id`, if kept.
    pub fn cached(&mut self, id: &ModelId) -> Option<Arc<Vec<u8>>> {
        let i = self.cache.iter().position(|(k, _, _)| k == id)?;
        let entry = self.cache.remove(i)?;
        let bytes = entry.1.clone();
        self.cache.push_back(entry);
        Some(bytes)
    }

    /// Bytes of fetched files that were taken from kept files (blocks whose
    /// chaining value, at the same place, matched) instead of asked for.
    #[must_use]
    pub fn reused_bytes(&self) -> u64 {
        self.reused
    }

    /// Files being fetched.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// A request: answered from the cache, joined to a fetch under way, or
    /// the start of a new one.
    pub fn request(&mut self, r: FetchRequest) -> Asks {
        if let Some(bytes) = self.cached(&r.id) {
            let _ = r.reply.send(Ok(bytes));
            return Vec::new();
        }
        if let Some(f) = self.active.get_mut(&r.id) {
            f.waiters.push(r.reply);
            return Vec::new();
        }
        if self.active.len() >= MAX_MEMORY_FETCHES {
            let _ = r.reply.send(Err("too many files being fetched".into()));
            return Vec::new();
        }
        self.active.insert(
            r.id,
            MemoryFetch {
                fetch: Fetch::new(r.id),
                from: r.from,
                data: Vec::new(),
                waiters: vec![r.reply],
            },
        );
        self.drive(r.id)
    }

    /// The answer to a request for `id` (`index`: the block asked, `None`:
    /// the manifest).
    pub fn on_response(
        &mut self,
        id: ModelId,
        peer: PeerId,
        index: Option<u32>,
        bytes: &[u8],
    ) -> Asks {
        let Some(f) = self.active.get_mut(&id) else {
            return Vec::new();
        };
        match codec::decode::<BlobResponse>(bytes, Limit::M64) {
            Ok(BlobResponse::Manifest(m)) if index.is_none() => {
                if m.len > MAX_MEMORY_FILE {
                    return self.fail(id, &format!("{} bytes is too large to hold", m.len));
                }
                let len = m.len as usize;
                match f.fetch.on_manifest(peer, m) {
                    Ok(()) => {
                        f.data = vec![0; len];
                        self.reused += reuse_blocks(&self.cache, id, f);
                    }
                    Err(e) => tracing::warn!(%peer, %e, "manifest rejected"),
                }
            }
            Ok(BlobResponse::Block { index: got, data }) if Some(got) == index => {
                match f.fetch.on_block(peer, got, &data) {
                    Ok(offset) => {
                        let end = offset as usize + data.len();
                        if end as u64 > MAX_MEMORY_FILE {
                            return self.fail(id, "the file grew past what can be held");
                        }
                        if f.data.len() < end {
                            f.data.resize(end, 0);
                        }
                        f.data[offset as usize..end].copy_from_slice(&data);
                    }
                    Err(e) => tracing::warn!(%peer, %e, "block rejected"),
                }
            }
            _ => f.fetch.on_failure(peer, index),
        }
        self.drive(id)
    }

    /// A request for `id` failed.
    pub fn on_failure(&mut self, id: ModelId, peer: PeerId, index: Option<u32>) -> Asks {
        if let Some(f) = self.active.get_mut(&id) {
            f.fetch.on_failure(peer, index);
        }
        self.drive(id)
    }

    /// Finishes, fails or continues the fetch of `id`.
    fn drive(&mut self, id: ModelId) -> Asks {
        let Some(f) = self.active.get_mut(&id) else {
            return Vec::new();
        };
        if f.fetch.is_complete() {
            let Some(mut f) = self.active.remove(&id) else {
                return Vec::new();
            };
            let len = f.fetch.manifest().map_or(0, |m| m.len) as usize;
            f.data.truncate(len);
            let bytes = Arc::new(std::mem::take(&mut f.data));
            for w in f.waiters {
                let _ = w.send(Ok(bytes.clone()));
            }
            self.keep(id, bytes, f.fetch.manifest().cloned());
            return Vec::new();
        }
        if f.fetch.bad_peers().contains(&f.from) {
            return self.fail(
                id,
                "the peer's file did not check out or could not be reached",
            );
        }
        let from = f.from;
        f.fetch
            .next(&[from], 4)
            .into_iter()
            .map(|ask| (id, ask))
            .collect()
    }

    fn fail(&mut self, id: ModelId, reason: &str) -> Asks {
        if let Some(f) = self.active.remove(&id) {
            for w in f.waiters {
                let _ = w.send(Err(reason.to_owned()));
            }
        }
        Vec::new()
    }

    fn keep(&mut self, id: ModelId, bytes: Arc<Vec<u8>>, manifest: Option<Manifest>) {
        self.cache.push_back((id, bytes, manifest));
        while self.cache.len() > CACHE_FILES
            || self.cache.iter().map(|(_, b, _)| b.len()).sum::<usize>() > CACHE_BYTES
        {
            if self.cache.pop_front().is_none() {
                break;
            }
        }
    }
}

/// A kept file: its id, bytes and manifest (when it was fetched).
type Kept = (ModelId, Arc<Vec<u8>>, Option<Manifest>);

/// Fills the blocks of `f` (whose manifest just arrived) that a kept file
/// holds unchanged at the same place: a block's chaining value covers its
/// bytes and its position, so equal values mean equal bytes, and each copy
/// is verified against the new manifest before it counts. A new round's
/// checkpoint then costs only the blocks whose parameters moved. Returns the
/// bytes reused.
fn reuse_blocks(cache: &std::collections::VecDeque<Kept>, id: ModelId, f: &mut MemoryFetch) -> u64 {
    let Some(manifest) = f.fetch.manifest().cloned() else {
        return 0;
    };
    let mut reused = 0;
    for index in 0..manifest.block_count() as u32 {
        let (offset, len) = block_span(manifest.len, index);
        let (start, end) = (offset as usize, (offset + len) as usize);
        let source = cache.iter().rev().find_map(|(_, bytes, kept)| {
            let kept = kept.as_ref()?;
            let same = kept.blocks.get(index as usize) == manifest.blocks.get(index as usize);
            (same && bytes.len() >= end).then(|| &bytes[start..end])
        });
        if let Some(block) = source
            && manifest.verify_block(&id, index, block).is_ok()
        {
            f.data[start..end].copy_from_slice(block);
            f.fetch.resume_block(index);
            reused += len;
        }
    }
    reused
}

#[cfg(test)]
mod tests {
    use super::*;
    use commons_protocol::Hash;

    fn file(len: usize) -> (Vec<u8>, ModelId, Manifest) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i % 253) as u8 ^ (i >> 12) as u8)
            .collect();
        let id = ModelId(Hash(*blake3::hash(&bytes).as_bytes()));
        let mut b = ManifestBuilder::new();
        for c in bytes.chunks(BLOCK_LEN as usize) {
            b.push(c).unwrap();
        }
        (bytes, id, b.finish().unwrap())
    }

    fn block(bytes: &[u8], i: u32) -> &[u8] {
        let (o, l) = block_span(bytes.len() as u64, i);
        &bytes[o as usize..(o + l) as usize]
    }

    /// Runs a fetch against peers, `liar` serving corrupt blocks and a forged manifest.
    #[test]
    fn a_lying_peer_is_dropped_and_its_blocks_come_from_another() {
        let (bytes, id, manifest) = file(5 * BLOCK_LEN as usize + 123);
        let (honest, liar) = (PeerId::random(), PeerId::random());
        // The liar's manifest lists a wrong chaining value.
        let mut forged = manifest.clone();
        let mut cvs = forged.blocks.into_vec();
        cvs[3][5] ^= 1;
        forged.blocks = commons_protocol::BoundedVec::try_from_vec(cvs).unwrap();
        let mut f = Fetch::new(id);
        let mut out = vec![0u8; bytes.len()];
        for _ in 0..100 {
            if f.is_complete() {
                break;
            }
            for ask in f.next(&[liar, honest], 2) {
                match ask {
                    FetchAsk::Manifest(p) if p == liar => {
                        assert!(f.on_manifest(p, forged.clone()).is_err());
                    }
                    FetchAsk::Manifest(p) => f.on_manifest(p, manifest.clone()).unwrap(),
                    FetchAsk::Block(p, i) => {
                        let mut data = block(&bytes, i).to_vec();
                        if p == liar {
                            data[0] ^= 0xff;
                        }
                        if let Ok(offset) = f.on_block(p, i, &data) {
                            out[offset as usize..offset as usize + data.len()]
                                .copy_from_slice(&data);
                        }
                    }
                }
            }
        }
        assert!(f.is_complete());
        assert_eq!(out, bytes);
        assert!(f.bad_peers().contains(&liar));
        assert_eq!(f.progress(), (bytes.len() as u64, bytes.len() as u64));
    }

    #[test]
    fn a_manifest_that_lies_about_the_length_still_yields_the_exact_file() {
        let (bytes, id, mut manifest) = file(2 * BLOCK_LEN as usize + 10);
        manifest.len += 100;
        let peer = PeerId::random();
        let mut f = Fetch::new(id);
        f.on_manifest(peer, manifest).unwrap();
        for i in 0..3 {
            f.on_block(peer, i, block(&bytes, i)).unwrap();
        }
        assert!(f.is_complete());
        assert_eq!(f.manifest().unwrap().len, bytes.len() as u64);
    }

    #[test]
    fn corrupt_blocks_are_rejected_and_asked_again_and_resumed_blocks_are_skipped() {
        let (bytes, id, manifest) = file(4 * BLOCK_LEN as usize);
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut f = Fetch::new(id);
        let [FetchAsk::Manifest(p)] = f.next(&[a, b], 4)[..] else {
            panic!("manifest first")
        };
        f.on_manifest(p, manifest).unwrap();
        // Blocks 0 and 1 were on disk already.
        f.resume_block(0);
        f.resume_block(1);
        assert_eq!(f.resumed, 2);
        let asks = f.next(&[a, b], 4);
        assert_eq!(asks.len(), 2, "{asks:?}");
        // Peer a sends garbage for its block: rejected, a is dropped.
        let (pa, ia) = asks
            .iter()
            .find_map(|x| match x {
                FetchAsk::Block(p, i) if *p == a => Some((*p, *i)),
                _ => None,
            })
            .unwrap();
        assert!(f.on_block(pa, ia, &vec![0u8; BLOCK_LEN as usize]).is_err());
        assert_eq!(f.rejected, 1);
        // The block goes to b next.
        let again = f.next(&[a, b], 4);
        assert!(again.contains(&FetchAsk::Block(b, ia)), "{again:?}");
        // A peer that keeps failing is dropped too.
        for _ in 0..MAX_FAILURES {
            f.on_failure(b, Some(ia));
        }
        assert!(f.next(&[a, b], 4).is_empty(), "nobody left to ask");
        assert!(!f.is_complete());
        let _ = bytes;
    }

    /// Serves `asks` from `bytes` (corrupting every block when `lie`).
    fn answer(
        m: &mut MemoryFetches,
        asks: Asks,
        bytes: &[u8],
        manifest: &Manifest,
        lie: bool,
    ) -> Asks {
        let mut next = Vec::new();
        for (id, ask) in asks {
            let (peer, index, response) = match ask {
                FetchAsk::Manifest(p) => (p, None, BlobResponse::Manifest(manifest.clone())),
                FetchAsk::Block(p, i) => {
                    let mut data = block(bytes, i).to_vec();
                    if lie {
                        data[0] ^= 1;
                    }
                    (p, Some(i), BlobResponse::Block { index: i, data })
                }
            };
            next.extend(m.on_response(id, peer, index, &codec::encode(&response).unwrap()));
        }
        next
    }

    #[tokio::test]
    async fn files_fetched_into_memory_are_checked_shared_and_kept() {
        for len in [100, 3 * BLOCK_LEN as usize + 7] {
            let (bytes, id, manifest) = file(len);
            let peer = PeerId::random();
            let mut m = MemoryFetches::default();
            let (tx1, rx1) = tokio::sync::oneshot::channel();
            let (tx2, rx2) = tokio::sync::oneshot::channel();
            let mut asks = m.request(FetchRequest {
                id,
                from: peer,
                reply: tx1,
            });
            assert_eq!(asks, vec![(id, FetchAsk::Manifest(peer))]);
            // A second unit wanting the same file waits for the same fetch.
            assert!(
                m.request(FetchRequest {
                    id,
                    from: peer,
                    reply: tx2
                })
                .is_empty()
            );
            while !asks.is_empty() {
                asks = answer(&mut m, asks, &bytes, &manifest, false);
            }
            assert_eq!(*rx1.await.unwrap().unwrap(), bytes);
            assert_eq!(*rx2.await.unwrap().unwrap(), bytes);
            assert_eq!(m.active(), 0);
            // Kept: the next request is answered at once.
            let (tx3, rx3) = tokio::sync::oneshot::channel();
            assert!(
                m.request(FetchRequest {
                    id,
                    from: peer,
                    reply: tx3
                })
                .is_empty()
            );
            assert_eq!(*rx3.await.unwrap().unwrap(), bytes);
        }
        // A peer whose blocks do not match fails the fetch; nothing is kept.
        let (bytes, id, manifest) = file(2 * BLOCK_LEN as usize);
        let mut m = MemoryFetches::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut asks = m.request(FetchRequest {
            id,
            from: PeerId::random(),
            reply: tx,
        });
        while !asks.is_empty() {
            asks = answer(&mut m, asks, &bytes, &manifest, true);
        }
        assert!(rx.await.unwrap().is_err());
        assert!(m.cached(&id).is_none());
        // An unreachable peer fails it too, after a few tries.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let peer = PeerId::random();
        let mut asks = m.request(FetchRequest {
            id,
            from: peer,
            reply: tx,
        });
        while let Some((id, ask)) = asks.pop() {
            let index = match ask {
                FetchAsk::Manifest(_) => None,
                FetchAsk::Block(_, i) => Some(i),
            };
            asks.extend(m.on_failure(id, peer, index));
        }
        assert!(rx.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_new_version_of_a_kept_file_fetches_only_the_blocks_that_changed() {
        let len = 4 * BLOCK_LEN as usize + 100;
        let (old, old_id, old_manifest) = file(len);
        let mut new = old.clone();
        // One byte in block 1 and one in the short last block change.
        new[BLOCK_LEN as usize + 5] ^= 0xff;
        new[len - 1] ^= 0xff;
        let new_id = ModelId(Hash(*blake3::hash(&new).as_bytes()));
        let mut b = ManifestBuilder::new();
        for c in new.chunks(BLOCK_LEN as usize) {
            b.push(c).unwrap();
        }
        let new_manifest = b.finish().unwrap();
        let peer = PeerId::random();
        let mut m = MemoryFetches::default();
        for (id, bytes, manifest) in [(old_id, &old, &old_manifest), (new_id, &new, &new_manifest)]
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut asks = m.request(FetchRequest {
                id,
                from: peer,
                reply: tx,
            });
            let mut blocks = BTreeSet::new();
            while !asks.is_empty() {
                blocks.extend(asks.iter().filter_map(|(_, a)| match a {
                    FetchAsk::Block(_, i) => Some(*i),
                    FetchAsk::Manifest(_) => None,
                }));
                asks = answer(&mut m, asks, bytes, manifest, false);
            }
            assert_eq!(*rx.await.unwrap().unwrap(), *bytes);
            if id == old_id {
                assert_eq!(blocks.len(), 5, "the first version is fetched whole");
            } else {
                assert_eq!(blocks, BTreeSet::from([1, 4]), "only the changed blocks");
            }
        }
        assert_eq!(m.reused_bytes(), 3 * BLOCK_LEN);
    }
}
