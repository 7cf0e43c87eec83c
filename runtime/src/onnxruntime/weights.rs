//! The graph's weights in pages this process owns, handed to ONNX Runtime as external data.
//!
//! Parsed from ONNX bytes with the weights inline, ONNX Runtime keeps the parsed model's copy of
//! every initializer *and* the prepacked copy `MatMulNBits` computes with: the weights twice.
//! Here the large initializers move into anonymous private pages ([`WeightPages`]) and the
//! model refers to them as external data "in memory" (`AddExternalInitializersFromMemory`),
//! which ONNX Runtime reads in place. Once the session has prepacked its `MatMulNBits` weights,
//! the pages of the initializers only those kernels read are given back to the system
//! ([`WeightPages::release`]): the process then holds each of those weights once, prepacked.
//! Whether a released weight is truly unread is not taken on trust: the caller compares a
//! probe's logits before and after the release, bitwise (`OrtModel::open`).

use super::onnx;
use std::collections::HashMap;
use std::ops::Range;

/// The external-data "file" name the model refers to; it exists only in memory.
pub const FILE_NAME: &str = "amend-weights.bin";

/// Initializers at least this large move to the pages (the small ones stay inline).
pub const MIN_EXTERNAL: usize = 4096;

/// Offsets in the pages are page-aligned, so each weight can be released on its own.
const PAGE: usize = 4096;

/// Anonymous private pages holding weights: written once, then read-only. No other process can
/// map or rewrite them (the rule that inference never reads memory another process can change).
pub struct WeightPages {
    ptr: *mut u8,
    len: usize,
    /// Bytes given back to the system (reads there now see zeros).
    released: usize,
}

// SAFETY: the pages are plain memory owned by this value; after `seal` nothing writes them
// except `release`, which takes `&mut self`.
unsafe impl Send for WeightPages {}
unsafe impl Sync for WeightPages {}

impl WeightPages {
    #[cfg(unix)]
    fn new(len: usize) -> std::io::Result<WeightPages> {
        let len = len.max(1);
        // SAFETY: an anonymous private mapping; no pointer is passed in.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(WeightPages {
            ptr: ptr.cast(),
            len,
            released: 0,
        })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` writable bytes until `seal`, which is called after the writes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Without mmap: a leaked heap allocation, never released page by page.
    #[cfg(not(unix))]
    fn new(len: usize) -> std::io::Result<WeightPages> {
        let len = len.max(1);
        let ptr = Box::leak(vec![0u8; len].into_boxed_slice()).as_mut_ptr();
        Ok(WeightPages {
            ptr,
            len,
            released: 0,
        })
    }

    /// Makes the pages read-only: from here on a stray write faults instead of changing a weight.
    #[cfg(not(unix))]
    fn seal(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Makes the pages read-only: from here on a stray write faults instead of changing a weight.
    #[cfg(unix)]
    fn seal(&mut self) -> std::io::Result<()> {
        // SAFETY: the range is exactly the mapping made in `new`.
        if unsafe { libc::mprotect(self.ptr.cast(), self.len, libc::PROT_READ) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes given back to the system so far.
    pub fn released(&self) -> usize {
        self.released
    }

    /// Without mmap nothing is given back.
    #[cfg(not(unix))]
    pub fn release(&mut self, _range: Range<usize>) -> std::io::Result<()> {
        Ok(())
    }

    /// Gives the whole pages inside `range` back to the system. A later read of them sees zeros
    /// (never another process's data), so a weight released while still read changes the logits
    /// rather than crashing: the caller's probe catches that.
    #[cfg(unix)]
    pub fn release(&mut self, range: Range<usize>) -> std::io::Result<()> {
        let start = range.start.next_multiple_of(PAGE);
        let end = range.end.min(self.len) / PAGE * PAGE;
        if end <= start {
            return Ok(());
        }
        // SAFETY: [start, end) lies inside the mapping (`end <= len`) and is page-aligned; the
        // mapping is private and anonymous, so MADV_DONTNEED only drops this process's pages.
        let rc =
            unsafe { libc::madvise(self.ptr.add(start).cast(), end - start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.released += end - start;
        Ok(())
    }
}

impl Drop for WeightPages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
        // SAFETY: the allocation leaked in `new`, rebuilt and freed once.
        #[cfg(not(unix))]
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )));
        }
    }
}

/// One initializer moved to the pages.
#[derive(Clone, Debug)]
pub struct External {
    pub name: String,
    pub range: Range<usize>,
    /// `TensorProto.DataType` and dimensions: what a tensor over the pages needs.
    pub dtype: i32,
    pub dims: Vec<i64>,
    /// Read only by `MatMulNBits` as inputs its kernel prepacks at session creation on the CPU
    /// EP (the quantized weight; scales and zero points too at `accuracy_level` 4), or by no
    /// node at all.
    pub releasable: bool,
}

/// A model whose large initializers live in [`WeightPages`].
pub struct Externalized {
    /// The model, its large initializers referring to [`FILE_NAME`].
    pub onnx: Vec<u8>,
    pub pages: WeightPages,
    pub tensors: Vec<External>,
}

impl Externalized {
    /// The bytes of initializer `name`: in the pages, or inline in the model if it was small.
    pub fn bytes_of(&self, name: &str) -> Result<Option<&[u8]>, String> {
        match self.tensors.iter().find(|t| t.name == name) {
            // SAFETY: the range lies inside the pages (built by `externalize`); they are
            // read-only, and only `release`, which takes `&mut self`, changes them.
            Some(t) => Ok(Some(unsafe {
                std::slice::from_raw_parts(self.pages.as_ptr().add(t.range.start), t.range.len())
            })),
            None => find_initializer(&self.onnx, name),
        }
    }

    /// Releases every initializer only `MatMulNBits` reads; returns the bytes released.
    pub fn release_prepacked(&mut self) -> std::io::Result<usize> {
        let before = self.pages.released();
        for t in &self.tensors {
            if t.releasable {
                self.pages.release(t.range.clone())?;
            }
        }
        Ok(self.pages.released() - before)
    }
}

// ---- a minimal protobuf reader: just enough of ModelProto to move initializers out ----

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

struct Field<'a> {
    num: u32,
    wire: u32,
    /// The whole field as encoded, key included (copied verbatim when unchanged).
    encoded: &'a [u8],
    /// The payload of a length-delimited field.
    body: &'a [u8],
    /// The value of a varint field.
    value: u64,
}

fn read_varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn fields(b: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let start = pos;
        let key = read_varint(b, &mut pos)?;
        let (num, wire) = ((key >> 3) as u32, (key & 7) as u32);
        let body_start;
        let mut value = 0;
        match wire {
            VARINT => {
                value = read_varint(b, &mut pos)?;
                body_start = pos;
            }
            I64 | I32 => {
                let n = if wire == I64 { 8 } else { 4 };
                if b.len() - pos < n {
                    return Err("truncated fixed-width field".into());
                }
                pos += n;
                body_start = pos;
            }
            LEN => {
                let n = read_varint(b, &mut pos)?;
                if n > (b.len() - pos) as u64 {
                    return Err(format!("field {num}: length {n} past the end"));
                }
                body_start = pos;
                pos += n as usize;
            }
            _ => return Err(format!("field {num}: unsupported wire type {wire}")),
        }
        out.push(Field {
            num,
            wire,
            encoded: &b[start..pos],
            body: if wire == LEN {
                &b[body_start..pos]
            } else {
                &[]
            },
            value,
        });
    }
    Ok(out)
}

/// A node's `accuracy_level` attribute (`NodeProto.attribute` = 5: `name` = 1, `i` = 3).
fn accuracy_level(node: &[Field<'_>]) -> Result<Option<u64>, String> {
    for a in node.iter().filter(|x| x.num == 5 && x.wire == LEN) {
        let af = fields(a.body)?;
        if af.iter().any(|x| x.num == 1 && x.body == b"accuracy_level") {
            return Ok(af
                .iter()
                .find(|x| x.num == 3 && x.wire == VARINT)
                .map(|x| x.value));
        }
    }
    Ok(None)
}

fn string(f: &Field<'_>) -> Result<String, String> {
    std::str::from_utf8(f.body)
        .map(str::to_string)
        .map_err(|_| format!("field {}: not UTF-8", f.num))
}

/// The model's graph field (`ModelProto.graph` = 7).
fn graph_field<'a, 'b>(top: &'b [Field<'a>]) -> Result<&'b Field<'a>, String> {
    top.iter()
        .find(|f| f.num == 7 && f.wire == LEN)
        .ok_or_else(|| "the model has no graph".to_string())
}

/// How many nodes the graph of `model` has (`GraphProto.node` = 1): a cached graph's count,
/// which the builder gives only for a graph it builds.
pub fn count_nodes(model: &[u8]) -> Result<usize, String> {
    let top = fields(model)?;
    Ok(fields(graph_field(&top)?.body)?
        .iter()
        .filter(|f| f.num == 1 && f.wire == LEN)
        .count())
}

/// The raw bytes of the initializer `name` of `model` (ONNX bytes, weights inline); `None`
/// when the graph has no such initializer with raw data.
pub fn find_initializer<'a>(model: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    let top = fields(model)?;
    for f in fields(graph_field(&top)?.body)? {
        if f.num != 5 || f.wire != LEN {
            continue;
        }
        let tf = fields(f.body)?;
        if tf.iter().any(|x| x.num == 8 && x.body == name.as_bytes()) {
            return Ok(tf
                .iter()
                .find(|x| x.num == 9 && x.wire == LEN)
                .map(|x| x.body));
        }
    }
    Ok(None)
}

/// Moves every initializer of `model` (ONNX bytes, weights inline) with at least
/// [`MIN_EXTERNAL`] bytes of raw data into page-aligned [`WeightPages`], the model referring to
/// them as external data in [`FILE_NAME`]. Errors: a malformed model (a message to report).
pub fn externalize(model: &[u8]) -> Result<Externalized, String> {
    let top = fields(model)?;
    let graph = graph_field(&top)?;
    let gfields = fields(graph.body)?;

    // Whether each use of a value leaves it to a prepacked copy: `MatMulNBits` prepacks its
    // quantized weight (input 1) at session creation, and its scales and zero points (inputs 2
    // and 3) too at `accuracy_level` 4 (int8 activations); with f32 activations its kernel
    // reads those at run time (measured: the probe's logits changed once they were released).
    let mut uses: HashMap<&[u8], Vec<bool>> = HashMap::new();
    for f in gfields.iter().filter(|f| f.num == 1 && f.wire == LEN) {
        let nf = fields(f.body)?;
        let is_mmnb = nf.iter().any(|x| x.num == 4 && x.body == b"MatMulNBits");
        let int8 = is_mmnb && accuracy_level(&nf)? == Some(4);
        for (i, x) in nf
            .iter()
            .filter(|x| x.num == 1 && x.wire == LEN)
            .enumerate()
        {
            let prepacked = is_mmnb && (i == 1 || (int8 && (2..=3).contains(&i)));
            uses.entry(x.body).or_default().push(prepacked);
        }
    }

    // Plan: which initializers move, and where.
    struct Plan<'a> {
        index: usize,
        raw: &'a [u8],
        name: String,
        offset: usize,
        dtype: i32,
        dims: Vec<i64>,
    }
    let mut plans = Vec::new();
    let mut total = 0usize;
    for (index, f) in gfields.iter().enumerate() {
        if f.num != 5 || f.wire != LEN {
            continue;
        }
        let tf = fields(f.body)?;
        let Some(raw) = tf.iter().find(|x| x.num == 9 && x.wire == LEN) else {
            continue;
        };
        if raw.body.len() < MIN_EXTERNAL {
            continue;
        }
        let name = tf
            .iter()
            .find(|x| x.num == 8 && x.wire == LEN)
            .map(string)
            .transpose()?
            .ok_or("an initializer without a name")?;
        // dims = 1 (repeated int64, packed or not), data_type = 2.
        let mut dims = Vec::new();
        for x in tf.iter().filter(|x| x.num == 1) {
            match x.wire {
                VARINT => dims.push(x.value as i64),
                LEN => {
                    let mut pos = 0;
                    while pos < x.body.len() {
                        dims.push(read_varint(x.body, &mut pos)? as i64);
                    }
                }
                _ => return Err(format!("{name}: malformed dims")),
            }
        }
        let dtype = tf
            .iter()
            .find(|x| x.num == 2 && x.wire == VARINT)
            .map(|x| x.value as i32)
            .ok_or_else(|| format!("{name}: no data type"))?;
        let offset = total.next_multiple_of(PAGE);
        total = offset + raw.body.len();
        plans.push(Plan {
            index,
            raw: raw.body,
            name,
            offset,
            dtype,
            dims,
        });
    }

    let mut pages = WeightPages::new(total).map_err(|e| format!("weight pages: {e}"))?;
    let mut tensors = Vec::with_capacity(plans.len());
    {
        let buf = pages.bytes_mut();
        for p in &plans {
            buf[p.offset..p.offset + p.raw.len()].copy_from_slice(p.raw);
            // Unread initializers too (a table kept only for the host's row checks).
            let releasable = uses
                .get(p.name.as_bytes())
                .is_none_or(|u| u.iter().all(|&prepacked| prepacked));
            tensors.push(External {
                name: p.name.clone(),
                range: p.offset..p.offset + p.raw.len(),
                dtype: p.dtype,
                dims: p.dims.clone(),
                releasable,
            });
        }
    }
    pages.seal().map_err(|e| format!("weight pages: {e}"))?;

    // The graph again, the moved initializers without raw data and with external references.
    let mut gout = Vec::with_capacity(graph.body.len() - total.min(graph.body.len()) + 4096);
    let mut next = plans.iter().peekable();
    for (index, f) in gfields.iter().enumerate() {
        let Some(p) = next.next_if(|p| p.index == index) else {
            gout.extend_from_slice(f.encoded);
            continue;
        };
        let mut t = Vec::new();
        for x in fields(f.body)? {
            if !(x.num == 9 && x.wire == LEN) {
                t.extend_from_slice(x.encoded);
            }
        }
        // external_data = 13 (StringStringEntryProto: key = 1, value = 2), data_location = 14.
        for (k, v) in [
            ("location", FILE_NAME.to_string()),
            ("offset", p.offset.to_string()),
            ("length", p.raw.len().to_string()),
        ] {
            onnx::put_msg(&mut t, 13, &onnx::KeyValue(k, &v));
        }
        onnx::put_int(&mut t, 14, 1);
        onnx::put_bytes(&mut gout, 5, &t);
    }
    let mut out = Vec::with_capacity(model.len() - graph.body.len() + gout.len() + 16);
    for f in &top {
        if std::ptr::eq(f.encoded, graph.encoded) {
            onnx::put_bytes(&mut out, 7, &gout);
        } else {
            out.extend_from_slice(f.encoded);
        }
    }
    Ok(Externalized {
        onnx: out,
        pages,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx::{DataType, Dim, Graph, ModelProto, Node, TensorData, ValueInfo};

    fn model(big: usize) -> Vec<u8> {
        let graph = Graph {
            name: "g".into(),
            nodes: vec![
                Node {
                    op: "MatMulNBits",
                    domain: "com.microsoft",
                    name: "mm".into(),
                    inputs: vec!["x".into(), "w".into(), "s".into()],
                    outputs: vec!["y".into()],
                    attrs: vec![],
                },
                Node {
                    op: "Add",
                    domain: "",
                    name: "add".into(),
                    inputs: vec!["y".into(), "s".into()],
                    outputs: vec!["z".into()],
                    attrs: vec![],
                },
            ],
            initializers: vec![
                TensorData::u8("w", vec![big as i64], (0..big).map(|i| i as u8).collect()),
                TensorData::f32("s", vec![2048], &[1.5; 2048]),
                TensorData::u8("small", vec![4], vec![1, 2, 3, 4]),
            ],
            inputs: vec![ValueInfo {
                name: "x".into(),
                dtype: DataType::Float,
                shape: vec![Dim::Fixed(1)],
            }],
            outputs: vec![ValueInfo {
                name: "z".into(),
                dtype: DataType::Float,
                shape: vec![Dim::Fixed(1)],
            }],
        };
        ModelProto {
            graph: &graph,
            opsets: &[("", 21)],
            producer: "p",
            metadata: &[],
        }
        .to_bytes()
    }

    /// Scales are releasable where `MatMulNBits` prepacks them (int8 activations) and kept
    /// where its kernel reads them at run time (f32 activations); the weight codes are both.
    #[test]
    fn scales_are_releasable_only_at_accuracy_level_4() {
        let mm = |name: &str, level: i64| Node {
            op: "MatMulNBits",
            domain: "com.microsoft",
            name: name.into(),
            inputs: vec!["x".into(), format!("w{level}"), format!("s{level}")],
            outputs: vec![format!("y{level}")],
            attrs: vec![("accuracy_level", onnx::Attr::Int(level))],
        };
        let vi = |name: &str| ValueInfo {
            name: name.into(),
            dtype: DataType::Float,
            shape: vec![Dim::Fixed(1)],
        };
        let graph = Graph {
            name: "g".into(),
            nodes: vec![mm("int8", 4), mm("f32", 1)],
            initializers: [4, 1]
                .iter()
                .flat_map(|l| {
                    [
                        TensorData::u8(format!("w{l}"), vec![8192], vec![7; 8192]),
                        TensorData::f32(format!("s{l}"), vec![2048], &[0.5; 2048]),
                    ]
                })
                .collect(),
            inputs: vec![vi("x")],
            outputs: vec![vi("y4"), vi("y1")],
        };
        let bytes = ModelProto {
            graph: &graph,
            opsets: &[("", 21), ("com.microsoft", 1)],
            producer: "p",
            metadata: &[],
        }
        .to_bytes();
        let e = externalize(&bytes).unwrap();
        let releasable: Vec<(&str, bool)> = e
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.releasable))
            .collect();
        assert_eq!(
            releasable,
            [("w4", true), ("s4", true), ("w1", true), ("s1", false)]
        );
    }

    #[test]
    fn large_initializers_move_to_aligned_pages_and_keep_their_bytes() {
        let bytes = model(10_000);
        let mut e = externalize(&bytes).unwrap();
        assert_eq!(e.tensors.len(), 2, "w and s move, `small` stays inline");
        let w = &e.tensors[0];
        assert_eq!((w.name.as_str(), w.range.start % PAGE), ("w", 0));
        assert!(w.releasable, "only MatMulNBits reads w");
        assert_eq!(
            (w.dtype, &w.dims[..]),
            (DataType::Uint8 as i32, &[10_000i64][..])
        );
        assert_eq!(e.tensors[1].dims, [2048]);
        assert!(!e.tensors[1].releasable, "Add also reads s");
        // SAFETY: the pages hold `len` readable bytes.
        let pages = unsafe { std::slice::from_raw_parts(e.pages.as_ptr(), e.pages.len()) };
        assert!(pages[w.range.clone()]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == i as u8));
        assert!(e.onnx.len() < 1000, "{} bytes left inline", e.onnx.len());
        assert_eq!(
            find_initializer(&bytes, "small").unwrap(),
            Some(&[1u8, 2, 3, 4][..])
        );
        assert_eq!(
            find_initializer(&bytes, "w").unwrap().map(<[u8]>::len),
            Some(10_000)
        );
        assert_eq!(find_initializer(&bytes, "none").unwrap(), None);
        assert_eq!(
            e.bytes_of("w").unwrap(),
            find_initializer(&bytes, "w").unwrap()
        );
        assert_eq!(e.bytes_of("small").unwrap(), Some(&[1u8, 2, 3, 4][..]));
        let text = String::from_utf8_lossy(&e.onnx);
        assert!(text.contains(FILE_NAME) && text.contains("small"));
        // Releasing w gives back its whole pages (two of its 10,000 bytes' three) and zeroes them.
        assert_eq!(e.release_prepacked().unwrap(), 2 * PAGE);
        // SAFETY: as above; released pages read as zeros.
        let pages = unsafe { std::slice::from_raw_parts(e.pages.as_ptr(), e.pages.len()) };
        assert!(pages[..2 * PAGE].iter().all(|&b| b == 0));
        assert_eq!(pages[2 * PAGE], (2 * PAGE) as u8);
    }

    #[test]
    fn malformed_models_are_errors() {
        let bytes = model(5000);
        for cut in [1, 7, bytes.len() / 2, bytes.len() - 1] {
            assert!(externalize(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(externalize(&[]).is_err());
        assert!(externalize(&[0x0b]).is_err(), "wire type 3 (groups)");
    }
}
