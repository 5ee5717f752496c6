//! `commons coalition create | add-member | remove-member | sign | show`, and
//! reading the charter files a node serves (`commons node join --coalition FILE`).
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

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use commons_coordinator::trust::Coalitions;
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

/// The coalitions of the charter files given to `commons node join
/// --coalition`: each must be valid (signed by its admins' threshold).
pub fn serve_charters(paths: &[PathBuf]) -> anyhow::Result<Coalitions> {
    let mut charters = Vec::with_capacity(paths.len());
    for path in paths {
        let charter = read(path).context("--coalition")?;
        charter.verify().with_context(|| {
            format!(
                "--coalition {}: coalition {} ({}) version {} is not signed by enough admins yet (add signatures with `commons coalition sign`)",
                path.display(),
                charter.name,
                charter.id,
                charter.version
            )
        })?;
        charters.push(charter);
    }
    Ok(Coalitions::new(charters)?)
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
    }
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
        let served = serve_charters(std::slice::from_ref(&path)).unwrap();
        assert_eq!(served.ids().into_iter().collect::<Vec<_>>(), [charter.id]);
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
        let e = serve_charters(&[path]).unwrap_err();
        assert!(
            format!("{e:#}").contains("not signed by enough admins"),
            "{e:#}"
        );
    }
}
