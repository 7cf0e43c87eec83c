//! Edit slots: the graph inputs through which a bundle's edits reach an ONNX Runtime graph.
//!
//! ONNX Runtime has no per-node callback, so each edit family is a small subgraph at its hook
//! site, fed through plain required inputs (never initializers: the OpenVINO EP ignores a fed
//! value for an input that is also an initializer). Which slots a graph has is its
//! [`SlotLayout`], fixed when the graph is built; a bundle swap or rollback changes only what is
//! fed (`SlotFeeds`, built once per pinned snapshot, bound into a session's `IoBinding` once
//! per snapshot: `BoundFeeds`).
//!
//! - Codebook slot `cb{i}` (GRACE): `keys [N, d]` (unit rows), `values [N, d]`, `cos_min [N]`,
//!   `rows [R]`. The nearest key by cosine is found for the selected rows only (the last prompt
//!   token, or every row for all-positions codebooks); a row is replaced when its cosine
//!   reaches the entry's `cos_min`, the radius turned into a cosine bound on the host
//!   ([`cos_bound`]) so that the decision is the llama.cpp path's exactly, for the same row.
//!   Outputs `best [R]` and `cos [R]` feed `explain`. A run with no selected row is fed a
//!   one-entry sentinel that never hits (decode steps pay nothing for a large codebook).
//! - Neuron slot `pn{i}` (T-Patcher): `keys [M, d]`, `bias [M]`, `values [M, d]`;
//!   `out = write + act(x K^T + b) V` on the rows where a neuron fired. Output `act [T, M]`.
//! - Low-rank slot `lr{i}` on a base weight: `a [r, n_in]`, `b [n_out, r]` (scales folded in),
//!   `on [1]`: `y = x W^T + (x A^T) B^T` when `on`.
//!
//! An empty slot is fed a sentinel (nothing fires, `on` false); the subgraphs then select the
//! unmodified tensor with `Where`, so the output is bitwise the base graph's.

use std::collections::BTreeSet;
use std::sync::Arc;

use amend_edits::bundle::Payload;
use amend_edits::families::{self, Activation, Distance};
use amend_edits::{Bundle, HookPoint, Site};
use ort::session::IoBinding;
use ort::value::{DynValue, Tensor};

use crate::editing::{edit_of, CodebookEvent, EditPlan, Explain, LowRankSource, NeuronEvent};
use crate::error::RuntimeError;

/// A codebook slot: lookup at `key_site`, replacement at `replace_site`, both at `layer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CodebookSlot {
    pub layer: u32,
    pub key_site: Site,
    pub replace_site: Site,
}

/// A patch-neuron slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NeuronSlot {
    pub layer: u32,
    pub read_site: Site,
    pub write_site: Site,
    pub activation: Activation,
}

/// The edit slots a graph is built with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotLayout {
    pub codebooks: Vec<CodebookSlot>,
    pub neurons: Vec<NeuronSlot>,
    /// Base weights with a low-rank slot, e.g. `blk.5.ffn_down.weight`.
    pub low_rank: Vec<String>,
}

fn site_of(code: u8) -> Result<Site, String> {
    Site::from_code(code).ok_or_else(|| format!("unknown site code {code}"))
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
    }
}

impl SlotLayout {
    pub fn is_empty(&self) -> bool {
        self.codebooks.is_empty() && self.neurons.is_empty() && self.low_rank.is_empty()
    }

    /// The slots the edits of `bundles` need.
    pub fn for_bundles<'a>(
        bundles: impl IntoIterator<Item = &'a Bundle>,
    ) -> Result<SlotLayout, RuntimeError> {
        let mut l = SlotLayout::default();
        let bad = |b: &Bundle, e: String| RuntimeError::InvalidEdit(format!("{}: {e}", b.id()));
        for b in bundles {
            for (pi, p) in b.payloads().iter().enumerate() {
                match p {
                    Payload::Codebook(d) => l.codebooks.push(CodebookSlot {
                        layer: d.layer,
                        key_site: site_of(d.key_site).map_err(|e| bad(b, e))?,
                        replace_site: site_of(d.replace_site).map_err(|e| bad(b, e))?,
                    }),
                    Payload::PatchNeurons(d) => l.neurons.push(NeuronSlot {
                        layer: d.layer,
                        read_site: site_of(d.read_site).map_err(|e| bad(b, e))?,
                        write_site: site_of(d.write_site).map_err(|e| bad(b, e))?,
                        activation: Activation::from_code(d.activation)
                            .ok_or_else(|| bad(b, format!("activation code {}", d.activation)))?,
                    }),
                    Payload::LowRank(d) => {
                        l.low_rank.extend(d.tensors.iter().map(|t| t.name.clone()))
                    }
                    Payload::LowRankGguf(_) => {
                        if let Some(blob) = b.gguf_lora(pi) {
                            let info = families::inspect_gguf_lora(blob)
                                .map_err(|e| bad(b, e.to_string()))?;
                            l.low_rank.extend(info.tensors.into_iter().map(|t| t.name));
                        }
                    }
                    Payload::Memory(_) => {}
                }
            }
        }
        l.normalize();
        Ok(l)
    }

    /// The slots of `self` that `have` lacks.
    pub fn missing_from(&self, have: &SlotLayout) -> SlotLayout {
        SlotLayout {
            codebooks: (self.codebooks.iter())
                .filter(|c| !have.codebooks.contains(c))
                .copied()
                .collect(),
            neurons: (self.neurons.iter())
                .filter(|n| !have.neurons.contains(n))
                .copied()
                .collect(),
            low_rank: (self.low_rank.iter())
                .filter(|t| !have.low_rank.contains(t))
                .cloned()
                .collect(),
        }
    }

    /// Adds `other`'s slots.
    pub fn merge(&mut self, other: &SlotLayout) {
        self.codebooks.extend(other.codebooks.iter().copied());
        self.neurons.extend(other.neurons.iter().copied());
        self.low_rank.extend(other.low_rank.iter().cloned());
        self.normalize();
    }

    fn normalize(&mut self) {
        self.codebooks.sort();
        self.codebooks.dedup();
        self.neurons
            .sort_by_key(|n| (n.layer, n.read_site, n.write_site, n.activation.code()));
        self.neurons.dedup();
        let set: BTreeSet<String> = self.low_rank.drain(..).collect();
        self.low_rank = set.into_iter().collect();
    }

    /// The layout as text, `;`-separated: `cb:LAYER:KEY_SITE:REPLACE_SITE`,
    /// `pn:LAYER:READ_SITE:WRITE_SITE:relu|gelu`, `lr:TENSOR`. [`SlotLayout::parse`] reads it;
    /// it also identifies the layout in the graph cache.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for c in &self.codebooks {
            parts.push(format!("cb:{}:{}:{}", c.layer, c.key_site, c.replace_site));
        }
        for n in &self.neurons {
            parts.push(format!(
                "pn:{}:{}:{}:{}",
                n.layer,
                n.read_site,
                n.write_site,
                activation_name(n.activation)
            ));
        }
        for t in &self.low_rank {
            parts.push(format!("lr:{t}"));
        }
        parts.join(";")
    }

    /// Reads [`SlotLayout::describe`]'s text.
    pub fn parse(text: &str) -> Result<SlotLayout, String> {
        let mut l = SlotLayout::default();
        let site = |s: &str| Site::from_name(s).ok_or_else(|| format!("unknown site `{s}`"));
        let layer = |s: &str| s.parse::<u32>().map_err(|_| format!("bad layer `{s}`"));
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let f: Vec<&str> = part.split(':').collect();
            match f[..] {
                ["cb", ly, k, r] => l.codebooks.push(CodebookSlot {
                    layer: layer(ly)?,
                    key_site: site(k)?,
                    replace_site: site(r)?,
                }),
                ["pn", ly, rd, wr, act] => l.neurons.push(NeuronSlot {
                    layer: layer(ly)?,
                    read_site: site(rd)?,
                    write_site: site(wr)?,
                    activation: match act {
                        "relu" => Activation::Relu,
                        "gelu" => Activation::Gelu,
                        _ => return Err(format!("unknown activation `{act}`")),
                    },
                }),
                ["lr", t] if !t.is_empty() => l.low_rank.push(t.to_string()),
                _ => {
                    return Err(format!(
                        "slot `{part}`: expected cb:LAYER:KEY:REPLACE, pn:LAYER:READ:WRITE:ACT or lr:TENSOR"
                    ))
                }
            }
        }
        l.normalize();
        Ok(l)
    }

    /// Every slot names a layer the model has, and reads a site no later in the layer than the
    /// one it writes (the graph computes sites in [`Site`] order).
    pub fn check(&self, n_layer: usize) -> Result<(), String> {
        let pt = |layer: u32, s: Site| -> Result<(), String> {
            if layer as usize >= n_layer {
                return Err(format!(
                    "slot at layer {layer}: the model has {n_layer} layers"
                ));
            }
            if s == Site::Embeddings && layer != 0 {
                return Err(format!(
                    "slot at layer {layer}: embeddings exist at layer 0 only"
                ));
            }
            Ok(())
        };
        for c in &self.codebooks {
            pt(c.layer, c.key_site)?;
            pt(c.layer, c.replace_site)?;
            if c.key_site > c.replace_site {
                return Err(format!(
                    "codebook slot at layer {}: the key site {} comes after the replace site {}",
                    c.layer, c.key_site, c.replace_site
                ));
            }
        }
        for n in &self.neurons {
            pt(n.layer, n.read_site)?;
            pt(n.layer, n.write_site)?;
            if n.read_site > n.write_site {
                return Err(format!(
                    "neuron slot at layer {}: the read site {} comes after the write site {}",
                    n.layer, n.read_site, n.write_site
                ));
            }
        }
        Ok(())
    }
}

/// Input and output names of slot `i`'s tensors.
/// How much each slot holds when the graph has static shapes ([`super::StaticShapes`]): the
/// slot inputs' sizes are fixed at build, a shorter feed is padded with entries that never
/// fire, and a bundle needing more is refused naming the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCapacity {
    /// Entries per codebook slot.
    pub entries: usize,
    /// Neurons per patch-neuron slot.
    pub neurons: usize,
    /// Rank per low-rank slot.
    pub rank: usize,
}

impl Default for SlotCapacity {
    fn default() -> Self {
        SlotCapacity {
            entries: 1024,
            neurons: 256,
            rank: 64,
        }
    }
}

/// The largest value of each slot capacity (entries, neurons, rank).
pub const MAX_SLOT_CAPACITY: usize = 1_000_000;

impl SlotCapacity {
    pub(crate) fn describe(&self) -> String {
        format!("{},{},{}", self.entries, self.neurons, self.rank)
    }

    /// Each value is in 1..=[`MAX_SLOT_CAPACITY`] (the fields are public, so a capacity built by
    /// hand is checked too).
    pub(crate) fn in_range(&self) -> bool {
        [self.entries, self.neurons, self.rank]
            .iter()
            .all(|x| (1..=MAX_SLOT_CAPACITY).contains(x))
    }

    /// `ENTRIES,NEURONS,RANK`, each 1..=1,000,000.
    pub fn parse(text: &str) -> Result<SlotCapacity, String> {
        let v: Vec<usize> = text
            .split(',')
            .map(|x| x.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("slot capacity `{text}`: expected ENTRIES,NEURONS,RANK"))?;
        let c = match v[..] {
            [entries, neurons, rank] => SlotCapacity {
                entries,
                neurons,
                rank,
            },
            _ => SlotCapacity {
                entries: 0,
                neurons: 0,
                rank: 0,
            },
        };
        if c.in_range() {
            Ok(c)
        } else {
            Err(format!(
                "slot capacity `{text}`: expected ENTRIES,NEURONS,RANK, each 1..={MAX_SLOT_CAPACITY}"
            ))
        }
    }
}

/// `n` rows of `width` values padded to `cap` rows with `fill` (static slots).
fn pad_rows(mut v: Vec<f32>, n: usize, width: usize, cap: usize, fill: f32) -> Vec<f32> {
    debug_assert_eq!(v.len(), n * width);
    v.resize(cap.max(n) * width, fill);
    v
}

pub fn cb_name(i: usize, what: &str) -> String {
    format!("slot.cb{i}.{what}")
}
pub fn pn_name(i: usize, what: &str) -> String {
    format!("slot.pn{i}.{what}")
}
pub fn lr_name(i: usize, what: &str) -> String {
    format!("slot.lr{i}.{what}")
}

/// The smallest cosine whose distance is within `radius` under `distance` (a normalized one):
/// `distance_of_cos` decreases as the cosine grows, so the entry applies exactly when the
/// row's cosine is at least this bound. `-inf` when every cosine qualifies, `+inf` when none.
pub fn cos_bound(distance: Distance, radius: f32) -> f32 {
    let within = |c: f32| distance.distance_of_cos(c) <= radius;
    if within(-1.0) {
        return f32::NEG_INFINITY;
    }
    if !within(1.0) {
        return f32::INFINITY;
    }
    // Bisection over the f32 values of [-1, 1] in their total order.
    let key = |c: f32| {
        let b = c.to_bits() as i32;
        if b < 0 {
            !(b & 0x7fff_ffff)
        } else {
            b
        }
    };
    let val = |k: i32| {
        if k < 0 {
            f32::from_bits((!k | i32::MIN) as u32)
        } else {
            f32::from_bits(k as u32)
        }
    };
    let (mut lo, mut hi) = (key(-1.0), key(1.0)); // within(val(lo)) false, within(val(hi)) true
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if within(val(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    val(hi)
}

fn tensor_f32(shape: &[usize], data: Vec<f32>) -> Result<DynValue, RuntimeError> {
    let shape: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    Tensor::from_array((shape, data))
        .map(|t| t.into_dyn())
        .map_err(|e| RuntimeError::Ort(format!("building an edit slot input: {e}")))
}

fn tensor_bool(v: bool) -> Result<DynValue, RuntimeError> {
    Tensor::from_array((vec![1i64], vec![v]))
        .map(|t| t.into_dyn())
        .map_err(|e| RuntimeError::Ort(format!("building an edit slot input: {e}")))
}

/// A codebook slot's feed: its entries (the plan's codebooks at the slot, concatenated) and
/// where each came from.
struct CodebookFeed {
    /// keys, values, cos_min.
    real: Option<[DynValue; 3]>,
    all_positions: bool,
    /// Entry -> (plan codebook, index within it).
    entries: Vec<(usize, usize)>,
}

struct NeuronFeed {
    values: [DynValue; 3],
    /// Columns of the `act` output (the feed's neurons, or the slot's static capacity).
    width: usize,
    /// Column -> (plan neuron set, index within it); empty for the sentinel.
    columns: Vec<(usize, usize)>,
}

/// What one pinned snapshot feeds into the graph's slots.
pub(crate) struct SlotFeeds {
    codebooks: Vec<CodebookFeed>,
    /// keys, values, cos_min of the one-entry sentinel (shared by every codebook slot).
    cb_sentinel: [DynValue; 3],
    neurons: Vec<NeuronFeed>,
    /// a, b, on per low-rank slot.
    low_rank: Vec<[DynValue; 3]>,
}

impl SlotFeeds {
    /// The feeds of `plan` for a graph with `layout`: each edit goes to its slot; an edit the
    /// layout has no slot for is an error naming it (nothing is applied).
    pub(crate) fn build(
        plan: Option<&EditPlan>,
        layout: &SlotLayout,
        n_embd: usize,
        weight_dims: &dyn Fn(&str) -> Option<(usize, usize)>,
        capacity: Option<SlotCapacity>,
    ) -> Result<SlotFeeds, RuntimeError> {
        let d = n_embd;
        let over = |what: String, need: usize, cap: usize| {
            RuntimeError::EditSlot(format!(
                "{what} needs {need}, and the graph's static slot holds {cap}"
            ))
        };
        let (pcb, ppn, plr) = match plan {
            Some(p) => (&p.codebooks[..], &p.neurons[..], &p.low_rank[..]),
            None => (&[][..], &[][..], &[][..]),
        };
        let bundle_id = |b: usize| plan.map(|p| p.bundle_id(b)).unwrap_or_default();
        let no_slot = |what: String| RuntimeError::EditSlot(what);
        // Codebooks.
        let mut cb_members: Vec<Vec<usize>> = vec![Vec::new(); layout.codebooks.len()];
        for (ci, c) in pcb.iter().enumerate() {
            let slot = CodebookSlot {
                layer: c.cb.layer(),
                key_site: c.cb.key_site(),
                replace_site: c.cb.replace_site(),
            };
            let Some(si) = layout.codebooks.iter().position(|s| *s == slot) else {
                return Err(no_slot(format!(
                    "bundle {}: a codebook at layer {} ({} -> {}), and the graph has no slot for it (slots: {})",
                    bundle_id(c.bundle),
                    slot.layer,
                    slot.key_site,
                    slot.replace_site,
                    layout.describe()
                )));
            };
            if !c.cb.distance().normalized() {
                return Err(RuntimeError::Unsupported(format!(
                    "bundle {}: codebook with the plain Euclidean distance on ONNX Runtime (only the normalized distances have slots)",
                    bundle_id(c.bundle)
                )));
            }
            if c.cb.dim() != d {
                return Err(RuntimeError::InvalidEdit(format!(
                    "bundle {}: codebook rows are {} wide, the model's {d}",
                    bundle_id(c.bundle),
                    c.cb.dim()
                )));
            }
            cb_members[si].push(ci);
        }
        let mut codebooks = Vec::with_capacity(layout.codebooks.len());
        for members in cb_members {
            if members.is_empty() {
                codebooks.push(CodebookFeed {
                    real: None,
                    all_positions: false,
                    entries: Vec::new(),
                });
                continue;
            }
            let all = pcb[members[0]].cb.all_positions();
            if all && capacity.is_some() {
                return Err(RuntimeError::Unsupported(format!(
                    "bundle {}: an all-positions codebook with static shapes (the graph looks up one row per run)",
                    bundle_id(pcb[members[0]].bundle)
                )));
            }
            if members.iter().any(|&m| pcb[m].cb.all_positions() != all) {
                return Err(RuntimeError::Unsupported(
                    "codebooks at one slot disagree on all-positions lookup (one graph slot looks up at one set of positions)".into(),
                ));
            }
            let n: usize = members.iter().map(|&m| pcb[m].cb.len()).sum();
            let (mut keys, mut values, mut bounds, mut entries) = (
                Vec::with_capacity(n * d),
                Vec::with_capacity(n * d),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for &m in &members {
                let cb = &pcb[m].cb;
                for e in 0..cb.len() {
                    keys.extend_from_slice(cb.key(e));
                    values.extend_from_slice(cb.value(e));
                    bounds.push(cos_bound(cb.distance(), cb.radius(e)));
                    entries.push((m, e));
                }
            }
            let rows = match capacity {
                Some(c) if n > c.entries => {
                    let slot = &layout.codebooks[codebooks.len()];
                    return Err(over(
                        format!(
                            "the codebook slot at layer {} ({} -> {}) for bundle {}: {n} entries",
                            slot.layer,
                            slot.key_site,
                            slot.replace_site,
                            bundle_id(pcb[members[0]].bundle)
                        ),
                        n,
                        c.entries,
                    ));
                }
                Some(c) => {
                    // Padding: copies of the first key that never hit (+inf bound); ArgMax keeps
                    // the first of equal dots, the real entry.
                    let first = keys[..d].to_vec();
                    for _ in n..c.entries {
                        keys.extend_from_slice(&first);
                    }
                    values.resize(c.entries * d, 0.0);
                    bounds.resize(c.entries, f32::INFINITY);
                    c.entries
                }
                None => n,
            };
            codebooks.push(CodebookFeed {
                real: Some([
                    tensor_f32(&[rows, d], keys)?,
                    tensor_f32(&[rows, d], values)?,
                    tensor_f32(&[rows], bounds)?,
                ]),
                all_positions: all,
                entries,
            });
        }
        let sentinel_rows = capacity.map_or(1, |c| c.entries);
        let cb_sentinel = [
            tensor_f32(&[sentinel_rows, d], vec![0.0; sentinel_rows * d])?,
            tensor_f32(&[sentinel_rows, d], vec![0.0; sentinel_rows * d])?,
            tensor_f32(&[sentinel_rows], vec![f32::INFINITY; sentinel_rows])?,
        ];

        // Patch neurons.
        let mut pn_members: Vec<Vec<usize>> = vec![Vec::new(); layout.neurons.len()];
        for (ni, pl) in ppn.iter().enumerate() {
            let slot = NeuronSlot {
                layer: pl.pn.layer(),
                read_site: pl.pn.read_site(),
                write_site: pl.pn.write_site(),
                activation: pl.pn.activation(),
            };
            let Some(si) = layout.neurons.iter().position(|s| *s == slot) else {
                return Err(no_slot(format!(
                    "bundle {}: patch neurons at layer {} ({} -> {}, {}), and the graph has no slot for them (slots: {})",
                    bundle_id(pl.bundle),
                    slot.layer,
                    slot.read_site,
                    slot.write_site,
                    activation_name(slot.activation),
                    layout.describe()
                )));
            };
            if pl.pn.dim() != d {
                return Err(RuntimeError::InvalidEdit(format!(
                    "bundle {}: neuron rows are {} wide, the model's {d}",
                    bundle_id(pl.bundle),
                    pl.pn.dim()
                )));
            }
            pn_members[si].push(ni);
        }
        let mut neurons = Vec::with_capacity(layout.neurons.len());
        for members in pn_members {
            let m: usize = members.iter().map(|&i| ppn[i].pn.len()).sum();
            if let Some(c) = capacity.filter(|c| m > c.neurons) {
                let slot = &layout.neurons[neurons.len()];
                return Err(over(
                    format!(
                        "the patch-neuron slot at layer {} ({} -> {})",
                        slot.layer, slot.read_site, slot.write_site
                    ),
                    m,
                    c.neurons,
                ));
            }
            // Static slots are padded to capacity, the rest of the feed included.
            let width = capacity.map_or(m.max(1), |c| c.neurons);
            if m == 0 {
                // Nothing fires: a zero key with a negative bias.
                neurons.push(NeuronFeed {
                    values: [
                        tensor_f32(&[width, d], vec![0.0; width * d])?,
                        tensor_f32(&[width], vec![-1.0; width])?,
                        tensor_f32(&[width, d], vec![0.0; width * d])?,
                    ],
                    width,
                    columns: Vec::new(),
                });
                continue;
            }
            let (mut keys, mut bias, mut values, mut columns) = (
                Vec::with_capacity(m * d),
                Vec::with_capacity(m),
                Vec::with_capacity(m * d),
                Vec::with_capacity(m),
            );
            for &i in &members {
                let pn = &ppn[i].pn;
                for j in 0..pn.len() {
                    keys.extend_from_slice(pn.key(j));
                    bias.push(pn.bias(j));
                    values.extend_from_slice(pn.value(j));
                    columns.push((i, j));
                }
            }
            // Padding: zero keys with a negative bias never fire (and write zero values).
            let (keys, values) = (
                pad_rows(keys, m, d, width, 0.0),
                pad_rows(values, m, d, width, 0.0),
            );
            bias.resize(width, -1.0);
            neurons.push(NeuronFeed {
                values: [
                    tensor_f32(&[width, d], keys)?,
                    tensor_f32(&[width], bias)?,
                    tensor_f32(&[width, d], values)?,
                ],
                width,
                columns,
            });
        }

        // Low-rank: every bundle's deltas on a weight concatenated along the rank, the user's
        // scale folded into B.
        let mut merger = families::LowRankMerger::default();
        for l in plr {
            if l.scale == 0.0 {
                continue;
            }
            let lr = match &l.source {
                LowRankSource::Merged(m) => m.to_low_rank(),
                LowRankSource::Gguf(blob) => families::LowRank::from_gguf_blob(blob),
            }
            .map_err(|e| {
                RuntimeError::InvalidEdit(format!(
                    "bundle {}: low-rank deltas on ONNX Runtime: {e}",
                    bundle_id(l.bundle)
                ))
            })?;
            for t in lr.tensors() {
                let scaled = families::LowRankTensor {
                    alpha: t.alpha * l.scale,
                    ..*t
                };
                merger.add(&scaled).map_err(|e| {
                    RuntimeError::InvalidEdit(format!("bundle {}: {e}", bundle_id(l.bundle)))
                })?;
            }
        }
        let merged = if merger.is_empty() {
            None
        } else {
            Some(
                merger
                    .to_low_rank()
                    .map_err(|e| RuntimeError::InvalidEdit(e.to_string()))?,
            )
        };
        if let Some(m) = &merged {
            for t in m.tensors() {
                if !layout.low_rank.iter().any(|n| n == t.name) {
                    return Err(no_slot(format!(
                        "a low-rank delta on `{}`, and the graph has no slot for it (slots: {})",
                        t.name,
                        layout.describe()
                    )));
                }
            }
        }
        let mut low_rank = Vec::with_capacity(layout.low_rank.len());
        for name in &layout.low_rank {
            let (n_in, n_out) = weight_dims(name).ok_or_else(|| {
                RuntimeError::EditSlot(format!(
                    "low-rank slot on `{name}`: the model has no such weight"
                ))
            })?;
            match merged.as_ref().and_then(|m| m.tensor(name)) {
                Some(t) => {
                    if (t.n_in, t.n_out) != (n_in, n_out) {
                        return Err(RuntimeError::InvalidEdit(format!(
                            "low-rank delta on `{name}` is {}x{}, the weight {n_out}x{n_in}",
                            t.n_out, t.n_in
                        )));
                    }
                    let s = t.scale();
                    let rank = match capacity {
                        Some(c) if t.rank > c.rank => {
                            return Err(over(
                                format!("the low-rank slot on `{name}`: rank {}", t.rank),
                                t.rank,
                                c.rank,
                            ))
                        }
                        Some(c) => c.rank,
                        None => t.rank,
                    };
                    // Static slots: zero rows of A and zero columns of B add exact zeros.
                    let a = pad_rows(t.a.to_vec(), t.rank, n_in, rank, 0.0);
                    let mut b = vec![0f32; n_out * rank];
                    for o in 0..n_out {
                        for r in 0..t.rank {
                            b[o * rank + r] = t.b[o * t.rank + r] * s;
                        }
                    }
                    low_rank.push([
                        tensor_f32(&[rank, n_in], a)?,
                        tensor_f32(&[n_out, rank], b)?,
                        tensor_bool(true)?,
                    ]);
                }
                None => {
                    let rank = capacity.map_or(1, |c| c.rank);
                    low_rank.push([
                        tensor_f32(&[rank, n_in], vec![0.0; rank * n_in])?,
                        tensor_f32(&[n_out, rank], vec![0.0; n_out * rank])?,
                        tensor_bool(false)?,
                    ])
                }
            }
        }
        Ok(SlotFeeds {
            codebooks,
            cb_sentinel,
            neurons,
            low_rank,
        })
    }

    /// Whether codebook slot `i` looks up at row `t` of a run (`last_prompt`: the index of the
    /// last prompt token within the run, if it is in it).
    fn gated(&self, i: usize, t: usize, last_prompt: Option<usize>) -> bool {
        let c = &self.codebooks[i];
        c.real.is_some() && (c.all_positions || last_prompt == Some(t))
    }

    /// The codebook slot `i` of one run of `n` rows: whether its real entries are fed (else the
    /// sentinel) and the rows it looks up.
    fn codebook_run(&self, i: usize, n: usize, last_prompt: Option<usize>) -> (bool, Vec<i64>) {
        let rows: Vec<i64> = (0..n)
            .filter(|&t| self.gated(i, t, last_prompt))
            .map(|t| t as i64)
            .collect();
        // No row looked up: the sentinel (which never hits) on row 0.
        if rows.is_empty() {
            (false, vec![0])
        } else {
            (true, rows)
        }
    }

    /// [`SlotFeeds::record`] from a run's outputs.
    pub(crate) fn record_run(
        &self,
        plan: &EditPlan,
        n: usize,
        last_prompt: Option<usize>,
        pos0: usize,
        out: &ort::session::SessionOutputs<'_>,
        explain: &mut Explain,
    ) {
        let floats = |name: &str| {
            out.get(name)
                .and_then(|v| v.try_extract_tensor::<f32>().ok())
                .map(|(_, d)| d.to_vec())
        };
        let ints = |name: &str| {
            out.get(name)
                .and_then(|v| v.try_extract_tensor::<i64>().ok())
                .map(|(_, d)| d.to_vec())
        };
        self.record(plan, n, last_prompt, pos0, &floats, &ints, explain);
    }

    /// Records what fired in a run into `explain`: codebook lookups at the gated rows, neurons
    /// with a non-zero activation. `output(name)` reads a graph output; `pos0` is the position
    /// of the run's first row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        plan: &EditPlan,
        n: usize,
        last_prompt: Option<usize>,
        pos0: usize,
        output: &dyn Fn(&str) -> Option<Vec<f32>>,
        best: &dyn Fn(&str) -> Option<Vec<i64>>,
        explain: &mut Explain,
    ) {
        for (i, c) in self.codebooks.iter().enumerate() {
            if c.real.is_none() || !(0..n).any(|t| self.gated(i, t, last_prompt)) {
                continue;
            }
            let (Some(cos), Some(idx)) = (output(&cb_name(i, "cos")), best(&cb_name(i, "best")))
            else {
                continue;
            };
            // The k-th looked-up row is the k-th gated row of the run.
            let gated = (0..n).filter(|&t| self.gated(i, t, last_prompt));
            for (k, t) in gated.enumerate().take(cos.len().min(idx.len())) {
                let Some(&(m, e)) = usize::try_from(idx[k]).ok().and_then(|j| c.entries.get(j))
                else {
                    continue;
                };
                let pc = &plan.codebooks[m];
                // As the llama.cpp path: no lookup for a row without a direction.
                if !cos[k].is_finite() {
                    continue;
                }
                let cosine = cos[k].clamp(-1.0, 1.0);
                let distance = pc.cb.distance().distance_of_cos(cosine);
                let radius = pc.cb.radius(e);
                explain.codebook.push(CodebookEvent {
                    bundle: plan.bundle_id(pc.bundle),
                    edit_id: edit_of(&plan.set, pc.bundle, pc.payload, pc.rows.start + e),
                    layer: pc.cb.layer(),
                    entry: pc.rows.start + e,
                    pos: (pos0 + t) as i32,
                    distance,
                    radius,
                    replaced: cos[k] >= cos_bound(pc.cb.distance(), radius),
                });
            }
        }
        for (i, f) in self.neurons.iter().enumerate() {
            if f.columns.is_empty() {
                continue;
            }
            let Some(act) = output(&pn_name(i, "act")) else {
                continue;
            };
            for row in act.chunks_exact(f.width).take(n) {
                for (j, &a) in row.iter().enumerate().take(f.columns.len()) {
                    if a <= 0.0 {
                        continue;
                    }
                    let (ni, unit) = f.columns[j];
                    let pl = &plan.neurons[ni];
                    let unit = pl.rows.start + unit;
                    let bundle = plan.bundle_id(pl.bundle);
                    if let Some(e) = explain.neurons.iter_mut().find(|e| {
                        e.layer == pl.pn.layer() && e.neuron == unit && e.bundle == bundle
                    }) {
                        e.max_activation = e.max_activation.max(a);
                        e.positions += 1;
                    } else {
                        explain.neurons.push(NeuronEvent {
                            edit_id: edit_of(&plan.set, pl.bundle, pl.payload, unit),
                            bundle,
                            layer: pl.pn.layer(),
                            neuron: unit,
                            max_activation: a,
                            positions: 1,
                        });
                    }
                }
            }
        }
    }
}

fn bind(io: &mut IoBinding, name: &str, v: &DynValue) -> Result<(), RuntimeError> {
    io.bind_input(name, v)
        .map_err(|e| RuntimeError::Ort(format!("binding the edit slot input `{name}`: {e}")))
}

/// What of a snapshot's feeds an [`IoBinding`] holds, so that a run rebinds only what changed:
/// a snapshot's neuron and low-rank inputs once, a codebook's entries when its gate opens or
/// closes (prefill's last prompt token vs decode), its `rows` when they change. Binding an
/// owned tensor copies nothing (ONNX Runtime keeps a reference), so a swap or rollback is a
/// few pointer updates: the graph is never rebuilt. A caller whose binding failed midway drops
/// it with this state.
#[derive(Default)]
pub(crate) struct BoundFeeds {
    /// The snapshot bound, compared by pointer (held, so that its address is not reused by a
    /// later snapshot while bound).
    feeds: Option<Arc<SlotFeeds>>,
    /// Per codebook slot: real entries (else the sentinel) and the rows bound.
    codebooks: Vec<(bool, Vec<i64>)>,
}

impl BoundFeeds {
    /// Binds `feeds` for one run of `n` rows (`last_prompt`: the index of the last prompt token
    /// within the run, if it is in it).
    pub(crate) fn bind(
        &mut self,
        io: &mut IoBinding,
        feeds: &Arc<SlotFeeds>,
        n: usize,
        last_prompt: Option<usize>,
    ) -> Result<(), RuntimeError> {
        if !self.feeds.as_ref().is_some_and(|f| Arc::ptr_eq(f, feeds)) {
            self.feeds = None;
            self.codebooks.clear();
            for (i, f) in feeds.neurons.iter().enumerate() {
                for (w, v) in ["keys", "bias", "values"].iter().zip(&f.values) {
                    bind(io, &pn_name(i, w), v)?;
                }
            }
            for (i, v) in feeds.low_rank.iter().enumerate() {
                for (w, v) in ["a", "b", "on"].iter().zip(v) {
                    bind(io, &lr_name(i, w), v)?;
                }
            }
            self.feeds = Some(feeds.clone());
        }
        for (i, c) in feeds.codebooks.iter().enumerate() {
            let (real, rows) = feeds.codebook_run(i, n, last_prompt);
            let bound = self.codebooks.get(i);
            if bound.map(|b| b.0) != Some(real) {
                let src = match &c.real {
                    Some(r) if real => r,
                    _ => &feeds.cb_sentinel,
                };
                for (w, v) in ["keys", "values", "cos_min"].iter().zip(src) {
                    bind(io, &cb_name(i, w), v)?;
                }
            }
            if bound.map(|b| &b.1) != Some(&rows) {
                let v = Tensor::from_array((vec![rows.len() as i64], rows.clone()))
                    .map_err(|e| RuntimeError::Ort(format!("building an edit slot input: {e}")))?;
                bind(io, &cb_name(i, "rows"), &v.into_dyn())?;
            }
            match self.codebooks.get_mut(i) {
                Some(b) => *b = (real, rows),
                None => self.codebooks.push((real, rows)),
            }
        }
        Ok(())
    }
}

/// Hook points the plan's edits read or write (for [`crate::editing::PlanTarget`] checks).
pub(crate) fn point_exists(p: HookPoint, n_layer: u32) -> bool {
    p.layer < n_layer && (p.site != Site::Embeddings || p.layer == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cos_bound_matches_the_distance() {
        for distance in [Distance::NormalizedEuclidean, Distance::Cosine] {
            for &r in &[0.0f32, 1e-6, 0.05, 0.3, 0.7, 1.0, 1.4, 1.99, 2.0] {
                let b = cos_bound(distance, r);
                // Every cosine at or above the bound is within the radius, the one below is not.
                for c in [-1.0f32, -0.5, 0.0, 0.3, 0.7, 0.9, 0.99, 0.999_9, 1.0] {
                    assert_eq!(
                        c >= b,
                        distance.distance_of_cos(c) <= r,
                        "{distance:?} r={r} c={c} bound={b}"
                    );
                }
                if b.is_finite() && b > -1.0 {
                    let below = f32::from_bits(if b > 0.0 {
                        b.to_bits() - 1
                    } else {
                        b.to_bits() + 1
                    });
                    assert!(distance.distance_of_cos(below) > r, "{distance:?} r={r}");
                    assert!(distance.distance_of_cos(b) <= r);
                }
            }
        }
    }

    #[test]
    fn layout_text_round_trips_and_is_checked() {
        let l = SlotLayout::parse(
            "lr:blk.5.ffn_down.weight; cb:12:ffn_input:ffn_output;pn:3:ffn_input:ffn_output:relu;cb:12:ffn_input:ffn_output",
        )
        .unwrap();
        assert_eq!(l.codebooks.len(), 1, "duplicates merge");
        assert_eq!(SlotLayout::parse(&l.describe()).unwrap(), l);
        assert!(l.check(18).is_ok());
        assert!(l.check(12).unwrap_err().contains("12 layers"));
        let back = SlotLayout::parse("cb:2:ffn_output:ffn_input").unwrap();
        assert!(back
            .check(18)
            .unwrap_err()
            .contains("after the replace site"));
        assert!(SlotLayout::parse("cb:x:ffn_input:ffn_output").is_err());
        assert!(SlotLayout::parse("pn:1:ffn_input:ffn_output:tanh").is_err());
        assert!(SlotLayout::parse("zz:1").is_err());
    }
}
