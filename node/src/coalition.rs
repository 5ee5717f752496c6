//! `commons coalition create | add-member | remove-member | sign | show |
//! publish`, reading the charter files a node serves (`commons node join
//! --coalition FILE`), and the node's [`Charters`]: the charters it has
//! heard of through files, its control API and the swarm, kept in its data
//! directory.
//!
//! A charter file holds exactly the wire bytes of a signed envelope (see
//! [`commons_protocol::envelope`]) carrying a [`CoalitionCharter`]: the
//! envelope is signed by the admin who wrote that version, and the charter
//! inside carries the admins' own signatures over its contents. A version is
//! valid once `threshold` distinct admins have signed it. Every change of the
//! membership makes a new version (one higher, signatures cleared) that the
//! admins sign again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use commons_coordinator::trust::{CharterBook, Coalitions, Learned, NotLearned};
use commons_protocol::envelope::{Envelope, OpenError, SealError};
use commons_protocol::messages::CoalitionCharter;
use commons_protocol::{CoalitionId, Identity, NodeId, UnixMillis};

use crate::settings::Settings;

/// A charter file that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CharterFileError {
    /// The file could not be read.
    #[error("cannot read charter file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a charter signed by one of its admins.
    #[error("{path} is not a coalition charter signed by one of its admins")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// The charter could not be signed into an envelope.
    #[error("cannot seal the charter for {path}")]
    Seal {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: SealError,
    },
    /// The file could not be written.
    #[error("cannot write charter file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// Reads a charter file. Its envelope must be signed by one of the charter's
/// admins; whether enough admins signed the charter is [`CoalitionCharter::verify`]'s question.
pub fn read(path: &Path) -> Result<CoalitionCharter, CharterFileError> {
    let bytes = std::fs::read(path).map_err(|source| CharterFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    Envelope::open_bytes(&bytes, now()).map_err(|source| CharterFileError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Writes `charter` to `path`, sealed by `admin`, atomically (beside, then renamed).
pub fn write(
    path: &Path,
    charter: &CoalitionCharter,
    admin: &Identity,
) -> Result<(), CharterFileError> {
    let bytes = Envelope::seal(admin, charter)
        .map_err(|source| CharterFileError::Seal {
            path: path.to_owned(),
            source,
        })?
        .to_bytes();
    let write_err = |source| CharterFileError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// A charter offered to a node that it did not take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OfferError {
    /// Not a charter envelope sealed by one of its admins.
    #[error("not a coalition charter sealed by one of its admins")]
    Open(#[source] OpenError),
    /// Not valid, not newer, or changing what no version may change.
    #[error(transparent)]
    NotLearned(#[from] NotLearned),
}

impl OfferError {
    /// True for a version already superseded (nothing wrong with it).
    #[must_use]
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::NotLearned(e) if e.is_stale())
    }
}

/// A node's charters: the pure [`CharterBook`] (the latest valid version of
/// each coalition heard of, and which are served), the sealed bytes each
/// came in (passed on as they are: only an admin can seal a charter), and a
/// copy of each served coalition's latest charter in the data directory, so
/// a restart never falls back to an older membership.
#[derive(Debug, Clone)]
pub struct Charters {
    book: CharterBook,
    sealed: BTreeMap<CoalitionId, Vec<u8>>,
    dir: Option<PathBuf>,
}

impl Default for Charters {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl Charters {
    /// Charters kept in memory only.
    #[must_use]
    pub fn in_memory() -> Self {
        Self {
            book: CharterBook::default(),
            sealed: BTreeMap::new(),
            dir: None,
        }
    }

    /// The charters kept in `dir` (created if missing). A file that is not a
    /// valid charter is skipped with a warning.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut this = Self::in_memory();
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "charter"))
            .collect();
        paths.sort();
        for path in paths {
            let outcome = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| this.offer(&bytes, now()).map_err(anyhow::Error::from));
            match outcome {
                Ok(_) => {}
                Err(e)
                    if e.downcast_ref::<OfferError>()
                        .is_some_and(OfferError::is_stale) => {}
                Err(e) => tracing::warn!(path = %path.display(), "skipping a kept charter: {e:#}"),
            }
        }
        this.dir = Some(dir.to_owned());
        Ok(this)
    }

    /// Takes a sealed charter (from a file, the control API or the swarm) if
    /// it is valid and newer than the version known; keeps it on disk when
    /// its coalition is served.
    pub fn offer(
        &mut self,
        bytes: &[u8],
        now: UnixMillis,
    ) -> Result<(CoalitionCharter, Learned), OfferError> {
        let charter: CoalitionCharter =
            Envelope::open_bytes(bytes, now).map_err(OfferError::Open)?;
        let learned = self.book.learn(charter.clone())?;
        self.sealed.insert(charter.id, bytes.to_vec());
        // The book may have forgotten old coalitions to make room.
        self.sealed.retain(|id, _| self.book.get(id).is_some());
        if self.book.is_served(&charter.id) {
            self.keep(&charter.id);
        }
        Ok((charter, learned))
    }

    /// Serves `id` (pending until its charter is known); false if it was served.
    pub fn serve(&mut self, id: CoalitionId) -> bool {
        let new = self.book.serve(id);
        self.keep(&id);
        new
    }

    /// Stops serving `id`; false if it was not served.
    pub fn drop_coalition(&mut self, id: &CoalitionId) -> bool {
        self.book.drop_coalition(id)
    }

    /// Serves the coalition `arg` names: a charter file (taken unless a
    /// newer version is known) or a coalition id (pending until its charter
    /// reaches this node through the swarm).
    pub fn serve_arg(&mut self, arg: &str) -> anyhow::Result<CoalitionId> {
        if arg.len() == 64
            && let Ok(id) = arg.parse::<CoalitionId>()
        {
            self.serve(id);
            return Ok(id);
        }
        let path = Path::new(arg);
        let bytes = std::fs::read(path).map_err(|source| {
            if path.exists() {
                anyhow::Error::from(CharterFileError::Read {
                    path: path.to_owned(),
                    source,
                })
            } else {
                anyhow::anyhow!(
                    "--coalition {arg}: neither a coalition id (64 hex digits) nor a charter file"
                )
            }
        })?;
        let id = match self.offer(&bytes, now()) {
            Ok((charter, _)) => charter.id,
            Err(e) if e.is_stale() => {
                let charter: CoalitionCharter =
                    Envelope::open_bytes(&bytes, now()).map_err(|source| {
                        CharterFileError::Open {
                            path: path.to_owned(),
                            source,
                        }
                    })?;
                if let Some(newer) = self.book.get(&charter.id) {
                    tracing::info!(
                        coalition = %charter.id,
                        file = charter.version,
                        kept = newer.version,
                        "a newer version of this charter is known; serving that"
                    );
                }
                charter.id
            }
            Err(e) => {
                let short = matches!(
                    &e,
                    OfferError::NotLearned(NotLearned::Invalid(invalid))
                        if matches!(invalid.source, commons_protocol::messages::CharterError::NotEnoughSignatures { .. })
                );
                let why = if short {
                    "the charter is not signed by enough admins yet (add signatures with `commons coalition sign`)"
                } else {
                    "not a charter this node can serve"
                };
                return Err(anyhow::Error::from(e)
                    .context(format!("--coalition {}: {why}", path.display())));
            }
        };
        self.serve(id);
        Ok(id)
    }

    /// What is served now.
    #[must_use]
    pub fn coalitions(&self) -> Coalitions {
        self.book.coalitions()
    }

    /// The book.
    #[must_use]
    pub fn book(&self) -> &CharterBook {
        &self.book
    }

    /// The sealed bytes of the served coalitions' charters, to pass on.
    pub fn served_sealed(&self) -> impl Iterator<Item = &[u8]> {
        self.sealed
            .iter()
            .filter(|(id, _)| self.book.is_served(id))
            .map(|(_, b)| b.as_slice())
    }

    /// Writes `id`'s sealed charter to the data directory, if both exist.
    fn keep(&self, id: &CoalitionId) {
        let (Some(dir), Some(bytes)) = (&self.dir, self.sealed.get(id)) else {
            return;
        };
        let path = dir.join(format!("{id}.charter"));
        let tmp = dir.join(format!("{id}.charter.tmp"));
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), %e, "cannot keep the charter");
        }
    }
}

/// The coalition named by `arg`: its id (64 hex digits) or a charter file.
pub fn resolve_id(arg: &str) -> anyhow::Result<CoalitionId> {
    if arg.len() == 64
        && let Ok(id) = arg.parse::<CoalitionId>()
    {
        return Ok(id);
    }
    let path = Path::new(arg);
    if !path.exists() {
        bail!("--coalition {arg}: neither a coalition id (64 hex digits) nor a charter file");
    }
    Ok(read(path)?.id)
}

/// `commons coalition …`.
#[derive(Debug, Subcommand)]
pub enum CoalitionCommand {
    /// Found a coalition: write the first version of its charter, signed by the admins whose keys are given.
    Create(CreateArgs),
    /// Add a member: a new version of the charter, signed by an admin.
    AddMember(MemberArgs),
    /// Remove a member: a new version of the charter, signed by an admin.
    RemoveMember(MemberArgs),
    /// Add an admin's signature to the charter's current version (for thresholds above 1).
    Sign(SignArgs),
    /// Show a charter: its members, admins, signatures, and whether it is valid.
    Show(ShowArgs),
    /// Hand a charter to a running node, which takes it if it is valid and
    /// newer than the version it knows, and passes it on to the swarm: every
    /// node serving the coalition then serves the new membership.
    Publish(PublishArgs),
}

/// Arguments of `commons coalition publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The charter file.
    pub file: PathBuf,
    /// The node's control API. Default: the address the node in the data directory recorded.
    #[arg(long, value_name = "ADDR")]
    pub control: Option<std::net::SocketAddr>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `commons coalition create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The coalition's name.
    pub name: String,
    /// Where to write the charter.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// An admin's key file (repeatable); each signs the first version.
    /// Default: the node's own key.
    #[arg(long, value_name = "KEYFILE")]
    pub admin: Vec<PathBuf>,
    /// An admin whose key is not here (repeatable); they sign later with `commons coalition sign`.
    #[arg(long, value_name = "PEERID")]
    pub admin_peer: Vec<NodeId>,
    /// Admin signatures a version needs to be valid.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threshold: u16,
    /// A member (repeatable): whose jobs and work units the coalition's nodes take.
    #[arg(long, value_name = "PEERID")]
    pub member: Vec<NodeId>,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
    /// Print the charter as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `commons coalition add-member` and `remove-member`.
#[derive(Debug, Args)]
pub struct MemberArgs {
    /// The charter file (rewritten in place).
    pub file: PathBuf,
    /// The member's PeerId.
    pub peer: NodeId,
    /// The signing admin's key file. Default: the node's own key.
    #[arg(long, value_name = "KEYFILE")]
    pub key: Option<PathBuf>,
    /// Print the charter as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `commons coalition sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The charter file (rewritten in place).
    pub file: PathBuf,
    /// The signing admin's key file. Default: the node's own key.
    #[arg(long, value_name = "KEYFILE")]
    pub key: Option<PathBuf>,
    /// Print the charter as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `commons coalition show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The charter file.
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `commons coalition …`.
pub fn run(settings: &Settings, command: CoalitionCommand) -> anyhow::Result<ExitCode> {
    match command {
        CoalitionCommand::Create(args) => create(settings, args),
        CoalitionCommand::AddMember(args) => change_members(settings, args, true),
        CoalitionCommand::RemoveMember(args) => change_members(settings, args, false),
        CoalitionCommand::Sign(args) => sign(settings, &args),
        CoalitionCommand::Show(args) => {
            let charter = read(&args.file)?;
            print(&charter, &args.file, args.json);
            Ok(ExitCode::SUCCESS)
        }
        CoalitionCommand::Publish(args) => publish(settings, &args),
    }
}

fn publish(settings: &Settings, args: &PublishArgs) -> anyhow::Result<ExitCode> {
    let charter = read(&args.file)?;
    charter.verify().with_context(|| {
        format!(
            "{}: version {} is not signed by enough admins yet (add signatures with `commons coalition sign`)",
            args.file.display(),
            charter.version
        )
    })?;
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let addr = crate::join::control_addr(settings, args.control)?;
    let answer = crate::control::post_to(addr, "/v1/charters", &bytes)?;
    if args.json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    if answer["changed"] == true {
        println!(
            "the node at {addr} took coalition {} version {}",
            charter.name, charter.version
        );
    } else {
        println!(
            "the node at {addr} knows coalition {} at version {} already",
            charter.name, answer["version"]
        );
    }
    if answer["published"] == true {
        println!("passed on to the swarm");
    } else {
        println!("not passed on: the node has no peers subscribed to charters yet");
    }
    Ok(ExitCode::SUCCESS)
}

fn create(settings: &Settings, args: CreateArgs) -> anyhow::Result<ExitCode> {
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            args.out.display()
        );
    }
    let mut signers: Vec<Identity> = Vec::new();
    if args.admin.is_empty() {
        let (identity, _) = crate::identity::load_or_create(&settings.key)?;
        signers.push(identity);
    }
    for path in &args.admin {
        let identity = crate::identity::load(path)?;
        if !signers.iter().any(|s| s.node_id() == identity.node_id()) {
            signers.push(identity);
        }
    }
    let admins: Vec<NodeId> = signers
        .iter()
        .map(Identity::node_id)
        .chain(args.admin_peer.iter().copied())
        .collect();
    let mut charter =
        CoalitionCharter::found(&args.name, &admins, args.threshold, &args.member, now())
            .with_context(|| format!("cannot found coalition {}", args.name))?;
    for admin in &signers {
        charter.sign_as(admin)?;
    }
    let first = signers
        .first()
        .context("a coalition needs an admin whose key is here")?;
    write(&args.out, &charter, first)?;
    print(&charter, &args.out, args.json);
    Ok(ExitCode::SUCCESS)
}

/// The admin key for a change: `--key`, or the node's own; it must be an admin.
fn admin_key(
    settings: &Settings,
    key: Option<&Path>,
    charter: &CoalitionCharter,
) -> anyhow::Result<Identity> {
    let path = key.unwrap_or(&settings.key);
    let identity = crate::identity::load(path)
        .with_context(|| "cannot load the admin's key (name it with --key KEYFILE)")?;
    if !charter.is_admin(&identity.node_id()) {
        bail!(
            "the key {} ({}) is not an admin of coalition {}; its admins are {}",
            path.display(),
            identity.node_id(),
            charter.name,
            charter
                .admins
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(identity)
}

fn change_members(settings: &Settings, args: MemberArgs, add: bool) -> anyhow::Result<ExitCode> {
    let current = read(&args.file)?;
    let admin = admin_key(settings, args.key.as_deref(), &current)?;
    let mut next = current.next_version(now().max(current.issued_at));
    let changed = if add {
        next.add_member(args.peer)?
    } else {
        next.remove_member(&args.peer)
    };
    if !changed {
        bail!(
            "{} is {} a member of coalition {}; the charter is unchanged",
            args.peer,
            if add { "already" } else { "not" },
            current.name
        );
    }
    next.sign_as(&admin)?;
    write(&args.file, &next, &admin)?;
    print(&next, &args.file, args.json);
    Ok(ExitCode::SUCCESS)
}

fn sign(settings: &Settings, args: &SignArgs) -> anyhow::Result<ExitCode> {
    let mut charter = read(&args.file)?;
    let admin = admin_key(settings, args.key.as_deref(), &charter)?;
    if charter.valid_signers().contains(&admin.node_id()) {
        bail!(
            "{} has already signed version {} of coalition {}",
            admin.node_id(),
            charter.version,
            charter.name
        );
    }
    charter.sign_as(&admin)?;
    write(&args.file, &charter, &admin)?;
    print(&charter, &args.file, args.json);
    Ok(ExitCode::SUCCESS)
}

/// The charter as JSON.
#[must_use]
pub fn charter_json(charter: &CoalitionCharter, file: &Path) -> serde_json::Value {
    let signed = charter.valid_signers();
    let problem = charter.verify().err().map(|e| e.to_string());
    serde_json::json!({
        "file": file.display().to_string(),
        "id": charter.id.to_string(),
        "name": charter.name,
        "version": charter.version,
        "issued_at": charter.issued_at.0,
        "threshold": charter.threshold,
        "admins": charter.admins.iter().map(|a| serde_json::json!({
            "peer_id": a.to_string(),
            "signed": signed.contains(a),
        })).collect::<Vec<_>>(),
        "members": charter.members.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "valid": problem.is_none(),
        "problem": problem,
    })
}

fn print(charter: &CoalitionCharter, file: &Path, json: bool) {
    if json {
        println!("{}", charter_json(charter, file));
        return;
    }
    let signed = charter.valid_signers();
    println!("coalition {}", charter.name);
    println!("  id:        {}", charter.id);
    println!(
        "  version:   {} (issued at {} ms since the epoch)",
        charter.version, charter.issued_at.0
    );
    println!(
        "  threshold: {} of {} admins",
        charter.threshold,
        charter.admins.len()
    );
    println!("  admins:");
    for a in charter.admins.iter() {
        let mark = if signed.contains(a) {
            "signed"
        } else {
            "not signed"
        };
        println!("    {a}  {mark}");
    }
    println!("  members ({}):", charter.members.len());
    for m in charter.members.iter() {
        println!("    {m}");
    }
    match charter.verify() {
        Ok(()) => println!("  valid: yes"),
        Err(e) => {
            println!("  valid: no ({e})");
            println!(
                "  other admins sign with `commons coalition sign {} --key KEYFILE`",
                file.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn charter_files_roundtrip_and_must_be_sealed_by_an_admin() {
        let dir = tempfile::tempdir().unwrap();
        let (admin, outsider) = (
            Identity::from_secret([1; 32]),
            Identity::from_secret([2; 32]),
        );
        let mut charter = CoalitionCharter::found(
            "riverside",
            &[admin.node_id()],
            1,
            &[NodeId([5; 32])],
            now(),
        )
        .unwrap();
        charter.sign_as(&admin).unwrap();
        let path = dir.path().join("riverside.charter");
        write(&path, &charter, &admin).unwrap();
        assert_eq!(read(&path).unwrap(), charter);
        let mut served = Charters::in_memory();
        served.serve_arg(path.to_str().unwrap()).unwrap();
        assert_eq!(
            served.coalitions().ids().into_iter().collect::<Vec<_>>(),
            [charter.id]
        );
        assert_eq!(resolve_id(path.to_str().unwrap()).unwrap(), charter.id);
        assert_eq!(resolve_id(&charter.id.to_string()).unwrap(), charter.id);
        assert!(resolve_id("nope").is_err());

        // Sealed by someone who is not an admin: refused on reading.
        assert!(matches!(
            write(&path, &charter, &outsider),
            Err(CharterFileError::Seal { .. })
        ));
        let forged = Envelope::seal_payload(
            &outsider,
            commons_protocol::MessageKind::CoalitionCharter,
            commons_protocol::codec::encode(&charter).unwrap(),
        )
        .unwrap();
        std::fs::write(&path, forged.to_bytes()).unwrap();
        assert!(matches!(read(&path), Err(CharterFileError::Open { .. })));

        // A version short of its threshold is read, but not served.
        let mut unsigned = charter.next_version(now());
        unsigned.add_member(NodeId([6; 32])).unwrap();
        unsigned.admin_signatures = Default::default();
        let bytes = Envelope::seal(&admin, &unsigned).unwrap().to_bytes();
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(read(&path).unwrap().version, 2);
        let e = Charters::in_memory()
            .serve_arg(path.to_str().unwrap())
            .unwrap_err();
        assert!(format!("{e:#}").contains("valid admin signatures"), "{e:#}");
    }

    #[test]
    fn kept_charters_outlive_a_restart_and_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let admin = Identity::from_secret([1; 32]);
        let (m1, m2) = (NodeId([5; 32]), NodeId([6; 32]));
        let mut v1 =
            CoalitionCharter::found("riverside", &[admin.node_id()], 1, &[m1], now()).unwrap();
        v1.sign_as(&admin).unwrap();
        let mut v2 = v1.next_version(now());
        v2.remove_member(&m1);
        v2.add_member(m2).unwrap();
        v2.sign_as(&admin).unwrap();
        let (f1, f2) = (dir.path().join("v1.charter"), dir.path().join("v2.charter"));
        write(&f1, &v1, &admin).unwrap();
        write(&f2, &v2, &admin).unwrap();
        let kept = dir.path().join("kept");

        let mut node = Charters::load(&kept).unwrap();
        node.serve_arg(f1.to_str().unwrap()).unwrap();
        let (_, learned) = node.offer(&std::fs::read(&f2).unwrap(), now()).unwrap();
        assert_eq!(learned, Learned::Newer { from: 1 });
        assert!(node.coalitions().authorize(Some(v1.id), &m1).is_err());

        // Restarted with the old file: the newer version kept wins.
        let mut node = Charters::load(&kept).unwrap();
        node.serve_arg(f1.to_str().unwrap()).unwrap();
        assert_eq!(node.coalitions().get(&v1.id).unwrap().version, 2);
        node.coalitions().authorize(Some(v1.id), &m2).unwrap();
        assert!(node.coalitions().authorize(Some(v1.id), &m1).is_err());
        assert_eq!(node.served_sealed().count(), 1);

        // By id alone: pending until the charter is offered.
        let mut fresh = Charters::in_memory();
        fresh.serve_arg(&v1.id.to_string()).unwrap();
        assert_eq!(fresh.coalitions().pending().len(), 1);
        fresh.offer(&std::fs::read(&f2).unwrap(), now()).unwrap();
        fresh.coalitions().authorize(Some(v1.id), &m2).unwrap();
        assert!(fresh.drop_coalition(&v1.id));
        assert!(fresh.coalitions().is_open());
        // Garbage is refused, not a panic.
        assert!(matches!(
            fresh.offer(b"not a charter", now()),
            Err(OfferError::Open(_))
        ));
        assert!(Charters::in_memory().serve_arg("nope").is_err());
    }
}
