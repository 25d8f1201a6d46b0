//! Pipeline placement (T42): which contiguous run of layers each stage holds. Automatic
//! placement balances a cost of FLOPs and parameter memory; an explicit placement lists the
//! layers of each stage by name. Both are checked before any worker starts.

use std::ops::Range;

/// What placement needs to know about one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCost {
    pub name: String,
    pub params: u64,
    /// Forward FLOPs per example.
    pub flops: u64,
}

/// The layers of each stage, as index ranges into the model's layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub stages: Vec<Range<usize>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("parallel.pipeline_stages = {stages} but the model has only {layers} layers with work to split")]
    TooManyStages { stages: usize, layers: usize },
    #[error("parallel.placement lists {listed} stages but parallel.pipeline_stages = {stages}")]
    StageCount { listed: usize, stages: usize },
    #[error("parallel.placement: stage {stage} is empty")]
    EmptyStage { stage: usize },
    #[error("parallel.placement: no layer named {name:?} (the model's layers: {known})")]
    Unknown { name: String, known: String },
    #[error("parallel.placement: layer {name:?} is listed twice")]
    Repeated { name: String },
    #[error("parallel.placement: layer {name:?} is missing; every layer must be on exactly one stage")]
    Skipped { name: String },
    #[error(
        "parallel.placement: stage {stage} lists {name:?} out of order; stages hold consecutive layers, in model order"
    )]
    OutOfOrder { stage: usize, name: String },
}

impl Placement {
    /// Contiguous stages minimising the largest stage cost, where a layer's cost is its
    /// share of the model's FLOPs plus its share of the parameters (time and memory both
    /// count). Exact, by dynamic programming over split points.
    pub fn balanced(layers: &[LayerCost], stages: usize) -> Result<Self, PlacementError> {
        let n = layers.len();
        if stages == 0 || stages > n {
            return Err(PlacementError::TooManyStages { stages, layers: n });
        }
        let total_flops = layers.iter().map(|l| l.flops).sum::<u64>().max(1) as f64;
        let total_params = layers.iter().map(|l| l.params).sum::<u64>().max(1) as f64;
        let cost: Vec<f64> =
            layers.iter().map(|l| l.flops as f64 / total_flops + l.params as f64 / total_params).collect();
        let mut prefix = vec![0.0; n + 1];
        for i in 0..n {
            prefix[i + 1] = prefix[i] + cost[i];
        }
        let span = |a: usize, b: usize| prefix[b] - prefix[a];
        // best[k][j]: the least possible max stage cost putting layers [0, j) on k stages.
        let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
        let mut cut = vec![vec![0usize; n + 1]; stages + 1];
        best[0][0] = 0.0;
        for k in 1..=stages {
            for j in k..=n {
                for i in (k - 1)..j {
                    let candidate = best[k - 1][i].max(span(i, j));
                    // Ties go to the later cut: earlier stages a little lighter, as the
                    // last stage also computes the loss.
                    if candidate <= best[k][j] {
                        best[k][j] = candidate;
                        cut[k][j] = i;
                    }
                }
            }
        }
        let mut ranges = Vec::with_capacity(stages);
        let mut end = n;
        for k in (1..=stages).rev() {
            let start = cut[k][end];
            ranges.push(start..end);
            end = start;
        }
        ranges.reverse();
        Ok(Self { stages: ranges })
    }

    /// The placement `listed` spells out by layer name, checked: every layer exactly once,
    /// in model order, no empty stage.
    pub fn explicit(layers: &[LayerCost], listed: &[Vec<String>], stages: usize) -> Result<Self, PlacementError> {
        if listed.len() != stages {
            return Err(PlacementError::StageCount { listed: listed.len(), stages });
        }
        let index = |name: &str| layers.iter().position(|l| l.name == name);
        let mut seen = vec![false; layers.len()];
        let mut next = 0;
        let mut ranges = Vec::with_capacity(stages);
        for (stage, names) in listed.iter().enumerate() {
            if names.is_empty() {
                return Err(PlacementError::EmptyStage { stage });
            }
            let start = next;
            for name in names {
                let Some(i) = index(name) else {
                    let known = layers.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ");
                    return Err(PlacementError::Unknown { name: name.clone(), known });
                };
                if seen[i] {
                    return Err(PlacementError::Repeated { name: name.clone() });
                }
                seen[i] = true;
                if i != next {
                    return match (next..i).find(|&j| !seen[j]) {
                        Some(j) if i > next => Err(PlacementError::Skipped { name: layers[j].name.clone() }),
                        _ => Err(PlacementError::OutOfOrder { stage, name: name.clone() }),
                    };
                }
                next += 1;
            }
            ranges.push(start..next);
        }
        if let Some(j) = seen.iter().position(|s| !s) {
            return Err(PlacementError::Skipped { name: layers[j].name.clone() });
        }
        Ok(Self { stages: ranges })
    }

    /// A table of the placement: layers, parameters and FLOPs per stage.
    pub fn describe(&self, layers: &[LayerCost]) -> String {
        let mut out = format!("{:<6} {:<36} {:>12} {:>16}\n", "stage", "layers", "params", "FLOPs/example");
        for (s, r) in self.stages.iter().enumerate() {
            let names: Vec<&str> = layers[r.clone()].iter().map(|l| l.name.as_str()).collect();
            let names = if names.len() > 4 {
                format!("{} .. {} ({})", names[0], names[names.len() - 1], names.len())
            } else {
                names.join(", ")
            };
            let params: u64 = layers[r.clone()].iter().map(|l| l.params).sum();
            let flops: u64 = layers[r.clone()].iter().map(|l| l.flops).sum();
            out += &format!("{s:<6} {names:<36} {params:>12} {flops:>16}\n");
        }
        out
    }
}

/// Each layer's name, parameter count and forward FLOPs per example.
pub fn layer_costs<B: lockstep_kernels::Backend>(model: &lockstep_nn::Sequential<B>) -> Vec<LayerCost> {
    model
        .layers
        .iter()
        .map(|l| LayerCost {
            name: l.name().to_string(),
            params: l.params().iter().map(|p| p.numel() as u64).sum(),
            flops: l.flops_per_example(),
        })
        .collect()
}

/// The placement a job asks for on `model`: its explicit list, or balanced.
pub fn place<B: lockstep_kernels::Backend>(
    model: &lockstep_nn::Sequential<B>,
    spec: &lockstep_proto::JobSpec,
) -> Result<(Placement, Vec<LayerCost>), PlacementError> {
    let costs = layer_costs(model);
    let p = &spec.parallel;
    let placement = if p.placement.is_empty() {
        Placement::balanced(&costs, p.pipeline_stages)?
    } else {
        Placement::explicit(&costs, &p.placement, p.pipeline_stages)?
    };
    Ok((placement, costs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(costs: &[(u64, u64)]) -> Vec<LayerCost> {
        costs
            .iter()
            .enumerate()
            .map(|(i, &(params, flops))| LayerCost { name: format!("l{i}"), params, flops })
            .collect()
    }

    fn names(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter().map(|s| s.iter().map(|n| n.to_string()).collect()).collect()
    }

    #[test]
    fn balanced_placement_minimises_the_heaviest_stage() {
        // Equal layers split evenly.
        let even = layers(&[(10, 100); 8]);
        assert_eq!(Placement::balanced(&even, 2).unwrap().stages, vec![0..4, 4..8]);
        assert_eq!(Placement::balanced(&even, 4).unwrap().stages, vec![0..2, 2..4, 4..6, 6..8]);
        // One heavy layer gets a stage of its own.
        let heavy = layers(&[(1, 1), (1, 1), (100, 100), (1, 1)]);
        let p = Placement::balanced(&heavy, 3).unwrap();
        assert!(p.stages.contains(&(2..3)), "{p:?}");
        // Exhaustive check on a small case: no contiguous split has a lighter heaviest stage.
        let mixed = layers(&[(5, 50), (1, 400), (30, 10), (2, 2), (8, 90), (40, 5)]);
        let p = Placement::balanced(&mixed, 3).unwrap();
        let cost = |r: &Range<usize>| -> f64 {
            let (tf, tp) = (557.0, 86.0);
            mixed[r.clone()].iter().map(|l| l.flops as f64 / tf + l.params as f64 / tp).sum()
        };
        let worst = p.stages.iter().map(cost).fold(0.0, f64::max);
        for a in 1..6 {
            for b in a + 1..6 {
                let other = [0..a, a..b, b..6].iter().map(cost).fold(0.0, f64::max);
                assert!(worst <= other + 1e-12, "{p:?} vs cuts {a},{b}");
            }
        }
    }

    #[test]
    fn invalid_placements_are_named() {
        let l = layers(&[(1, 1); 4]);
        assert_eq!(Placement::balanced(&l, 5).unwrap_err(), PlacementError::TooManyStages { stages: 5, layers: 4 });
        let ok = Placement::explicit(&l, &names(&[&["l0"], &["l1", "l2", "l3"]]), 2).unwrap();
        assert_eq!(ok.stages, vec![0..1, 1..4]);
        let err = |v: &[&[&str]], p: usize| Placement::explicit(&l, &names(v), p).unwrap_err().to_string();
        assert!(err(&[&["l0", "l1"], &["l3"]], 2).contains("\"l2\" is missing"));
        assert!(err(&[&["l0", "l1"], &["l1", "l2", "l3"]], 2).contains("\"l1\" is listed twice"));
        assert!(err(&[&["l0", "l1"], &["l2"]], 2).contains("\"l3\" is missing"));
        assert!(
            err(&[&["l1", "l0"], &["l2", "l3"]], 2).contains("missing")
                || err(&[&["l1", "l0"], &["l2", "l3"]], 2).contains("order")
        );
        assert!(err(&[&["l0"], &["l1", "l9"]], 2).contains("no layer named \"l9\""));
        assert!(err(&[&["l0", "l1", "l2", "l3"], &[]], 2).contains("stage 1 is empty"));
        assert!(err(&[&["l0", "l1", "l2", "l3"]], 2).contains("lists 1 stages"));
    }
}
