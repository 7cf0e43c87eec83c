//! The one GGUF reader/writer of amend.
//!
//! Enough of GGUF (v2/v3, little-endian) to write llama.cpp LoRA adapters and tiny test models, and
//! to validate a model's header, tensor table and hyperparameters ([`ModelHparams`]) before
//! llama.cpp ever sees the file: the runtime's pre-load check, the model fingerprint and the
//! compiler's model metadata all read through here. Parsing works over a byte slice (no_std) or,
//! with `std`, streams only the header from a file ([`GgufFile::read_header`]), so a 250 MB model
//! is checked without reading its tensor data.
//!
//! Every count read from the file is checked against the bytes that remain before anything is
//! allocated from it, and every offset is bounds-checked: a hostile or truncated file yields a
//! [`GgufError`] naming what was cut or wrong, never a panic or a huge allocation.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

#[path = "gguf_hparams.rs"]
mod hparams;
pub use hparams::{HparamError, ModelHparams, SwaPattern, ROPE_SCALING_TYPES};

/// `GGUF` in file order.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version [`GgufWriter`] writes.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the tensor data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are rejected (llama.cpp never writes nested arrays at all).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most metadata keys and most tensors a file may declare: far above any real model, a larger
/// count is corruption (not a file cut short).
pub const MAX_COUNT: u64 = 1 << 20;

/// Why a GGUF file could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("implausible GGUF {what} count {count} (at most {MAX_COUNT})")]
    ImplausibleCount { what: &'static str, count: u64 },
    #[error(
        "GGUF truncated: {what} needs {needed} bytes at offset {offset}, but the file has {len}"
    )]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("GGUF {what} count {count} at offset {offset} cannot fit in the {remaining} bytes that remain")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        offset: u64,
        remaining: u64,
    },
    #[error("GGUF {what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str, offset: u64 },
    #[error("unknown GGUF value type {type_id} at offset {offset}")]
    UnknownValueType { type_id: u32, offset: u64 },
    #[error("GGUF arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {offset}")]
    ArrayTooDeep { offset: u64 },
    #[error("general.alignment must be a non-zero power of two u32, got {0}")]
    BadAlignment(u64),
    #[error("duplicate GGUF metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate GGUF tensor {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {tensor:?} has {n_dims} dimensions (max {MAX_DIMS})")]
    TooManyDims { tensor: String, n_dims: u32 },
    #[error("tensor {tensor:?} has a zero or overflowing dimension {ne:?}")]
    BadShape { tensor: String, ne: Vec<u64> },
    #[error("tensor {tensor:?} has unknown ggml type {type_id}")]
    UnknownGgmlType { tensor: String, type_id: u32 },
    #[error(
        "tensor {tensor:?}: ne[0] = {ne0} is not a multiple of the {ggml_type} block size {block}"
    )]
    NotBlockAligned {
        tensor: String,
        ggml_type: GgmlType,
        ne0: u64,
        block: u64,
    },
    #[error(
        "tensor {tensor:?} data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?} data [{start}, {end}) lies outside the file ({len} bytes)")]
    TensorOutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("no tensor named {0:?}")]
    TensorNotFound(String),
    #[error("tensor {tensor:?} is {ggml_type}, expected {expected}")]
    WrongTensorType {
        tensor: String,
        ggml_type: GgmlType,
        expected: &'static str,
    },
    #[error("tensor {tensor:?}: shape {ne:?} needs {expected} elements, got {got}")]
    DataSizeMismatch {
        tensor: String,
        ne: Vec<u64>,
        expected: u64,
        got: u64,
    },
    #[error("metadata key {key:?} is missing or not a {expected}")]
    MissingKey { key: String, expected: &'static str },
    #[error("I/O error reading {path}: {message}")]
    Io { path: String, message: String },
    #[error("tensor {tensor:?} holds {value} ({})", NonFiniteAt(.block, .field))]
    NonFinite {
        tensor: String,
        /// Index of the block (of the element, for the float types).
        block: u64,
        /// "value" for float types, else the block field (e.g. "d", "dmin").
        field: &'static str,
        /// "NaN" or "infinity".
        value: &'static str,
    },
}

/// Where [`GgufError::NonFinite`] found its value: an element of a float tensor, or a field of a
/// quantized block.
struct NonFiniteAt<'a>(&'a u64, &'a &'static str);

impl fmt::Display for NonFiniteAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.1 {
            "value" => write!(f, "element {}", self.0),
            field => write!(f, "the {field} of block {}", self.0),
        }
    }
}

/// A ggml tensor type id. Unknown ids are kept (a file may use a type this reader does not size);
/// they only fail where their byte size is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const BF16: GgmlType = GgmlType(30);

    /// (name, elements per block, bytes per block) for the types this reader knows; layouts follow
    /// ggml's block structs (K-quants use 256-element super-blocks).
    pub const fn info(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }

    pub fn name(self) -> Option<&'static str> {
        self.info().map(|i| i.0)
    }

    /// The floating-point fields of a block of this type, as ggml validates row data: the
    /// element itself for the float types, the scales (`d`, and `dmin` or `m`) for the quantized
    /// types; their quants and integer sub-scales are finite by construction. Empty for the
    /// integer types and IQ1_M (its scale is packed into the quants).
    const fn float_fields(self) -> &'static [(usize, Float, &'static str)] {
        use Float::*;
        match self.0 {
            0 => &[(0, F32, "value")],
            1 => &[(0, F16, "value")],
            30 => &[(0, Bf16, "value")],
            28 => &[(0, F64, "value")],
            // Q4_0, Q5_0, Q8_0, IQ4_NL, and the IQ types whose block starts with `d`.
            2 | 6 | 8 | 20 | 16 | 17 | 18 | 19 | 21 | 22 | 23 => &[(0, F16, "d")],
            3 | 7 => &[(0, F16, "d"), (2, F16, "m")],
            9 => &[(0, F16, "d"), (2, F16, "s")],
            12 | 13 => &[(0, F16, "d"), (2, F16, "dmin")],
            10 => &[(80, F16, "d"), (82, F16, "dmin")],
            11 => &[(108, F16, "d")],
            14 => &[(208, F16, "d")],
            15 => &[(0, F32, "d")],
            34 => &[(52, F16, "d")],
            35 => &[(64, F16, "d")],
            39 => &[(0, E8m0, "e")],
            _ => &[],
        }
    }

    /// The first non-finite float of `data`, a whole number of this type's blocks: (block index,
    /// field, "NaN" or "infinity"). ggml computes with whatever a file holds, so a NaN scale is
    /// otherwise a model that silently answers garbage.
    pub fn first_non_finite(self, data: &[u8]) -> Option<(u64, &'static str, &'static str)> {
        let block = self.info()?.2 as usize;
        for &(at, kind, field) in self.float_fields() {
            let width = kind.width();
            let found = data
                .chunks_exact(block)
                .enumerate()
                .find_map(|(i, b)| kind.non_finite(&b[at..at + width]).map(|v| (i as u64, v)));
            if let Some((i, v)) = found {
                return Some((i, field, v));
            }
        }
        None
    }

    /// A type llama.cpp stores model weights in and computes with: the float and quantized
    /// types, not the integer types, F64, or the activation-only Q8_1 and Q8_K (their CPU dot
    /// products do not exist for weights).
    pub fn is_weight_type(self) -> bool {
        self.info().is_some() && !matches!(self.0, 9 | 15 | 24..=28)
    }

    /// Bytes of a tensor of this type and shape; errors for unknown types, `ne[0]` not a multiple
    /// of the block size, and overflow.
    pub fn byte_size(self, tensor: &str, ne: &[u64]) -> Result<u64, GgufError> {
        let (_, block, block_bytes) = self.info().ok_or_else(|| GgufError::UnknownGgmlType {
            tensor: tensor.to_string(),
            type_id: self.0,
        })?;
        let ne0 = ne.first().copied().unwrap_or(1);
        if ne0 % block != 0 {
            return Err(GgufError::NotBlockAligned {
                tensor: tensor.to_string(),
                ggml_type: self,
                ne0,
                block,
            });
        }
        let overflow = || GgufError::BadShape {
            tensor: tensor.to_string(),
            ne: ne.to_vec(),
        };
        let mut size = (ne0 / block)
            .checked_mul(block_bytes)
            .ok_or_else(overflow)?;
        for &n in ne.iter().skip(1) {
            size = size.checked_mul(n).ok_or_else(overflow)?;
        }
        Ok(size)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "ggml type {}", self.0),
        }
    }
}

/// How a block field stores its float.
#[derive(Clone, Copy)]
enum Float {
    F16,
    Bf16,
    F32,
    F64,
    /// A power-of-two exponent byte (MXFP4's scale): 0xff is NaN.
    E8m0,
}

impl Float {
    const fn width(self) -> usize {
        match self {
            Float::F16 | Float::Bf16 => 2,
            Float::F32 => 4,
            Float::F64 => 8,
            Float::E8m0 => 1,
        }
    }

    /// "NaN" or "infinity" when the little-endian `b` (exactly [`Float::width`] bytes) is not a
    /// finite number: all exponent bits set.
    fn non_finite(self, b: &[u8]) -> Option<&'static str> {
        let (exp, mantissa) = match self {
            Float::F16 => {
                let v = u16::from_le_bytes([b[0], b[1]]) as u64;
                (v & 0x7c00 == 0x7c00, v & 0x03ff)
            }
            Float::Bf16 => {
                let v = u16::from_le_bytes([b[0], b[1]]) as u64;
                (v & 0x7f80 == 0x7f80, v & 0x007f)
            }
            Float::F32 => {
                let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
                (v & 0x7f80_0000 == 0x7f80_0000, v & 0x007f_ffff)
            }
            Float::F64 => {
                let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                (
                    v & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000,
                    v & 0x000f_ffff_ffff_ffff,
                )
            }
            Float::E8m0 => return (b[0] == 0xff).then_some("NaN"),
        };
        match (exp, mantissa) {
            (false, _) => None,
            (true, 0) => Some("infinity"),
            (true, _) => Some("NaN"),
        }
    }
}

/// GGUF metadata value type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    pub const fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies (bounds array counts before allocating).
    const fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A typed metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// A typed metadata array (kept typed so a 262k-token vocabulary is one allocation per column).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::F64(_) => GgufValueType::F64,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
        }
    }
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::F64(_) => GgufValueType::F64,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type that fits in u64 (llama.cpp writers differ on u32 vs i32 for counts).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// F32 or F64 (narrowed).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for GgufValue {
            fn from(x: $t) -> Self { GgufValue::$v(x) }
        }
        impl From<Vec<$t>> for GgufValue {
            fn from(x: Vec<$t>) -> Self { GgufValue::Array(GgufArray::$v(x)) }
        }
    )*};
}
value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => String);

impl From<&str> for GgufValue {
    fn from(s: &str) -> Self {
        GgufValue::String(s.to_string())
    }
}

impl From<Vec<&str>> for GgufValue {
    fn from(v: Vec<&str>) -> Self {
        GgufValue::Array(GgufArray::String(
            v.into_iter().map(|s| s.to_string()).collect(),
        ))
    }
}

impl From<GgufArray> for GgufValue {
    fn from(a: GgufArray) -> Self {
        GgufValue::Array(a)
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `ne[0]` is the fastest-varying (a row of `ne[0]` elements).
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to [`GgufHeader::data_offset`].
    pub offset: u64,
    /// Where the name's bytes lie in the file (lets callers borrow the name from a blob).
    pub name_range: (u64, u64),
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Byte size of the data (errors for types this reader cannot size).
    pub fn byte_size(&self) -> Result<u64, GgufError> {
        self.ggml_type.byte_size(&self.name, &self.ne)
    }
}

/// Everything before the tensor data: version, metadata, tensor table and layout.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Byte range of the tensor table in the file (what a model fingerprint hashes).
    pub tensor_table: (u64, u64),
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// Total file length the header was checked against.
    pub file_len: u64,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(GgufValue::as_f32)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Parse the header of a file of `file_len` bytes from `prefix`, which must hold at least the
    /// whole header (not necessarily the tensor data). Tensor extents are checked against
    /// `file_len`.
    pub fn parse_prefix(prefix: &[u8], file_len: u64) -> Result<GgufHeader, GgufError> {
        let mut src = SliceSource {
            bytes: prefix,
            pos: 0,
            file_len,
        };
        parse_header(&mut src)
    }
}

/// A parsed GGUF file borrowing its bytes (tensor data is not copied).
#[derive(Clone, Debug)]
pub struct GgufFile<'a> {
    pub header: GgufHeader,
    bytes: &'a [u8],
}

impl<'a> core::ops::Deref for GgufFile<'a> {
    type Target = GgufHeader;
    fn deref(&self) -> &GgufHeader {
        &self.header
    }
}

impl<'a> GgufFile<'a> {
    /// Parse a whole GGUF file held in memory; every known-type tensor must lie inside `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<GgufFile<'a>, GgufError> {
        let header = GgufHeader::parse_prefix(bytes, bytes.len() as u64)?;
        Ok(GgufFile { header, bytes })
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The raw data of tensor `name`.
    pub fn tensor_data(&self, name: &str) -> Result<&'a [u8], GgufError> {
        let t = self
            .header
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        self.data_of(t)
    }

    /// The raw data of a tensor of this file's table.
    pub fn data_of(&self, t: &TensorInfo) -> Result<&'a [u8], GgufError> {
        let (start, end) = tensor_extent(&self.header, t)?;
        let len = self.bytes.len() as u64;
        if end > len {
            return Err(GgufError::TensorOutOfBounds {
                tensor: t.name.clone(),
                start,
                end,
                len,
            });
        }
        Ok(&self.bytes[start as usize..end as usize])
    }

    /// Every tensor's floats are finite (see [`GgmlType::first_non_finite`]); the first that is
    /// not is named.
    pub fn check_finite(&self) -> Result<(), GgufError> {
        // A type this reader cannot size is refused where its size is needed, not here.
        for t in self
            .header
            .tensors
            .iter()
            .filter(|t| t.ggml_type.info().is_some())
        {
            let data = self.data_of(t)?;
            if let Some((block, field, value)) = t.ggml_type.first_non_finite(data) {
                return Err(GgufError::NonFinite {
                    tensor: t.name.clone(),
                    block,
                    field,
                    value,
                });
            }
        }
        Ok(())
    }

    /// The data of an F32 tensor as f32 values, borrowed when the bytes are 4-byte aligned on a
    /// little-endian host (`None` otherwise; use [`GgufFile::tensor_f32_owned`]).
    pub fn tensor_f32(&self, name: &str) -> Result<Option<&'a [f32]>, GgufError> {
        let t = self
            .header
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        if t.ggml_type != GgmlType::F32 {
            return Err(GgufError::WrongTensorType {
                tensor: t.name.clone(),
                ggml_type: t.ggml_type,
                expected: "F32",
            });
        }
        Ok(cast_f32(self.data_of(t)?))
    }

    /// The data of an F32, F16 or BF16 tensor converted to f32.
    pub fn tensor_f32_owned(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .header
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let data = self.data_of(t)?;
        Ok(match t.ggml_type {
            GgmlType::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GgmlType::F16 => data
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            GgmlType::BF16 => data
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            other => {
                return Err(GgufError::WrongTensorType {
                    tensor: t.name.clone(),
                    ggml_type: other,
                    expected: "F32, F16 or BF16",
                })
            }
        })
    }
}

/// Reinterpret little-endian f32 bytes in place when alignment and endianness allow.
pub fn cast_f32(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "big") || !bytes.len().is_multiple_of(4) {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32; `align_to` only yields the aligned middle part,
    // and we accept the result only when there is no unaligned prefix or suffix.
    let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

#[cfg(feature = "std")]
impl GgufFile<'static> {
    /// Read and validate only the header and tensor table of the file at `path` (streamed; the
    /// tensor data is never read, but tensor extents are checked against the file length).
    pub fn read_header(path: impl AsRef<std::path::Path>) -> Result<GgufHeader, GgufError> {
        let path = path.as_ref();
        let io_err = |e: std::io::Error| GgufError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut src = ReadSource {
            reader: std::io::BufReader::with_capacity(1 << 16, file),
            pos: 0,
            file_len,
            path,
        };
        parse_header(&mut src)
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Where the parser reads from: a slice, or (std) a streamed file. `file_len` bounds every count.
trait Source {
    fn pos(&self) -> u64;
    fn file_len(&self) -> u64;
    /// Fill `buf` entirely or fail with `Truncated { what }`.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError>;

    fn remaining(&self) -> u64 {
        self.file_len().saturating_sub(self.pos())
    }
}

struct SliceSource<'a> {
    bytes: &'a [u8],
    pos: usize,
    file_len: u64,
}

impl Source for SliceSource<'_> {
    fn pos(&self) -> u64 {
        self.pos as u64
    }
    fn file_len(&self) -> u64 {
        self.file_len
    }
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        let end = self.pos.checked_add(buf.len());
        match end {
            Some(end) if end <= self.bytes.len() => {
                buf.copy_from_slice(&self.bytes[self.pos..end]);
                self.pos = end;
                Ok(())
            }
            _ => Err(GgufError::Truncated {
                what,
                offset: self.pos as u64,
                needed: buf.len() as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }
}

#[cfg(feature = "std")]
struct ReadSource<'p, R> {
    reader: R,
    pos: u64,
    file_len: u64,
    path: &'p std::path::Path,
}

#[cfg(feature = "std")]
impl<R: std::io::Read> Source for ReadSource<'_, R> {
    fn pos(&self) -> u64 {
        self.pos
    }
    fn file_len(&self) -> u64 {
        self.file_len
    }
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: buf.len() as u64,
                len: self.file_len,
            }),
            Err(e) => Err(GgufError::Io {
                path: self.path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }
}

fn rd<const N: usize>(src: &mut impl Source, what: &'static str) -> Result<[u8; N], GgufError> {
    let mut b = [0u8; N];
    src.fill(&mut b, what)?;
    Ok(b)
}

fn rd_u32(src: &mut impl Source, what: &'static str) -> Result<u32, GgufError> {
    rd::<4>(src, what).map(u32::from_le_bytes)
}

fn rd_u64(src: &mut impl Source, what: &'static str) -> Result<u64, GgufError> {
    rd::<8>(src, what).map(u64::from_le_bytes)
}

/// Check that `count` items of at least `min_size` bytes each can fit in what remains.
fn check_count(
    src: &impl Source,
    what: &'static str,
    count: u64,
    min_size: u64,
) -> Result<usize, GgufError> {
    let remaining = src.remaining();
    match count.checked_mul(min_size) {
        Some(bytes) if bytes <= remaining => usize::try_from(count).map_err(|_| ()),
        _ => Err(()),
    }
    .map_err(|_| GgufError::CountTooLarge {
        what,
        count,
        offset: src.pos(),
        remaining,
    })
}

fn rd_string(src: &mut impl Source, what: &'static str) -> Result<(String, (u64, u64)), GgufError> {
    let len = rd_u64(src, what)?;
    let start = src.pos();
    let len = check_count(src, what, len, 1)?;
    let mut buf = alloc::vec![0u8; len];
    src.fill(&mut buf, what)?;
    let s = String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 {
        what,
        offset: start,
    })?;
    Ok((s, (start, start + len as u64)))
}

fn rd_value(src: &mut impl Source, ty: GgufValueType, depth: u32) -> Result<GgufValue, GgufError> {
    const W: &str = "metadata value";
    Ok(match ty {
        GgufValueType::U8 => GgufValue::U8(rd::<1>(src, W)?[0]),
        GgufValueType::I8 => GgufValue::I8(rd::<1>(src, W)?[0] as i8),
        GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(rd(src, W)?)),
        GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(rd(src, W)?)),
        GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(rd(src, W)?)),
        GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(rd(src, W)?)),
        GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(rd(src, W)?)),
        GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(rd(src, W)?)),
        GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(rd(src, W)?)),
        GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(rd(src, W)?)),
        GgufValueType::Bool => GgufValue::Bool(rd::<1>(src, W)?[0] != 0),
        GgufValueType::String => GgufValue::String(rd_string(src, "metadata string")?.0),
        GgufValueType::Array => GgufValue::Array(rd_array(src, depth + 1)?),
    })
}

fn rd_array(src: &mut impl Source, depth: u32) -> Result<GgufArray, GgufError> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep { offset: src.pos() });
    }
    let at = src.pos();
    let type_id = rd_u32(src, "metadata array type")?;
    let ty = GgufValueType::from_id(type_id).ok_or(GgufError::UnknownValueType {
        type_id,
        offset: at,
    })?;
    let count = rd_u64(src, "metadata array length")?;
    let n = check_count(src, "metadata array", count, ty.min_size())?;
    const W: &str = "metadata array element";
    macro_rules! prim {
        ($v:ident, $t:ty, $n:literal) => {{
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(<$t>::from_le_bytes(rd::<$n>(src, W)?));
            }
            GgufArray::$v(out)
        }};
    }
    Ok(match ty {
        GgufValueType::U8 => prim!(U8, u8, 1),
        GgufValueType::I8 => prim!(I8, i8, 1),
        GgufValueType::U16 => prim!(U16, u16, 2),
        GgufValueType::I16 => prim!(I16, i16, 2),
        GgufValueType::U32 => prim!(U32, u32, 4),
        GgufValueType::I32 => prim!(I32, i32, 4),
        GgufValueType::U64 => prim!(U64, u64, 8),
        GgufValueType::I64 => prim!(I64, i64, 8),
        GgufValueType::F32 => prim!(F32, f32, 4),
        GgufValueType::F64 => prim!(F64, f64, 8),
        GgufValueType::Bool => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(rd::<1>(src, W)?[0] != 0);
            }
            GgufArray::Bool(out)
        }
        GgufValueType::String => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(rd_string(src, "metadata array string")?.0);
            }
            GgufArray::String(out)
        }
        GgufValueType::Array => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(rd_array(src, depth + 1)?);
            }
            GgufArray::Array(out)
        }
    })
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// Absolute [start, end) of a tensor's data (needs its type to be known).
fn tensor_extent(h: &GgufHeader, t: &TensorInfo) -> Result<(u64, u64), GgufError> {
    let size = t.byte_size()?;
    let oob = || GgufError::TensorOutOfBounds {
        tensor: t.name.clone(),
        start: h.data_offset.saturating_add(t.offset),
        end: u64::MAX,
        len: h.file_len,
    };
    let start = h.data_offset.checked_add(t.offset).ok_or_else(oob)?;
    let end = start.checked_add(size).ok_or_else(oob)?;
    Ok((start, end))
}

fn parse_header(src: &mut impl Source) -> Result<GgufHeader, GgufError> {
    // A short file that does not start like GGUF (an empty one included) is "not GGUF", not
    // "truncated".
    let short = src.remaining().min(4) as usize;
    if short < 4 {
        let mut magic = [0u8; 4];
        src.fill(&mut magic[..short], "magic")?;
        if short == 0 || magic[..short] != GGUF_MAGIC[..short] {
            return Err(GgufError::BadMagic(magic));
        }
        return Err(GgufError::Truncated {
            what: "magic",
            offset: 0,
            needed: 4,
            len: short as u64,
        });
    }
    let magic = rd::<4>(src, "magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = rd_u32(src, "version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = rd_u64(src, "tensor count")?;
    let n_kv = rd_u64(src, "metadata count")?;
    for (what, count) in [("tensor", n_tensors), ("metadata", n_kv)] {
        if count > MAX_COUNT {
            return Err(GgufError::ImplausibleCount { what, count });
        }
    }
    // Minimal sizes: a KV is key len (8) + type (4) + 1 byte; a tensor info 8 + 4 + 4 + 8.
    let n_kv = check_count(src, "metadata", n_kv, 13)?;
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let (key, _) = rd_string(src, "metadata key")?;
        let at = src.pos();
        let type_id = rd_u32(src, "metadata value type")?;
        let ty = GgufValueType::from_id(type_id).ok_or(GgufError::UnknownValueType {
            type_id,
            offset: at,
        })?;
        let value = rd_value(src, ty, 0)?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => return Err(GgufError::BadAlignment(v.as_u64().unwrap_or(0))),
    };

    let table_start = src.pos();
    let n_tensors = check_count(src, "tensor info", n_tensors, 24)?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let (name, name_range) = rd_string(src, "tensor name")?;
        let n_dims = rd_u32(src, "tensor dimension count")?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
            });
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(rd_u64(src, "tensor dimensions")?);
        }
        // ggml rejects empty dims; the element count must also fit in i64 like ggml's.
        let count = ne.iter().try_fold(1u64, |acc, &n| acc.checked_mul(n));
        if ne.contains(&0) || !matches!(count, Some(c) if c <= i64::MAX as u64) {
            return Err(GgufError::BadShape { tensor: name, ne });
        }
        let ggml_type = GgmlType(rd_u32(src, "tensor type")?);
        let offset = rd_u64(src, "tensor offset")?;
        if tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: name,
                offset,
                alignment,
            });
        }
        tensors.push(TensorInfo {
            name,
            ne,
            ggml_type,
            offset,
            name_range,
        });
    }
    let table_end = src.pos();
    let file_len = src.file_len();
    let data_offset = align_up(table_end, alignment).unwrap_or(u64::MAX);
    if !tensors.is_empty() && data_offset > file_len {
        return Err(GgufError::Truncated {
            what: "padding before tensor data",
            offset: table_end,
            needed: data_offset - table_end,
            len: file_len,
        });
    }
    let header = GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        tensor_table: (table_start, table_end),
        data_offset,
        file_len,
    };
    for t in &header.tensors {
        // Unknown types are tolerated here; they fail where their size is needed.
        if t.ggml_type.info().is_none() {
            continue;
        }
        let (start, end) = tensor_extent(&header, t)?;
        if end > file_len {
            return Err(GgufError::Truncated {
                what: "tensor data",
                offset: start,
                needed: end - start,
                len: file_len,
            });
        }
    }
    Ok(header)
}

// ---------------------------------------------------------------------------------------------
// Writing

#[derive(Clone, Debug)]
struct WriterTensor {
    name: String,
    ne: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory.
///
/// ```
/// use amend_edits::gguf::{GgufWriter, GgufFile};
/// let mut w = GgufWriter::new();
/// w.add("general.architecture", "llama");
/// w.add_tensor_f32("t", &[2, 3], &[0.0; 6]).unwrap();
/// let bytes = w.to_bytes();
/// let f = GgufFile::parse(&bytes).unwrap();
/// assert_eq!(f.tensor("t").unwrap().ne, vec![2, 3]);
/// ```
#[derive(Clone, Debug)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<WriterTensor>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Set (or replace) a metadata value; insertion order is kept.
    pub fn add(&mut self, key: &str, value: impl Into<GgufValue>) -> &mut Self {
        let value = value.into();
        if key == "general.alignment" {
            if let GgufValue::U32(a) = value {
                if a != 0 && a.is_power_of_two() {
                    self.alignment = u64::from(a);
                }
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Alignment of the data section and of every tensor (written as `general.alignment` when not
    /// the default). Must be a non-zero power of two.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self, GgufError> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment(alignment.into()));
        }
        self.alignment = alignment.into();
        if alignment as u64 != DEFAULT_ALIGNMENT
            || self.metadata.iter().any(|(k, _)| k == "general.alignment")
        {
            self.add("general.alignment", alignment);
        }
        Ok(self)
    }

    /// Add a tensor of raw bytes; `data` must be exactly the size of `ggml_type` x `ne`.
    pub fn add_tensor_raw(
        &mut self,
        name: &str,
        ggml_type: GgmlType,
        ne: &[u64],
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        if ne.len() > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name.to_string(),
                n_dims: ne.len() as u32,
            });
        }
        if ne.contains(&0) {
            return Err(GgufError::BadShape {
                tensor: name.to_string(),
                ne: ne.to_vec(),
            });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name.to_string()));
        }
        let size = ggml_type.byte_size(name, ne)?;
        if size != data.len() as u64 {
            return Err(GgufError::DataSizeMismatch {
                tensor: name.to_string(),
                ne: ne.to_vec(),
                expected: size,
                got: data.len() as u64,
            });
        }
        self.tensors.push(WriterTensor {
            name: name.to_string(),
            ne: ne.to_vec(),
            ggml_type,
            data,
        });
        Ok(self)
    }

    /// Add an F32 tensor; `ne[0]` is the fastest-varying dimension (row length).
    pub fn add_tensor_f32(
        &mut self,
        name: &str,
        ne: &[u64],
        data: &[f32],
    ) -> Result<&mut Self, GgufError> {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add_tensor_checked(name, GgmlType::F32, ne, data.len(), bytes)
    }

    /// Add an F16 tensor converted from f32 (round to nearest even).
    pub fn add_tensor_f16(
        &mut self,
        name: &str,
        ne: &[u64],
        data: &[f32],
    ) -> Result<&mut Self, GgufError> {
        let bytes = data
            .iter()
            .flat_map(|&x| f32_to_f16(x).to_le_bytes())
            .collect();
        self.add_tensor_checked(name, GgmlType::F16, ne, data.len(), bytes)
    }

    fn add_tensor_checked(
        &mut self,
        name: &str,
        ty: GgmlType,
        ne: &[u64],
        n: usize,
        bytes: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let expected = ne.iter().try_fold(1u64, |a, &b| a.checked_mul(b));
        if expected != Some(n as u64) {
            return Err(GgufError::DataSizeMismatch {
                tensor: name.to_string(),
                ne: ne.to_vec(),
                expected: expected.unwrap_or(u64::MAX),
                got: n as u64,
            });
        }
        self.add_tensor_raw(name, ty, ne, bytes)
    }

    /// The complete file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let a = self.alignment;
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for &n in &t.ne {
                out.extend_from_slice(&n.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + t.data.len() as u64, a).unwrap_or(u64::MAX);
        }
        if !self.tensors.is_empty() {
            pad_to(&mut out, a);
            for t in &self.tensors {
                out.extend_from_slice(&t.data);
                pad_to(&mut out, a);
            }
        }
        out
    }

    /// Write the file to `path`.
    #[cfg(feature = "std")]
    pub fn write_to(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn pad_to(out: &mut Vec<u8>, a: u64) {
    let len = out.len() as u64;
    let padded = align_up(len, a).unwrap_or(len);
    out.resize(padded as usize, 0);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::F64(v) => each!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|x| put_array(out, x)),
    }
}

// ---------------------------------------------------------------------------------------------
// IEEE half precision (F16 tensors), by the `half` crate.

/// f32 -> IEEE f16 bits, round to nearest even; overflow to inf, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// IEEE f16 bits -> f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// bfloat16 bits -> f32 (exact: the upper half of an f32).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add("general.architecture", "llama")
            .add("u8", 7u8)
            .add("i8", -7i8)
            .add("u16", 700u16)
            .add("i16", -700i16)
            .add("u32", 70_000u32)
            .add("i32", -70_000i32)
            .add("u64", 1u64 << 40)
            .add("i64", -(1i64 << 40))
            .add("f32", 1.5f32)
            .add("f64", -2.25f64)
            .add("bool", true)
            .add("strs", vec!["a", "", "ünï"])
            .add("f32s", vec![1.0f32, 2.0])
            .add(
                "nested",
                GgufArray::Array(vec![
                    GgufArray::I32(vec![1, 2]),
                    GgufArray::Bool(vec![false]),
                ]),
            );
        w.add_tensor_f32("a", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap();
        w.add_tensor_f16("b", &[5], &[0.5, -1.0, 65504.0, 1e-7, 0.0])
            .unwrap();
        w.add_tensor_raw("q", GgmlType::Q8_0, &[32, 1], vec![9u8; 34])
            .unwrap();
        w.to_bytes()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let f = GgufFile::parse(&bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.get("i8"), Some(&GgufValue::I8(-7)));
        assert_eq!(f.get("i16"), Some(&GgufValue::I16(-700)));
        assert_eq!(f.get_u64("u32"), Some(70_000));
        assert_eq!(f.get("i64"), Some(&GgufValue::I64(-(1 << 40))));
        assert_eq!(f.get_f32("f64"), Some(-2.25));
        assert_eq!(f.get("bool"), Some(&GgufValue::Bool(true)));
        assert_eq!(
            f.get("strs"),
            Some(&GgufValue::Array(GgufArray::String(vec![
                "a".into(),
                "".into(),
                "ünï".into()
            ])))
        );
        assert_eq!(f.get("nested").unwrap().as_array().unwrap().len(), 2);
        assert_eq!(f.data_offset % 32, 0);
        let a = f.tensor("a").unwrap();
        assert_eq!(a.ne, vec![3, 2]);
        assert_eq!(
            f.tensor_f32_owned("a").unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        let b = f.tensor_f32_owned("b").unwrap();
        assert_eq!(&b[..3], &[0.5, -1.0, 65504.0]);
        assert!((b[3] - 1e-7).abs() <= 3e-8); // f16 subnormal step is 2^-24
        assert_eq!(f.tensor_data("q").unwrap(), &[9u8; 34][..]);
        assert_eq!(f.tensor("q").unwrap().offset % 32, 0);
        assert!(matches!(
            f.tensor_data("zz"),
            Err(GgufError::TensorNotFound(_))
        ));
        assert!(matches!(
            f.tensor_f32("b"),
            Err(GgufError::WrongTensorType { .. })
        ));
        // Name ranges point at the name bytes.
        let (s, e) = a.name_range;
        assert_eq!(&bytes[s as usize..e as usize], b"a");
        // Re-writing the parsed metadata gives the same bytes.
        let mut w = GgufWriter::new();
        for (k, v) in &f.metadata {
            w.add(k, v.clone());
        }
        for t in &f.tensors {
            w.add_tensor_raw(&t.name, t.ggml_type, &t.ne, f.data_of(t).unwrap().to_vec())
                .unwrap();
        }
        assert_eq!(w.to_bytes(), bytes);
    }

    #[test]
    fn non_finite_floats_are_found_in_every_type() {
        let mut checked = 0;
        for id in 0..64 {
            let ty = GgmlType(id);
            let Some((_, _, block)) = ty.info() else {
                continue;
            };
            let block = block as usize;
            for &(at, kind, field) in ty.float_fields() {
                assert!(at + kind.width() <= block, "{ty}: {field} past the block");
                // Largest finite and NaN/infinity patterns of this field's float.
                let (max, nan, inf): (Vec<u8>, Vec<u8>, Option<Vec<u8>>) = match kind {
                    Float::F16 => (
                        0x7bffu16.to_le_bytes().into(),
                        0x7e00u16.to_le_bytes().into(),
                        Some(0xfc00u16.to_le_bytes().into()),
                    ),
                    Float::Bf16 => (
                        0x7f7fu16.to_le_bytes().into(),
                        0x7fc0u16.to_le_bytes().into(),
                        Some(0xff80u16.to_le_bytes().into()),
                    ),
                    Float::F32 => (
                        f32::MAX.to_le_bytes().into(),
                        f32::NAN.to_le_bytes().into(),
                        Some(f32::NEG_INFINITY.to_le_bytes().into()),
                    ),
                    Float::F64 => (
                        f64::MAX.to_le_bytes().into(),
                        f64::NAN.to_le_bytes().into(),
                        Some(f64::INFINITY.to_le_bytes().into()),
                    ),
                    Float::E8m0 => (vec![0xfe], vec![0xff], None),
                };
                let mut data = vec![0u8; 4 * block];
                data[block + at..block + at + max.len()].copy_from_slice(&max);
                assert_eq!(ty.first_non_finite(&data), None, "{ty} {field}");
                let mut bad = data.clone();
                bad[2 * block + at..2 * block + at + nan.len()].copy_from_slice(&nan);
                assert_eq!(ty.first_non_finite(&bad), Some((2, field, "NaN")), "{ty}");
                if let Some(inf) = inf {
                    let mut bad = data.clone();
                    bad[3 * block + at..3 * block + at + inf.len()].copy_from_slice(&inf);
                    assert_eq!(
                        ty.first_non_finite(&bad),
                        Some((3, field, "infinity")),
                        "{ty}"
                    );
                }
                checked += 1;
            }
        }
        // The fields of every float, quantized and IQ type but IQ1_M (the integer types have
        // none): 4 float types, 17 types with one scale, 6 with two.
        assert_eq!(checked, 33);
        assert_eq!(GgmlType(26).first_non_finite(&[0xff; 16]), None);

        // A file: the first tensor holding one is named.
        let bytes = sample();
        assert_eq!(GgufFile::parse(&bytes).unwrap().check_finite(), Ok(()));
        let mut w = GgufWriter::new();
        w.add_tensor_f32("ok", &[2], &[1.0, 2.0]).unwrap();
        let mut q = vec![0u8; 2 * 34];
        q[34..36].copy_from_slice(&0x7c00u16.to_le_bytes());
        w.add_tensor_raw("q", GgmlType::Q8_0, &[32, 2], q).unwrap();
        w.add_tensor_f32("nan", &[1], &[f32::NAN]).unwrap();
        let bytes = w.to_bytes();
        let e = GgufFile::parse(&bytes).unwrap().check_finite().unwrap_err();
        assert_eq!(
            e,
            GgufError::NonFinite {
                tensor: "q".into(),
                block: 1,
                field: "d",
                value: "infinity"
            }
        );
        assert_eq!(
            e.to_string(),
            "tensor \"q\" holds infinity (the d of block 1)"
        );
    }

    #[test]
    fn custom_alignment() {
        let mut w = GgufWriter::new();
        w.set_alignment(64).unwrap();
        w.add_tensor_f32("x", &[3], &[1.0, 2.0, 3.0]).unwrap();
        w.add_tensor_f32("y", &[1], &[4.0]).unwrap();
        let bytes = w.to_bytes();
        let f = GgufFile::parse(&bytes).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        assert_eq!(f.tensor("y").unwrap().offset, 64);
        assert_eq!(f.tensor_f32_owned("y").unwrap(), vec![4.0]);
        assert!(w.set_alignment(24).is_err());
    }

    #[test]
    fn truncation_never_panics() {
        let bytes = sample();
        let full = GgufFile::parse(&bytes).unwrap();
        // Only the trailing padding after the last tensor may be cut without an error.
        let data_end = full
            .tensors
            .iter()
            .map(|t| full.data_offset + t.offset + t.byte_size().unwrap())
            .max()
            .unwrap();
        for cut in 0..bytes.len() {
            match GgufFile::parse(&bytes[..cut]) {
                Err(GgufError::Truncated { .. } | GgufError::CountTooLarge { .. }) => {}
                Err(GgufError::BadMagic(_)) if cut == 0 => {}
                Ok(_) if cut as u64 >= data_end => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
            // The header alone parses from any prefix that holds it.
            let _ = GgufHeader::parse_prefix(&bytes[..cut], bytes.len() as u64);
        }
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for v in [0u8, 0xff, 0x80, 3] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = GgufFile::parse(&b);
            }
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            GgufFile::parse(b"GGUX\x03\0\0\0"),
            Err(GgufError::BadMagic(_))
        ));
        let mut b = sample();
        b[4] = 1;
        assert_eq!(
            GgufFile::parse(&b).unwrap_err(),
            GgufError::UnsupportedVersion(1)
        );
        // A huge metadata count is refused before allocation.
        let mut b = sample();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            GgufFile::parse(&b),
            Err(GgufError::ImplausibleCount {
                what: "metadata",
                ..
            })
        ));
        // A plausible count that the bytes cannot hold is a cut file.
        let mut b = sample();
        b[16..24].copy_from_slice(&(MAX_COUNT).to_le_bytes());
        assert!(matches!(
            GgufFile::parse(&b),
            Err(GgufError::CountTooLarge { .. })
        ));
        // Short files: empty or not GGUF-like is "not GGUF", a GGUF prefix is "truncated".
        assert!(matches!(GgufFile::parse(b""), Err(GgufError::BadMagic(_))));
        assert!(matches!(
            GgufFile::parse(b"ab"),
            Err(GgufError::BadMagic(_))
        ));
        assert!(matches!(
            GgufFile::parse(b"GG"),
            Err(GgufError::Truncated { what: "magic", .. })
        ));
        let mut w = GgufWriter::new();
        w.add_tensor_f32("x", &[2], &[1.0]).unwrap_err();
        w.add_tensor_raw("q", GgmlType::Q4_K, &[32], vec![0; 18])
            .unwrap_err();
        w.add_tensor_f32("x", &[1], &[1.0]).unwrap();
        assert!(matches!(
            w.add_tensor_f32("x", &[1], &[1.0]),
            Err(GgufError::DuplicateTensor(_))
        ));
    }

    #[test]
    fn unknown_type_fails_only_when_sized() {
        let mut w = GgufWriter::new();
        w.add_tensor_f32("x", &[8], &[1.0; 8]).unwrap();
        let mut bytes = w.to_bytes();
        // Patch the type id of "x" to an unknown one (the table follows the 24-byte header).
        let type_pos = 24 + 8 + 1 + 4 + 8;
        bytes[type_pos..type_pos + 4].copy_from_slice(&200u32.to_le_bytes());
        let f = GgufFile::parse(&bytes).unwrap();
        assert!(matches!(
            f.tensor_data("x"),
            Err(GgufError::UnknownGgmlType { type_id: 200, .. })
        ));
    }

    #[test]
    fn half_conversions() {
        for (x, h) in [
            (1.0f32, 0x3c00u16),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (1e6, 0x7c00),
            (0.0, 0),
        ] {
            assert_eq!(f32_to_f16(x), h, "{x}");
        }
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if !x.is_nan() {
                assert_eq!(f32_to_f16(x), h, "{h:#x}");
            }
        }
        // Ties round to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10.
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
    }

    #[cfg(feature = "std")]
    #[test]
    fn read_header_streams_and_checks_extents() {
        let bytes = sample();
        let dir = std::env::temp_dir().join(format!("amend-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let h = GgufFile::read_header(&path).unwrap();
        assert_eq!(h, GgufFile::parse(&bytes).unwrap().header);
        // Header intact but tensor data cut: the streamed reader still notices.
        let f = GgufFile::parse(&bytes).unwrap();
        std::fs::write(&path, &bytes[..f.data_offset as usize + 8]).unwrap();
        assert!(matches!(
            GgufFile::read_header(&path),
            Err(GgufError::Truncated {
                what: "tensor data",
                ..
            })
        ));
        // 30 bytes: the metadata count no longer fits in what remains.
        std::fs::write(&path, &bytes[..30]).unwrap();
        assert!(matches!(
            GgufFile::read_header(&path),
            Err(GgufError::CountTooLarge {
                what: "metadata",
                ..
            })
        ));
        assert!(matches!(
            GgufFile::read_header(dir.join("missing.gguf")),
            Err(GgufError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(feature = "std")]
    #[test]
    fn real_model_header() {
        let path = std::env::var("AMEND_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                crate::fsutil::cache_dir()
                    .unwrap_or_default()
                    .join("gemma3-270m-q4_k_m.gguf")
            });
        if !path.exists() {
            if std::env::var("AMEND_REQUIRE_MODEL").as_deref() == Ok("1") {
                panic!("model {} missing and AMEND_REQUIRE_MODEL=1", path.display());
            }
            println!("skipped: model {} not present", path.display());
            return;
        }
        let h = GgufFile::read_header(&path).unwrap();
        if !path.ends_with("gemma3-270m-q4_k_m.gguf") {
            return;
        }
        assert_eq!(h.architecture(), Some("gemma3"));
        assert_eq!(h.tensors.len(), 236);
        assert_eq!(h.file_len, 253_113_024);
        let down = h.tensor("blk.12.ffn_down.weight").unwrap();
        assert_eq!(down.ne, vec![2048, 640]);
        assert_eq!(
            h.get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(GgufArray::len),
            Some(262_144)
        );
        // Tensors are laid out back to back: each known size ends at or before the next offset.
        let mut spans: Vec<(u64, u64)> = h
            .tensors
            .iter()
            .map(|t| (t.offset, t.offset + t.byte_size().unwrap()))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0 && w[1].0 - w[0].1 < h.alignment);
        }
        let end = h.data_offset + spans.last().unwrap().1;
        assert!(h.file_len - end < h.alignment);
    }
}
