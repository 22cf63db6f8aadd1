//! Seeded, replayable publish workloads: new users, value changes, identical republishes, and a
//! few heavy users with one version per epoch (so marker versions matter in history proofs).

use akd_core::{AkdLabel, AkdValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One publish batch per intended epoch.
pub struct Workload {
    pub batches: Vec<Vec<(AkdLabel, AkdValue)>>,
    /// Labels updated in every batch.
    pub heavy: Vec<AkdLabel>,
}

fn value(rng: &mut StdRng) -> AkdValue {
    let len = rng.random_range(1..48);
    AkdValue((0..len).map(|_| rng.random()).collect())
}

/// `epochs` batches; the first seeds `initial` users, every later one mixes new users, value
/// changes, identical republishes and an update of every heavy user.
pub fn random(seed: u64, epochs: usize, initial: usize, heavy: usize) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut users: Vec<(AkdLabel, AkdValue)> = Vec::new();
    let heavy_labels: Vec<AkdLabel> = (0..heavy)
        .map(|i| AkdLabel::from(format!("heavy-{seed}-{i}").as_str()))
        .collect();
    let mut heavy_values: Vec<AkdValue> = heavy_labels.iter().map(|_| value(&mut rng)).collect();
    let mut batches = Vec::new();
    for epoch in 0..epochs {
        let mut batch: Vec<(AkdLabel, AkdValue)> = Vec::new();
        let mut touched = std::collections::HashSet::new();
        let n_new = if epoch == 0 {
            initial
        } else {
            rng.random_range(1..6)
        };
        for _ in 0..n_new {
            let label = AkdLabel::from(format!("user-{seed}-{}", users.len()).as_str());
            let new_value = value(&mut rng);
            users.push((label.clone(), new_value.clone()));
            touched.insert(label.clone());
            batch.push((label, new_value));
        }
        if epoch > 0 {
            for _ in 0..rng.random_range(0..6) {
                let index = rng.random_range(0..users.len());
                if !touched.insert(users[index].0.clone()) {
                    continue;
                }
                if rng.random_bool(0.3) {
                    // Identical republish: must not create a version.
                    batch.push(users[index].clone());
                } else {
                    users[index].1 = value(&mut rng);
                    batch.push(users[index].clone());
                }
            }
        }
        for (label, current) in heavy_labels.iter().zip(heavy_values.iter_mut()) {
            *current = value(&mut rng);
            batch.push((label.clone(), current.clone()));
        }
        batches.push(batch);
    }
    Workload {
        batches,
        heavy: heavy_labels,
    }
}
