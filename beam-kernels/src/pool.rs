//! The host kernels' threads: helpers that wait for the next product by spinning, not sleeping.
//!
//! A decode step is a few dozen products of a few MB each with a little single-threaded work
//! between them (norms, routing, one query's attention). On rayon's pool each product ends with
//! the other workers going to sleep, and the next begins by waking them: a futex wake and a
//! context switch per worker and product (27 a token on the 4-layer OLMoE shape, two threads;
//! llama.cpp's threads spin between products instead). Here a product's work items run on the
//! calling thread and on `threads − 1` helper threads that, once out of work, spin for up to
//! [`SPIN`] waiting for the next product and only then park; the caller takes items too and
//! spins until the helpers are done with the product.
//!
//! `threads` is rayon's thread count where the pool is first used (`RAYON_NUM_THREADS`, else
//! the cores), so one setting sizes both. One product holds the helpers at a time: a call made
//! while they are busy (from another thread, or from inside an item) runs on rayon's pool
//! instead, so callers never wait for each other and nothing waits on itself.
//!
//! ```
//! use beam_kernels::pool::for_each_part_mut;
//!
//! // Three parts of one buffer, filled on the pool's threads.
//! let mut out = vec![0u32; 6];
//! for_each_part_mut(&mut out, &[0, 1, 3, 6], |part, values| values.fill(part as u32 + 1));
//! assert_eq!(out, [1, 2, 2, 3, 3, 3]);
//! ```

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// How long a helper spins for the next product before it parks: well above the gaps between a
/// decode step's products (tens to hundreds of microseconds), short enough that an idle program
/// stops spending a core within milliseconds.
pub const SPIN: Duration = Duration::from_millis(2);

/// Runs `run(i)` once for every `i < items`, on the calling thread and the pool's helpers, and
/// returns when all have run. Which thread runs which item is not fixed: items must not depend
/// on each other.
///
/// # Panics
/// If an item panics: the first panic is raised again on the caller once every thread has
/// stopped taking items (items not started by then are skipped).
pub fn for_each_index(items: usize, run: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if items <= 1 || pool.helpers == 0 {
        (0..items).for_each(run);
        return;
    }
    match pool.caller.try_lock() {
        Ok(caller) => on_helpers(pool, caller, items, run),
        Err(TryLockError::Poisoned(poisoned)) => {
            on_helpers(pool, poisoned.into_inner(), items, run)
        }
        Err(TryLockError::WouldBlock) => {
            use rayon::prelude::*;
            (0..items).into_par_iter().for_each(run);
        }
    }
}

/// [`for_each_index`] on the caller and the helpers, for the holder of `pool.caller`.
fn on_helpers(
    pool: &Pool,
    _caller: MutexGuard<'_, ()>,
    items: usize,
    run: &(dyn Fn(usize) + Sync),
) {
    let run: *const (dyn Fn(usize) + Sync + '_) = run;
    // SAFETY: only the lifetime changes. The helpers reach `run` through `job`, and this
    // function returns only after every helper has acknowledged the job (below), after its
    // last use of it.
    let run: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(run) };
    let job = Job {
        run,
        items,
        next: AtomicUsize::new(0),
        panic: Mutex::new(None),
    };
    let shared = pool.shared;
    shared.acks.store(0, Ordering::Relaxed);
    shared
        .job
        .store(&job as *const Job as *mut Job, Ordering::Release);
    shared.epoch.fetch_add(1, Ordering::SeqCst);
    if shared.parked.load(Ordering::SeqCst) > 0 {
        let _sleep = lock(&shared.sleep);
        shared.wake.notify_all();
    }
    job.work();
    while shared.acks.load(Ordering::Acquire) < pool.helpers {
        std::hint::spin_loop();
    }
    shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
    let panic = lock(&job.panic).take();
    if let Some(payload) = panic {
        resume_unwind(payload);
    }
}

/// `f(i, &mut out[offsets[i]..offsets[i + 1]])` for every part `i` of `out`, as
/// [`for_each_index`] runs its items: disjoint parts of one buffer written in parallel.
///
/// # Panics
/// If `offsets` decreases or ends past `out`; if `f` panics (as [`for_each_index`]).
pub fn for_each_part_mut<T: Send>(
    out: &mut [T],
    offsets: &[usize],
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]) && offsets.last().is_none_or(|&e| e <= out.len()),
        "part offsets increase and end within the buffer"
    );
    let parts = offsets.len().saturating_sub(1);
    let bounds = |i: usize| offsets[i]..offsets[i + 1];
    split_run(out, parts, &bounds, &f);
}

/// `f(i, chunk)` for each `chunk_len`-element chunk of `out` (the last may be shorter), as
/// [`for_each_index`] runs its items.
///
/// # Panics
/// If `chunk_len` is 0; if `f` panics (as [`for_each_index`]).
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(chunk_len > 0, "chunks of at least one element");
    let len = out.len();
    let bounds = |i: usize| i * chunk_len..((i + 1) * chunk_len).min(len);
    split_run(out, len.div_ceil(chunk_len), &bounds, &f);
}

/// Runs `f(i, &mut out[bounds(i)])` for `i < parts`, where the callers' `bounds` are disjoint
/// ranges within `out`.
fn split_run<T: Send>(
    out: &mut [T],
    parts: usize,
    bounds: &(dyn Fn(usize) -> Range<usize> + Sync),
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let base = Base(out.as_mut_ptr());
    for_each_index(parts, &|i| {
        let Range { start, end } = bounds(i);
        // SAFETY: each index runs once; the callers' ranges lie within `out` and are disjoint,
        // and `out` is borrowed mutably for the whole call.
        let part = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
        f(i, part)
    });
}

/// The start of a buffer whose disjoint parts the items write ([`split_run`]).
struct Base<T>(*mut T);

impl<T> Base<T> {
    /// Element `i`'s address (`i` within the buffer).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

// SAFETY: the items that share it write disjoint parts of the buffer (`split_run`).
unsafe impl<T: Send> Sync for Base<T> {}

/// One product's items, shared with the helpers while the caller waits for them.
struct Job {
    /// The caller's item function, its lifetime erased (see [`for_each_index`]).
    run: *const (dyn Fn(usize) + Sync),
    items: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job {
    /// Takes items until none are left; keeps the first panic for the caller.
    fn work(&self) {
        // SAFETY: `run` is alive until every helper has acknowledged the job.
        let run = unsafe { &*self.run };
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.items {
                return;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| run(i))) {
                // The others stop taking items.
                self.next.store(self.items, Ordering::Relaxed);
                lock(&self.panic).get_or_insert(payload);
            }
        }
    }
}

/// What the caller and the helpers share.
struct Shared {
    /// Bumped once per job; every helper works on each epoch's job once, then acknowledges it.
    epoch: AtomicU64,
    job: AtomicPtr<Job>,
    /// Helpers done with the current epoch's job.
    acks: AtomicUsize,
    /// Helpers parked on `wake`.
    parked: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: &'static Shared,
    helpers: usize,
    /// Held by the caller whose job the helpers are on.
    caller: Mutex<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            acks: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        // A helper that cannot be started is one fewer: the caller does its share.
        let helpers = (1..rayon::current_num_threads())
            .filter(|i| {
                std::thread::Builder::new()
                    .name(format!("beam-pool-{i}"))
                    .spawn(move || help(shared))
                    .is_ok()
            })
            .count();
        Pool {
            shared,
            helpers,
            caller: Mutex::new(()),
        }
    })
}

/// A helper's life: wait for the next epoch (spinning, then parked), work on its job, ack.
fn help(shared: &'static Shared) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut epoch = shared.epoch.load(Ordering::Acquire);
        while epoch == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut sleep = lock(&shared.sleep);
                shared.parked.fetch_add(1, Ordering::SeqCst);
                // The caller bumps the epoch, then looks for parked helpers: either this load
                // sees the new epoch, or the caller sees `parked` and notifies under the lock.
                while shared.epoch.load(Ordering::SeqCst) == seen {
                    sleep = shared
                        .wake
                        .wait(sleep)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                shared.parked.fetch_sub(1, Ordering::SeqCst);
            }
            epoch = shared.epoch.load(Ordering::Acquire);
        }
        seen = epoch;
        // SAFETY: the caller stored the job before bumping the epoch and keeps it alive until
        // this helper's ack.
        let job = unsafe { &*shared.job.load(Ordering::Acquire) };
        job.work();
        shared.acks.fetch_add(1, Ordering::AcqRel);
    }
}

/// Locks `mutex`, also after a panic elsewhere (the data are plain values).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A way to run `items` items (`for_each_index`'s signature).
    type Runner = fn(usize, &(dyn Fn(usize) + Sync));

    /// The ways [`for_each_index`] can run items: as callers get them (the helpers, or rayon's
    /// pool while another test holds the helpers), and on the helpers for certain (waiting
    /// for them; where there are any).
    fn runners() -> Vec<Runner> {
        let mut runners: Vec<Runner> = vec![for_each_index];
        if pool().helpers > 0 {
            runners.push(|items, run| {
                let pool = pool();
                on_helpers(pool, lock(&pool.caller), items, run)
            });
        }
        runners
    }

    /// Every index runs exactly once, for item counts around the thread count and far above.
    #[test]
    fn every_item_runs_once() {
        for runner in runners() {
            for items in [0, 1, 2, 3, 7, 64, 1000] {
                let counts: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
                runner(items, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "{items} items: each exactly once"
                );
            }
        }
    }

    /// Parts and chunks get their own elements: uneven and empty parts, a short last chunk.
    #[test]
    fn parts_and_chunks_are_the_callers_ranges() {
        let offsets = [0, 3, 3, 10, 11, 40];
        let mut out = vec![usize::MAX; 40];
        for_each_part_mut(&mut out, &offsets, |part, values| {
            for (k, v) in values.iter_mut().enumerate() {
                *v = part * 100 + k;
            }
        });
        for (part, w) in offsets.windows(2).enumerate() {
            for (k, &v) in out[w[0]..w[1]].iter().enumerate() {
                assert_eq!(v, part * 100 + k, "part {part}, element {k}");
            }
        }
        let mut out = vec![0usize; 23];
        for_each_chunk_mut(&mut out, 5, |chunk, values| {
            assert_eq!(values.len(), if chunk == 4 { 3 } else { 5 });
            values.iter_mut().for_each(|v| *v = chunk + 1);
        });
        let expected: Vec<usize> = (0..23).map(|i| i / 5 + 1).collect();
        assert_eq!(out, expected);
    }

    /// With two or more threads, items also run off the caller's thread (on a helper, or on
    /// rayon's pool when another test holds the helpers).
    #[test]
    fn items_run_on_several_threads() {
        if rayon::current_num_threads() < 2 {
            return;
        }
        for runner in runners() {
            let caller = std::thread::current().id();
            let elsewhere = AtomicU32::new(0);
            runner(32, &|_| {
                std::thread::sleep(Duration::from_millis(1));
                if std::thread::current().id() != caller {
                    elsewhere.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(elsewhere.load(Ordering::Relaxed) > 0);
        }
    }

    /// A panicking item reaches the caller with its message; the pool works afterwards.
    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_goes_on() {
        for runner in runners() {
            let result = catch_unwind(|| {
                runner(16, &|i| {
                    if i == 5 {
                        panic!("item five failed");
                    }
                })
            });
            let payload = result.expect_err("the panic is raised on the caller");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"item five failed"));
            let sum = AtomicUsize::new(0);
            runner(100, &|i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 4950);
        }
    }

    /// Calls from inside an item, from several threads at once, and after the helpers have
    /// parked all complete with every item run once.
    #[test]
    fn nested_concurrent_and_parked_calls_complete() {
        let total = AtomicUsize::new(0);
        for_each_index(8, &|_| {
            for_each_index(10, &|j| {
                total.fetch_add(j, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 8 * 45);

        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for _ in 0..50 {
                        let mut out = vec![0usize; 64];
                        for_each_chunk_mut(&mut out, 4, |c, v| v.fill(c + t));
                        assert!(out.iter().enumerate().all(|(i, &v)| v == i / 4 + t));
                    }
                });
            }
        });

        // Longer than SPIN: the helpers park, and the next call must wake them (or run on the
        // caller) rather than hang.
        std::thread::sleep(SPIN * 3);
        let mut out = vec![0u8; 1000];
        for_each_chunk_mut(&mut out, 10, |_, v| v.fill(7));
        assert!(out.iter().all(|&v| v == 7));
    }
}
