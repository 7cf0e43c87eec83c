//! A host app at its thread limit (`RLIMIT_NPROC`, a cgroup's `pids.max`, systemd's `TasksMax`)
//! through the C ABI: `amend_session_open` asking for more compute threads than the process may
//! start is `AMEND_ERR_CONTEXT`, with a message naming the thread limit and `*out` NULL, and
//! the model stays usable: a one-thread session opens on it and generates. Before session 39,
//! ggml aborted the whole process at the first decode instead. The limit is set in a child
//! process (this test binary run again), as `nobody` when the test runs as root, whom the limit
//! does not bind. Its own test binary, so no other test's threads share the child.

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::process::Command;
use std::ptr;

use amend::*;

#[path = "common/util.rs"]
mod util;
use util::last_error;

/// Set in the child: the model to open.
const CHILD: &str = "AMEND_FFI_THREAD_LIMIT_CHILD";
/// What the child prints when every check passed (a child that skipped would not).
const PASSED: &str = "thread-limit child: every check passed";

#[test]
fn thread_limit_is_a_context_error_and_the_model_stays_usable() {
    if let Some(model) = std::env::var_os(CHILD) {
        child(&PathBuf::from(model));
        return;
    }
    let root = unsafe { libc::geteuid() } == 0;
    // Everything the child reads and writes, where `nobody` can.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ffi-nproc-{}", std::process::id()));
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let model = dir.join("tiny.gguf");
    amend_runtime::testutil::write_tiny_model(&model, amend_runtime::Architecture::Llama, 5)
        .unwrap();
    if root {
        use std::os::unix::fs::PermissionsExt;
        for (p, m) in [(&dir, 0o777), (&cache, 0o777), (&model, 0o644)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "thread_limit_is_a_context_error_and_the_model_stays_usable",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD, &model)
    .env("AMEND_CACHE", &cache)
    .env("RUST_BACKTRACE", "0");
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if root
                    && (libc::setgroups(0, ptr::null()) != 0
                        || libc::setgid(65534) != 0
                        || libc::setuid(65534) != 0)
                {
                    return fail();
                }
                // No room for one more thread.
                let lim = libc::rlimit {
                    rlim_cur: 1,
                    rlim_max: 1,
                };
                if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                    return fail();
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && text.contains(PASSED),
        "child {:?}:\n{text}",
        out.status
    );
}

/// Runs at the thread limit: every check, then [`PASSED`].
fn child(model: &std::path::Path) {
    let path = CString::new(model.to_str().unwrap()).unwrap();
    let mparams = amend_model_params {
        n_threads: 1,
        ..amend_model_default_params()
    };
    let mut m = ptr::null_mut();
    assert_eq!(
        amend_model_open(path.as_ptr(), &mparams, &mut m),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    for threads in [2, 4] {
        let params = amend_session_params {
            n_threads: threads,
            ..amend_session_default_params()
        };
        // Not NULL going in, so the test sees the failure set it.
        let mut s = ptr::dangling_mut::<amend_session>();
        assert_eq!(
            amend_session_open(m, &params, &mut s),
            amend_result::AMEND_ERR_CONTEXT,
            "{threads} threads: {}",
            last_error()
        );
        assert!(s.is_null(), "{threads} threads: *out is not NULL");
        let msg = last_error();
        assert!(msg.contains("thread limit"), "{threads} threads: {msg}");
    }
    // One thread starts none: the session opens on the same model and generates.
    let s = util::open_session_with(
        m,
        &amend_session_params {
            n_threads: 1,
            ..amend_session_default_params()
        },
    );
    let mut gparams = amend_generate_default_params();
    gparams.max_tokens = 3;
    let prompt = "a b c";
    let mut out = std::mem::MaybeUninit::<amend_generation>::uninit();
    assert_eq!(
        amend_session_generate(
            s,
            prompt.as_ptr() as *const c_char,
            prompt.len(),
            &gparams,
            None,
            ptr::null_mut(),
            out.as_mut_ptr(),
        ),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    assert!(unsafe { out.assume_init() }.n_generated > 0);
    amend_session_free(s);
    amend_model_free(m);
    println!("{PASSED}");
}
