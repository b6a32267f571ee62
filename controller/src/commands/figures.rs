//! The figures benchmarks and lab scenarios print: nearest-rank percentiles of sorted samples,
//! values rounded to two decimals, and `redis-benchmark -q`'s requests per second.

/// The sample at rank `p` (0 to 1) of `sorted`, nearest rank; 0 for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `x` to two decimals.
pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Parses `redis-benchmark -q` output: test name to requests per second.
pub fn parse_benchmark(output: &str) -> Vec<(String, f64)> {
    output
        .split(['\n', '\r'])
        .filter_map(|line| {
            let (name, rest) = line.split_once(": ")?;
            let rps = rest
                .strip_suffix(" requests per second")
                .or_else(|| rest.split(" requests per second").next())?;
            Some((name.trim().to_owned(), rps.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_quiet_output() {
        let out = "PING_INLINE: rps=0.0 (overall: -nan) avg_msec=-nan (overall: -nan)\r\
                   PING_INLINE: 78125.00 requests per second, p50=0.551 msec\n\
                   SET: 81967.21 requests per second, p50=0.551 msec\n";
        assert_eq!(
            parse_benchmark(out),
            vec![
                ("PING_INLINE".to_owned(), 78125.0),
                ("SET".to_owned(), 81967.21)
            ]
        );
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), 51.0);
        assert_eq!(percentile(&s, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
