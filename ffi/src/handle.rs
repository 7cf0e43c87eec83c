//! Opaque handles: C sees a pointer-sized token, amend keeps the object in a registry.
//!
//! Every entry point looks its handles up here before touching them, so a freed, forged or
//! wrong-kind handle is reported as `AMEND_ERR_INVALID_HANDLE` instead of being dereferenced.
//! Tokens are never reused (a counter, not an address), so use-after-free and double free are
//! always caught. Lookups clone an `Arc`: an object freed on one thread while another thread is
//! inside a call on it lives until that call returns.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{amend_result, FfiError, FfiResult};

type Object = Arc<dyn Any + Send + Sync>;

static REGISTRY: Mutex<BTreeMap<usize, Object>> = Mutex::new(BTreeMap::new());
// Start well above 0 and step by 16 so tokens look like aligned, non-NULL pointers.
static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(0x1000);

fn registry() -> MutexGuard<'static, BTreeMap<usize, Object>> {
    // Nothing panics while holding the lock; a poisoned lock still holds a consistent map.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `object` and returns its token as a `*mut H` (H is the opaque C type).
pub fn insert<T: Any + Send + Sync, H>(object: T) -> *mut H {
    let token = NEXT_TOKEN.fetch_add(16, Ordering::Relaxed);
    registry().insert(token, Arc::new(object));
    token as *mut H
}

fn invalid(kind: &str, ptr: usize) -> FfiError {
    FfiError::new(
        amend_result::AMEND_ERR_INVALID_HANDLE,
        format!("{ptr:#x} is not a live {kind} handle (freed, never created, or another kind)"),
    )
}

/// The object behind a handle of kind `T`. `kind` names the C type for messages.
pub fn get<T: Any + Send + Sync, H>(ptr: *const H, kind: &str, arg: &str) -> FfiResult<Arc<T>> {
    if ptr.is_null() {
        return Err(FfiError::null(arg));
    }
    let object = registry().get(&(ptr as usize)).cloned();
    object
        .and_then(|o| o.downcast::<T>().ok())
        .ok_or_else(|| invalid(kind, ptr as usize))
}

/// Unregisters a handle of kind `T`. NULL is a no-op (`Ok(None)`); a handle of another kind is
/// left registered and reported.
pub fn remove<T: Any + Send + Sync, H>(ptr: *mut H, kind: &str) -> FfiResult<Option<Arc<T>>> {
    if ptr.is_null() {
        return Ok(None);
    }
    let mut map = registry();
    match map.get(&(ptr as usize)) {
        Some(o) if o.is::<T>() => {}
        _ => return Err(invalid(kind, ptr as usize)),
    }
    let object = map.remove(&(ptr as usize)).expect("checked above");
    drop(map);
    // Dropped by the caller outside the registry lock: a model's teardown can take a while.
    Ok(Some(object.downcast::<T>().expect("type checked above")))
}

/// How many handles are live (tests check that frees really free).
pub fn live_count() -> usize {
    registry().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct A(u32);
    struct B;
    enum HA {}

    #[test]
    fn lookups_check_kind_and_liveness() {
        let a: *mut HA = insert(A(7));
        let b: *mut HA = insert(B);
        assert_eq!(get::<A, HA>(a, "a", "x").unwrap().0, 7);
        let err = get::<A, HA>(b, "a", "x").err().unwrap();
        assert_eq!(err.code, amend_result::AMEND_ERR_INVALID_HANDLE);
        assert!(remove::<A, HA>(b, "a").is_err());
        assert!(remove::<A, HA>(a, "a").unwrap().is_some());
        // Double free and use after free are detected, not dereferenced.
        assert!(remove::<A, HA>(a, "a").is_err());
        assert_eq!(
            get::<A, HA>(a, "a", "x").err().unwrap().code,
            amend_result::AMEND_ERR_INVALID_HANDLE
        );
        assert_eq!(
            get::<A, HA>(std::ptr::null(), "a", "x").err().unwrap().code,
            amend_result::AMEND_ERR_NULL_ARGUMENT
        );
        assert!(remove::<A, HA>(std::ptr::null_mut(), "a")
            .unwrap()
            .is_none());
        assert!(remove::<B, HA>(b, "b").unwrap().is_some());
    }
}
