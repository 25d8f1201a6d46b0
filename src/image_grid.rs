//! `lockstep sample` on a GAN model file: a PNG grid of generated images, and optionally
//! a classifier's verdict on them (how many it recognises with confidence).

use crate::SampleArgs;
use anyhow::{bail, Context, Result};
use lockstep_kernels::CpuBackend;
use lockstep_worker::gan::{classify, sample_images, Generated};
use std::path::Path;

/// Pixels between images and around the grid.
const GAP: u32 = 2;

pub fn sample_gan(model: &Path, args: &SampleArgs, threads: usize) -> Result<()> {
    if args.count == 0 || args.count > 100_000 {
        bail!("--count must be in 1..=100000, got {}", args.count);
    }
    if !(args.confidence > 0.0 && args.confidence <= 1.0) {
        bail!("--confidence must be in (0, 1], got {}", args.confidence);
    }
    let be = CpuBackend::new(threads);
    let images =
        sample_images(&be, model, args.count, args.seed).with_context(|| format!("sampling {}", model.display()))?;
    write_grid(&images, &args.out)?;
    println!("{} generated images (seed {}) -> {}", images.count(), args.seed, args.out.display());
    if let Some(classifier) = &args.classifier {
        let v = classify(&be, classifier, &images, args.confidence)
            .with_context(|| format!("classifying with {}", classifier.display()))?;
        println!(
            "{}: {} of {} images ({:.1}%) classified with confidence >= {}; mean confidence {:.3}",
            classifier.display(),
            v.confident,
            v.images,
            100.0 * v.confident as f64 / v.images.max(1) as f64,
            v.threshold,
            v.mean_confidence
        );
        let classes: Vec<String> = v.per_class.iter().enumerate().map(|(c, n)| format!("{c}: {n}")).collect();
        println!("predicted classes: {}", classes.join(", "));
    }
    Ok(())
}

/// The images in a near-square grid, pixel values clamped to 0..=255 (grey for one
/// channel, RGB for three).
fn write_grid(images: &Generated, out: &Path) -> Result<()> {
    let (h, w, c) = match images.image_shape[..] {
        [h, w, c] if c == 1 || c == 3 => (h as u32, w as u32, c),
        [f] => match (f as f64).sqrt() as u32 {
            side if side * side == f as u32 => (side, side, 1),
            _ => bail!("images of {f} values are not square; give the GAN input_shape = [H, W, C]"),
        },
        ref other => bail!("cannot draw images of shape {other:?} (need [H, W, 1], [H, W, 3] or a square [F])"),
    };
    let count = images.count() as u32;
    let cols = (count as f64).sqrt().ceil() as u32;
    let rows = count.div_ceil(cols);
    let (width, height) = (cols * (w + GAP) + GAP, rows * (h + GAP) + GAP);
    let mut grid = image::RgbImage::new(width, height);
    let per_image = (h * w) as usize * c;
    for (i, pixels) in images.pixels.chunks(per_image).enumerate() {
        let (x0, y0) = (GAP + (i as u32 % cols) * (w + GAP), GAP + (i as u32 / cols) * (h + GAP));
        for (p, value) in pixels.chunks(c).enumerate() {
            let byte = |v: f32| v.round().clamp(0.0, 255.0) as u8;
            let rgb = if c == 1 { [byte(value[0]); 3] } else { [byte(value[0]), byte(value[1]), byte(value[2])] };
            grid.put_pixel(x0 + p as u32 % w, y0 + p as u32 / w, image::Rgb(rgb));
        }
    }
    grid.save(out).with_context(|| format!("writing {}", out.display()))
}
