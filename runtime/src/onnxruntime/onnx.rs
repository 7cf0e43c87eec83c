//! The ONNX file format, written directly: the few protobuf messages a model needs (ModelProto,
//! GraphProto, NodeProto, TensorProto, ValueInfoProto), encoded in one pass into one buffer.
//! Field numbers are those of onnx.proto (ONNX 1.16, IR version 10).
//!
//! Every message knows its exact encoded length, so nested messages (a 170 MB initializer inside
//! the graph inside the model) are written once, never built in a temporary and copied.

/// Element types (onnx.proto `TensorProto.DataType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Int32 = 6,
    Int64 = 7,
    /// Graph inputs and outputs only (no string constants are written).
    String = 8,
    Bool = 9,
    Float16 = 10,
}

impl DataType {
    pub fn size(self) -> usize {
        match self {
            DataType::Float | DataType::Int32 => 4,
            DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
            DataType::Int64 => 8,
            DataType::Float16 => 2,
            DataType::String => 0,
        }
    }
}

/// A constant tensor (an initializer or a `value` attribute), little-endian raw bytes.
#[derive(Clone, Debug)]
pub struct TensorData {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    pub raw: Vec<u8>,
}

impl TensorData {
    pub fn f32(name: impl Into<String>, dims: Vec<i64>, v: &[f32]) -> TensorData {
        TensorData {
            name: name.into(),
            dtype: DataType::Float,
            dims,
            raw: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn i64(name: impl Into<String>, dims: Vec<i64>, v: &[i64]) -> TensorData {
        TensorData {
            name: name.into(),
            dtype: DataType::Int64,
            dims,
            raw: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn u8(name: impl Into<String>, dims: Vec<i64>, raw: Vec<u8>) -> TensorData {
        TensorData {
            name: name.into(),
            dtype: DataType::Uint8,
            dims,
            raw,
        }
    }
}

/// A node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(String),
    Tensor(TensorData),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: &'static str,
    /// `""` for the ONNX domain, `"com.microsoft"` for ORT's contrib ops.
    pub domain: &'static str,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(&'static str, Attr)>,
}

/// A dimension of a graph input or output: fixed, or named (dynamic).
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

#[derive(Clone, Debug)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<Dim>,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<TensorData>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

/// A whole model: the graph, the operator sets it uses and `metadata_props`.
pub struct ModelProto<'a> {
    pub graph: &'a Graph,
    pub opsets: &'a [(&'a str, i64)],
    pub producer: &'a str,
    pub metadata: &'a [(String, String)],
}

pub const IR_VERSION: i64 = 10;

// ---- protobuf wire encoding ----

const VARINT: u32 = 0;
const I32: u32 = 5;
const LEN: u32 = 2;

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key_len(field: u32) -> usize {
    varint_len((field as u64) << 3)
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

fn int_len(field: u32, v: i64) -> usize {
    key_len(field) + varint_len(v as u64)
}

pub(super) fn put_int(out: &mut Vec<u8>, field: u32, v: i64) {
    put_key(out, field, VARINT);
    put_varint(out, v as u64);
}

fn bytes_len(field: u32, n: usize) -> usize {
    key_len(field) + varint_len(n as u64) + n
}

pub(super) fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A message whose encoded length is known before it is written.
pub(super) trait Message {
    fn body_len(&self) -> usize;
    fn write_body(&self, out: &mut Vec<u8>);
}

fn msg_len(field: u32, m: &dyn Message) -> usize {
    bytes_len(field, m.body_len())
}

pub(super) fn put_msg(out: &mut Vec<u8>, field: u32, m: &dyn Message) {
    put_key(out, field, LEN);
    put_varint(out, m.body_len() as u64);
    let before = out.len();
    m.write_body(out);
    debug_assert_eq!(out.len() - before, m.body_len());
}

/// A `StringStringEntryProto` (metadata, external-data references).
pub(super) struct KeyValue<'a>(pub &'a str, pub &'a str);
impl Message for KeyValue<'_> {
    fn body_len(&self) -> usize {
        bytes_len(1, self.0.len()) + bytes_len(2, self.1.len())
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_bytes(out, 1, self.0.as_bytes());
        put_bytes(out, 2, self.1.as_bytes());
    }
}

struct OpsetId<'a>(&'a str, i64);
impl Message for OpsetId<'_> {
    fn body_len(&self) -> usize {
        bytes_len(1, self.0.len()) + int_len(2, self.1)
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_bytes(out, 1, self.0.as_bytes());
        put_int(out, 2, self.1);
    }
}

impl Message for TensorData {
    // dims = 1, data_type = 2, name = 8, raw_data = 9
    fn body_len(&self) -> usize {
        self.dims.iter().map(|&d| int_len(1, d)).sum::<usize>()
            + int_len(2, self.dtype as i64)
            + bytes_len(8, self.name.len())
            + bytes_len(9, self.raw.len())
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        for &d in &self.dims {
            put_int(out, 1, d);
        }
        put_int(out, 2, self.dtype as i64);
        put_bytes(out, 8, self.name.as_bytes());
        put_bytes(out, 9, &self.raw);
    }
}

struct NamedAttr<'a>(&'a str, &'a Attr);
impl Message for NamedAttr<'_> {
    // name = 1, f = 2, i = 3, s = 4, t = 5, ints = 8, type = 20
    fn body_len(&self) -> usize {
        let v = match self.1 {
            Attr::Int(i) => int_len(3, *i),
            Attr::Float(_) => key_len(2) + 4,
            Attr::Ints(v) => v.iter().map(|&i| int_len(8, i)).sum(),
            Attr::Str(s) => bytes_len(4, s.len()),
            Attr::Tensor(t) => msg_len(5, t),
        };
        bytes_len(1, self.0.len()) + v + int_len(20, attr_type(self.1))
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_bytes(out, 1, self.0.as_bytes());
        match self.1 {
            Attr::Int(i) => put_int(out, 3, *i),
            Attr::Float(f) => {
                put_key(out, 2, I32);
                out.extend_from_slice(&f.to_le_bytes());
            }
            Attr::Ints(v) => v.iter().for_each(|&i| put_int(out, 8, i)),
            Attr::Str(s) => put_bytes(out, 4, s.as_bytes()),
            Attr::Tensor(t) => put_msg(out, 5, t),
        }
        put_int(out, 20, attr_type(self.1));
    }
}

fn attr_type(a: &Attr) -> i64 {
    match a {
        Attr::Float(_) => 1,
        Attr::Int(_) => 2,
        Attr::Str(_) => 3,
        Attr::Tensor(_) => 4,
        Attr::Ints(_) => 7,
    }
}

impl Message for Node {
    // input = 1, output = 2, name = 3, op_type = 4, attribute = 5, domain = 7
    fn body_len(&self) -> usize {
        self.inputs
            .iter()
            .map(|s| bytes_len(1, s.len()))
            .sum::<usize>()
            + self
                .outputs
                .iter()
                .map(|s| bytes_len(2, s.len()))
                .sum::<usize>()
            + bytes_len(3, self.name.len())
            + bytes_len(4, self.op.len())
            + self
                .attrs
                .iter()
                .map(|(n, a)| msg_len(5, &NamedAttr(n, a)))
                .sum::<usize>()
            + bytes_len(7, self.domain.len())
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        self.inputs
            .iter()
            .for_each(|s| put_bytes(out, 1, s.as_bytes()));
        self.outputs
            .iter()
            .for_each(|s| put_bytes(out, 2, s.as_bytes()));
        put_bytes(out, 3, self.name.as_bytes());
        put_bytes(out, 4, self.op.as_bytes());
        for (n, a) in &self.attrs {
            put_msg(out, 5, &NamedAttr(n, a));
        }
        put_bytes(out, 7, self.domain.as_bytes());
    }
}

struct DimMsg<'a>(&'a Dim);
impl Message for DimMsg<'_> {
    // dim_value = 1, dim_param = 2
    fn body_len(&self) -> usize {
        match self.0 {
            Dim::Fixed(v) => int_len(1, *v),
            Dim::Named(s) => bytes_len(2, s.len()),
        }
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        match self.0 {
            Dim::Fixed(v) => put_int(out, 1, *v),
            Dim::Named(s) => put_bytes(out, 2, s.as_bytes()),
        }
    }
}

struct ShapeMsg<'a>(&'a [Dim]);
impl Message for ShapeMsg<'_> {
    fn body_len(&self) -> usize {
        self.0.iter().map(|d| msg_len(1, &DimMsg(d))).sum()
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        self.0.iter().for_each(|d| put_msg(out, 1, &DimMsg(d)));
    }
}

struct TensorTypeMsg<'a>(&'a ValueInfo);
impl Message for TensorTypeMsg<'_> {
    // elem_type = 1, shape = 2
    fn body_len(&self) -> usize {
        int_len(1, self.0.dtype as i64) + msg_len(2, &ShapeMsg(&self.0.shape))
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_int(out, 1, self.0.dtype as i64);
        put_msg(out, 2, &ShapeMsg(&self.0.shape));
    }
}

struct TypeMsg<'a>(&'a ValueInfo);
impl Message for TypeMsg<'_> {
    // tensor_type = 1
    fn body_len(&self) -> usize {
        msg_len(1, &TensorTypeMsg(self.0))
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_msg(out, 1, &TensorTypeMsg(self.0));
    }
}

impl Message for ValueInfo {
    // name = 1, type = 2
    fn body_len(&self) -> usize {
        bytes_len(1, self.name.len()) + msg_len(2, &TypeMsg(self))
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_bytes(out, 1, self.name.as_bytes());
        put_msg(out, 2, &TypeMsg(self));
    }
}

impl Message for Graph {
    // node = 1, name = 2, initializer = 5, input = 11, output = 12
    fn body_len(&self) -> usize {
        self.nodes.iter().map(|n| msg_len(1, n)).sum::<usize>()
            + bytes_len(2, self.name.len())
            + self
                .initializers
                .iter()
                .map(|t| msg_len(5, t))
                .sum::<usize>()
            + self.inputs.iter().map(|v| msg_len(11, v)).sum::<usize>()
            + self.outputs.iter().map(|v| msg_len(12, v)).sum::<usize>()
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        self.nodes.iter().for_each(|n| put_msg(out, 1, n));
        put_bytes(out, 2, self.name.as_bytes());
        self.initializers.iter().for_each(|t| put_msg(out, 5, t));
        self.inputs.iter().for_each(|v| put_msg(out, 11, v));
        self.outputs.iter().for_each(|v| put_msg(out, 12, v));
    }
}

impl Message for ModelProto<'_> {
    // ir_version = 1, producer_name = 2, graph = 7, opset_import = 8, metadata_props = 14
    fn body_len(&self) -> usize {
        int_len(1, IR_VERSION)
            + bytes_len(2, self.producer.len())
            + msg_len(7, self.graph)
            + self
                .opsets
                .iter()
                .map(|(d, v)| msg_len(8, &OpsetId(d, *v)))
                .sum::<usize>()
            + self
                .metadata
                .iter()
                .map(|(k, v)| msg_len(14, &KeyValue(k, v)))
                .sum::<usize>()
    }
    fn write_body(&self, out: &mut Vec<u8>) {
        put_int(out, 1, IR_VERSION);
        put_bytes(out, 2, self.producer.as_bytes());
        put_msg(out, 7, self.graph);
        for (d, v) in self.opsets {
            put_msg(out, 8, &OpsetId(d, *v));
        }
        for (k, v) in self.metadata {
            put_msg(out, 14, &KeyValue(k, v));
        }
    }
}

impl ModelProto<'_> {
    /// The serialized model (a `.onnx` file's bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len());
        self.write_body(&mut out);
        out
    }

    /// [`Self::to_bytes`] for a model with its weights (hundreds of MB): an allocation that
    /// fails is an error (the bytes it needed), not an abort.
    pub fn try_to_bytes(&self) -> Result<Vec<u8>, usize> {
        let n = self.body_len();
        let mut out = Vec::new();
        out.try_reserve_exact(n).map_err(|_| n)?;
        self.write_body(&mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_lengths_agree() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16383,
            16384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
        // A negative int64 is ten bytes on the wire (two's complement as u64).
        assert_eq!(int_len(1, -1), 11);
    }

    #[test]
    fn known_encoding_of_a_small_model() {
        let graph = Graph {
            name: "g".into(),
            nodes: vec![Node {
                op: "Identity",
                domain: "",
                name: "n".into(),
                inputs: vec!["x".into()],
                outputs: vec!["y".into()],
                attrs: vec![],
            }],
            initializers: vec![],
            inputs: vec![ValueInfo {
                name: "x".into(),
                dtype: DataType::Float,
                shape: vec![Dim::Fixed(2)],
            }],
            outputs: vec![ValueInfo {
                name: "y".into(),
                dtype: DataType::Float,
                shape: vec![Dim::Named("n".into())],
            }],
        };
        let bytes = ModelProto {
            graph: &graph,
            opsets: &[("", 21)],
            producer: "p",
            metadata: &[],
        }
        .to_bytes();
        // ir_version 10, then producer "p".
        assert_eq!(&bytes[..5], &[0x08, 10, 0x12, 1, b'p']);
        // graph (field 7, length-delimited) follows.
        assert_eq!(bytes[5], 0x3a);
        assert_eq!(bytes[6] as usize, graph.body_len());
        // The opset import closes the model: field 8 { domain "" (1), version 21 (2) }.
        assert_eq!(&bytes[bytes.len() - 6..], &[0x42, 4, 0x0a, 0, 0x10, 21]);
    }
}
