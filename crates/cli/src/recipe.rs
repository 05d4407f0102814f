//! Named recipes: an architecture and the settings it trains with, measured and documented in
//! the README (`mnist train --recipe <name>`; any flag given explicitly overrides the recipe's).

use nn::Schedule;

/// A recipe's settings; the others keep `mnist train`'s defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    /// The recipe's name.
    pub name: &'static str,
    /// The preset it trains.
    pub model: &'static str,
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Adam's peak learning rate.
    pub learning_rate: f32,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Label smoothing of the cross-entropy targets.
    pub label_smoothing: f32,
    /// Whether to augment the training images (the tutorial's rotation, zoom and shift).
    pub augment: bool,
}

/// The recipes' names.
pub const RECIPES: [&str; 2] = ["fast", "best"];

/// A recipe by name. Both train on all 60,000 images (no validation split unless one is
/// asked for) with Adam and the one-cycle schedule; how each was chosen is in the README.
pub fn recipe(name: &str) -> Option<Recipe> {
    let one_cycle = Schedule::OneCycle {
        pct_start: 0.3,
        div_factor: 25.0,
        final_div_factor: 1e4,
    };
    match name {
        // The least training time to 99% test accuracy: a small BatchNorm network, two epochs.
        "fast" => Some(Recipe {
            name: "fast",
            model: "fast-cnn",
            epochs: 2,
            batch_size: 128,
            learning_rate: 0.03,
            schedule: one_cycle,
            label_smoothing: 0.1,
            augment: false,
        }),
        // The best single model in 15 minutes on 2 cores: bn-cnn with augmentation.
        "best" => Some(Recipe {
            name: "best",
            model: "bn-cnn",
            epochs: 8,
            batch_size: 64,
            learning_rate: 0.003,
            schedule: one_cycle,
            label_smoothing: 0.0,
            augment: true,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_trains_a_preset() {
        for name in RECIPES {
            let recipe = recipe(name).unwrap_or_else(|| panic!("no recipe {name}"));
            assert_eq!(recipe.name, name);
            assert!(
                nn::preset(recipe.model).is_some(),
                "{name}: no preset {}",
                recipe.model
            );
        }
        assert!(recipe("slow").is_none());
    }
}
