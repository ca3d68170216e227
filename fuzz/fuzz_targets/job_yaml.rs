#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| muster_fuzz_targets::job_yaml(data));
