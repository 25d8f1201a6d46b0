#![no_main]
// The safetensors loader and the checkpoint header metadata.
libfuzzer_sys::fuzz_target!(|data: &[u8]| lockstep_nn::fuzz::checkpoint(data));
