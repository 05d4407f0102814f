//! The IDX file format (LeCun's format for MNIST): reading and writing, gzip-compressed or raw.
//!
//! Layout: a magic number `00 00 <type code> <number of dimensions>`, then one big-endian `u32`
//! size per dimension, then the elements in row-major order, big-endian.
//!
//! Architecture invariant: no allocation is sized from a header alone. The header is untrusted;
//! buffers grow only with bytes actually read, so a 30-byte file claiming 2^32 images fails as
//! truncated after reading 30 bytes.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use byteorder::{BigEndian, ByteOrder, WriteBytesExt};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use ndarray::{ArrayD, IxDyn};

use crate::atomic_file::write_atomically;
use crate::error::{DataError, IdxError};

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Initial capacity for the data buffer; it grows with the bytes actually read beyond this.
const INITIAL_DATA_CAPACITY: u64 = 1 << 20;

/// The element type of an IDX array, as coded in the third magic byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElementType {
    /// Unsigned byte, code 0x08.
    U8,
    /// Signed byte, code 0x09.
    I8,
    /// Big-endian 16-bit integer, code 0x0B.
    I16,
    /// Big-endian 32-bit integer, code 0x0C.
    I32,
    /// Big-endian IEEE 754 single, code 0x0D.
    F32,
    /// Big-endian IEEE 754 double, code 0x0E.
    F64,
}

impl ElementType {
    /// Every element type, in code order.
    pub const ALL: [ElementType; 6] = [
        ElementType::U8,
        ElementType::I8,
        ElementType::I16,
        ElementType::I32,
        ElementType::F32,
        ElementType::F64,
    ];

    /// The type for a magic type code, if it names one.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The magic type code.
    pub fn code(self) -> u8 {
        match self {
            ElementType::U8 => 0x08,
            ElementType::I8 => 0x09,
            ElementType::I16 => 0x0B,
            ElementType::I32 => 0x0C,
            ElementType::F32 => 0x0D,
            ElementType::F64 => 0x0E,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElementType::U8 | ElementType::I8 => 1,
            ElementType::I16 => 2,
            ElementType::I32 | ElementType::F32 => 4,
            ElementType::F64 => 8,
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElementType::U8 => "u8",
            ElementType::I8 => "i8",
            ElementType::I16 => "i16",
            ElementType::I32 => "i32",
            ElementType::F32 => "f32",
            ElementType::F64 => "f64",
        })
    }
}

/// An n-dimensional IDX array of any of the six element types.
#[derive(Clone, Debug, PartialEq)]
pub enum IdxArray {
    /// Unsigned bytes (MNIST's images and labels).
    U8(ArrayD<u8>),
    /// Signed bytes.
    I8(ArrayD<i8>),
    /// 16-bit integers.
    I16(ArrayD<i16>),
    /// 32-bit integers.
    I32(ArrayD<i32>),
    /// Single-precision floats.
    F32(ArrayD<f32>),
    /// Double-precision floats.
    F64(ArrayD<f64>),
}

impl IdxArray {
    /// The element type.
    pub fn element_type(&self) -> ElementType {
        match self {
            IdxArray::U8(_) => ElementType::U8,
            IdxArray::I8(_) => ElementType::I8,
            IdxArray::I16(_) => ElementType::I16,
            IdxArray::I32(_) => ElementType::I32,
            IdxArray::F32(_) => ElementType::F32,
            IdxArray::F64(_) => ElementType::F64,
        }
    }

    /// The size of each dimension.
    pub fn shape(&self) -> &[usize] {
        match self {
            IdxArray::U8(a) => a.shape(),
            IdxArray::I8(a) => a.shape(),
            IdxArray::I16(a) => a.shape(),
            IdxArray::I32(a) => a.shape(),
            IdxArray::F32(a) => a.shape(),
            IdxArray::F64(a) => a.shape(),
        }
    }

    /// The array as bytes, or an error naming the type it holds instead.
    pub fn into_u8(self) -> Result<ArrayD<u8>, IdxError> {
        match self {
            IdxArray::U8(a) => Ok(a),
            other => Err(IdxError::WrongType {
                expected: ElementType::U8,
                found: other.element_type(),
            }),
        }
    }
}

/// Reads one IDX array from a reader, gzip-compressed or raw (told apart by the first bytes).
pub fn read_idx(mut reader: impl Read) -> Result<IdxArray, IdxError> {
    let mut prefix = [0u8; 2];
    let found = read_up_to(&mut reader, &mut prefix).map_err(IdxError::Io)?;
    let rest = io::Cursor::new(prefix).take(found as u64).chain(reader);
    if found == 2 && prefix == GZIP_MAGIC {
        read_raw_idx(MultiGzDecoder::new(rest), Stream::Gzip)
    } else {
        read_raw_idx(rest, Stream::Raw)
    }
}

/// Reads one IDX array from a file, gzip-compressed or raw; errors name the file.
pub fn read_idx_file(path: &Path) -> Result<IdxArray, DataError> {
    let file = File::open(path).map_err(|e| DataError::in_file(path, IdxError::Io(e)))?;
    read_idx(BufReader::with_capacity(1 << 16, file)).map_err(|e| DataError::in_file(path, e))
}

/// Writes one IDX array, raw, in the big-endian layout every IDX reader expects.
pub fn write_idx(mut writer: impl Write, array: &IdxArray) -> Result<(), IdxError> {
    let shape = array.shape();
    let ndims = u8::try_from(shape.len())
        .map_err(|_| IdxError::Unwritable(format!("{} dimensions, at most 255", shape.len())))?;
    let mut header = vec![0, 0, array.element_type().code(), ndims];
    for &dim in shape {
        let dim = u32::try_from(dim)
            .map_err(|_| IdxError::Unwritable(format!("dimension size {dim} over u32::MAX")))?;
        header.extend_from_slice(&dim.to_be_bytes());
    }
    let mut out = BufWriter::new(&mut writer);
    out.write_all(&header).map_err(IdxError::Io)?;
    // `iter()` walks in logical row-major order whatever the memory layout, as IDX requires.
    let written: io::Result<()> = match array {
        IdxArray::U8(a) => a.iter().try_for_each(|&x| out.write_u8(x)),
        IdxArray::I8(a) => a.iter().try_for_each(|&x| out.write_i8(x)),
        IdxArray::I16(a) => a.iter().try_for_each(|&x| out.write_i16::<BigEndian>(x)),
        IdxArray::I32(a) => a.iter().try_for_each(|&x| out.write_i32::<BigEndian>(x)),
        IdxArray::F32(a) => a.iter().try_for_each(|&x| out.write_f32::<BigEndian>(x)),
        IdxArray::F64(a) => a.iter().try_for_each(|&x| out.write_f64::<BigEndian>(x)),
    };
    written.and_then(|()| out.flush()).map_err(IdxError::Io)
}

/// Whether an IDX file is written gzip-compressed or raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Plain IDX bytes.
    Raw,
    /// gzip-compressed IDX bytes (what the public mirrors serve).
    Gzip,
}

/// Writes one IDX array to a file atomically: a crash leaves the old file or none, never half.
pub fn write_idx_file(path: &Path, array: &IdxArray, encoding: Encoding) -> Result<(), DataError> {
    write_atomically(path, |file| match encoding {
        Encoding::Raw => write_idx(file, array),
        Encoding::Gzip => {
            let mut encoder = GzEncoder::new(file, Compression::default());
            write_idx(&mut encoder, array)?;
            encoder.finish().map(drop).map_err(IdxError::Io)
        }
    })
}

/// Whether the bytes being parsed come through a gzip decoder, which decides how to report
/// read errors: inside a gzip stream, malformed input means the compressed file is corrupt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Raw,
    Gzip,
}

impl Stream {
    fn error(self, e: io::Error) -> IdxError {
        let malformed = matches!(
            e.kind(),
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
        );
        if self == Stream::Gzip && malformed {
            IdxError::CorruptGzip(e)
        } else {
            IdxError::Io(e)
        }
    }
}

/// Parses uncompressed IDX bytes.
fn read_raw_idx(mut reader: impl Read, stream: Stream) -> Result<IdxArray, IdxError> {
    let mut magic = [0u8; 4];
    read_header(&mut reader, &mut magic, 0, stream)?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(IdxError::BadMagic(magic));
    }
    let element_type = ElementType::from_code(magic[2]).ok_or(IdxError::UnknownType(magic[2]))?;
    let ndims = usize::from(magic[3]);

    let mut dim_bytes = vec![0u8; 4 * ndims];
    read_header(&mut reader, &mut dim_bytes, magic.len(), stream)?;
    let dims: Vec<u32> = dim_bytes.chunks_exact(4).map(BigEndian::read_u32).collect();
    let overflow = || IdxError::SizeOverflow {
        dims: dims.clone(),
        element_type,
    };
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let byte_len = count
        .checked_mul(element_type.size())
        .filter(|&n| isize::try_from(n).is_ok())
        .ok_or_else(overflow)? as u64;

    let mut bytes = Vec::with_capacity(byte_len.min(INITIAL_DATA_CAPACITY) as usize);
    let found = (&mut reader)
        .take(byte_len)
        .read_to_end(&mut bytes)
        .map_err(|e| stream.error(e))? as u64;
    if found < byte_len {
        return Err(IdxError::TruncatedData {
            expected: byte_len,
            found,
        });
    }
    // Reading to the end also makes the gzip decoder check the stream's CRC and length.
    let trailing = io::copy(&mut reader, &mut io::sink()).map_err(|e| stream.error(e))?;
    if trailing > 0 {
        return Err(IdxError::TrailingBytes {
            expected: byte_len,
            count: trailing,
        });
    }
    Ok(decode(element_type, shape, bytes))
}

/// Fills `buf` from the header, or reports how much of the header was present.
fn read_header(
    reader: &mut impl Read,
    buf: &mut [u8],
    already_read: usize,
    stream: Stream,
) -> Result<(), IdxError> {
    let found = read_up_to(reader, buf).map_err(|e| stream.error(e))?;
    if found < buf.len() {
        return Err(IdxError::TruncatedHeader {
            expected: already_read + buf.len(),
            found: already_read + found,
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Turns big-endian data bytes into a typed array; `bytes.len()` is the shape's byte size.
fn decode(element_type: ElementType, shape: Vec<usize>, bytes: Vec<u8>) -> IdxArray {
    fn typed<T: Clone + Default>(
        shape: Vec<usize>,
        bytes: &[u8],
        size: usize,
        read_into: fn(&[u8], &mut [T]),
    ) -> ArrayD<T> {
        let mut values = vec![T::default(); bytes.len() / size];
        read_into(bytes, &mut values);
        into_array(shape, values)
    }
    match element_type {
        ElementType::U8 => IdxArray::U8(into_array(shape, bytes)),
        ElementType::I8 => IdxArray::I8(into_array(
            shape,
            bytes.into_iter().map(|b| b as i8).collect(),
        )),
        ElementType::I16 => IdxArray::I16(typed(shape, &bytes, 2, BigEndian::read_i16_into)),
        ElementType::I32 => IdxArray::I32(typed(shape, &bytes, 4, BigEndian::read_i32_into)),
        ElementType::F32 => IdxArray::F32(typed(shape, &bytes, 4, BigEndian::read_f32_into)),
        ElementType::F64 => IdxArray::F64(typed(shape, &bytes, 8, BigEndian::read_f64_into)),
    }
}

fn into_array<T>(shape: Vec<usize>, values: Vec<T>) -> ArrayD<T> {
    // The caller read exactly product(shape) elements, so the shape always fits.
    match ArrayD::from_shape_vec(IxDyn(&shape), values) {
        Ok(array) => array,
        Err(e) => unreachable!("element count checked against the shape: {e}"),
    }
}
