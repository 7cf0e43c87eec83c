//! The ordered stack of verified bundles active on one model, swapped atomically.
//!
//! Writers build a new [`ActiveSet`] from the current one and publish it with one atomic pointer
//! exchange ([`arc_swap::ArcSwap`]); readers (decodes in progress) hold an `Arc` snapshot and so
//! see either the old or the new set, never a mix. A failed operation publishes nothing.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::bundle::{
    Bundle, BundleBytes, BundleError, CodebookView, LowRankTensorView, MemoryView, ModelBinding,
    PatchNeuronsView, Payload,
};
use crate::families;
use crate::keys::TrustStore;
use crate::version_store::{Refusal, VersionStore};

/// How many previous states [`EditSet::restore_previous`] can go back.
pub const HISTORY_DEPTH: usize = 8;

/// Unix time source (injectable for tests).
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A fixed or settable clock for tests.
#[derive(Debug, Default)]
pub struct ManualClock(pub std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(t: u64) -> Self {
        ManualClock(std::sync::atomic::AtomicU64::new(t))
    }
    pub fn set(&self, t: u64) {
        self.0.store(t, std::sync::atomic::Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EditSetError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("bundle expired at {expires} (now {now})")]
    Expired { expires: u64, now: u64 },
    #[error("bundle is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("channel {channel:?} already had version {version} (replay)")]
    Replay { channel: String, version: u64 },
    #[error("channel {channel:?} is at version {current}; {offered} would be a downgrade")]
    Downgrade {
        channel: String,
        current: u64,
        offered: u64,
    },
    #[error("bundle was built for another model (fingerprint mismatch)")]
    WrongModel,
    #[error("bundle was built for architecture {bundle:?}, the model is {model:?}")]
    ArchMismatch { bundle: String, model: String },
    #[error("dimension mismatch: bundle {what} = {bundle}, model has {model}")]
    DimensionMismatch {
        what: &'static str,
        bundle: u64,
        model: u64,
    },
    #[error("a bundle with id {0:?} is already active")]
    DuplicateBundle(String),
    #[error("no active bundle with id {0:?}")]
    UnknownBundle(String),
    #[error("no active edit with id {0:?}")]
    UnknownEdit(String),
    #[error("edit {0:?} is already rolled back")]
    AlreadyRolledBack(String),
    #[error("edit {0:?} is active, not rolled back: there is nothing to restore")]
    NotRolledBack(String),
    #[error("no previous state to restore")]
    NoHistory,
    #[error("{0}")]
    VersionStore(String),
}

/// One active bundle and the ids of its edits that were rolled back.
#[derive(Clone, Debug)]
pub struct ActiveBundle {
    pub bundle: Arc<Bundle>,
    /// Indices into the manifest's edits that are rolled back (sorted).
    pub rolled_back: Arc<[u32]>,
}

impl ActiveBundle {
    pub fn id(&self) -> &str {
        self.bundle.id()
    }

    /// The active unit ranges of payload `p` (all units minus rolled-back edits), in order.
    pub fn active_runs(&self, p: usize) -> Vec<Range<usize>> {
        let n = self.bundle.units(p);
        let edits = &self.bundle.manifest().edits;
        let mut masked: Vec<Range<usize>> = self
            .rolled_back
            .iter()
            .map(|&i| &edits[i as usize])
            .filter(|e| e.payload as usize == p)
            .map(|e| e.first as usize..(e.first + e.count) as usize)
            .collect();
        masked.sort_unstable_by_key(|r| r.start);
        let mut runs = Vec::new();
        let mut pos = 0;
        for m in masked {
            if m.start > pos {
                runs.push(pos..m.start);
            }
            pos = pos.max(m.end);
        }
        if pos < n {
            runs.push(pos..n);
        }
        runs
    }

    pub fn is_rolled_back(&self, edit_id: &str) -> bool {
        let edits = &self.bundle.manifest().edits;
        self.rolled_back
            .iter()
            .any(|&i| edits[i as usize].id == edit_id)
    }
}

/// One published state: what readers snapshot.
#[derive(Clone, Debug, Default)]
pub struct ActiveSet {
    /// Incremented by every published change.
    pub generation: u64,
    /// Bottom to top: later bundles are applied after earlier ones.
    pub bundles: Vec<ActiveBundle>,
    /// Highest version ever accepted per channel (replay/downgrade protection survives removal).
    pub high_water: BTreeMap<String, u64>,
}

/// A summary line of [`EditSet::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleInfo {
    pub id: String,
    pub channel: String,
    pub version: u64,
    pub edits: usize,
    pub rolled_back: Vec<String>,
}

impl ActiveSet {
    /// Active codebook rows: one view per contiguous run of non-rolled-back rows.
    pub fn codebook_views(&self) -> impl Iterator<Item = (&str, CodebookView<'_>)> {
        self.views(|ab, p| match ab.bundle.payloads()[p] {
            Payload::Codebook(_) => ab
                .active_runs(p)
                .into_iter()
                .filter_map(|r| ab.bundle.codebook(p, r))
                .collect(),
            _ => Vec::new(),
        })
    }

    pub fn patch_neurons_views(&self) -> impl Iterator<Item = (&str, PatchNeuronsView<'_>)> {
        self.views(|ab, p| match ab.bundle.payloads()[p] {
            Payload::PatchNeurons(_) => ab
                .active_runs(p)
                .into_iter()
                .filter_map(|r| ab.bundle.patch_neurons(p, r))
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Active low-rank deltas (tensors of rolled-back edits left out).
    pub fn low_rank_views(&self) -> impl Iterator<Item = (&str, Vec<LowRankTensorView<'_>>)> {
        self.views(|ab, p| match ab.bundle.payloads()[p] {
            Payload::LowRank(_) => {
                let runs = ab.active_runs(p);
                ab.bundle
                    .low_rank(p, |i| runs.iter().any(|r| r.contains(&i)))
                    .filter(|v| !v.is_empty())
                    .into_iter()
                    .collect()
            }
            _ => Vec::new(),
        })
    }

    /// Active GGUF-LoRA blobs.
    pub fn gguf_loras(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.views(|ab, p| match ab.bundle.payloads()[p] {
            Payload::LowRankGguf(_) if !ab.active_runs(p).is_empty() => {
                ab.bundle.gguf_lora(p).into_iter().collect()
            }
            _ => Vec::new(),
        })
    }

    pub fn memory_views(&self) -> impl Iterator<Item = (&str, MemoryView<'_>)> {
        self.views(|ab, p| match ab.bundle.payloads()[p] {
            Payload::Memory(_) => ab
                .active_runs(p)
                .into_iter()
                .filter_map(|r| ab.bundle.memory(p, r))
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Active codebooks as the families' type (one per contiguous run of active rows).
    pub fn codebooks(&self) -> impl Iterator<Item = (&str, families::Codebook<'_>)> {
        // Validated when the bundle was opened, so construction cannot fail here.
        self.codebook_views()
            .filter_map(|(id, v)| v.to_family().ok().map(|f| (id, f)))
    }

    pub fn patch_neurons(&self) -> impl Iterator<Item = (&str, families::PatchNeurons<'_>)> {
        self.patch_neurons_views()
            .filter_map(|(id, v)| v.to_family().ok().map(|f| (id, f)))
    }

    /// Active low-rank adapters: explicit tensors and GGUF-LoRA blobs.
    pub fn low_ranks(&self) -> impl Iterator<Item = (&str, families::LowRank<'_>)> {
        self.low_rank_views()
            .filter_map(|(id, v)| LowRankTensorView::to_family(&v).ok().map(|f| (id, f)))
            .chain(
                self.gguf_loras().filter_map(|(id, b)| {
                    families::LowRank::from_gguf_blob(b).ok().map(|f| (id, f))
                }),
            )
    }

    pub fn memories(&self) -> impl Iterator<Item = (&str, families::Memory<'_>)> {
        self.memory_views()
            .filter_map(|(id, v)| v.to_family().ok().map(|f| (id, f)))
    }

    fn views<'s, T: 's>(
        &'s self,
        f: impl Fn(&'s ActiveBundle, usize) -> Vec<T> + 's,
    ) -> impl Iterator<Item = (&'s str, T)> + 's {
        self.bundles.iter().flat_map(move |ab| {
            (0..ab.bundle.payloads().len())
                .flat_map(|p| f(ab, p))
                .map(move |v| (ab.id(), v))
                .collect::<Vec<_>>()
        })
    }

    pub fn get(&self, bundle_id: &str) -> Option<&ActiveBundle> {
        self.bundles.iter().find(|b| b.id() == bundle_id)
    }

    pub fn list(&self) -> Vec<BundleInfo> {
        self.bundles
            .iter()
            .map(|ab| {
                let m = ab.bundle.manifest();
                BundleInfo {
                    id: m.bundle_id.clone(),
                    channel: m.channel.clone(),
                    version: m.version,
                    edits: m.edits.len(),
                    rolled_back: ab
                        .rolled_back
                        .iter()
                        .map(|&i| m.edits[i as usize].id.clone())
                        .collect(),
                }
            })
            .collect()
    }
}

/// Options of [`EditSet::add`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AddOptions {
    /// Accept a version lower than or equal to the channel's (an operator's explicit rollback).
    pub allow_downgrade: bool,
}

/// A batch of changes published in one swap ([`EditSet::update`]).
pub struct Transaction<'e> {
    set: &'e EditSet,
    work: ActiveSet,
    /// Bundles added: (channel, version, signed digest, allow_downgrade), for the version store.
    offers: Vec<(String, u64, [u8; 32], bool)>,
}

impl Transaction<'_> {
    /// Add a verified bundle. A newer version replaces the channel's active bundle in place;
    /// otherwise the bundle goes on top of the stack.
    pub fn add(&mut self, bundle: Arc<Bundle>, opts: AddOptions) -> Result<(), EditSetError> {
        self.set.check_compatible(&bundle)?;
        let m = bundle.manifest();
        let now = self.set.clock.now();
        if now >= m.expires {
            return Err(EditSetError::Expired {
                expires: m.expires,
                now,
            });
        }
        if now < m.not_before {
            return Err(EditSetError::NotYetValid {
                not_before: m.not_before,
                now,
            });
        }
        if !opts.allow_downgrade {
            if let Some(&hw) = self.work.high_water.get(&m.channel) {
                if m.version == hw {
                    return Err(EditSetError::Replay {
                        channel: m.channel.clone(),
                        version: hw,
                    });
                }
                if m.version < hw {
                    return Err(EditSetError::Downgrade {
                        channel: m.channel.clone(),
                        current: hw,
                        offered: m.version,
                    });
                }
            }
        }
        let same_channel = self
            .work
            .bundles
            .iter()
            .position(|b| b.bundle.manifest().channel == m.channel);
        if let Some(dup) = self.work.bundles.iter().position(|b| b.id() == m.bundle_id) {
            if Some(dup) != same_channel {
                return Err(EditSetError::DuplicateBundle(m.bundle_id.clone()));
            }
        }
        let hw = self.work.high_water.entry(m.channel.clone()).or_insert(0);
        *hw = (*hw).max(m.version);
        self.offers.push((
            m.channel.clone(),
            m.version,
            bundle.signed_digest(),
            opts.allow_downgrade,
        ));
        let entry = ActiveBundle {
            bundle,
            rolled_back: Arc::from(Vec::new()),
        };
        match same_channel {
            Some(i) => self.work.bundles[i] = entry,
            None => self.work.bundles.push(entry),
        }
        Ok(())
    }

    /// Remove (roll back) a whole bundle.
    pub fn remove(&mut self, bundle_id: &str) -> Result<Arc<Bundle>, EditSetError> {
        let i = self
            .work
            .bundles
            .iter()
            .position(|b| b.id() == bundle_id)
            .ok_or_else(|| EditSetError::UnknownBundle(bundle_id.into()))?;
        Ok(self.work.bundles.remove(i).bundle)
    }

    /// Roll back one edit by id (masks its units; the bundle stays mapped, zero-copy). Edit ids
    /// are unique per bundle; if several bundles carry the id, the topmost one where it is still
    /// active is rolled back.
    pub fn rollback_edit(&mut self, edit_id: &str) -> Result<(), EditSetError> {
        let mut seen = false;
        for ab in self.work.bundles.iter_mut().rev() {
            if let Some(i) = ab
                .bundle
                .manifest()
                .edits
                .iter()
                .position(|e| e.id == edit_id)
            {
                if ab.rolled_back.contains(&(i as u32)) {
                    seen = true;
                    continue;
                }
                let mut v = ab.rolled_back.to_vec();
                v.push(i as u32);
                v.sort_unstable();
                ab.rolled_back = Arc::from(v);
                return Ok(());
            }
        }
        Err(if seen {
            EditSetError::AlreadyRolledBack(edit_id.into())
        } else {
            EditSetError::UnknownEdit(edit_id.into())
        })
    }

    /// Re-enable a rolled-back edit.
    pub fn restore_edit(&mut self, edit_id: &str) -> Result<(), EditSetError> {
        for ab in self.work.bundles.iter_mut() {
            let edits = &ab.bundle.manifest().edits;
            if let Some(k) = ab
                .rolled_back
                .iter()
                .position(|&i| edits[i as usize].id == edit_id)
            {
                let mut v = ab.rolled_back.to_vec();
                v.remove(k);
                ab.rolled_back = Arc::from(v);
                return Ok(());
            }
        }
        let active = self
            .work
            .bundles
            .iter()
            .any(|ab| ab.bundle.manifest().edits.iter().any(|e| e.id == edit_id));
        Err(if active {
            EditSetError::NotRolledBack(edit_id.into())
        } else {
            EditSetError::UnknownEdit(edit_id.into())
        })
    }

    /// The state being built.
    pub fn state(&self) -> &ActiveSet {
        &self.work
    }
}

/// The bundles active on one model.
pub struct EditSet {
    model: ModelBinding,
    trust: TrustStore,
    clock: Arc<dyn Clock>,
    current: ArcSwap<ActiveSet>,
    /// Serializes writers and keeps the previous states.
    history: Mutex<VecDeque<Arc<ActiveSet>>>,
    /// Persistent high-water marks shared with other sessions and processes.
    store: Option<Arc<VersionStore>>,
}

impl EditSet {
    /// An empty set bound to `model` (see [`crate::fingerprint::model_binding`]).
    pub fn new(model: ModelBinding, trust: TrustStore) -> Self {
        Self::with_clock(model, trust, Arc::new(SystemClock))
    }

    pub fn with_clock(model: ModelBinding, trust: TrustStore, clock: Arc<dyn Clock>) -> Self {
        EditSet {
            model,
            trust,
            clock,
            current: ArcSwap::from_pointee(ActiveSet::default()),
            history: Mutex::new(VecDeque::new()),
            store: None,
        }
    }

    /// Also check and raise the persistent marks of `store` whenever a bundle is activated: a
    /// version below a mark set by any process sharing the file is refused.
    pub fn with_version_store(mut self, store: Arc<VersionStore>) -> Self {
        self.store = Some(store);
        self
    }

    pub fn version_store(&self) -> Option<&Arc<VersionStore>> {
        self.store.as_ref()
    }

    /// The clock activation and expiry use.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Remove every active bundle whose `expires` has passed (one swap; nothing when none has).
    /// Called per request by the runtime, so a bundle that expires while active stops applying
    /// at the next request. Returns the ids removed.
    pub fn drop_expired(&self) -> Result<Vec<String>, EditSetError> {
        let now = self.clock.now();
        if !self
            .snapshot()
            .bundles
            .iter()
            .any(|b| now >= b.bundle.manifest().expires)
        {
            return Ok(Vec::new());
        }
        let (ids, _) = self.update(|tx| {
            let ids: Vec<String> = tx
                .work
                .bundles
                .iter()
                .filter(|b| now >= b.bundle.manifest().expires)
                .map(|b| b.id().to_string())
                .collect();
            tx.work
                .bundles
                .retain(|b| now < b.bundle.manifest().expires);
            Ok(ids)
        })?;
        Ok(ids)
    }

    pub fn model(&self) -> &ModelBinding {
        &self.model
    }

    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// The current state; hold it for the whole decode step for a consistent view.
    pub fn snapshot(&self) -> Arc<ActiveSet> {
        self.current.load_full()
    }

    /// Verify bytes against this set's trust store (copied into an aligned buffer).
    pub fn open_bytes(&self, bytes: &[u8]) -> Result<Arc<Bundle>, EditSetError> {
        Ok(Arc::new(Bundle::from_bytes(bytes, &self.trust)?))
    }

    /// Verify a buffer that is already aligned (no copy).
    pub fn open_buffer(&self, bytes: BundleBytes) -> Result<Arc<Bundle>, EditSetError> {
        Ok(Arc::new(Bundle::open(bytes, &self.trust)?))
    }

    fn check_compatible(&self, b: &Bundle) -> Result<(), EditSetError> {
        check_binding(&self.model, b)
    }

    /// Apply `f` to a copy of the current state and publish it in one swap if `f` succeeds;
    /// on error nothing changes. Returns the new generation.
    pub fn update<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, EditSetError>,
    ) -> Result<(R, u64), EditSetError> {
        self.update_with(f)
    }

    /// [`EditSet::update`] with the host's own error type: a host checks the prospective state
    /// ([`Transaction::state`]) against what its backend can run before anything is published.
    pub fn update_with<R, E: From<EditSetError>>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, E>,
    ) -> Result<(R, u64), E> {
        let mut hist = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let mut tx = Transaction {
            set: self,
            work: (*cur).clone(),
            offers: Vec::new(),
        };
        let r = f(&mut tx)?;
        // Last check before publishing, under the store's lock: marks another process raised
        // since this transaction began count too.
        if let Some(store) = &self.store {
            match store.check_and_raise(&tx.offers) {
                Err(e) => return Err(EditSetError::VersionStore(e.to_string()).into()),
                Ok(Err(Refusal::Replay { channel, version })) => {
                    return Err(EditSetError::Replay { channel, version }.into())
                }
                Ok(Err(Refusal::Downgrade {
                    channel,
                    current,
                    offered,
                })) => {
                    return Err(EditSetError::Downgrade {
                        channel,
                        current,
                        offered,
                    }
                    .into())
                }
                Ok(Ok(())) => {}
            }
        }
        tx.work.generation = cur.generation + 1;
        let generation = tx.work.generation;
        self.current.store(Arc::new(tx.work));
        hist.push_back(cur);
        if hist.len() > HISTORY_DEPTH {
            hist.pop_front();
        }
        Ok((r, generation))
    }

    pub fn add(&self, bundle: Arc<Bundle>, opts: AddOptions) -> Result<u64, EditSetError> {
        self.update(|tx| tx.add(bundle, opts)).map(|(_, g)| g)
    }

    pub fn remove(&self, bundle_id: &str) -> Result<Arc<Bundle>, EditSetError> {
        self.update(|tx| tx.remove(bundle_id)).map(|(b, _)| b)
    }

    pub fn rollback_edit(&self, edit_id: &str) -> Result<u64, EditSetError> {
        self.update(|tx| tx.rollback_edit(edit_id)).map(|(_, g)| g)
    }

    pub fn restore_edit(&self, edit_id: &str) -> Result<u64, EditSetError> {
        self.update(|tx| tx.restore_edit(edit_id)).map(|(_, g)| g)
    }

    /// Go back to the state before the last change (keeping the replay high-water marks).
    pub fn restore_previous(&self) -> Result<u64, EditSetError> {
        let mut hist = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let prev = hist.pop_back().ok_or(EditSetError::NoHistory)?;
        let cur = self.current.load_full();
        let mut st = (*prev).clone();
        for (ch, v) in &cur.high_water {
            let e = st.high_water.entry(ch.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
        st.generation = cur.generation + 1;
        let g = st.generation;
        self.current.store(Arc::new(st));
        Ok(g)
    }

    pub fn list(&self) -> Vec<BundleInfo> {
        self.snapshot().list()
    }
}

/// Check that `b` was built for `model` (architecture, dims, then fingerprint).
pub fn check_binding<B: AsRef<[u8]>>(
    model: &ModelBinding,
    b: &Bundle<B>,
) -> Result<(), EditSetError> {
    let m = &b.manifest().model;
    if m.arch != model.arch {
        return Err(EditSetError::ArchMismatch {
            bundle: m.arch.clone(),
            model: model.arch.clone(),
        });
    }
    for (what, bv, mv) in [
        ("n_embd", m.n_embd, model.n_embd),
        ("n_layer", m.n_layer, model.n_layer),
    ] {
        if bv != mv {
            return Err(EditSetError::DimensionMismatch {
                what,
                bundle: bv as u64,
                model: mv as u64,
            });
        }
    }
    if m.fingerprint != model.fingerprint {
        return Err(EditSetError::WrongModel);
    }
    Ok(())
}
