//! The compute threads of a llama.cpp context, started once when the context is made.
//!
//! Without a pool of its own, ggml starts `n_threads - 1` threads at every `llama_decode` and
//! aborts the process (`GGML_ASSERT(rc == 0)`) when `pthread_create` fails: a host app at its
//! thread limit (`RLIMIT_NPROC`, a cgroup's `pids.max`, systemd's `TasksMax`) would be killed
//! by its next token. A [`ComputePool`] starts the threads with the context instead, after
//! checking that the threads can be started at all, so the failure is an error at session
//! creation and decoding starts no thread.

use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

use llama_cpp_sys_2 as sys;

use crate::error::RuntimeError;

/// A ggml thread pool owned by one context (attach it with [`ComputePool::attach`], free it
/// after the context). `None` of [`ComputePool::new`] for one thread: ggml then starts none.
pub(crate) struct ComputePool {
    ptr: NonNull<sys::ggml_threadpool>,
    /// The process whose threads these are: a `fork()`ed child has none of them.
    owner: u32,
    /// Set in a forked child once the context has gone back to ggml's per-call threads.
    orphaned: std::sync::atomic::AtomicBool,
}

// SAFETY: the pool is used by the one context it is attached to, through `&mut` of its owner
// (or under the scope model's mutex); ggml's own threads synchronise among themselves.
unsafe impl Send for ComputePool {}
unsafe impl Sync for ComputePool {}

impl ComputePool {
    /// A pool of `n_threads` (the calling thread is one of them, so `n_threads - 1` are
    /// started). Errors with [`RuntimeError::Threads`] when they cannot all be started.
    pub(crate) fn new(n_threads: usize) -> Result<Option<ComputePool>, RuntimeError> {
        if n_threads <= 1 {
            return Ok(None);
        }
        let extra = n_threads - 1;
        reserve(extra).map_err(|source| RuntimeError::Threads {
            wanted: extra,
            source,
        })?;
        // SAFETY: plain FFI; the params are a value we own for the call.
        let ptr = unsafe {
            let mut p = sys::ggml_threadpool_params_default(n_threads as i32);
            // No spinning between graphs: an idle session's threads sleep (battery), and a
            // decode wakes them once per token.
            p.poll = 0;
            sys::ggml_threadpool_new(&mut p)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| RuntimeError::Threads {
            wanted: extra,
            source: std::io::Error::other("ggml could not allocate its thread pool"),
        })?;
        Ok(Some(ComputePool {
            ptr,
            owner: std::process::id(),
            orphaned: false.into(),
        }))
    }

    /// Gives the pool to `ctx` for its decodes and encodes.
    ///
    /// # Safety
    /// `ctx` is a live context, freed before this pool.
    pub(crate) unsafe fn attach(&self, ctx: *mut sys::llama_context) {
        unsafe { sys::llama_attach_threadpool(ctx, self.ptr.as_ptr(), self.ptr.as_ptr()) }
    }

    /// Called before every decode of `ctx`. In a `fork()`ed child the pool's threads do not
    /// exist and a graph handed to them would wait forever: there `ctx` goes back to ggml's
    /// per-call threads (as before pools), and the pool is never freed (its threads cannot
    /// be joined). One `getpid` per call elsewhere.
    ///
    /// # Safety
    /// `ctx` is the live context this pool was attached to.
    pub(crate) unsafe fn check_fork(&self, ctx: *mut sys::llama_context) {
        use std::sync::atomic::Ordering;
        if self.owner != std::process::id() && !self.orphaned.swap(true, Ordering::Relaxed) {
            log::debug!("forked child: the context's compute threads are started per call");
            unsafe { sys::llama_detach_threadpool(ctx) }
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        if self.owner != std::process::id() {
            // A forked child's copy: freeing would join threads that are not there.
            return;
        }
        // SAFETY: made by ggml_threadpool_new; the context it was attached to is freed first
        // (its owners drop the context before the pool).
        unsafe { sys::ggml_threadpool_free(self.ptr.as_ptr()) }
    }
}

/// Checks that `n` more threads can run at once: starts `n` threads that wait until all have
/// started (or one failed), then stops them and waits until the kernel has released them, so
/// that ggml's `pthread_create` right after finds the same room.
fn reserve(n: usize) -> std::io::Result<()> {
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let mut started = Vec::with_capacity(n);
    let mut failure = None;
    for _ in 0..n {
        let gate = gate.clone();
        let spawned = std::thread::Builder::new()
            .name("amend-reserve".into())
            // The probe does nothing; a small stack keeps it cheap where address space is tight.
            .stack_size(64 * 1024)
            .spawn(move || {
                let (open, cv) = &*gate;
                let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                while !*open {
                    open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
                }
                current_tid()
            });
        match spawned {
            Ok(h) => started.push(h),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    {
        let (open, cv) = &*gate;
        *open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
    let tids: Vec<Option<i64>> = started
        .into_iter()
        .map(|h| h.join().ok().flatten())
        .collect();
    wait_released(&tids);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The kernel's id of the calling thread (Linux and Android), to see it released.
fn current_tid() -> Option<i64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: gettid has no preconditions.
        Some(unsafe { libc::gettid() } as i64)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        None
    }
}

/// A joined thread is released by the kernel a moment after `pthread_join` returns: its
/// `/proc/self/task/TID` goes only after its slot in `RLIMIT_NPROC` and the cgroup's
/// `pids.current` is given back. Waits (at most 100 ms) until every probe thread's is gone.
fn wait_released(tids: &[Option<i64>]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    for tid in tids.iter().flatten() {
        let path = format!("/proc/self/task/{tid}");
        while std::path::Path::new(&path).exists() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}
