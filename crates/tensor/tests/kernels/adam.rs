//! The Adam update against PyTorch's formula, written value by value.

use proptest::prelude::*;
use tensor::{AdamStep, adam_update};

use crate::reference::Values;

/// `torch.optim.Adam` / `AdamW` on one value, in the order of operations the kernel documents.
fn reference(s: &AdamStep, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
    let g = if s.decoupled {
        *p *= 1.0 - s.lr * s.weight_decay;
        g
    } else {
        g + s.weight_decay * *p
    };
    *m = s.beta1 * *m + (1.0 - s.beta1) * g;
    *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
    *p -= s.step_size * *m / (v.sqrt() / s.bias2_sqrt + s.eps);
}

proptest! {
    #[test]
    fn adam_update_gives_the_bits_of_the_formula(
        // Around a vector, and around the size that splits over threads.
        len in prop_oneof![0usize..100, 32_760usize..32_800, 50_000usize..50_050],
        decoupled in any::<bool>(),
        t in 1i32..2000,
        seed in any::<u64>(),
    ) {
        let mut values = Values::new(seed);
        let (lr, beta1, beta2) = (1e-3f32, 0.9f32, 0.999f32);
        let step = AdamStep {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay: if decoupled { 0.01 } else { 1e-4 },
            decoupled,
            step_size: (f64::from(lr) / (1.0 - f64::from(beta1).powi(t))) as f32,
            bias2_sqrt: (1.0 - f64::from(beta2).powi(t)).sqrt() as f32,
        };
        let mut draw = |scale: f32| -> Vec<f32> { (0..len).map(|_| values.next() * scale).collect() };
        let (p, g, m) = (draw(1.0), draw(0.1), draw(0.01));
        let v: Vec<f32> = draw(1e-3).iter().map(|x| x * x).collect();
        let (mut p_ref, mut m_ref, mut v_ref) = (p.clone(), m.clone(), v.clone());
        for i in 0..len {
            reference(&step, &mut p_ref[i], g[i], &mut m_ref[i], &mut v_ref[i]);
        }
        let (mut p, mut m, mut v) = (p, m, v);
        adam_update(&step, &mut p, &g, &mut m, &mut v).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&p), bits(&p_ref));
        prop_assert_eq!(bits(&m), bits(&m_ref));
        prop_assert_eq!(bits(&v), bits(&v_ref));
        prop_assert!(adam_update(&step, &mut p, &g[..len.saturating_sub(1)], &mut m, &mut v).is_err() || len == 0);
    }
}
