//! The conformance suite against the real vLLM (CPU build). A start costs 30
//! to 60 s here, so the checks that only need a running engine share one
//! (the one `lifecycle` starts again after its shutdown); the lifecycle and
//! fault checks start their own, because starting and failing is what they
//! check.

conformance::suite!(conformance::backends::vllm);
