//! `POST /api/translate` bodies: parsing never panics, an error is a 4xx, and an accepted
//! request is within every limit the handler relies on.
#![no_main]

use ampserve::http::parse_translate_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_translate_body(data) {
        Ok(r) => {
            assert!(!r.texts.is_empty() && r.texts.len() <= 64);
            assert_eq!(r.texts.len(), r.fields.len());
            assert!(r.texts.iter().all(|t| !t.trim().is_empty()));
            assert!((1..=16).contains(&r.opts.beam_size));
            assert!((0.0..=2.0).contains(&r.opts.alpha));
            assert!(r.max_len.is_none_or(|m| (1..=512).contains(&m)));
        }
        Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
    }
});
