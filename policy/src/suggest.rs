//! "Did you mean": the closest known word to a misspelt one.

/// The candidate closest to `word`, if it is close enough to be a likely typo: same letters up
/// to case and `-`/`_` (`hold-time`, `holdTime` for `hold_time`), or within a small edit distance.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let folded = fold(word);
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .filter_map(|c| {
            let candidate = fold(c);
            let distance = if candidate == folded {
                0
            } else if folded.len() >= 3 && candidate.starts_with(&folded) {
                1
            } else {
                strsim::damerau_levenshtein(word, c)
            };
            (distance <= limit).then_some((distance, c))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn fold(word: &str) -> String {
    word.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        let keys = ["hold_time", "remote_as", "address", "bfd"];
        assert_eq!(did_you_mean("hold_tme", keys), Some("hold_time"));
        assert_eq!(did_you_mean("holdTime", keys), Some("hold_time"));
        assert_eq!(did_you_mean("remote-as", keys), Some("remote_as"));
        assert_eq!(did_you_mean("bdf", keys), Some("bfd"));
        assert_eq!(did_you_mean("colour", keys), None);
        assert_eq!(
            did_you_mean("upstream", ["upstream-bgp", "none"]),
            Some("upstream-bgp")
        );
    }
}
