//! A small thread pool for the kernels: the calling thread works too, and
//! never waits for a helper that has not started.
//!
//! A decode step runs a few hundred short parallel loops (each a few
//! microseconds), separated by short serial work. Handing them to rayon costs
//! two thread switches each (the caller sleeps while the pool works); a pool
//! that gives every thread a fixed share stalls whenever the OS has parked
//! one of its threads, which on a shared machine is often. Here the caller
//! and the helpers claim chunks of items from a shared counter: whoever is
//! running does the work, and the caller only waits for chunks a helper has
//! actually claimed. Helpers spin briefly between loops, so the next one
//! finds them awake, then sleep.
//!
//! Whether a loop is worth splitting depends on the loop and on the machine
//! at the time (a busy machine deschedules helpers mid-chunk; a loop bound by
//! memory bandwidth gains little). So each loop size keeps running averages
//! of its time on the calling thread alone and split, and runs the faster
//! way; a window of split runs every few hundred loops keeps both current.
//!
//! Work that gains little from a second core can run [`solo`]: its loops
//! stay on the calling thread. A single-position decode step is bound by
//! memory bandwidth (a second thread made one 6% faster on the 2-core
//! machine these kernels were measured on) while its helper holds a core,
//! working or spinning between loops; where several processes share the
//! cores, as the stages of a pipeline on one machine do, that core is worth
//! more to them.
//!
//! Which thread computes an item never changes its result: every output is
//! written once, by the same arithmetic, whatever the split.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it yields its core between checks.
const SPIN_HOT: Duration = Duration::from_micros(30);
/// How long an idle helper waits for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// Every `PROBE_EVERY` loops, the next `PROBE_LEN` run split whatever their
/// averages say (the first wakes the helpers and is not counted).
const PROBE_EVERY: u64 = 512;
const PROBE_LEN: u64 = 48;

thread_local! {
    static SOLO: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the calling thread's loops kept on it, unsplit.
pub fn solo<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SOLO.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SOLO.with(|s| s.replace(true)));
    f()
}

/// An output buffer that work items on several threads write into, each item
/// to its own elements.
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` only hands out writes through `write`, whose contract
// (callers write disjoint ranges) rules out data races; the buffer outlives it.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _out: std::marker::PhantomData,
        }
    }

    /// Writes `values` at `offset`.
    ///
    /// # Safety
    /// No other thread may read or write `offset..offset + values.len()`
    /// while the buffer is shared: each work item writes only its own outputs.
    pub(crate) unsafe fn write(&self, offset: usize, values: &[f32]) {
        assert!(
            offset + values.len() <= self.len,
            "write past the output buffer"
        );
        // SAFETY: in bounds (checked above); the caller guarantees that no one
        // else touches these elements; `values` cannot alias the buffer, which
        // is mutably borrowed for the lifetime of `self`.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(offset), values.len());
        }
    }
}

type Work<'a> = dyn Fn(Range<usize>) + Sync + 'a;

/// One parallel loop.
struct Job {
    /// The loop body. Only called while the job is open or by a helper that
    /// registered in `active` before it closed; the caller keeps it alive
    /// until then (see [`run`]).
    work: *const Work<'static>,
    n_items: usize,
    chunk: usize,
    next: AtomicUsize,
    /// Helpers inside the job.
    active: AtomicUsize,
    closed: AtomicBool,
    panicked: AtomicBool,
}

// SAFETY: `work` points to a `Sync` closure, called from several threads only
// under the protocol described on the field; everything else is atomics.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs chunks until none are left.
    ///
    /// # Safety
    /// `self.work` must be alive: called by the job's caller, or by a helper
    /// registered in `active` that found the job open.
    unsafe fn drain(&self) {
        loop {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.n_items {
                return;
            }
            // SAFETY: alive, by this function's contract.
            let work = unsafe { &*self.work };
            work(start..self.n_items.min(start + self.chunk));
        }
    }

    /// A helper's part.
    fn help(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
        if !self.closed.load(Ordering::SeqCst) {
            // The caller closes the job before it waits for `active` to drop to
            // zero, and both sides use sequentially consistent operations: we
            // saw the job open, so the caller will see us and wait.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: registered in `active` and the job was open.
                unsafe { self.drain() }
            }));
            if ran.is_err() {
                self.panicked.store(true, Ordering::SeqCst);
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Running averages of one loop size's time, in nanoseconds (0: not yet seen).
#[derive(Debug, Default, Clone, Copy)]
struct Timing {
    alone: f64,
    split: f64,
}

impl Timing {
    fn record(slot: &mut f64, ns: f64) {
        *slot = if *slot == 0.0 {
            ns
        } else {
            *slot + (ns - *slot) / 4.0
        };
    }
}

struct Pool {
    /// The job helpers should join, if any.
    current: Mutex<Option<Arc<Job>>>,
    /// Bumped for every new job.
    epoch: AtomicU64,
    helpers: Vec<Thread>,
    /// Loops seen, for the probe windows.
    loops: AtomicU64,
    /// Timings by loop size.
    timings: Mutex<HashMap<usize, Timing>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = candle_core::utils::get_num_threads().max(1);
        let helpers = (1..threads)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("commons-kernels-{i}"))
                    // Helpers block in `pool()` until this initialisation is done.
                    .spawn(|| helper(pool()))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Pool {
            current: Mutex::new(None),
            epoch: AtomicU64::new(0),
            helpers,
            loops: AtomicU64::new(0),
            timings: Mutex::new(HashMap::new()),
        }
    })
}

fn helper(pool: &'static Pool) {
    let mut seen = 0u64;
    loop {
        // Wait for a new job: spin for a while, then sleep until woken (each
        // new job unparks every helper).
        let since = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = pool.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let idle = since.elapsed();
            if idle > SPIN {
                std::thread::park();
            } else if idle > SPIN_HOT {
                // Leave the core to other work while waiting.
                std::thread::yield_now();
            }
        }
        let job = pool
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(job) = job {
            job.help();
        }
    }
}

/// Runs `f` over `0..n_items`: split between the calling thread and the
/// pool's helpers when `parallel` and splitting has been the faster way for
/// loops of this size, on the calling thread alone otherwise.
pub(crate) fn run<F: Fn(Range<usize>) + Sync>(n_items: usize, parallel: bool, f: F) {
    if n_items == 0 {
        return;
    }
    let pool = pool();
    if !parallel || pool.helpers.is_empty() || SOLO.with(std::cell::Cell::get) {
        f(0..n_items);
        return;
    }
    let n = pool.loops.fetch_add(1, Ordering::Relaxed) % PROBE_EVERY;
    let (probe, counted) = (n < PROBE_LEN, n != 0);
    let timing = *pool
        .timings
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(n_items)
        .or_default();
    // Unknown ways are tried first (split, then alone), then the faster runs.
    let split =
        probe || timing.split == 0.0 || (timing.alone != 0.0 && timing.split < timing.alone);
    let start = Instant::now();
    if split {
        run_split(pool, n_items, &f);
    } else {
        f(0..n_items);
    }
    let ns = start.elapsed().as_nanos() as f64;
    if counted {
        let mut timings = pool.timings.lock().unwrap_or_else(PoisonError::into_inner);
        let t = timings.entry(n_items).or_default();
        Timing::record(if split { &mut t.split } else { &mut t.alone }, ns);
    }
}

/// `run`'s split path.
fn run_split(pool: &Pool, n_items: usize, f: &Work<'_>) {
    let threads = pool.helpers.len() + 1;
    // SAFETY: only the lifetime is erased; `Job::work`'s protocol keeps every
    // call within this function, which waits for all of them before it returns.
    let work: *const Work<'static> = unsafe { std::mem::transmute::<&Work<'_>, &Work<'static>>(f) };
    let job = Arc::new(Job {
        work,
        n_items,
        chunk: n_items.div_ceil(threads * 8).max(1),
        next: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
    });
    *pool.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&job));
    pool.epoch.fetch_add(1, Ordering::Release);
    for h in &pool.helpers {
        h.unpark();
    }
    // SAFETY: the caller's closure is alive for this whole function.
    unsafe { job.drain() };
    job.closed.store(true, Ordering::SeqCst);
    let mut spins = 0u32;
    while job.active.load(Ordering::SeqCst) != 0 {
        spins += 1;
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    if job.panicked.load(Ordering::SeqCst) {
        panic!("a kernel panicked on a helper thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threads that ran the items of a loop of `n` items.
    fn threads_of(n: usize) -> std::collections::HashSet<std::thread::ThreadId> {
        let seen = Mutex::new(std::collections::HashSet::new());
        run(n, true, |range| {
            // Long enough for a helper to join in.
            let until = Instant::now() + Duration::from_micros(20 * range.len() as u64);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            seen.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(std::thread::current().id());
        });
        seen.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn solo_loops_stay_on_the_calling_thread_and_cover_every_item() {
        let me = std::thread::current().id();
        let alone = solo(|| threads_of(512));
        assert_eq!(alone.len(), 1);
        assert!(alone.contains(&me));
        // And every item once, whether solo or not.
        for on in [true, false] {
            let mut out = vec![0f32; 1000];
            let shared = SharedOut::new(&mut out);
            let body = |r: Range<usize>| {
                let values: Vec<f32> = r.clone().map(|i| i as f32).collect();
                // SAFETY: each item's range is written by its own call only.
                unsafe { shared.write(r.start, &values) };
            };
            if on {
                solo(|| run(1000, true, body));
            } else {
                run(1000, true, body);
            }
            assert!(out.iter().enumerate().all(|(i, v)| *v == i as f32));
        }
        // Solo ends with its call.
        assert!(!SOLO.with(std::cell::Cell::get));
    }
}
