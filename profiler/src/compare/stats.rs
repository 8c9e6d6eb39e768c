//! The significance test: is a function's change in cumulative share more than sampling noise?
//!
//! A profile is a sample of where the CPU was. Each sample either has the function on its stack
//! or not, so the function's sample count is binomial in the profile's sample total, and two
//! profiles give two independent proportions. A two-proportion z-test with pooled variance asks
//! whether they differ. The normal distribution's CDF and quantile are written out here (a few
//! dozen lines) rather than pulling in a statistics crate for two functions.

use std::f64::consts::SQRT_2;

/// The result of a two-proportion z-test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZTest {
    /// How many standard errors the second proportion lies above the first (negative: below).
    pub z: f64,
    /// The two-sided p-value: the chance of a difference at least this large if both samples
    /// came from the same proportion.
    pub p_value: f64,
}

/// Tests whether `x2` of `n2` differs from `x1` of `n1`, pooling both samples to estimate the
/// variance under "no difference". Without variance (no samples on a side, or the function in
/// none or all of them on both sides) nothing can differ, so z is 0 and p is 1.
pub fn two_proportion_z(x1: u64, n1: u64, x2: u64, n2: u64) -> ZTest {
    let none = ZTest {
        z: 0.0,
        p_value: 1.0,
    };
    if n1 == 0 || n2 == 0 {
        return none;
    }
    let (x1, n1, x2, n2) = (x1 as f64, n1 as f64, x2 as f64, n2 as f64);
    let pooled = (x1 + x2) / (n1 + n2);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2);
    if variance <= 0.0 {
        return none;
    }
    let z = (x2 / n2 - x1 / n1) / variance.sqrt();
    ZTest {
        z,
        p_value: erfc(z.abs() / SQRT_2).min(1.0),
    }
}

/// The standard normal distribution function Φ(x).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / SQRT_2)
}

/// The complementary error function, with a relative error below 1.2e-7 everywhere
/// (the Chebyshev fit of Numerical Recipes' `erfcc`): relative, so that the tiny p-values of
/// large changes keep their order of magnitude instead of rounding to 0.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ]
    .iter()
    .rev()
    .fold(0.0, |acc, c| c + t * acc);
    let tail = t * (-z * z + poly).exp();
    if x >= 0.0 {
        tail
    } else {
        2.0 - tail
    }
}

/// The standard normal quantile Φ⁻¹(p) for 0 < p < 1, by Peter Acklam's rational approximation
/// (relative error below 1.2e-9). It turns a confidence level into the critical |z|. A Halley
/// step through [`normal_cdf`] would not refine it: our CDF is the less exact of the two. At 0
/// and 1 it returns the limits, ±infinity; outside [0, 1], NaN.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    let horner = |coefficients: &[f64], x: f64| coefficients.iter().fold(0.0, |acc, c| acc * x + c);
    // The tails in q = sqrt(-2 ln p), symmetric about 1/2.
    let tail = |p: f64| {
        let q = (-2.0 * p.ln()).sqrt();
        horner(&C, q) / (horner(&D, q) * q + 1.0)
    };
    if p < LOW {
        tail(p)
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        horner(&A, r) * q / (horner(&B, r) * r + 1.0)
    } else {
        -tail(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from Python's `statistics.NormalDist` and `math.erfc`.
    fn close(got: f64, want: f64, relative: f64) -> bool {
        (got - want).abs() <= relative * want.abs().max(1e-300)
    }

    #[test]
    fn quantile_matches_known_values() {
        for (p, want) in [
            (0.975, 1.959_963_984_540_053_6),
            (0.995, 2.575_829_303_548_9),
            (0.9995, 3.290_526_731_491_925_5),
            (0.01, -2.326_347_874_040_840_8),
            (1e-10, -6.361_340_902_404_056),
            (0.024_25, -1.972_961_051_311_884_5),
            (0.3, -0.524_400_512_708_040_7),
        ] {
            let got = normal_quantile(p);
            assert!(close(got, want, 1e-7), "Φ⁻¹({p}) = {got}, want {want}");
        }
        assert_eq!(normal_quantile(0.5), 0.0);
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
        assert!(normal_quantile(1.5).is_nan());
    }

    #[test]
    fn quantile_inverts_the_cdf() {
        for i in 1..1000 {
            let p = i as f64 / 1000.0;
            let back = normal_cdf(normal_quantile(p));
            assert!(close(back, p, 1e-6), "Φ(Φ⁻¹({p})) = {back}");
        }
    }

    #[test]
    fn cdf_and_erfc_match_known_values() {
        for (x, cdf, erfc_x) in [
            (0.0, 0.5, 1.0),
            (1.0, 0.841_344_746_068_542_9, 0.157_299_207_050_285_13),
            (1.96, 0.975_002_104_851_779_6, 0.005_573_724_535_172_132),
            (3.0, 0.998_650_101_968_369_9, 2.209_049_699_858_543_8e-5),
            (5.0, 0.999_999_713_348_428_2, 1.537_459_794_428_035_1e-12),
            (10.0, 1.0, 2.088_487_583_762_545e-45),
        ] {
            assert!(
                close(normal_cdf(x), cdf, 1e-7),
                "Φ({x}) = {}",
                normal_cdf(x)
            );
            assert!(close(erfc(x), erfc_x, 1.2e-7), "erfc({x}) = {}", erfc(x));
        }
        assert!(close(normal_cdf(-1.96), 0.024_997_895_148_220_43, 1e-6));
        assert!(close(erfc(-1.96), 1.994_426_275_464_827_9, 1e-7));
    }

    #[test]
    fn z_test_matches_known_values() {
        // 45 of 100 against 60 of 100: the textbook example, z = 2.124, p = 0.0337.
        let t = two_proportion_z(45, 100, 60, 100);
        assert!(close(t.z, 2.123_976_976_214_365_7, 1e-12), "{t:?}");
        assert!(close(t.p_value, 0.033_672_068_856_345_876, 1e-6), "{t:?}");
        // A function going from 30% to 46% of 2000 samples: far beyond noise.
        let t = two_proportion_z(600, 2000, 920, 2000);
        assert!(close(t.z, 10.423_950_481_140_86, 1e-12), "{t:?}");
        assert!(close(t.p_value, 1.927_757_972_880_606_4e-25, 1e-6), "{t:?}");
        // Symmetric: a fall has the opposite z and the same p.
        let down = two_proportion_z(920, 2000, 600, 2000);
        assert_eq!(down.z, -t.z);
        assert_eq!(down.p_value, t.p_value);
    }

    #[test]
    fn z_test_without_variance_finds_nothing() {
        let none = ZTest {
            z: 0.0,
            p_value: 1.0,
        };
        assert_eq!(two_proportion_z(0, 0, 5, 10), none);
        assert_eq!(two_proportion_z(0, 100, 0, 200), none);
        assert_eq!(two_proportion_z(100, 100, 200, 200), none);
        // Equal shares differ by nothing.
        let same = two_proportion_z(30, 100, 60, 200);
        assert_eq!(same.z, 0.0);
        assert!(close(same.p_value, 1.0, 1e-6));
    }
}
