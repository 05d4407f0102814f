//! The crate's errors: what went wrong with the bytes of a stream, and which file it was.

use std::io;
use std::path::PathBuf;

use crate::idx::ElementType;

/// A problem with the bytes of one IDX stream; [`DataError::File`] adds the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The stream starts like gzip but does not decompress.
    #[error("corrupt gzip stream: {0}")]
    CorruptGzip(io::Error),
    /// The stream ended inside the header.
    #[error("truncated header: expected {expected} header bytes, found {found}")]
    TruncatedHeader {
        /// Header bytes the format requires at this point.
        expected: usize,
        /// Header bytes actually present.
        found: usize,
    },
    /// The first two bytes are not the zeros every IDX file starts with.
    #[error(
        "not an IDX file: magic bytes are {0:02x?}, expected [00, 00, <type code>, <number of dimensions>]"
    )]
    BadMagic([u8; 4]),
    /// The third magic byte names no IDX element type.
    #[error(
        "unknown IDX element type code 0x{0:02x} (known: 0x08 u8, 0x09 i8, 0x0b i16, 0x0c i32, 0x0d f32, 0x0e f64)"
    )]
    UnknownType(u8),
    /// The dimension sizes multiply to more bytes than this machine can address.
    #[error("dimension sizes {dims:?} of {element_type} overflow the addressable size")]
    SizeOverflow {
        /// The sizes the header claims.
        dims: Vec<u32>,
        /// The element type the header claims.
        element_type: ElementType,
    },
    /// Fewer data bytes are present than the header promises.
    #[error("truncated data: expected {expected} bytes of data after the header, found {found}")]
    TruncatedData {
        /// Bytes the header promises.
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },
    /// Bytes follow the data the header describes.
    #[error("{count} trailing bytes after the {expected} bytes of data the header describes")]
    TrailingBytes {
        /// Bytes the header describes.
        expected: u64,
        /// Bytes after them.
        count: u64,
    },
    /// The array holds a different element type than the caller needs.
    #[error("holds {found} elements, expected {expected}")]
    WrongType {
        /// The type the caller needs.
        expected: ElementType,
        /// The type in the file.
        found: ElementType,
    },
    /// The array has a different number of dimensions than the caller needs.
    #[error("has shape {shape:?}, expected {expected} dimensions ({meaning})")]
    WrongRank {
        /// The shape in the file.
        shape: Vec<usize>,
        /// The number of dimensions the caller needs.
        expected: usize,
        /// What those dimensions are, e.g. "images, rows, columns".
        meaning: &'static str,
    },
    /// An array cannot be written as IDX (a dimension over `u32::MAX`, or over 255 dimensions).
    #[error("cannot be written as IDX: {0}")]
    Unwritable(String),
}

/// Everything that can go wrong loading, transforming or batching a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written, or its contents are invalid.
    // Causes are in the messages, and so not also `source`s: printed with their chain, they
    // would appear twice.
    #[error("{}: {error}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: IdxError,
    },
    /// A dataset directory lacks one of its files.
    #[error("{}: no {wanted} file (looked for {})", dir.display(), candidates.join(", "))]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// What was being looked for, e.g. "training images".
        wanted: &'static str,
        /// Every file name tried.
        candidates: Vec<String>,
    },
    /// An image file and its label file disagree on the number of examples.
    #[error("{} holds {images} images but {} holds {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// Images in it.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// Labels in it.
        labels: usize,
    },
    /// A label is not a valid class index.
    #[error("{}: label {label} at index {index} is outside the {classes} classes 0..{classes}", path.display())]
    LabelOutOfRange {
        /// The label file.
        path: PathBuf,
        /// Position of the label.
        index: usize,
        /// The label.
        label: u8,
        /// Number of classes expected.
        classes: usize,
    },
    /// Images are not the size the model expects.
    #[error("{}: images are {rows}x{cols}, but {expected_rows}x{expected_cols} is expected", path.display())]
    ImageSize {
        /// The image file.
        path: PathBuf,
        /// Rows per image in the file.
        rows: usize,
        /// Columns per image in the file.
        cols: usize,
        /// Rows expected.
        expected_rows: usize,
        /// Columns expected.
        expected_cols: usize,
    },
    /// An image file could not be read or holds no digit.
    #[error("{}: {problem}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A label is not a valid class index (for labels not read from a file).
    #[error("label {label} at index {index} is outside the {classes} classes 0..{classes}")]
    InvalidLabel {
        /// Position of the label.
        index: usize,
        /// The label.
        label: u8,
        /// Number of classes.
        classes: usize,
    },
    /// A caller-supplied argument is impossible, e.g. a batch size of 0.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl DataError {
    /// Attaches a file path to a stream-level error.
    pub fn in_file(path: impl Into<PathBuf>, error: IdxError) -> Self {
        DataError::File {
            path: path.into(),
            error,
        }
    }
}
