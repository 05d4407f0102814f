//! The per-epoch history as CSV, for spreadsheets and plotting.

use std::fmt::Write;

use crate::fit::EpochRecord;

/// `history.csv`: one row per epoch; validation columns are empty without a validation set.
pub fn history_csv(records: &[EpochRecord]) -> String {
    let mut csv = String::from(
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,learning_rate,seconds,images_per_second\n",
    );
    let optional = |v: Option<f32>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    for r in records {
        let _ = writeln!(
            csv,
            "{},{:.6},{:.6},{},{},{:e},{:.3},{:.1}",
            r.epoch,
            r.train_loss,
            r.train_accuracy,
            optional(r.val_loss),
            optional(r.val_accuracy),
            r.learning_rate,
            r.seconds,
            r.images_per_second
        );
    }
    csv
}
