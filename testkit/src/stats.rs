//! Percentiles and medians of measured samples (benchmark timings, drill figures), defined
//! once.
//!
//! Two rank rules are in use, and each keeps the figures it always produced:
//! - [`percentile`]: the value at index `round((n - 1) · q)` of the sorted samples — what the
//!   benches report (and what `ktd bench`'s own `quantiles` computes);
//! - [`nearest_rank`]: the `ceil(n · q)`-th smallest value — the textbook nearest-rank
//!   percentile the chaos reports and their SLO checks use.
//!
//! [`quantile`] and [`median`] sort a copy first and give `NaN` for no samples;
//! [`midpoint_median`] averages the two middle values of an even count.

/// The value at index `round((n - 1) · q)` of `sorted` (ascending), `q` in `[0, 1]`; `None`
/// when empty.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let index = (q * last as f64).round() as usize;
    Some(sorted[index.min(last)])
}

/// The `ceil(n · q)`-th smallest value of `sorted` (ascending; at least the first), `q` in
/// `[0, 1]`; `None` when empty.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `values` sorted ascending (`NaN`s last).
pub fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// [`percentile`] `q` of unsorted `values`; `NaN` when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    percentile(&sorted(values), q).unwrap_or(f64::NAN)
}

/// The median by the [`percentile`] rule (of an even count, the upper middle value); `NaN`
/// when empty.
pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

/// Counts indexed by position (e.g. node reads by label length) summed in bands of `width`
/// positions and divided by `per` (e.g. the updates of an epoch): `("0-7", x), ("8-15", y), …`,
/// bands with a count only.
pub fn per_band(counts: &[u64], width: usize, per: f64) -> Vec<(String, f64)> {
    counts
        .chunks(width.max(1))
        .enumerate()
        .filter_map(|(band, chunk)| {
            let total: u64 = chunk.iter().sum();
            let (low, high) = (band * width, band * width + chunk.len() - 1);
            (total > 0).then(|| (format!("{low}-{high}"), total as f64 / per))
        })
        .collect()
}

/// The median as the mean of the two middle values of an even count; `NaN` when empty.
pub fn midpoint_median(values: &[f64]) -> f64 {
    let sorted = sorted(values);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_rounds_the_linear_index() {
        let values: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&values, 0.5), Some(6)); // index round(4.5) = 5
        assert_eq!(percentile(&values, 0.99), Some(10));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
    }

    #[test]
    fn nearest_rank_takes_the_ceiling_rank() {
        let values: Vec<u64> = (1..=10).collect();
        assert_eq!(nearest_rank(&values, 0.5), Some(5));
        assert_eq!(nearest_rank(&values, 0.99), Some(10));
        assert_eq!(nearest_rank(&values, 0.0), Some(1));
        let sixty: Vec<u64> = (1..=60).collect();
        assert_eq!(nearest_rank(&sixty, 0.99), Some(60));
        assert_eq!(
            percentile(&sixty, 0.99),
            Some(59),
            "the two rules differ here"
        );
        assert_eq!(nearest_rank::<u64>(&[], 0.5), None);
    }

    #[test]
    fn medians_of_unsorted_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), 3.0);
        assert_eq!(midpoint_median(&[3.0, 1.0, 2.0, 4.0]), 2.5);
        assert_eq!(midpoint_median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(quantile(&[5.0, 1.0], 1.0), 5.0);
        assert!(median(&[]).is_nan() && midpoint_median(&[]).is_nan());
    }

    #[test]
    fn per_band_sums_bands_and_skips_empty_ones() {
        let counts = [1, 1, 0, 0, 0, 0, 4, 2];
        assert_eq!(
            per_band(&counts, 2, 2.0),
            vec![("0-1".to_string(), 1.0), ("6-7".to_string(), 3.0)]
        );
        assert_eq!(per_band(&[5, 5, 5], 2, 1.0)[1], ("2-2".to_string(), 5.0));
        assert!(per_band(&[], 8, 1.0).is_empty());
    }
}
