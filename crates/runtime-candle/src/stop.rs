//! Stop strings on a stream of text: emit what can no longer become a stop
//! string, hold back what still might, cut at the first one found.

/// Scans generated text for stop strings.
#[derive(Debug)]
pub(crate) struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds `piece`; returns the text now safe to emit and whether a stop string
    /// was found (then the text up to it is all that is emitted, ever).
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        // A stop string may straddle the previous piece: search from where one
        // could have started.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.text.len().saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|stop| self.text[from..].find(stop.as_str()).map(|at| from + at))
            .min();
        if let Some(cut) = found {
            self.text.truncate(cut.max(self.emitted));
            return (self.take(self.text.len()), true);
        }
        let safe = self.text.len() - self.held_back();
        (self.take(safe), false)
    }

    /// Everything not yet emitted, at the end of generation.
    pub(crate) fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    /// Bytes at the end of the text that are the start of some stop string.
    fn held_back(&self) -> usize {
        let unemitted = &self.text[self.emitted..];
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&k| stop.is_char_boundary(k))
                    .find(|&k| unemitted.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }

    fn take(&mut self, upto: usize) -> String {
        let out = self.text[self.emitted..upto].to_owned();
        self.emitted = upto;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut scanner = StopScanner::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for piece in pieces {
            let (ready, stopped) = scanner.push(piece);
            out.push(ready);
            if stopped {
                return (out, true, String::new());
            }
        }
        let rest = scanner.finish();
        (out, false, rest)
    }

    #[test]
    fn without_stop_strings_everything_passes_at_once() {
        let (out, stopped, rest) = run(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b"]);
        assert!(!stopped && rest.is_empty());
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_held_then_cut() {
        let (out, stopped, _) = run(&["END"], &["hello E", "N", "D more"]);
        assert_eq!(out.concat(), "hello ");
        assert_eq!(out[0], "hello ", "the possible start `E` is held back");
        assert!(stopped);
    }

    #[test]
    fn a_false_start_is_released() {
        let (out, stopped, rest) = run(&["END"], &["E", "X", "!"]);
        assert_eq!(out.concat() + &rest, "EX!");
        assert_eq!(out[0], "");
        assert!(!stopped);
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        let (out, stopped, rest) = run(&["END"], &["abc E"]);
        assert_eq!(out, ["abc "]);
        assert_eq!(rest, "E");
        assert!(!stopped);
    }

    #[test]
    fn multibyte_stop_strings_are_cut_on_character_boundaries() {
        let (out, stopped, _) = run(&["é!"], &["caf", "é", "!"]);
        assert_eq!(out.concat(), "caf");
        assert!(stopped);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (out, stopped, _) = run(&["b", "a"], &["xab"]);
        assert_eq!(out.concat(), "x");
        assert!(stopped);
    }
}
