//! Blob requests and responses (model files between peers) must never panic,
//! whatever the bytes, and neither may checking a decoded manifest or block.
#![no_main]

use commons_protocol::blob::{BlobRequest, BlobResponse};
use commons_protocol::codec::{self, Limit};
use commons_protocol::{Hash, ModelId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode::<BlobRequest>(data, Limit::K4);
    if let Ok(BlobResponse::Manifest(m)) = codec::decode::<BlobResponse>(data, Limit::M64) {
        let id = ModelId(Hash([7; 32]));
        let _ = m.check(&id);
        let _ = m.root();
        for index in [0, 1, u32::MAX] {
            let _ = m.verify_block(&id, index, data);
        }
    }
});
