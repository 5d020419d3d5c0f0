//! Shipping KV caches over a connection: the sender encodes each (layer, chunk) block into
//! a send buffer and writes it, with an immediate naming (slot, layer, chunk), into a slot
//! of the receiver's registered region; the receiver decodes each block as it lands, gives
//! the slot back, and hands finished layers out in order. Slots and send buffers are
//! bounded, so memory stays bounded whatever the cache size; the receiver confirms the
//! transfer only when every block passed its CRC and decoded.

use kvwire_codec::model::ModelRole;

pub mod msg;
mod recv;
mod send;

pub(crate) use recv::layer_bytes;
pub use recv::{recv_kv, KvReceiver, RecvOptions, RecvSlots, RecvStats};
pub use send::{send_kv, KvSender, SendOptions, SendStats};

/// Builds the model tables of `header`'s level that `role` needs on a thread of their own,
/// if it has any not built yet (a coder needing them meanwhile waits for them, or builds
/// them itself).
fn prepare_tables(header: &kvwire_codec::Header, role: ModelRole) {
    if header.models_ready(role) {
        return;
    }
    let header = header.clone();
    let _ = std::thread::Builder::new()
        .name("kvwire-tables".into())
        .spawn(move || header.prepare_models(role));
}
