//! KV-cache sessions on a stage: one cache per session id, a token budget per
//! session and for the whole stage, least-recently-used eviction, explicit
//! close.

use std::collections::HashMap;

use commons_protocol::SessionId;

use super::stage::KvCache;

/// Limits of a session store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most sessions held at once.
    pub max_sessions: usize,
    /// Most cached tokens over all sessions (the memory budget).
    pub max_total_tokens: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            max_total_tokens: 64 * 2048,
        }
    }
}

/// Why a session step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The step would take the session past its own token budget.
    #[error("session {session} would hold {needed} tokens, over its budget of {budget}")]
    OverBudget {
        /// The session.
        session: SessionId,
        /// Tokens it would hold.
        needed: usize,
        /// Its budget.
        budget: usize,
    },
    /// Not even evicting every other session makes room.
    #[error("no room for {needed} tokens (the stage holds at most {max_total})")]
    NoRoom {
        /// Tokens needed.
        needed: usize,
        /// The stage's total budget.
        max_total: usize,
    },
    /// A step continues a session that is not here (never opened, closed or evicted).
    #[error("unknown session {session} (closed or evicted); restart it from position 0")]
    Unknown {
        /// The session.
        session: SessionId,
    },
    /// A step starts past the end of the session's cache.
    #[error("session {session} holds {cached} tokens but the step starts at position {start_pos}")]
    Position {
        /// The session.
        session: SessionId,
        /// Tokens cached.
        cached: usize,
        /// Where the step says it starts.
        start_pos: usize,
    },
}

#[derive(Debug)]
struct Session {
    cache: KvCache,
    budget: usize,
    last_used: u64,
}

/// The sessions of one stage.
#[derive(Debug)]
pub struct SessionStore {
    limits: SessionLimits,
    sessions: HashMap<SessionId, Session>,
    clock: u64,
    evicted: u64,
}

/// A session checked out for one step; put it back with [`SessionStore::commit`].
#[derive(Debug)]
pub struct Checkout {
    /// The session.
    pub id: SessionId,
    /// Its cache, to run the step on.
    pub cache: KvCache,
    budget: usize,
}

impl SessionStore {
    /// An empty store.
    #[must_use]
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
            clock: 0,
            evicted: 0,
        }
    }

    /// Sessions held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when no session is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Tokens cached over all sessions.
    #[must_use]
    pub fn total_tokens(&self) -> usize {
        self.sessions.values().map(|s| s.cache.len()).sum()
    }

    /// Sessions evicted so far to make room.
    #[must_use]
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Whether `id` is held.
    #[must_use]
    pub fn contains(&self, id: &SessionId) -> bool {
        self.sessions.contains_key(id)
    }

    /// Takes session `id` out for a step of `tokens` tokens starting at
    /// `start_pos`. A step at position 0 opens (or restarts) the session with
    /// `budget` tokens; a later step continues its cache, after forgetting
    /// the positions from `start_pos` on if the cache holds more (its issuer
    /// runs that step again: the steps after were dropped, or were never
    /// taken), and must not start past the cache's end. Evicts the least
    /// recently used other sessions when the stage's budget is short.
    pub fn checkout(
        &mut self,
        id: SessionId,
        start_pos: usize,
        tokens: usize,
        budget: usize,
        fresh: impl FnOnce() -> KvCache,
    ) -> Result<Checkout, SessionError> {
        let (cache, budget) = if start_pos == 0 {
            let mut cache = self.sessions.remove(&id).map_or_else(fresh, |s| s.cache);
            cache.clear();
            (cache, budget)
        } else {
            let s = self
                .sessions
                .get(&id)
                .ok_or(SessionError::Unknown { session: id })?;
            if s.cache.len() < start_pos {
                return Err(SessionError::Position {
                    session: id,
                    cached: s.cache.len(),
                    start_pos,
                });
            }
            let mut s = self
                .sessions
                .remove(&id)
                .ok_or(SessionError::Unknown { session: id })?;
            s.cache.rewind(start_pos);
            (s.cache, s.budget)
        };
        let needed = start_pos + tokens;
        let result = if needed > budget {
            Err(SessionError::OverBudget {
                session: id,
                needed,
                budget,
            })
        } else {
            self.make_room(needed)
        };
        match result {
            Ok(()) => Ok(Checkout { id, cache, budget }),
            Err(e) => {
                // A refused step loses nothing: the session goes back as it was.
                if start_pos > 0 {
                    self.clock += 1;
                    self.sessions.insert(
                        id,
                        Session {
                            cache,
                            budget,
                            last_used: self.clock,
                        },
                    );
                }
                Err(e)
            }
        }
    }

    /// Puts a session back after its step.
    pub fn commit(&mut self, checkout: Checkout) {
        self.clock += 1;
        self.sessions.insert(
            checkout.id,
            Session {
                cache: checkout.cache,
                budget: checkout.budget,
                last_used: self.clock,
            },
        );
    }

    /// Drops session `id`; true if it was held.
    pub fn close(&mut self, id: &SessionId) -> bool {
        self.sessions.remove(id).is_some()
    }

    /// Evicts least-recently-used sessions until `needed` more tokens and one
    /// more session fit.
    fn make_room(&mut self, needed: usize) -> Result<(), SessionError> {
        if needed > self.limits.max_total_tokens {
            return Err(SessionError::NoRoom {
                needed,
                max_total: self.limits.max_total_tokens,
            });
        }
        while self.total_tokens() + needed > self.limits.max_total_tokens
            || self.sessions.len() >= self.limits.max_sessions
        {
            let Some(victim) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            tracing::debug!(session = %victim, "evicting least recently used session");
            self.sessions.remove(&victim);
            self.evicted += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::tiny::{TinySpec, write_tiny_gguf};
    use crate::executor::{ModelFile, Stage, StageInput};

    fn sid(n: u8) -> SessionId {
        SessionId([n; 16])
    }

    fn stage() -> (tempfile::TempDir, Stage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_gguf(
            &path,
            &TinySpec {
                n_layer: 2,
                ..TinySpec::default()
            },
        )
        .unwrap();
        let model = ModelFile::open(&path).unwrap();
        let stage = Stage::load(&model, 0..2, &candle_core::Device::Cpu).unwrap();
        (dir, stage)
    }

    fn step(
        store: &mut SessionStore,
        stage: &Stage,
        id: SessionId,
        start: usize,
        n: usize,
    ) -> Result<(), SessionError> {
        let mut c = store.checkout(id, start, n, 16, || stage.new_cache())?;
        stage
            .forward(StageInput::Tokens(vec![5; n]), &mut c.cache)
            .unwrap();
        store.commit(c);
        Ok(())
    }

    #[test]
    fn steps_follow_the_cache_and_budgets_hold() {
        let (_d, stage) = stage();
        let mut store = SessionStore::new(SessionLimits {
            max_sessions: 4,
            max_total_tokens: 40,
        });
        step(&mut store, &stage, sid(1), 0, 10).unwrap();
        step(&mut store, &stage, sid(1), 10, 1).unwrap();
        assert_eq!(store.total_tokens(), 11);
        // Past the cache's end, unknown session, over the session's budget: refused, nothing lost.
        assert_eq!(
            step(&mut store, &stage, sid(1), 12, 1),
            Err(SessionError::Position {
                session: sid(1),
                cached: 11,
                start_pos: 12
            })
        );
        assert_eq!(
            step(&mut store, &stage, sid(2), 3, 1),
            Err(SessionError::Unknown { session: sid(2) })
        );
        assert!(matches!(
            step(&mut store, &stage, sid(1), 11, 6),
            Err(SessionError::OverBudget {
                needed: 17,
                budget: 16,
                ..
            })
        ));
        assert_eq!(store.total_tokens(), 11);
        step(&mut store, &stage, sid(1), 11, 5).unwrap();
        // Restarting at 0 replaces the cache.
        step(&mut store, &stage, sid(1), 0, 3).unwrap();
        assert_eq!(store.total_tokens(), 3);
        assert!(store.close(&sid(1)));
        assert!(!store.close(&sid(1)));
        assert!(store.is_empty());
    }

    /// Runs `tokens` at `start` in session `id` and returns the stage's output.
    fn run(
        store: &mut SessionStore,
        stage: &Stage,
        id: SessionId,
        start: usize,
        tokens: &[u32],
    ) -> Vec<f32> {
        let mut c = store
            .checkout(id, start, tokens.len(), 16, || stage.new_cache())
            .unwrap();
        let out = stage
            .forward(StageInput::Tokens(tokens.to_vec()), &mut c.cache)
            .unwrap();
        store.commit(c);
        let t = match out {
            crate::executor::StageOutput::Hidden(t) | crate::executor::StageOutput::Logits(t) => t,
        };
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn a_step_before_the_cache_end_rewinds_the_session_to_it() {
        let (_d, stage) = stage();
        let mut store = SessionStore::new(SessionLimits::default());
        // One session runs 1 2 3, then 4 and 5, then goes back to run 6 after 4.
        run(&mut store, &stage, sid(1), 0, &[1, 2, 3]);
        run(&mut store, &stage, sid(1), 3, &[4]);
        run(&mut store, &stage, sid(1), 4, &[5]);
        let rewound = run(&mut store, &stage, sid(1), 4, &[6]);
        // Another never ran 5.
        run(&mut store, &stage, sid(2), 0, &[1, 2, 3]);
        run(&mut store, &stage, sid(2), 3, &[4]);
        let straight = run(&mut store, &stage, sid(2), 4, &[6]);
        assert_eq!(rewound, straight, "bit for bit");
        assert_eq!(store.total_tokens(), 10);
        // And on from there, identically.
        assert_eq!(
            run(&mut store, &stage, sid(1), 5, &[7]),
            run(&mut store, &stage, sid(2), 5, &[7])
        );
    }

    #[test]
    fn least_recently_used_sessions_are_evicted_first() {
        let (_d, stage) = stage();
        let mut store = SessionStore::new(SessionLimits {
            max_sessions: 3,
            max_total_tokens: 30,
        });
        step(&mut store, &stage, sid(1), 0, 10).unwrap();
        step(&mut store, &stage, sid(2), 0, 10).unwrap();
        step(&mut store, &stage, sid(3), 0, 5).unwrap();
        step(&mut store, &stage, sid(1), 10, 1).unwrap(); // 1 is now the most recent
        // 10 more tokens: 2 is the least recently used.
        step(&mut store, &stage, sid(4), 0, 10).unwrap();
        assert!(!store.contains(&sid(2)));
        assert!(store.contains(&sid(1)) && store.contains(&sid(3)) && store.contains(&sid(4)));
        assert_eq!(store.evicted(), 1);
        assert_eq!(
            step(&mut store, &stage, sid(2), 10, 1),
            Err(SessionError::Unknown { session: sid(2) })
        );
        // Something larger than the whole stage can never fit.
        let mut big = SessionStore::new(SessionLimits {
            max_sessions: 3,
            max_total_tokens: 8,
        });
        assert!(matches!(
            step(&mut big, &stage, sid(9), 0, 9),
            Err(SessionError::NoRoom { .. })
        ));
    }
}
