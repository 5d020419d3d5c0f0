//! Errors of the codec crate.
//!
//! Two kinds: [`DecodeError`] is small, `Copy` and exact, so tests and fuzz targets can assert
//! the variant a hostile input produced; [`CodecError`] wraps it together with the errors of
//! encoding, file handling and I/O.

/// Why a bitstream (a file header or a layer block) was rejected.
///
/// Every variant is produced without panicking and before any allocation that the input's
/// length fields alone would have asked for.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before a field that the format requires.
    #[error("truncated input: needed {needed} more bytes at offset {offset}")]
    Truncated {
        /// Byte offset where the missing field starts.
        offset: usize,
        /// How many bytes were missing.
        needed: usize,
    },
    /// The magic bytes are not those of a kvwire file or block.
    #[error("bad magic: not a kvwire bitstream")]
    BadMagic,
    /// The format version is not one this build reads.
    #[error("unsupported format version {0} (this build reads version {supported})", supported = crate::container::FORMAT_VERSION)]
    UnsupportedVersion(u8),
    /// Bits the format reserves are set.
    #[error("reserved bits set in {0}")]
    ReservedBits(&'static str),
    /// A header field holds a value outside its documented range.
    #[error("invalid header field {field}: {value}")]
    InvalidField {
        /// The field's name as FORMAT.md spells it.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// The CRC32C of a header or block does not match its bytes.
    #[error("checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Which part failed (`header` or `block`).
        what: &'static str,
        /// CRC stored in the stream.
        stored: u32,
        /// CRC computed over the bytes received.
        computed: u32,
    },
    /// An entropy-coded stream did not end in the state its encoder left it in, or ran past
    /// its bytes: the payload is corrupt.
    #[error("corrupt entropy-coded stream {stream}")]
    CorruptStream {
        /// Index of the stream within its block.
        stream: usize,
    },
    /// A block names a layer or token range that does not fit the header's shape, or repeats one.
    #[error("block for layer {layer}, tokens {token_start}+{tokens} does not fit the shape")]
    BlockOutOfRange {
        /// Layer index in the block header.
        layer: u32,
        /// First token in the block header.
        token_start: u32,
        /// Token count in the block header.
        tokens: u32,
    },
    /// Bytes follow the last block, or a block's payload length disagrees with its contents.
    #[error("trailing bytes: {0} bytes after the end of the data")]
    TrailingBytes(usize),
    /// A stream decoded a symbol outside the alphabet of its level.
    #[error("symbol out of range in stream {stream}")]
    SymbolOutOfRange {
        /// Index of the stream within its block.
        stream: usize,
    },
    /// The file ended before every layer block was seen.
    #[error("missing blocks: {missing} of {expected} token-layer blocks absent")]
    MissingBlocks {
        /// How many blocks were absent.
        missing: usize,
        /// How many the header announced.
        expected: usize,
    },
}

/// Every error the codec returns.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A bitstream was rejected.
    #[error("bad bitstream")]
    Decode(#[from] DecodeError),
    /// A KV cache's bytes do not match the shape, dtype or layout given for them.
    #[error("invalid KV cache: {0}")]
    InvalidKv(String),
    /// The input holds a value the lossy levels cannot represent (NaN or infinity).
    #[error(
        "non-finite value in layer {layer} ({part}) token {token}: lossy levels need finite input"
    )]
    NonFinite {
        /// Layer index.
        layer: usize,
        /// `K` or `V`.
        part: &'static str,
        /// Token index.
        token: usize,
    },
    /// An option is outside what the level supports.
    #[error("unsupported option: {0}")]
    Unsupported(String),
    /// A safetensors file could not be parsed or written.
    #[error("safetensors: {0}")]
    SafeTensors(String),
    /// An output buffer is too small.
    #[error("output buffer too small: need {needed} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes required.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The output buffer could not be allocated.
    #[error("cannot allocate {bytes} bytes for the decoded cache")]
    Alloc {
        /// Bytes requested.
        bytes: usize,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The codec's result type.
pub type Result<T, E = CodecError> = std::result::Result<T, E>;
