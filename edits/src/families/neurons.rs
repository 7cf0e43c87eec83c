//! Patch neurons (T-Patcher family): extra FFN neurons added at one layer.
//!
//! For an input row `x` (the FFN input, `dim` wide) each neuron `i` computes
//! `a_i = act(k_i · x + b_i)` and the layer's output row gets `Σ a_i v_i`. With ReLU, an input that
//! no neuron is keyed on (every pre-activation `<= 0`) leaves the output bitwise untouched: zero
//! activations are skipped, never added as `0.0 * v` (which would turn `-0.0` into `0.0`).

use super::{check_matrix, InvalidPayload};
use crate::site::Site;

/// The neurons' activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u8)]
pub enum Activation {
    /// `max(0, z)`: exactly zero off the keyed inputs (the default).
    Relu = 0,
    /// GELU, tanh approximation (what ggml's `gelu` and gemma's FFN compute).
    Gelu = 1,
}

impl Activation {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Activation> {
        match code {
            0 => Some(Activation::Relu),
            1 => Some(Activation::Gelu),
            _ => None,
        }
    }

    /// The activation of a pre-activation `z`; NaN maps to 0 so a broken row never spreads.
    #[inline(always)]
    pub fn eval(self, z: f32) -> f32 {
        match self {
            Activation::Relu => {
                if z > 0.0 {
                    z
                } else {
                    0.0
                }
            }
            Activation::Gelu => {
                if z.is_nan() {
                    return 0.0;
                }
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                let inner = SQRT_2_OVER_PI * (z + 0.044_715 * z * z * z);
                0.5 * z * (1.0 + libm::tanhf(inner))
            }
        }
    }
}

/// Patch neurons at one layer: keys `[m, dim]`, biases `[m]`, values `[m, dim]`.
#[derive(Clone, Copy, Debug)]
pub struct PatchNeurons<'a> {
    layer: u32,
    read_site: Site,
    write_site: Site,
    dim: usize,
    keys: &'a [f32],
    biases: &'a [f32],
    values: &'a [f32],
    activation: Activation,
}

impl<'a> PatchNeurons<'a> {
    /// Validate shapes (`m = biases.len() >= 1`) and that every value is finite.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layer: u32,
        read_site: Site,
        write_site: Site,
        dim: usize,
        keys: &'a [f32],
        biases: &'a [f32],
        values: &'a [f32],
        activation: Activation,
    ) -> Result<PatchNeurons<'a>, InvalidPayload> {
        let m = biases.len();
        if dim == 0 {
            return Err(InvalidPayload("patch neurons: dim must be positive"));
        }
        if m == 0 {
            return Err(InvalidPayload("patch neurons: no neurons"));
        }
        check_matrix(
            keys,
            m,
            dim,
            "patch neurons: keys must be [m, dim] with m = biases.len()",
            "patch neurons: non-finite key",
        )?;
        check_matrix(
            values,
            m,
            dim,
            "patch neurons: values must be [m, dim] with m = biases.len()",
            "patch neurons: non-finite value",
        )?;
        check_matrix(biases, m, 1, "", "patch neurons: non-finite bias")?;
        Ok(PatchNeurons {
            layer,
            read_site,
            write_site,
            dim,
            keys,
            biases,
            values,
            activation,
        })
    }

    pub fn layer(&self) -> u32 {
        self.layer
    }
    pub fn read_site(&self) -> Site {
        self.read_site
    }
    pub fn write_site(&self) -> Site {
        self.write_site
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.biases.len()
    }
    pub fn is_empty(&self) -> bool {
        self.biases.is_empty()
    }
    pub fn activation(&self) -> Activation {
        self.activation
    }
    pub fn key(&self, i: usize) -> &'a [f32] {
        &self.keys[i * self.dim..(i + 1) * self.dim]
    }
    pub fn value(&self, i: usize) -> &'a [f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
    pub fn bias(&self, i: usize) -> f32 {
        self.biases[i]
    }

    /// For one row: `out += Σ act(k_i·x + b_i) v_i`; returns how many neurons fired (non-zero
    /// activation). `activations`, when given (length `m`), receives every `a_i`.
    ///
    /// A row of the wrong width (`x` or `out` not `dim` long) is left untouched and 0 returned.
    pub fn apply(&self, x: &[f32], out: &mut [f32], activations: Option<&mut [f32]>) -> usize {
        if x.len() != self.dim || out.len() != self.dim {
            return 0;
        }
        // The keys (m x dim f32) stream from cache once per row: memory-bound, so the portable
        // SSE2 build is as fast as an AVX2 one here (measured: 127 us both at 1,000 x 640).
        // aarch64 gets explicit NEON (bitwise equal; its speed could not be measured here).
        #[cfg(all(feature = "std", target_arch = "aarch64"))]
        if super::neon_available() {
            // SAFETY: NEON support was just checked at run time.
            return unsafe { self.apply_neon(x, out, activations) };
        }
        self.apply_portable(x, out, activations)
    }

    /// Apply to `rows` rows of `dim` (`xs` and `outs` both `[rows, dim]`); returns total fired.
    pub fn apply_rows(&self, xs: &[f32], outs: &mut [f32]) -> usize {
        if xs.len() != outs.len() || !xs.len().is_multiple_of(self.dim) {
            return 0;
        }
        xs.chunks_exact(self.dim)
            .zip(outs.chunks_exact_mut(self.dim))
            .map(|(x, o)| self.apply(x, o, None))
            .sum()
    }

    #[inline(always)]
    fn apply_portable(&self, x: &[f32], out: &mut [f32], activations: Option<&mut [f32]>) -> usize {
        // SAFETY: the portable kernels need no CPU feature.
        unsafe { self.apply_with::<super::Portable>(x, out, activations) }
    }

    /// # Safety
    /// The CPU has NEON.
    #[cfg(all(feature = "std", target_arch = "aarch64"))]
    #[target_feature(enable = "neon")]
    unsafe fn apply_neon(
        &self,
        x: &[f32],
        out: &mut [f32],
        activations: Option<&mut [f32]>,
    ) -> usize {
        self.apply_with::<super::Neon>(x, out, activations)
    }

    /// The pass, written once over the kernels `K` (portable or NEON: bitwise equal).
    ///
    /// # Safety
    /// The CPU supports `K`'s instruction set.
    #[inline(always)]
    unsafe fn apply_with<K: super::Kernels>(
        &self,
        x: &[f32],
        out: &mut [f32],
        mut activations: Option<&mut [f32]>,
    ) -> usize {
        let mut fired = 0;
        for (i, (k, v)) in self
            .keys
            .chunks_exact(self.dim)
            .zip(self.values.chunks_exact(self.dim))
            .enumerate()
        {
            let a = self.activation.eval(K::dot(k, x) + self.biases[i]);
            if let Some(acts) = activations.as_deref_mut() {
                if let Some(slot) = acts.get_mut(i) {
                    *slot = a;
                }
            }
            if a != 0.0 {
                fired += 1;
                K::axpy(a, v, out);
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    #[test]
    fn relu_fires_only_on_keyed_input() {
        // Two neurons in 2-d: k0 = (1, 0), b0 = -0.5; k1 = (0, 1), b1 = -0.5.
        let keys = [1.0, 0.0, 0.0, 1.0];
        let biases = [-0.5, -0.5];
        let values = [10.0, 0.0, 0.0, 20.0];
        let p = PatchNeurons::new(
            3,
            Site::FfnInput,
            Site::FfnOutput,
            2,
            &keys,
            &biases,
            &values,
            Activation::Relu,
        )
        .unwrap();
        let mut out = [1.0, -0.0];
        let mut acts = [9.0; 2];
        // x = (2, 0): a0 = 1.5, a1 = relu(-0.5) = 0.
        assert_eq!(p.apply(&[2.0, 0.0], &mut out, Some(&mut acts)), 1);
        assert_eq!(acts, [1.5, 0.0]);
        assert_eq!(out[0], 16.0);
        // An unrelated input (both pre-activations exactly 0 or below) changes nothing at all.
        let mut out2 = [-0.0f32, 3.25];
        assert_eq!(p.apply(&[0.5, 0.5], &mut out2, None), 0);
        assert_eq!(out2[0].to_bits(), (-0.0f32).to_bits());
        assert_eq!(out2[1], 3.25);
        // NaN input fires nothing.
        assert_eq!(p.apply(&[f32::NAN, 0.0], &mut out2, None), 0);
        // Wrong widths are ignored.
        assert_eq!(p.apply(&[1.0], &mut out2, None), 0);
        assert_eq!(p.layer(), 3);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn gelu_values() {
        let g = Activation::Gelu;
        assert_eq!(g.eval(0.0), 0.0);
        // Reference values of 0.5 z (1 + tanh(sqrt(2/pi)(z + 0.044715 z^3))).
        for (z, want) in [
            (1.0f32, 0.841_192),
            (-1.0, -0.158_808),
            (2.0, 1.954_598),
            (-3.0, -0.003_637_4),
        ] {
            assert!((g.eval(z) - want).abs() < 1e-5, "gelu({z}) = {}", g.eval(z));
        }
        let keys = [1.0, 0.0];
        let p = PatchNeurons::new(
            0,
            Site::FfnInput,
            Site::FfnOutput,
            2,
            &keys,
            &[0.0],
            &[1.0, 1.0],
            g,
        )
        .unwrap();
        let mut out = [0.0, 0.0];
        assert_eq!(p.apply(&[1.0, 5.0], &mut out, None), 1);
        assert!((out[0] - 0.841_192).abs() < 1e-5 && out[0] == out[1]);
    }

    #[test]
    fn matches_dense_reference() {
        let (m, d) = (7, 33);
        let keys: Vec<f32> = (0..m * d)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let values: Vec<f32> = (0..m * d)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
            .collect();
        let biases: Vec<f32> = (0..m).map(|i| i as f32 * 0.3 - 1.0).collect();
        let x: Vec<f32> = (0..d).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.25).collect();
        let p = PatchNeurons::new(
            0,
            Site::FfnInput,
            Site::FfnOutput,
            d,
            &keys,
            &biases,
            &values,
            Activation::Relu,
        )
        .unwrap();
        let mut want = vec![0.0f64; d];
        let mut fired = 0;
        for i in 0..m {
            let z: f64 = (0..d)
                .map(|j| keys[i * d + j] as f64 * x[j] as f64)
                .sum::<f64>()
                + biases[i] as f64;
            if z > 0.0 {
                fired += 1;
                (0..d).for_each(|j| want[j] += z * values[i * d + j] as f64);
            }
        }
        let mut out = vec![0.0f32; d];
        assert_eq!(p.apply(&x, &mut out, None), fired);
        assert!(fired > 0 && fired < m);
        for j in 0..d {
            assert!((out[j] as f64 - want[j]).abs() < 1e-4);
        }
        let mut outs = vec![0.0f32; 2 * d];
        let xs: Vec<f32> = x.iter().chain(x.iter()).copied().collect();
        assert_eq!(p.apply_rows(&xs, &mut outs), 2 * fired);
        assert_eq!(&outs[..d], &out[..]);
    }

    #[test]
    fn dispatch_is_bitwise_portable() {
        // Whatever kernels `apply` picks (NEON on aarch64), outputs and activations are the
        // portable pass's bit for bit.
        for (m, d) in [(5usize, 37usize), (40, 640)] {
            let f = |i: usize, s: f32| {
                (((i * 2_654_435_761) >> 7) % 1000) as f32 / 1000.0 * s - 0.3 * s
            };
            let keys: Vec<f32> = (0..m * d).map(|i| f(i, 0.2)).collect();
            let values: Vec<f32> = (0..m * d).map(|i| f(i + 7, 3.0)).collect();
            let biases: Vec<f32> = (0..m).map(|i| f(i + 3, 1.0)).collect();
            let x: Vec<f32> = (0..d).map(|i| f(i + 11, 5.0)).collect();
            for act in [Activation::Relu, Activation::Gelu] {
                let p = PatchNeurons::new(
                    0,
                    Site::FfnInput,
                    Site::FfnOutput,
                    d,
                    &keys,
                    &biases,
                    &values,
                    act,
                )
                .unwrap();
                let (mut o1, mut o2) = (x.clone(), x.clone());
                let (mut a1, mut a2) = (vec![0.0; m], vec![0.0; m]);
                let n1 = p.apply(&x, &mut o1, Some(&mut a1));
                let n2 = p.apply_portable(&x, &mut o2, Some(&mut a2));
                assert_eq!(n1, n2);
                assert!(n1 > 0);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o1), bits(&o2));
                assert_eq!(bits(&a1), bits(&a2));
            }
        }
    }

    #[test]
    fn rejects_bad_payloads() {
        let s = Site::FfnInput;
        let t = Site::FfnOutput;
        let r = Activation::Relu;
        assert!(PatchNeurons::new(0, s, t, 2, &[1.0, 0.0], &[0.0], &[1.0], r).is_err());
        assert!(PatchNeurons::new(0, s, t, 2, &[1.0], &[0.0], &[1.0, 0.0], r).is_err());
        assert!(PatchNeurons::new(0, s, t, 2, &[], &[], &[], r).is_err());
        assert!(PatchNeurons::new(0, s, t, 0, &[], &[0.0], &[], r).is_err());
        assert!(PatchNeurons::new(0, s, t, 2, &[f32::NAN, 0.0], &[0.0], &[1.0, 0.0], r).is_err());
        assert!(
            PatchNeurons::new(0, s, t, 2, &[1.0, 0.0], &[f32::INFINITY], &[1.0, 0.0], r).is_err()
        );
        for a in [Activation::Relu, Activation::Gelu] {
            assert_eq!(Activation::from_code(a.code()), Some(a));
        }
        assert_eq!(Activation::from_code(9), None);
    }
}
