//! One-hot encoding of class labels, for losses that take probability targets.

use ndarray::{Array2, ArrayView1};

use crate::error::DataError;

/// A `[labels, classes]` matrix with a single 1.0 per row at the label's column.
pub fn one_hot(labels: ArrayView1<'_, u8>, classes: usize) -> Result<Array2<f32>, DataError> {
    let mut encoded = Array2::zeros((labels.len(), classes));
    for (index, (&label, mut row)) in labels.iter().zip(encoded.rows_mut()).enumerate() {
        let column = usize::from(label);
        if column >= classes {
            return Err(DataError::InvalidLabel {
                index,
                label,
                classes,
            });
        }
        row[column] = 1.0;
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, aview1};

    #[test]
    fn encodes_each_label_as_its_column() {
        let encoded = one_hot(aview1(&[2, 0, 1]), 3).unwrap();
        assert_eq!(
            encoded,
            array![[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
        );
    }

    #[test]
    fn rejects_a_label_outside_the_classes() {
        let err = one_hot(aview1(&[1, 10]), 10).unwrap_err();
        assert!(matches!(
            err,
            DataError::InvalidLabel {
                index: 1,
                label: 10,
                classes: 10
            }
        ));
    }
}
