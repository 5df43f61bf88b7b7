//! Which KV blocks are free. Sequences own their block lists; this only hands blocks out and
//! takes them back.

/// A free list of block ids `0..num_blocks`.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so blocks are handed out in ascending order (nicer to read in tests).
        Self { free: (0..num_blocks as u32).rev().collect(), num_blocks }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_and_release() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(a.num_free(), 1);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.num_free(), 1, "a failed allocation takes nothing");
        a.release(x);
        assert_eq!(a.num_free(), 4);
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(17, 16), 2);
    }
}
