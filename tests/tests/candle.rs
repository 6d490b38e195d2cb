//! The conformance suite against candle, in process, on the real GGUF.

conformance::suite!(conformance::backends::candle);
