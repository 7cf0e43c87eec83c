//! Per-layer hooks: Rust code that reads or rewrites named hidden states during a decode.
//!
//! llama.cpp's scheduler calls an eval callback twice per graph node: first "do you want this
//! node?" (`ask`), then, for nodes we asked for, right after computing it with its data on the
//! host. Writes to that data flow into every later node. Rules this module keeps:
//! - only the registered node names are asked for (asking every node splits the graph at every
//!   node and makes decode several times slower);
//! - the callback never returns `false`: that silently stops the graph and leaves garbage
//!   logits, so failures (a panic in a hook, an unexpected tensor) are recorded and reported
//!   by the session after `llama_decode` returns;
//! - a tensor can hold every row of the ubatch or, on the last layer, only the rows whose
//!   outputs were requested (llama.cpp drops the others before the last FFN); ubatch splits give
//!   0-row calls.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use amend_edits::HookPoint;
use llama_cpp_sys_2 as sys;

use crate::error::RuntimeError;
use crate::Token;

/// Identifies a registered hook within its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookId(pub(crate) u64);

/// Whether the batch being evaluated is (part of) a prompt or one generated token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

/// What a row of a hooked tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowInfo {
    /// The token at this row.
    pub token: Token,
    /// Its position in the sequence (0-based).
    pub pos: i32,
    pub seq_id: i32,
    /// The last token of the prompt being prefilled (where "at the last prompt token" edits act).
    pub is_last_prompt_token: bool,
    /// Whether logits were requested for this row.
    pub is_output: bool,
}

/// Mutable view of one hooked tensor for the current ubatch: `n_rows` rows of `n_embd` f32.
pub struct HookRows<'a> {
    data: &'a mut [f32],
    n_embd: usize,
    meta: &'a [RowInfo],
    /// `None`: row i is batch row i. `Some(map)`: row i is batch row `map[i]` (output rows only).
    map: Option<&'a [usize]>,
    phase: Phase,
    node: &'a str,
}

impl<'a> HookRows<'a> {
    pub fn n_rows(&self) -> usize {
        self.data.len() / self.n_embd.max(1)
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The llama.cpp graph node this tensor is (e.g. `l_out-12`).
    pub fn node_name(&self) -> &str {
        self.node
    }

    /// True when this tensor holds only the rows that produce outputs (the last layer).
    pub fn only_output_rows(&self) -> bool {
        self.map.is_some()
    }

    /// Token, position and sequence of row `i`. Panics if `i >= n_rows()`.
    pub fn info(&self, i: usize) -> RowInfo {
        assert!(
            i < self.n_rows(),
            "row {i} out of range ({} rows)",
            self.n_rows()
        );
        match self.map {
            None => self.meta[i],
            Some(m) => self.meta[m[i]],
        }
    }

    /// The row holding the last prompt token, if it is in this tensor.
    pub fn last_prompt_row(&self) -> Option<usize> {
        (0..self.n_rows()).find(|&i| self.info(i).is_last_prompt_token)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.n_embd..(i + 1) * self.n_embd]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.n_embd..(i + 1) * self.n_embd]
    }

    /// All rows at once, row-major.
    pub fn data_mut(&mut self) -> &mut [f32] {
        self.data
    }
}

/// A hook: declares the points it wants and is called with each one's rows during decode.
///
/// Called on the decoding thread, synchronously, once per ubatch per point (also with 0 rows).
/// A panic is caught and reported as an error by the evaluation that triggered it.
pub trait Hook: Send {
    fn points(&self) -> Vec<HookPoint>;
    fn on_tensor(&mut self, point: HookPoint, rows: &mut HookRows<'_>);
}

/// A hook from a closure: `FnHook::new(vec![point], |point, rows| { ... })`.
pub struct FnHook<F> {
    points: Vec<HookPoint>,
    f: F,
}

impl<F: FnMut(HookPoint, &mut HookRows<'_>) + Send> FnHook<F> {
    pub fn new(points: Vec<HookPoint>, f: F) -> Self {
        FnHook { points, f }
    }
}

impl<F: FnMut(HookPoint, &mut HookRows<'_>) + Send> Hook for FnHook<F> {
    fn points(&self) -> Vec<HookPoint> {
        self.points.clone()
    }
    fn on_tensor(&mut self, point: HookPoint, rows: &mut HookRows<'_>) {
        (self.f)(point, rows)
    }
}

/// FNV-1a: node names are short and looked up ~700 times per decode; SipHash is needless there.
#[derive(Default)]
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf29ce484222325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        self.0 = h;
    }
}

/// Node name -> the (entry index, point) pairs listening on it.
type NameMap = HashMap<Box<[u8]>, Vec<(usize, HookPoint)>, BuildHasherDefault<Fnv>>;

struct Entry {
    id: HookId,
    hook: Box<dyn Hook>,
    /// `hook.points()` as validated at registration: the trait method is user code, called
    /// once, so a hook whose answer changes (or that panics on a later call) cannot leave the
    /// registry half rebuilt.
    points: Vec<HookPoint>,
}

/// Per-session hook registry and the per-decode row metadata the callback reads.
/// Lives at a stable heap address handed to llama.cpp as the callback's user data.
pub(crate) struct HookState {
    entries: Vec<Entry>,
    /// node name -> (entry index, point), in registration order.
    by_name: NameMap,
    next_id: u64,
    n_embd: usize,
    /// Rows of the batch being decoded, in batch order.
    pub(crate) meta: Vec<RowInfo>,
    /// Batch indices of rows with outputs, in order.
    pub(crate) outputs: Vec<usize>,
    pub(crate) phase: Phase,
    /// First failure inside the callback during the current decode.
    pub(crate) error: Option<RuntimeError>,
}

impl HookState {
    pub(crate) fn new(n_embd: usize) -> Self {
        HookState {
            entries: Vec::new(),
            by_name: HashMap::default(),
            next_id: 1,
            n_embd,
            meta: Vec::new(),
            outputs: Vec::new(),
            phase: Phase::Prefill,
            error: None,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Registers `hook` listening at `points` (its `points()`, already validated by the
    /// caller); call `rebuild` after.
    pub(crate) fn add(&mut self, hook: Box<dyn Hook>, points: Vec<HookPoint>) -> HookId {
        let id = HookId(self.next_id);
        self.next_id += 1;
        self.entries.push(Entry { id, hook, points });
        id
    }

    pub(crate) fn rebuild(&mut self, resolve: impl Fn(HookPoint) -> Result<String, RuntimeError>) {
        self.by_name.clear();
        for (idx, e) in self.entries.iter().enumerate() {
            for &p in &e.points {
                // Validated when the hook was added; the check stays for a model whose node
                // names could not be resolved.
                if let Ok(name) = resolve(p) {
                    self.by_name
                        .entry(name.into_bytes().into_boxed_slice())
                        .or_default()
                        .push((idx, p));
                }
            }
        }
    }

    pub(crate) fn remove(&mut self, id: HookId) -> Option<Box<dyn Hook>> {
        let i = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.remove(i).hook)
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.by_name.clear();
    }

    fn on_node(&mut self, t: &mut sys::ggml_tensor, name: &[u8]) {
        let HookState {
            entries,
            by_name,
            n_embd,
            meta,
            outputs,
            phase,
            error,
            ..
        } = self;
        let Some(targets) = by_name.get(name) else {
            return;
        };
        let node = String::from_utf8_lossy(name);
        let fail = |error: &mut Option<RuntimeError>, message: String| {
            if error.is_none() {
                *error = Some(RuntimeError::HookTensor {
                    node: node.to_string(),
                    message,
                });
            }
        };
        if t.type_ != sys::GGML_TYPE_F32 {
            return fail(error, format!("tensor type {} is not f32", t.type_));
        }
        let n_embd = *n_embd;
        if t.ne[0] as usize != n_embd || t.ne[2] != 1 || t.ne[3] != 1 {
            return fail(
                error,
                format!("shape {:?} is not [n_embd={n_embd}, rows]", t.ne),
            );
        }
        if t.nb[0] != 4 || t.nb[1] != 4 * n_embd {
            return fail(error, format!("rows are not contiguous (nb {:?})", t.nb));
        }
        let n_rows = t.ne[1] as usize;
        if n_rows == 0 {
            // ubatch split or a last layer with no requested outputs: nothing to show.
            return;
        }
        let map = if n_rows == meta.len() {
            None
        } else if n_rows == outputs.len() {
            Some(outputs.as_slice())
        } else {
            return fail(
                error,
                format!(
                    "{n_rows} rows, expected {} (batch) or {} (outputs)",
                    meta.len(),
                    outputs.len()
                ),
            );
        };
        if t.data.is_null() {
            return fail(error, "tensor has no host data".into());
        }
        // SAFETY: checked f32, contiguous, n_rows x n_embd; the scheduler has computed the node
        // and keeps its host buffer alive and untouched for the duration of this callback.
        let data = unsafe { std::slice::from_raw_parts_mut(t.data as *mut f32, n_rows * n_embd) };
        let mut rows = HookRows {
            data,
            n_embd,
            meta,
            map,
            phase: *phase,
            node: &node,
        };
        for &(idx, point) in targets {
            let hook = &mut entries[idx].hook;
            let r = catch_unwind(AssertUnwindSafe(|| hook.on_tensor(point, &mut rows)));
            if let Err(payload) = r {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "hook panicked".to_string());
                if error.is_none() {
                    *error = Some(RuntimeError::Hook {
                        point,
                        message: format!("panicked: {message}"),
                    });
                }
            }
        }
    }
}

fn tensor_name(t: &sys::ggml_tensor) -> &[u8] {
    // SAFETY: `name` is a fixed char array; reinterpret as bytes up to the first NUL.
    let bytes: &[u8; 64] = unsafe { &*(&t.name as *const _ as *const [u8; 64]) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(64);
    &bytes[..end]
}

/// The `cb_eval` handed to llama.cpp. `user_data` is the session's `HookState`.
pub(crate) unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    if t.is_null() || user_data.is_null() {
        return !ask;
    }
    // SAFETY: user_data is the session's HookState, only touched by the thread inside
    // llama_decode (the session is &mut-borrowed for the call), and `t` a live graph node.
    let state = unsafe { &mut *(user_data as *mut HookState) };
    let t = unsafe { &mut *t };
    if ask {
        return !state.by_name.is_empty() && state.by_name.contains_key(tensor_name(t));
    }
    // Never unwind into C, never return false (that truncates the graph).
    let r = catch_unwind(AssertUnwindSafe(|| {
        let name = tensor_name(t).to_vec();
        state.on_node(t, &name);
    }));
    if r.is_err() && state.error.is_none() {
        state.error = Some(RuntimeError::HookTensor {
            node: String::from_utf8_lossy(tensor_name(t)).into_owned(),
            message: "internal panic in the hook dispatcher".into(),
        });
    }
    true
}
