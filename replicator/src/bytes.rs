//! Reading little-endian fields from untrusted bytes: every read is bounds-checked, and running
//! out of bytes is the caller's own error (its `truncated` constructor), never a panic.

pub(crate) struct Fields<'a, E, F: Fn(usize) -> E> {
    bytes: &'a [u8],
    pub(crate) at: usize,
    truncated: F,
}

impl<'a, E, F: Fn(usize) -> E> Fields<'a, E, F> {
    /// Reads `bytes`; `truncated(offset)` is the error for a read past their end.
    pub(crate) fn new(bytes: &'a [u8], truncated: F) -> Self {
        Fields {
            bytes,
            at: 0,
            truncated,
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| (self.truncated)(self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], E> {
        Ok(self
            .take(N)?
            .try_into()
            .expect("take returns exactly N bytes"))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, E> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, E> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, E> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, E> {
        self.array().map(u64::from_le_bytes)
    }

    pub(crate) fn u128(&mut self) -> Result<u128, E> {
        self.array().map(u128::from_le_bytes)
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.at..];
        self.at = self.bytes.len();
        s
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// `len` pseudo-random bytes from an xorshift state (the parsers' never-panic tests).
#[cfg(test)]
pub(crate) fn noise(state: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *state as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_and_stops_at_the_end() {
        let mut f = Fields::new(&[1, 2, 0, 3, 0, 0, 0, 9], |at| at);
        assert_eq!(f.u8(), Ok(1));
        assert_eq!(f.u16(), Ok(2));
        assert_eq!(f.u32(), Ok(3));
        assert_eq!(f.u64(), Err(7));
        assert_eq!(f.remaining(), 1);
        assert_eq!(f.rest(), &[9]);
    }
}
