//! Codebooks (GRACE family): a key → value table with a radius per entry.
//!
//! At one layer the runtime reads a key row (default: the normed FFN input at the last prompt
//! token), finds the nearest active entry, and when the distance is within that entry's radius
//! replaces the row at the replace site (default: the FFN output) with the entry's value.
//!
//! Distances must mean the same at every layer, but gemma3's residual norms grow from ~7k to ~34k
//! across layers, so the default is [`Distance::NormalizedEuclidean`]: both vectors are scaled to
//! unit length first. **For the normalized distances the keys are stored already L2-normalized**
//! (the compiler normalizes them; `new` checks every key norm is 1 within 2e-3), so a lookup is one
//! dot product per entry over the borrowed keys, with nothing precomputed at load. Only the query
//! is normalized, once, by dividing the best dot product by its norm.

use super::{check_matrix, check_unit_rows, direction, max_dot, min_sq_dist, InvalidPayload};
use crate::site::Site;

/// How key distance is measured; recorded in bundles by [`Distance::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u8)]
pub enum Distance {
    /// Plain `‖q − k‖` on raw vectors (GRACE's original; only sensible at a fixed scale).
    Euclidean = 0,
    /// `‖q/‖q‖ − k‖` with unit keys, in `[0, 2]`; equals `sqrt(2 − 2 cos)`.
    #[default]
    NormalizedEuclidean = 1,
    /// `1 − cos(q, k)` with unit keys, in `[0, 2]`.
    Cosine = 2,
}

impl Distance {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Distance> {
        match code {
            0 => Some(Distance::Euclidean),
            1 => Some(Distance::NormalizedEuclidean),
            2 => Some(Distance::Cosine),
            _ => None,
        }
    }

    /// Whether keys must be stored L2-normalized.
    pub const fn normalized(self) -> bool {
        !matches!(self, Distance::Euclidean)
    }

    /// A normalized distance from the cosine `cos` (in `[-1, 1]`) of a query and a unit key;
    /// decreasing in `cos`. (Euclidean is not a function of the cosine: `1 - cos` is returned.)
    pub fn distance_of_cos(self, cos: f32) -> f32 {
        match self {
            Distance::NormalizedEuclidean => libm::sqrtf((2.0 - 2.0 * cos).max(0.0)),
            Distance::Cosine | Distance::Euclidean => 1.0 - cos,
        }
    }
}

/// The nearest active entry to a query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CodebookHit {
    pub index: usize,
    pub distance: f32,
    /// `distance <= radius[index]`: the entry applies.
    pub within_radius: bool,
}

/// A codebook at one layer: keys `[n, dim]`, values `[n, dim]`, radii `[n]`.
#[derive(Clone, Copy, Debug)]
pub struct Codebook<'a> {
    layer: u32,
    key_site: Site,
    replace_site: Site,
    dim: usize,
    keys: &'a [f32],
    values: &'a [f32],
    radii: &'a [f32],
    distance: Distance,
    all_positions: bool,
}

impl<'a> Codebook<'a> {
    /// Validate shapes (`n = radii.len() >= 1`), finite values, radii `>= 0`, and unit-norm keys
    /// for the normalized distances. `all_positions`: look up every position (including decode
    /// steps) instead of only the last prompt token.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layer: u32,
        key_site: Site,
        replace_site: Site,
        dim: usize,
        keys: &'a [f32],
        values: &'a [f32],
        radii: &'a [f32],
        distance: Distance,
        all_positions: bool,
    ) -> Result<Codebook<'a>, InvalidPayload> {
        let n = radii.len();
        if dim == 0 {
            return Err(InvalidPayload("codebook: dim must be positive"));
        }
        if n == 0 {
            return Err(InvalidPayload("codebook: no entries"));
        }
        check_matrix(
            keys,
            n,
            dim,
            "codebook: keys must be [n, dim] with n = radii.len()",
            "codebook: non-finite key",
        )?;
        check_matrix(
            values,
            n,
            dim,
            "codebook: values must be [n, dim] with n = radii.len()",
            "codebook: non-finite value",
        )?;
        if !radii.iter().all(|r| r.is_finite() && *r >= 0.0) {
            return Err(InvalidPayload("codebook: radii must be finite and >= 0"));
        }
        // A radius beyond the distance's range matches every query: refuse it as corrupt.
        if distance.normalized()
            && !radii
                .iter()
                .all(|r| *r <= crate::bundle::MAX_NORMALIZED_RADIUS)
        {
            return Err(InvalidPayload(
                "codebook: radius above 2, the range of the normalized distances",
            ));
        }
        if distance.normalized() {
            check_unit_rows(
                keys,
                dim,
                "codebook: keys must be L2-normalized for the normalized distances",
            )?;
        }
        Ok(Codebook {
            layer,
            key_site,
            replace_site,
            dim,
            keys,
            values,
            radii,
            distance,
            all_positions,
        })
    }

    pub fn layer(&self) -> u32 {
        self.layer
    }
    pub fn key_site(&self) -> Site {
        self.key_site
    }
    pub fn replace_site(&self) -> Site {
        self.replace_site
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.radii.len()
    }
    pub fn is_empty(&self) -> bool {
        self.radii.is_empty()
    }
    pub fn distance(&self) -> Distance {
        self.distance
    }
    pub fn all_positions(&self) -> bool {
        self.all_positions
    }
    pub fn radius(&self, i: usize) -> f32 {
        self.radii[i]
    }
    pub fn key(&self, i: usize) -> &'a [f32] {
        &self.keys[i * self.dim..(i + 1) * self.dim]
    }
    /// The replacement row of entry `i` (panics if `i >= len()`, like slice indexing).
    pub fn value(&self, i: usize) -> &'a [f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// The nearest entry to `key` among the active ones (`active[i]`; entries past the mask's end
    /// are inactive; `None` = all active). `None` when no entry is active, `key` is not `dim`
    /// long, or it has no direction (all zero, or a NaN or infinity) under a normalized
    /// distance; a huge but finite key (|key|² over f32's range) still finds its entry.
    pub fn nearest(&self, key: &[f32], active: Option<&[bool]>) -> Option<CodebookHit> {
        if key.len() != self.dim {
            return None;
        }
        let (index, distance) = match self.distance {
            Distance::Euclidean => {
                let (i, d2) = min_sq_dist(self.keys, self.dim, key, active)?;
                (i, libm::sqrtf(d2))
            }
            Distance::NormalizedEuclidean | Distance::Cosine => {
                let (key, norm) = direction(key)?;
                let (i, d) = max_dot(self.keys, self.dim, &key, active)?;
                let cos = (d / norm).clamp(-1.0, 1.0);
                (i, self.distance.distance_of_cos(cos))
            }
        };
        Some(CodebookHit {
            index,
            distance,
            within_radius: distance <= self.radii[index],
        })
    }

    /// Look up `key_row` among all entries and, when the nearest is within its radius, overwrite
    /// `replace_row` with its value. Returns the nearest entry either way (`within_radius` says
    /// whether the row was replaced); a `replace_row` of the wrong width is never written.
    pub fn apply(&self, key_row: &[f32], replace_row: &mut [f32]) -> Option<CodebookHit> {
        self.apply_masked(key_row, None, replace_row)
    }

    /// [`Codebook::apply`] over the active entries only.
    pub fn apply_masked(
        &self,
        key_row: &[f32],
        active: Option<&[bool]>,
        replace_row: &mut [f32],
    ) -> Option<CodebookHit> {
        let mut hit = self.nearest(key_row, active)?;
        if hit.within_radius {
            if replace_row.len() == self.dim {
                replace_row.copy_from_slice(self.value(hit.index));
            } else {
                hit.within_radius = false;
            }
        }
        Some(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    const S: Site = Site::FfnInput;
    const R: Site = Site::FfnOutput;

    #[test]
    fn euclidean_nearest_and_radius_boundary() {
        // Entries at (0,0) r=1 and (10,0) r=2.
        let keys = [0.0, 0.0, 10.0, 0.0];
        let values = [1.0, 1.0, 2.0, 2.0];
        let radii = [1.0, 2.0];
        let cb = Codebook::new(
            4,
            S,
            R,
            2,
            &keys,
            &values,
            &radii,
            Distance::Euclidean,
            false,
        )
        .unwrap();
        // Exactly on the boundary counts as within.
        let h = cb.nearest(&[0.0, 1.0], None).unwrap();
        assert_eq!(
            h,
            CodebookHit {
                index: 0,
                distance: 1.0,
                within_radius: true
            }
        );
        let h = cb.nearest(&[0.0, 1.0001], None).unwrap();
        assert!(!h.within_radius && h.index == 0);
        let h = cb.nearest(&[8.0, 0.0], None).unwrap();
        assert_eq!(
            h,
            CodebookHit {
                index: 1,
                distance: 2.0,
                within_radius: true
            }
        );
        // Inactive entry 1 is skipped: entry 0 is nearest (and out of radius).
        let h = cb.nearest(&[8.0, 0.0], Some(&[true, false])).unwrap();
        assert_eq!((h.index, h.distance, h.within_radius), (0, 8.0, false));
        // A short mask disables the entries it does not cover; nothing active -> None.
        assert_eq!(cb.nearest(&[8.0, 0.0], Some(&[true])).unwrap().index, 0);
        assert!(cb.nearest(&[8.0, 0.0], Some(&[false, false])).is_none());
        assert!(cb.nearest(&[8.0], None).is_none());
        // apply replaces only within the radius.
        let mut row = [5.0, 5.0];
        assert!(cb.apply(&[9.0, 0.0], &mut row).unwrap().within_radius);
        assert_eq!(row, [2.0, 2.0]);
        let mut row = [5.0, 5.0];
        assert!(!cb.apply(&[5.0, 0.0], &mut row).unwrap().within_radius);
        assert_eq!(row, [5.0, 5.0]);
        let mut short = [5.0];
        assert!(!cb.apply(&[9.0, 0.0], &mut short).unwrap().within_radius);
        assert_eq!(short, [5.0]);
    }

    #[test]
    fn normalized_distances_are_scale_free() {
        // Unit keys e0, e1; query is 30,000 * (cos t, sin t) like a deep gemma3 residual.
        let keys = [1.0, 0.0, 0.0, 1.0];
        let values = [7.0, 7.0, 8.0, 8.0];
        // sqrt(2 - 2 cos 0.1) = 0.09996; radius 0.1 admits it.
        let radii = [0.1, 0.1];
        let cb = Codebook::new(
            0,
            S,
            R,
            2,
            &keys,
            &values,
            &radii,
            Distance::NormalizedEuclidean,
            false,
        )
        .unwrap();
        let t = 0.1f32;
        let q = [30_000.0 * libm::cosf(t), 30_000.0 * libm::sinf(t)];
        let h = cb.nearest(&q, None).unwrap();
        assert_eq!(h.index, 0);
        assert!((h.distance - 0.099_958).abs() < 1e-4 && h.within_radius);
        // Same direction at a tiny scale: same distance.
        let h2 = cb.nearest(&[q[0] / 1e6, q[1] / 1e6], None).unwrap();
        assert!((h2.distance - h.distance).abs() < 1e-5);
        // Angle 0.2 is outside.
        let q = [libm::cosf(0.2), libm::sinf(0.2)];
        assert!(!cb.nearest(&q, None).unwrap().within_radius);
        // Zero query has no direction.
        assert!(cb.nearest(&[0.0, 0.0], None).is_none());

        let cos_cb = Codebook::new(
            0,
            S,
            R,
            2,
            &keys,
            &values,
            &[0.5, 0.5],
            Distance::Cosine,
            true,
        )
        .unwrap();
        let h = cos_cb.nearest(&[1.0, 1.0], None).unwrap();
        // cos = 1/sqrt(2) to both: the first wins ties; 1 - 0.7071 = 0.2929.
        assert_eq!(h.index, 0);
        assert!((h.distance - 0.292_893).abs() < 1e-5 && h.within_radius);
        assert!(cos_cb.all_positions());
    }

    #[test]
    fn larger_table_matches_brute_force_reference() {
        let (n, d) = (300, 40);
        // xorshift: distinct pseudo-random rows (no exact ties).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut keys: Vec<f32> = (0..n * d)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        for row in keys.chunks_exact_mut(d) {
            super::super::l2_normalize(row);
        }
        let values = vec![0.0; n * d];
        let radii = vec![0.5; n];
        let cb = Codebook::new(
            0,
            S,
            R,
            d,
            &keys,
            &values,
            &radii,
            Distance::NormalizedEuclidean,
            false,
        )
        .unwrap();
        let mut active = vec![true; n];
        for q_i in [3usize, 150, 299] {
            let q: Vec<f32> = keys[q_i * d..(q_i + 1) * d]
                .iter()
                .map(|x| x * 123.0 + 0.001)
                .collect();
            let h = cb.nearest(&q, Some(&active)).unwrap();
            assert_eq!(h.index, q_i);
            assert!(h.distance < 1e-3);
            active[q_i] = false;
            let h2 = cb.nearest(&q, Some(&active)).unwrap();
            // Reference: best cosine among the remaining active rows.
            let best = (0..n)
                .filter(|&i| active[i])
                .max_by(|&a, &b| {
                    let ca: f32 = (0..d).map(|j| keys[a * d + j] * q[j]).sum();
                    let cb_: f32 = (0..d).map(|j| keys[b * d + j] * q[j]).sum();
                    ca.partial_cmp(&cb_).unwrap()
                })
                .unwrap();
            assert_eq!(h2.index, best);
        }
    }

    #[test]
    fn rejects_bad_payloads() {
        let e = Distance::Euclidean;
        assert!(Codebook::new(0, S, R, 2, &[0.0; 4], &[0.0; 4], &[1.0], e, false).is_err());
        assert!(Codebook::new(0, S, R, 2, &[0.0; 2], &[0.0; 4], &[1.0], e, false).is_err());
        assert!(Codebook::new(0, S, R, 2, &[], &[], &[], e, false).is_err());
        assert!(Codebook::new(0, S, R, 2, &[0.0, f32::NAN], &[0.0; 2], &[1.0], e, false).is_err());
        assert!(Codebook::new(0, S, R, 2, &[0.0; 2], &[0.0; 2], &[-1.0], e, false).is_err());
        assert!(
            Codebook::new(0, S, R, 2, &[0.0; 2], &[0.0; 2], &[f32::INFINITY], e, false).is_err()
        );
        // Normalized distances need unit keys.
        let n = Distance::NormalizedEuclidean;
        assert_eq!(
            Codebook::new(0, S, R, 2, &[3.0, 4.0], &[0.0; 2], &[1.0], n, false).unwrap_err(),
            InvalidPayload("codebook: keys must be L2-normalized for the normalized distances")
        );
        assert!(Codebook::new(0, S, R, 2, &[0.6, 0.8], &[0.0; 2], &[1.0], n, false).is_ok());
        for d in [
            Distance::Euclidean,
            Distance::NormalizedEuclidean,
            Distance::Cosine,
        ] {
            assert_eq!(Distance::from_code(d.code()), Some(d));
        }
        assert_eq!(Distance::from_code(3), None);
        assert_eq!(Distance::default(), Distance::NormalizedEuclidean);
    }
}
