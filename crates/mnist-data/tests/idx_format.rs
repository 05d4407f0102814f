//! The IDX reader and writer: round-trips of every element type, and every malformed input
//! returning its error instead of panicking.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use mnist_data::{
    ElementType, Encoding, IdxArray, IdxError, read_idx, read_idx_file, write_idx, write_idx_file,
};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

fn encode(array: &IdxArray) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_idx(&mut bytes, array).expect("writing to a Vec cannot fail");
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip into a Vec");
    encoder.finish().expect("gzip into a Vec")
}

/// An array of random element type and shape (up to 4 dimensions of up to 5), random contents.
fn any_idx_array() -> impl Strategy<Value = IdxArray> {
    let shape = prop::collection::vec(0usize..=5, 0..=4);
    (shape, 0usize..6, any::<u64>()).prop_map(|(shape, type_index, seed)| {
        let len: usize = shape.iter().product();
        let mut state = seed;
        let mut next = move || {
            // SplitMix64: arbitrary bit patterns, NaNs and infinities included.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut values = |f: &mut dyn FnMut(u64)| (0..len).for_each(|_| f(next()));
        let dims = IxDyn(&shape);
        macro_rules! array_of {
            ($variant:ident, $convert:expr) => {{
                let mut v = Vec::with_capacity(len);
                values(&mut |bits| v.push($convert(bits)));
                IdxArray::$variant(ArrayD::from_shape_vec(dims, v).unwrap())
            }};
        }
        match ElementType::ALL[type_index] {
            ElementType::U8 => array_of!(U8, |b| b as u8),
            ElementType::I8 => array_of!(I8, |b| b as i8),
            ElementType::I16 => array_of!(I16, |b| b as i16),
            ElementType::I32 => array_of!(I32, |b| b as i32),
            ElementType::F32 => array_of!(F32, |b| f32::from_bits(b as u32)),
            ElementType::F64 => array_of!(F64, f64::from_bits),
        }
    })
}

/// Compares arrays bit for bit, so NaN payloads count.
fn same_bits(a: &IdxArray, b: &IdxArray) -> bool {
    a.shape() == b.shape() && a.element_type() == b.element_type() && encode(a) == encode(b)
}

proptest! {
    #[test]
    fn raw_and_gzip_round_trip(array in any_idx_array(), gzipped in any::<bool>()) {
        let raw = encode(&array);
        let expected_len = 4 + 4 * array.shape().len()
            + array.shape().iter().product::<usize>() * array.element_type().size();
        prop_assert_eq!(raw.len(), expected_len);
        let stored = if gzipped { gzip(&raw) } else { raw };
        let parsed = read_idx(stored.as_slice()).unwrap();
        prop_assert!(same_bits(&parsed, &array));
        if let (IdxArray::I16(a), IdxArray::I16(b)) = (&parsed, &array) {
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn every_truncation_is_an_error(array in any_idx_array(), gzipped in any::<bool>(), cut in any::<prop::sample::Index>()) {
        let raw = encode(&array);
        let stored = if gzipped { gzip(&raw) } else { raw };
        let truncated = &stored[..cut.index(stored.len())];
        prop_assert!(read_idx(truncated).is_err());
    }

    #[test]
    fn bit_flips_never_panic(array in any_idx_array(), gzipped in any::<bool>(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let raw = encode(&array);
        let mut stored = if gzipped { gzip(&raw) } else { raw };
        let i = at.index(stored.len());
        stored[i] ^= 1 << bit;
        // A flip inside raw data leaves a valid file; anything may come back but a panic.
        let _ = read_idx(stored.as_slice());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), gz_prefix in any::<bool>()) {
        let bytes = if gz_prefix { [vec![0x1f, 0x8b], bytes].concat() } else { bytes };
        let _ = read_idx(bytes.as_slice());
    }

    #[test]
    fn random_headers_with_matching_magic_never_panic(ty in any::<u8>(), ndims in 0u8..6, rest in prop::collection::vec(any::<u8>(), 0..64)) {
        let bytes = [vec![0, 0, ty, ndims], rest].concat();
        let _ = read_idx(bytes.as_slice());
    }
}

fn header(type_code: u8, dims: &[u32]) -> Vec<u8> {
    let mut bytes = vec![0, 0, type_code, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes
}

#[test]
fn bad_magic_is_reported_with_the_bytes() {
    let err = read_idx([0x01, 0x00, 0x08, 0x01, 0, 0, 0, 0].as_slice()).unwrap_err();
    assert!(matches!(err, IdxError::BadMagic([1, 0, 8, 1])), "{err}");
    assert!(err.to_string().contains("not an IDX file"));
}

#[test]
fn unknown_type_code_is_reported() {
    let err = read_idx(header(0x07, &[1]).as_slice()).unwrap_err();
    assert!(matches!(err, IdxError::UnknownType(0x07)), "{err}");
}

#[test]
fn truncated_headers_say_how_much_was_there() {
    let err = read_idx([0, 0, 8].as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            IdxError::TruncatedHeader {
                expected: 4,
                found: 3
            }
        ),
        "{err}"
    );
    let mut partial = header(0x08, &[3, 4]);
    partial.truncate(9);
    let err = read_idx(partial.as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            IdxError::TruncatedHeader {
                expected: 12,
                found: 9
            }
        ),
        "{err}"
    );
}

#[test]
fn a_size_product_that_overflows_is_an_error() {
    let err = read_idx(header(0x0E, &[u32::MAX, u32::MAX, u32::MAX]).as_slice()).unwrap_err();
    assert!(matches!(err, IdxError::SizeOverflow { .. }), "{err}");
}

#[test]
fn truncated_data_says_expected_and_found() {
    let mut bytes = header(0x0B, &[5]);
    bytes.extend_from_slice(&[0; 7]);
    let err = read_idx(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            IdxError::TruncatedData {
                expected: 10,
                found: 7
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("expected 10"), "{err}");
}

#[test]
fn a_lying_header_claiming_billions_of_images_fails_as_truncated() {
    // 30 bytes claiming 2^32 - 1 images of 28x28: ~3.4 TB promised.
    let mut bytes = header(0x08, &[u32::MAX, 28, 28]);
    bytes.resize(30, 0);
    let err = read_idx(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(err, IdxError::TruncatedData { found: 14, .. }),
        "{err}"
    );
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut bytes = header(0x08, &[2]);
    bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
    let err = read_idx(bytes.as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            IdxError::TrailingBytes {
                expected: 2,
                count: 3
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupt_and_truncated_gzip_are_reported_as_such() {
    let mut raw = header(0x08, &[4096]);
    raw.extend((0..4096u32).map(|i| (i * i % 251) as u8));
    let compressed = gzip(&raw);

    let mut flipped = compressed.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let err = read_idx(flipped.as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            IdxError::CorruptGzip(_)
                | IdxError::TruncatedData { .. }
                | IdxError::TrailingBytes { .. }
        ),
        "{err}"
    );

    // A flipped CRC in the trailer decompresses fine, and only the check catches it.
    let mut bad_crc = compressed.clone();
    let crc_at = bad_crc.len() - 8;
    bad_crc[crc_at] ^= 0xff;
    let err = read_idx(bad_crc.as_slice()).unwrap_err();
    assert!(matches!(err, IdxError::CorruptGzip(_)), "{err}");

    let cut = &compressed[..compressed.len() - 20];
    let err = read_idx(cut).unwrap_err();
    assert!(
        matches!(
            err,
            IdxError::CorruptGzip(_) | IdxError::TruncatedData { .. }
        ),
        "{err}"
    );
}

#[test]
fn gzip_is_detected_from_the_bytes_not_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let array =
        IdxArray::U8(ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1, 2, 3, 4, 5, 6]).unwrap());
    // A gzip file without .gz, and a raw file with it.
    let gz_named_raw = dir.path().join("data.gz");
    let raw_named_gz = dir.path().join("data");
    write_idx_file(&gz_named_raw, &array, Encoding::Raw).unwrap();
    write_idx_file(&raw_named_gz, &array, Encoding::Gzip).unwrap();
    assert_eq!(read_idx_file(&gz_named_raw).unwrap(), array);
    assert_eq!(read_idx_file(&raw_named_gz).unwrap(), array);
    assert_eq!(std::fs::read(&raw_named_gz).unwrap()[..2], [0x1f, 0x8b]);
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken-idx3-ubyte");
    std::fs::write(&path, [0, 0, 8]).unwrap();
    let message = read_idx_file(&path).unwrap_err().to_string();
    assert!(message.contains("broken-idx3-ubyte"), "{message}");
    assert!(message.contains("truncated header"), "{message}");

    let missing = dir.path().join("absent");
    let message = read_idx_file(&missing).unwrap_err().to_string();
    assert!(message.contains("absent"), "{message}");
}

#[test]
fn failed_writes_leave_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("too-many-dims");
    let array = IdxArray::U8(ArrayD::zeros(IxDyn(&[1; 256])));
    let err = write_idx_file(&path, &array, Encoding::Raw).unwrap_err();
    assert!(err.to_string().contains("at most 255"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
