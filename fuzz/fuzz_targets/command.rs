//! Any bytes as a Raft log command or gossip message: the bounded codec
//! refuses or decodes, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_mesh::{Command, codec};

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode::<Command>(data, 1 << 20);
    let _ = codec::decode::<shoal_gossip::message::Message>(data, 1 << 20);
});
