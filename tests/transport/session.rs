//! Whole KV transfers through the session layer.
