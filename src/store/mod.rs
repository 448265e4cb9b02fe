//! The shared folder: file index with hash cache, chunk hashing, partial downloads.
