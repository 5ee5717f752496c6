use serde::{Deserialize, Serialize};

use super::Message;
use super::error::ErrorCode;
use super::work::{LayerRange, SamplingParams};
use crate::bounded::BoundedVec;
use crate::codec::Limit;
use crate::envelope::MessageKind;
use crate::ids::{CoalitionId, Hash, JobId, ModelId, NodeId, Nonce};
use crate::time::UnixMillis;

/// A member's request to a coordinator, signed by the member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Who asks; jobs are owned by their submitter.
    pub submitter: NodeId,
    /// Random per request; with the submitter, the replay key.
    pub nonce: Nonce,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the request must not be acted on.
    pub expires_at: UnixMillis,
    /// What to do.
    pub op: JobOp,
}

/// What a job request asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobOp {
    /// Accept a new job. Submitting the same job id again returns its report.
    Submit(JobSpec),
    /// Report on a job, waiting up to `wait_ms` for tokens past `from_token`
    /// or for the job to end (a long poll: how tokens stream).
    Watch {
        /// The job.
        job: JobId,
        /// Tokens the watcher already has.
        from_token: u32,
        /// Longest wait, milliseconds (the coordinator may cap it).
        wait_ms: u32,
    },
    /// Stop a job; only its submitter may.
    Cancel {
        /// The job.
        job: JobId,
    },
}

/// A text generation job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Chosen at random by the submitter.
    pub job: JobId,
    /// The model, by content.
    pub model: ModelId,
    /// The prompt.
    pub input: JobInput,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// How to choose tokens (temperature 0: greedy).
    pub sampling: SamplingParams,
    /// The coalition the job runs for: only its members may submit it and only
    /// nodes serving it run its units. `None`: open work.
    pub coalition: Option<CoalitionId>,
}

/// A job's prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobInput {
    /// Text to continue, as it is.
    Text(String),
    /// A conversation, put through the model's chat template; the model answers as the assistant.
    Chat(BoundedVec<ChatTurn, 256>),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl JobInput {
    /// A single user message.
    #[must_use]
    pub fn user(content: impl Into<String>) -> Self {
        let mut turns = BoundedVec::new();
        // One element always fits.
        let _ = turns.try_push(ChatTurn {
            role: "user".into(),
            content: content.into(),
        });
        Self::Chat(turns)
    }
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobState {
    /// Accepted, waiting for its turn.
    Queued,
    /// Generating.
    Running,
    /// Done: a stop token was produced.
    Stopped,
    /// Done: the token budget or the context was used up.
    Length,
    /// Ended without a result.
    Failed {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// Cancelled by its submitter.
    Cancelled,
}

impl JobState {
    /// True once the job can change no more.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }

    /// A short stable name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Stopped => "stop",
            Self::Length => "length",
            Self::Failed { .. } => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A hop of a job's route and the results it signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHop {
    /// The node.
    pub node: NodeId,
    /// The layers it ran.
    pub layers: LayerRange,
    /// Signed, committed results it returned for this job.
    pub results: u32,
}

/// Where a job's audit log stood when a report was made: the entries it
/// held and the last one's chain value. A submitter who keeps the signed
/// report can hold the coordinator's log to it later: a log rewritten since
/// no longer reaches this value after this many entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    /// Entries in the log.
    pub entries: u64,
    /// The chain value after the last of them.
    pub head: Hash,
}

/// A coordinator's report on a job, signed by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    /// The coordinator.
    pub coordinator: NodeId,
    /// The job.
    pub job: JobId,
    /// The model.
    pub model: ModelId,
    /// Where it stands.
    pub state: JobState,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Index of the first token in `tokens`.
    pub from_token: u32,
    /// Generated tokens from `from_token` on.
    pub tokens: BoundedVec<u32, 32768>,
    /// Generated tokens in all.
    pub total_tokens: u32,
    /// The whole text generated so far (complete characters only).
    pub text: String,
    /// Every hop that returned results, in layer order, with replacements after failovers.
    pub route: BoundedVec<RouteHop, 256>,
    /// Hops replaced after a node failed or timed out.
    pub failovers: u32,
    /// Signed results received and checked.
    pub receipts: u32,
    /// blake3 chain over the commitments of the results that built the output, in order.
    pub transcript: Hash,
    /// Steps whose results another node re-executed and agreed with.
    pub verified: u32,
    /// Units run by checkers and referees for this job (the extra compute).
    pub check_units: u32,
    /// Times the job went back to redo results of a node that lost a
    /// verification dispute after some of its tokens had been reported.
    pub revisions: u32,
    /// Milliseconds from start to the first generated token.
    pub prefill_ms: u64,
    /// Milliseconds for the tokens after the first.
    pub decode_ms: u64,
    /// The job's audit log as committed when the report was made (`None`:
    /// the coordinator keeps no log, or has logged nothing yet).
    pub audit: Option<AuditAnchor>,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the report is stale.
    pub expires_at: UnixMillis,
}

impl Message for JobRequest {
    const KIND: MessageKind = MessageKind::JobRequest;
    const LIMIT: Limit = Limit::M1;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.submitter == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}

impl Message for JobReport {
    const KIND: MessageKind = MessageKind::JobReport;
    const LIMIT: Limit = Limit::M1;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.coordinator == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}
