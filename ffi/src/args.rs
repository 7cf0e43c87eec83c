//! Checked conversions of C arguments: every pointer and length is validated here before use.

use std::ffi::{c_char, CStr};

use crate::error::{amend_result, FfiError, FfiResult};

/// A NUL-terminated UTF-8 string argument (paths, ids).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid for `'a`.
pub unsafe fn cstr<'a>(p: *const c_char, arg: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| utf8_error(arg, e.valid_up_to()))
}

/// A byte-buffer argument. NULL is accepted only with length 0.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid for `'a`.
pub unsafe fn bytes<'a>(p: *const u8, len: usize, arg: &str) -> FfiResult<&'a [u8]> {
    if len > isize::MAX as usize {
        return Err(FfiError::new(
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            format!("length of `{arg}` ({len}) is larger than any buffer can be"),
        ));
    }
    if p.is_null() {
        if len == 0 {
            return Ok(&[]);
        }
        return Err(FfiError::null(arg));
    }
    // SAFETY: non-NULL, `len` bytes readable per the caller's contract, len <= isize::MAX.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A (pointer, length) UTF-8 text argument (prompts, targets); not NUL-terminated. Unlike a
/// byte buffer, a NULL pointer is always an error: a missing prompt is a bug, not empty text.
///
/// # Safety
/// As for [`bytes`].
pub unsafe fn text<'a>(p: *const c_char, len: usize, arg: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: forwarded contract.
    let b = unsafe { bytes(p as *const u8, len, arg)? };
    std::str::from_utf8(b).map_err(|e| utf8_error(arg, e.valid_up_to()))
}

fn utf8_error(arg: &str, at: usize) -> FfiError {
    FfiError::new(
        amend_result::AMEND_ERR_INVALID_UTF8,
        format!("`{arg}` is not valid UTF-8 (invalid byte sequence at byte {at})"),
    )
}

/// Writes `value` through an out-pointer, refusing NULL.
///
/// # Safety
/// `p` is NULL or valid for writing one `T`.
pub unsafe fn write_out<T>(p: *mut T, value: T, arg: &str) -> FfiResult<()> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: non-NULL and writable per the caller's contract; `write` does not read or drop
    // what was there (it may be uninitialised).
    unsafe { p.write(value) };
    Ok(())
}

/// Writes `value` through an optional out-pointer: NULL means the caller does not want it.
///
/// # Safety
/// `p` is NULL or valid for writing one `T`.
pub unsafe fn write_opt<T>(p: *mut T, value: T) {
    if !p.is_null() {
        // SAFETY: non-NULL and writable per the caller's contract; `write` does not drop the
        // previous (possibly uninitialised) contents.
        unsafe { p.write(value) };
    }
}

/// Checks an out-pointer before the work that fills it, so a NULL out-pointer fails before
/// anything expensive (or anything needing cleanup) happens.
pub fn need_out<T>(p: *mut T, arg: &str) -> FfiResult<()> {
    if p.is_null() {
        Err(FfiError::null(arg))
    } else {
        Ok(())
    }
}

/// Checks a handle out-pointer and sets `*p` to NULL, so that every failure after this leaves
/// the caller a NULL handle (as the header promises), never garbage.
///
/// # Safety
/// `p` is NULL or valid for writing one pointer.
pub unsafe fn clear_out<H>(p: *mut *mut H, arg: &str) -> FfiResult<()> {
    // SAFETY: forwarded contract.
    unsafe { write_out(p, std::ptr::null_mut(), arg) }
}

/// A parameter-struct argument by value: NULL means `default()`. `bools` are the offsets of its
/// `bool` fields: each is read as C reads a flag (any nonzero byte is true), since a byte other
/// than 0 or 1 in a Rust `bool` (a field left uninitialised, a struct filled with memset) is
/// undefined behaviour.
///
/// # Safety
/// `p` is NULL or points to a readable `T` (a struct the caller filled, e.g. from the matching
/// `amend_*_default_params()`).
pub unsafe fn read_params<T: Copy>(p: *const T, bools: &[usize], default: impl FnOnce() -> T) -> T {
    if p.is_null() {
        return default();
    }
    let mut out = std::mem::MaybeUninit::new(default());
    // SAFETY: non-NULL and readable for size_of::<T>() bytes per the caller's contract; the
    // flags are made valid before the bytes are used as a `T`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p as *const u8,
            out.as_mut_ptr() as *mut u8,
            std::mem::size_of::<T>(),
        );
        normalize_bools(out.as_mut_ptr() as *mut u8, std::mem::size_of::<T>(), bools);
        out.assume_init()
    }
}

/// Rewrites the flag bytes at `bools` (offsets below `len`) of the struct at `base` to 0 or 1.
///
/// # Safety
/// `base` is writable for `len` bytes.
unsafe fn normalize_bools(base: *mut u8, len: usize, bools: &[usize]) {
    for &at in bools.iter().filter(|&&at| at < len) {
        // SAFETY: `at < len`, inside the struct.
        unsafe {
            let b = base.add(at);
            b.write((b.read() != 0) as u8);
        }
    }
}

/// Reads a struct that starts with a `struct_size: usize` field: a caller compiled against an
/// older header passes a shorter struct, whose missing fields keep `default()`'s values. A size
/// that is not one of the struct's versions (`versions`, ascending, the last this library's
/// `size_of::<T>()`) is `AMEND_ERR_INVALID_ARGUMENT`: a size between two versions would cut a
/// field in half. `bools` as for [`read_params`].
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes (its first field).
pub unsafe fn read_sized_params<T: Copy>(
    p: *const T,
    versions: &[usize],
    bools: &[usize],
    default: impl FnOnce() -> T,
    arg: &str,
) -> FfiResult<T> {
    if p.is_null() {
        return Ok(default());
    }
    // SAFETY: non-NULL and the struct begins with its size, per the caller's contract.
    let size = unsafe { (p as *const usize).read_unaligned() };
    debug_assert_eq!(versions.last(), Some(&std::mem::size_of::<T>()));
    if !versions.contains(&size) || size > std::mem::size_of::<T>() {
        return Err(FfiError::new(
            crate::amend_result::AMEND_ERR_INVALID_ARGUMENT,
            format!(
                "{arg}.struct_size is {size}: expected one of {versions:?} (set it with the *_default_params() function of the header you compile against)"
            ),
        ));
    }
    let mut out = std::mem::MaybeUninit::new(default());
    // SAFETY: `size` bytes are readable (caller contract) and fit in `T`; the prefix of a
    // `repr(C)` struct has the same layout in every version of the header. The flags are made
    // valid before the bytes are used as a `T`.
    unsafe {
        std::ptr::copy_nonoverlapping(p as *const u8, out.as_mut_ptr() as *mut u8, size);
        normalize_bools(out.as_mut_ptr() as *mut u8, size, bools);
        Ok(out.assume_init())
    }
}

/// A NUL-terminated UTF-8 string, or `None` for NULL.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
pub unsafe fn opt_cstr<'a>(p: *const c_char, arg: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per the caller's contract.
    unsafe { cstr(p, arg).map(Some) }
}

/// Copies `s` with a terminating NUL into `buf` (capacity `buf_len`), storing `s.len()` (without
/// the NUL) in `*out_len` when `out_len` is not NULL. A buffer that is too small (NULL with
/// length 0 is a valid size query) gets nothing written and `AMEND_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `buf` is NULL or writable for `buf_len` bytes; `out_len` is NULL or writable.
pub unsafe fn write_str(
    s: &str,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> FfiResult<()> {
    if !out_len.is_null() {
        // SAFETY: non-NULL, writable per the contract.
        unsafe { out_len.write(s.len()) };
    }
    if buf.is_null() && buf_len > 0 {
        return Err(FfiError::null("buf"));
    }
    if buf_len < s.len() + 1 {
        return Err(FfiError::new(
            amend_result::AMEND_ERR_BUFFER_TOO_SMALL,
            format!(
                "buffer of {buf_len} bytes is too small: {} needed (including the NUL)",
                s.len() + 1
            ),
        ));
    }
    // SAFETY: buf is non-NULL (buf_len > s.len() >= 0 means buf_len >= 1) and has room.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf as *mut u8, s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// A file path given as `len` bytes (no NUL needed). On unix any bytes but NUL are a valid
/// path, so a path that is not UTF-8 can be opened; elsewhere it must be UTF-8.
///
/// # Safety
/// As for [`bytes`].
pub unsafe fn path_bytes(p: *const u8, len: usize, arg: &str) -> FfiResult<std::path::PathBuf> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: forwarded contract.
    let b = unsafe { bytes(p, len, arg)? };
    if b.is_empty() || b.contains(&0) {
        return Err(FfiError::new(
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            format!("{arg} is empty or contains a NUL byte"),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b)))
    }
    #[cfg(not(unix))]
    {
        let s = std::str::from_utf8(b).map_err(|e| utf8_error(arg, e.valid_up_to()))?;
        Ok(std::path::PathBuf::from(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_checks_null_length_and_utf8() {
        unsafe {
            assert_eq!(
                text(std::ptr::null(), 0, "prompt").unwrap_err().code,
                amend_result::AMEND_ERR_NULL_ARGUMENT
            );
            let bad = b"ab\xffcd";
            let e = text(bad.as_ptr() as *const c_char, 5, "prompt").unwrap_err();
            assert_eq!(e.code, amend_result::AMEND_ERR_INVALID_UTF8);
            assert!(e.message.contains("byte 2"), "{}", e.message);
            assert_eq!(
                bytes(bad.as_ptr(), usize::MAX, "data").unwrap_err().code,
                amend_result::AMEND_ERR_INVALID_ARGUMENT
            );
            assert_eq!(bytes(std::ptr::null(), 0, "data").unwrap(), &[] as &[u8]);
            assert_eq!(text(b"hi".as_ptr() as *const c_char, 2, "p").unwrap(), "hi");
        }
    }

    #[test]
    fn flags_with_garbage_bytes_read_as_true() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct P {
            struct_size: usize,
            a: bool,
            n: u32,
            b: bool,
        }
        let offs = [std::mem::offset_of!(P, a), std::mem::offset_of!(P, b)];
        let default = || P {
            struct_size: std::mem::size_of::<P>(),
            a: false,
            n: 0,
            b: false,
        };
        let mut raw = [0u8; std::mem::size_of::<P>()];
        raw[..8].copy_from_slice(&std::mem::size_of::<P>().to_ne_bytes());
        raw[offs[0]] = 0xfe;
        raw[offs[1]] = 0x02;
        let p = raw.as_ptr() as *const P;
        let bytes = |v: P| {
            let v = std::mem::MaybeUninit::new(v);
            let b = v.as_ptr() as *const u8;
            unsafe { (b.add(offs[0]).read(), b.add(offs[1]).read()) }
        };
        // `raw` is a byte array: read through an aligned copy of the struct.
        let mut aligned = std::mem::MaybeUninit::<P>::uninit();
        unsafe {
            std::ptr::copy_nonoverlapping(
                p as *const u8,
                aligned.as_mut_ptr() as *mut u8,
                raw.len(),
            );
            assert_eq!(bytes(read_params(aligned.as_ptr(), &offs, default)), (1, 1));
            let v = read_sized_params(
                aligned.as_ptr(),
                &[std::mem::size_of::<P>()],
                &offs,
                default,
                "p",
            );
            assert_eq!(bytes(v.unwrap()), (1, 1));
        }
        raw[offs[0]] = 0;
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), aligned.as_mut_ptr() as *mut u8, raw.len());
            assert_eq!(bytes(read_params(aligned.as_ptr(), &offs, default)), (0, 1));
        }
    }

    #[test]
    fn write_str_reports_needed_size() {
        let mut n = 0usize;
        unsafe {
            let e = write_str("hello", std::ptr::null_mut(), 0, &mut n).unwrap_err();
            assert_eq!(e.code, amend_result::AMEND_ERR_BUFFER_TOO_SMALL);
            assert_eq!(n, 5);
            let mut buf = [1 as c_char; 5];
            assert!(write_str("hello", buf.as_mut_ptr(), 5, &mut n).is_err());
            assert_eq!(buf[0], 1, "nothing written on failure");
            let mut buf = [1 as c_char; 6];
            write_str("hello", buf.as_mut_ptr(), 6, std::ptr::null_mut()).unwrap();
            assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), "hello");
        }
    }
}
