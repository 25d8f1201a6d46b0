//! Seeded image augmentation (T27): random translation and horizontal flip. The draw for an
//! example is keyed by (seed, step, global example index), so it never depends on which rank
//! processes the example, and the same example is moved differently at each step.

use crate::rng::Stream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Translate by dx, dy drawn uniformly from [−shift, shift].
    pub shift: usize,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// Augments a batch of NHWC images `x` (B, H, W, C) in place; row b is example
    /// `example_ids[b]`. Pixels shifted in from outside take the image's minimum value, its
    /// background after normalisation (0 before it).
    pub fn apply(&self, x: &mut [f32], example_ids: &[u64], (h, w, c): (usize, usize, usize), seed: u64, step: u64) {
        let size = h * w * c;
        let mut source = vec![0.0f32; size];
        for (image, &id) in x.chunks_exact_mut(size).zip(example_ids) {
            let mut stream = Stream::new(seed, "augment", &[step, id]);
            let span = 2 * self.shift as u64 + 1;
            let dy = stream.below(span) as isize - self.shift as isize;
            let dx = stream.below(span) as isize - self.shift as isize;
            let flip = self.flip && stream.below(2) == 1;
            if dx == 0 && dy == 0 && !flip {
                continue;
            }
            source.copy_from_slice(image);
            let background = source.iter().copied().fold(f32::INFINITY, f32::min);
            for row in 0..h as isize {
                for col in 0..w as isize {
                    // out(row, col) = in(row − dy, col' − dx), col' the mirrored column.
                    let src_col = if flip { w as isize - 1 - col } else { col } - dx;
                    let src_row = row - dy;
                    let inside = (0..h as isize).contains(&src_row) && (0..w as isize).contains(&src_col);
                    let out = (row as usize * w + col as usize) * c;
                    for ch in 0..c {
                        image[out + ch] = if inside {
                            source[(src_row as usize * w + src_col as usize) * c + ch]
                        } else {
                            background
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4x4 single-channel image with pixel value 1 + row·4 + col.
    fn ramp() -> Vec<f32> {
        (0..16).map(|i| 1.0 + i as f32).collect()
    }

    #[test]
    fn flip_only_mirrors_rows_and_is_an_involution_when_drawn() {
        let aug = Augment { shift: 0, flip: true };
        let mut flipped_once = 0;
        for id in 0..64u64 {
            let mut x = ramp();
            aug.apply(&mut x, &[id], (4, 4, 1), 3, 0);
            if x != ramp() {
                flipped_once += 1;
                assert_eq!(&x[0..4], &[4.0, 3.0, 2.0, 1.0], "a flip mirrors each row");
            }
        }
        assert!((20..=44).contains(&flipped_once), "about half flipped: {flipped_once}");
    }

    #[test]
    fn shift_moves_pixels_and_fills_with_the_background() {
        let aug = Augment { shift: 1, flip: false };
        let mut moved = 0;
        for id in 0..50u64 {
            let mut x = ramp();
            aug.apply(&mut x, &[id], (4, 4, 1), 3, 5);
            let mut stream = Stream::new(3, "augment", &[5, id]);
            let dy = stream.below(3) as isize - 1;
            let dx = stream.below(3) as isize - 1;
            for r in 0..4isize {
                for c in 0..4isize {
                    let (sr, sc) = (r - dy, c - dx);
                    let want =
                        if (0..4).contains(&sr) && (0..4).contains(&sc) { 1.0 + (sr * 4 + sc) as f32 } else { 1.0 };
                    assert_eq!(x[(r * 4 + c) as usize], want, "id {id} dy {dy} dx {dx} at ({r},{c})");
                }
            }
            moved += (dx != 0 || dy != 0) as usize;
        }
        assert!(moved > 30, "most draws move the image: {moved}");
    }

    #[test]
    fn draws_depend_on_example_and_step_not_on_batch_position() {
        let aug = Augment { shift: 2, flip: true };
        let mut batch: Vec<f32> = ramp().into_iter().chain(ramp()).collect();
        aug.apply(&mut batch, &[7, 9], (4, 4, 1), 11, 2);
        let mut alone = ramp();
        aug.apply(&mut alone, &[9], (4, 4, 1), 11, 2);
        assert_eq!(&batch[16..], &alone[..], "example 9 augments the same wherever it sits");
        let mut later = ramp();
        let mut changed = false;
        for step in 3..10 {
            later.copy_from_slice(&ramp());
            aug.apply(&mut later, &[9], (4, 4, 1), 11, step);
            changed |= later != alone;
        }
        assert!(changed, "other steps draw other transforms");
    }
}
