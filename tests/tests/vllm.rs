//! The conformance suite against the real vLLM (CPU build). Each check group
//! starts its own engine (about 30 s each here); the lifecycle and fault groups
//! start several, because starting is what they check.

conformance::suite!(conformance::backends::vllm);
