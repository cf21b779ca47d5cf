//! The data the snapshot scenario writes, into the driver's volume and
//! into the copy floor's source alike: bytes that no filesystem can store
//! as holes or deduplicate (a xorshift stream, different in every block),
//! flushed before the copies are timed.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` bytes of data to a new file at `path` and flushes it.
pub fn write(path: &Path, bytes: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_size_asked_with_no_repeated_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        write(&p, (3 << 20) + 5).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), (3 << 20) + 5);
        let blocks: std::collections::HashSet<&[u8]> = bytes.chunks_exact(4096).collect();
        assert_eq!(blocks.len(), bytes.len() / 4096, "a 4 KiB block repeats");
    }
}
