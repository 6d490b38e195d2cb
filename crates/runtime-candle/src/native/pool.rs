//! The compute threads of the forward pass: the calling thread plus
//! `threads - 1` helpers that spin between jobs.
//!
//! A forward pass is a few hundred short parallel steps (a matrix product
//! takes tens of microseconds while generating), so waking a sleeping thread
//! for each would cost more than the work; llama.cpp spins for the same
//! reason. A helper that finds no work for a few milliseconds parks, and a
//! parked helper is never waited for: a job starts without it, wakes it, and
//! it joins the job as soon as it runs. Tasks are claimed one at a time from
//! a shared counter, so a helper the OS delays leaves its share to the others
//! instead of stalling them.
//!
//! `unsafe` here hands helpers a closure that borrows the caller's stack. It
//! is sound because a helper only takes the job while holding the job's lock
//! and the job is there, and [`Pool::run`] takes the job away under the same
//! lock, then waits for every helper that took it to let go, before it
//! returns or unwinds (see `Finish`).
#![allow(unsafe_code)]

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper spins without work before it parks.
const SPIN: Duration = Duration::from_millis(3);

/// A helper waiting for work, spinning.
const SPINNING: u8 = 0;
/// A helper asleep; jobs run without it.
const PARKED: u8 = 1;
/// A helper given the current job, or that joined it; the caller waits for it.
const BUSY: u8 = 2;

/// The calling thread and its helpers.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

/// A job's closure with its lifetime erased (see the module docs).
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn(usize) + Sync + 'static));

// SAFETY: the closure is `Sync`, so calling it from another thread is
// allowed; the pointer is only followed while the caller waits.
unsafe impl Send for JobRef {}

/// One state per helper, each on its own cache line.
#[repr(align(64))]
struct HelperState(AtomicU8);

struct Shared {
    states: Box<[HelperState]>,
    job: Mutex<Option<JobRef>>,
    /// The next task of the current job to claim.
    next: AtomicUsize,
    /// The current job's task count.
    tasks: AtomicUsize,
    /// The first panic of a helper during the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    park: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Pool {
    /// A pool of `threads` threads in all, the caller included.
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let helpers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            states: (0..helpers)
                .map(|_| HelperState(AtomicU8::new(SPINNING)))
                .collect(),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            panic: Mutex::new(None),
            park: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut pool = Self {
            shared: shared.clone(),
            helpers: Vec::with_capacity(helpers),
        };
        for index in 0..helpers {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("candle-compute-{}", index + 1))
                .spawn(move || helper(&shared, index))?;
            pool.helpers.push(handle);
        }
        Ok(pool)
    }

    /// Threads that run jobs, the caller included.
    pub(crate) fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Calls `task(i)` for each `i` in `0..tasks`, spread over the threads;
    /// returns when all are done. A panic in a task is raised here.
    pub(crate) fn run(&mut self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 || self.helpers.is_empty() {
            (0..tasks).for_each(task);
            return;
        }
        let shared = &*self.shared;
        // A panic of an earlier job whose caller panicked first is stale.
        shared
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // SAFETY: only the lifetime is erased; `Finish` below keeps `task`
        // borrowed until no helper can follow the pointer.
        let erased: *const (dyn Fn(usize) + Sync + 'static) =
            unsafe { std::mem::transmute(task as *const (dyn Fn(usize) + Sync + '_)) };
        *shared.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(JobRef(erased));
        shared.next.store(0, Ordering::Relaxed);
        shared.tasks.store(tasks, Ordering::Relaxed);

        let finish = Finish(shared);
        let mut parked = false;
        for state in shared.states.iter() {
            // AcqRel: the job, counters and inputs written above become
            // visible to the helper that sees BUSY.
            if let Err(PARKED) =
                state
                    .0
                    .compare_exchange(SPINNING, BUSY, Ordering::AcqRel, Ordering::Acquire)
            {
                parked = true;
            }
        }
        if parked {
            // They join this job once awake (`try_join`).
            shared.unpark_all();
        }
        claim_tasks(shared, task, tasks);
        drop(finish);
        let panic = shared
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }

    /// Calls `task(i, chunk)` for each `chunk`-long piece of `data` (the last
    /// may be shorter), spread over the threads.
    pub(crate) fn for_each_chunk_mut<T: Send>(
        &mut self,
        data: &mut [T],
        chunk: usize,
        task: impl Fn(usize, &mut [T]) + Sync,
    ) {
        assert!(chunk > 0, "chunks must not be empty");
        let len = data.len();
        let base = DataPtr(data.as_mut_ptr());
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            assert!(start < end);
            // SAFETY: `run` hands out each index once, and the ranges of
            // distinct indices do not overlap, so this is the only reference
            // to `data[start..end]`, which `data`'s mutable borrow keeps alive
            // until `run` returns.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
            task(i, piece);
        });
    }
}

/// The data of [`Pool::for_each_chunk_mut`], shared by the threads that each
/// take distinct pieces of it.
struct DataPtr<T>(*mut T);

impl<T> DataPtr<T> {
    /// Element `i`'s address (a method, so closures capture the whole wrapper).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

// SAFETY: each piece goes to one thread only (see `for_each_chunk_mut`), and `T` is `Send`.
unsafe impl<T: Send> Sync for DataPtr<T> {}

/// Takes the job away, then waits, even while unwinding, until no helper
/// holds it.
struct Finish<'a>(&'a Shared);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        // Under the lock: a helper joining now finds no job; one that joined
        // before is BUSY, and waited for below.
        *self.0.job.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let mut spins = 0u32;
        for state in self.0.states.iter() {
            while state.0.load(Ordering::Acquire) == BUSY {
                spins += 1;
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

fn claim_tasks(shared: &Shared, task: &(dyn Fn(usize) + Sync), tasks: usize) {
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            return;
        }
        task(i);
    }
}

impl Shared {
    fn unpark_all(&self) {
        let _guard = self.park.lock().unwrap_or_else(PoisonError::into_inner);
        for state in self.states.iter() {
            let _ = state
                .0
                .compare_exchange(PARKED, SPINNING, Ordering::AcqRel, Ordering::Acquire);
        }
        self.wake.notify_all();
    }
}

fn helper(shared: &Shared, index: usize) {
    let state = &shared.states[index].0;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        match state.load(Ordering::Acquire) {
            BUSY => {
                let job = *shared.job.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(JobRef(task)) = job {
                    // SAFETY: the caller keeps the closure alive while any
                    // helper is BUSY (`Finish`).
                    let task = unsafe { &*task };
                    let tasks = shared.tasks.load(Ordering::Relaxed);
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        claim_tasks(shared, task, tasks);
                    }));
                    if let Err(panic) = outcome {
                        // Stop the others claiming more; the caller raises it.
                        shared.next.store(usize::MAX / 2, Ordering::Relaxed);
                        shared
                            .panic
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(panic);
                    }
                }
                // Release: the task's writes are visible to the caller that sees this.
                state.store(SPINNING, Ordering::Release);
                idle_since = Instant::now();
            }
            _ if shared.stop.load(Ordering::Relaxed) => return,
            _ => {
                spins += 1;
                if !spins.is_multiple_of(64) {
                    std::hint::spin_loop();
                    continue;
                }
                if idle_since.elapsed() < SPIN {
                    // Let another thread of this core run (the HTTP server's).
                    std::thread::yield_now();
                    continue;
                }
                if state
                    .compare_exchange(SPINNING, PARKED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue; // given a job meanwhile
                }
                let mut guard = shared.park.lock().unwrap_or_else(PoisonError::into_inner);
                while state.load(Ordering::Acquire) == PARKED
                    && !shared.stop.load(Ordering::Relaxed)
                {
                    guard = shared
                        .wake
                        .wait(guard)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                drop(guard);
                idle_since = Instant::now();
                try_join(shared, state);
            }
        }
    }
}

/// Joins the job running now, if there is one: BUSY is only taken while the
/// job is there, under its lock (see `Finish`).
fn try_join(shared: &Shared, state: &AtomicU8) {
    let job = shared.job.lock().unwrap_or_else(PoisonError::into_inner);
    if job.is_some() {
        let _ = state.compare_exchange(SPINNING, BUSY, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let _guard = self
                .shared
                .park
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once_whatever_the_thread_count() {
        for threads in 1..=4 {
            let mut pool = Pool::new(threads).unwrap();
            for tasks in [0, 1, 2, 3, 17, 1000] {
                for chunk in [1, 3, 64] {
                    let mut hits = vec![0u32; tasks];
                    pool.for_each_chunk_mut(&mut hits, chunk, |i, piece| {
                        for (j, hit) in piece.iter_mut().enumerate() {
                            *hit += (i * chunk + j) as u32 + 1;
                        }
                    });
                    assert!(hits.iter().enumerate().all(|(i, &h)| h == i as u32 + 1));
                }
            }
        }
    }

    #[test]
    fn jobs_still_run_after_the_helpers_park() {
        let mut pool = Pool::new(3).unwrap();
        let mut out = vec![0usize; 64];
        pool.for_each_chunk_mut(&mut out, 1, |i, v| v[0] = i);
        std::thread::sleep(SPIN * 4);
        pool.for_each_chunk_mut(&mut out, 1, |i, v| v[0] += i);
        assert!(out.iter().enumerate().all(|(i, &v)| v == 2 * i));
    }

    #[test]
    fn a_panicking_task_is_raised_in_the_caller_and_the_pool_goes_on() {
        let mut pool = Pool::new(2).unwrap();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(100, &|i| assert!(i != 57, "task 57 fails"));
        }));
        let panic = outcome.unwrap_err();
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        assert!(message.contains("task 57 fails"), "{message}");
        let mut out = vec![0u8; 10];
        pool.for_each_chunk_mut(&mut out, 2, |_, v| v.fill(1));
        assert_eq!(out, vec![1; 10]);
    }

    #[test]
    fn a_parked_helper_joins_the_job_that_woke_it() {
        let mut pool = Pool::new(2).unwrap();
        std::thread::sleep(SPIN * 4);
        // One long job: the caller alone would take 40 × 2 ms; the woken
        // helper takes tasks too.
        let helper_tasks = AtomicUsize::new(0);
        let caller = std::thread::current().id();
        pool.run(40, &|_| {
            if std::thread::current().id() != caller {
                helper_tasks.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        });
        assert!(
            helper_tasks.load(Ordering::Relaxed) > 0,
            "the helper never joined"
        );
    }

    #[test]
    fn dropping_the_pool_ends_its_threads() {
        let pool = Pool::new(4).unwrap();
        let shared = Arc::downgrade(&pool.shared);
        drop(pool);
        assert!(shared.upgrade().is_none(), "a helper still holds the pool");
    }
}
