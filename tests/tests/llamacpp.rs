//! The conformance suite against the real llama-server.

conformance::suite!(conformance::backends::llamacpp);
