//! The supervisor against real child processes (`/bin/sh` scripts).
#![cfg(unix)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_core::Error;
use runtime_process::{ServerCommand, ServerProcess, StopPolicy};

fn sh(script: &str) -> ServerCommand {
    let mut command = ServerCommand::new("test-engine", "/bin/sh");
    command.args(["-c", script]);
    command
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); read its state to tell.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn group_members(pgid: u32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // fields[0] is the state, fields[2] the process group.
        if fields.get(2) == Some(&pgid.to_string().as_str()) && fields[0] != "Z" {
            members.push(pid);
        }
    }
    members
}

/// Waits (up to 5 s) until the process has logged a line containing `needle`.
async fn wait_for_line(process: &ServerProcess, needle: &'static str) {
    let log = process.log().clone();
    process
        .wait_until_ready(Duration::from_secs(5), || {
            let log = log.clone();
            async move { log.contains(needle) }
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn spawning_a_missing_program_is_a_spawn_error() {
    let command = ServerCommand::new("ghost", "/nonexistent/engine");
    let err = ServerProcess::spawn(&command).unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
}

#[tokio::test]
async fn output_of_both_streams_reaches_the_log_tail() {
    let process = ServerProcess::spawn(&sh("echo out; echo err >&2; sleep 5")).unwrap();
    let log = process.log().clone();
    process
        .wait_until_ready(Duration::from_secs(5), || {
            let log = log.clone();
            async move { log.contains("out") && log.contains("err") }
        })
        .await
        .unwrap();
    process.stop(StopPolicy::new(Duration::from_secs(2))).await;
}

#[tokio::test]
async fn an_exit_during_startup_fails_at_once_with_status_and_log_tail() {
    let process = ServerProcess::spawn(&sh("echo 'failed to open GGUF file' >&2; exit 3")).unwrap();
    let started = Instant::now();
    let err = process
        .wait_until_ready(Duration::from_secs(30), || async { false })
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    match err {
        Error::EngineExited {
            status, log_tail, ..
        } => {
            assert!(status.contains('3'), "{status}");
            assert_eq!(log_tail, ["failed to open GGUF file"]);
        }
        other => panic!("expected EngineExited, got {other:?}"),
    }
}

#[tokio::test]
async fn a_silent_engine_times_out_with_its_log_tail() {
    let process = ServerProcess::spawn(&sh("echo loading; sleep 30")).unwrap();
    let started = Instant::now();
    let err = process
        .wait_until_ready(Duration::from_millis(300), || async { false })
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(matches!(err, Error::StartupTimeout { ref log_tail, .. } if log_tail == &["loading"]));
    process.stop(StopPolicy::new(Duration::from_secs(2))).await;
}

#[tokio::test]
async fn a_deadline_is_extended_while_the_log_keeps_moving() {
    // Logs every 50 ms for about a second; the stall timeout is 300 ms.
    let process = ServerProcess::spawn(&sh(
        "i=0; while [ $i -lt 20 ]; do echo step $i; i=$((i+1)); sleep 0.05; done; echo ready; sleep 30",
    ))
    .unwrap();
    let log = process.log().clone();
    process
        .wait_until_ready(Duration::from_millis(300), || {
            let log = log.clone();
            async move { log.contains("ready") }
        })
        .await
        .expect("progressing startup is not cut off");
    process.stop(StopPolicy::new(Duration::from_secs(2))).await;
}

#[tokio::test]
async fn readiness_reacts_to_a_log_line_within_milliseconds() {
    let process = ServerProcess::spawn(&sh("sleep 0.5; echo listening; sleep 30")).unwrap();
    let log = process.log().clone();
    let seen_at = Arc::new(std::sync::Mutex::new(None));
    let seen = seen_at.clone();
    process
        .wait_until_ready(Duration::from_secs(5), || {
            let log = log.clone();
            let seen = seen.clone();
            async move {
                let ready = log.contains("listening");
                if ready {
                    seen.lock().unwrap().get_or_insert(Instant::now());
                }
                ready
            }
        })
        .await
        .unwrap();
    let returned = Instant::now();
    let seen = seen_at.lock().unwrap().unwrap();
    assert!(returned - seen < Duration::from_millis(20));
    process.stop(StopPolicy::new(Duration::from_secs(2))).await;
}

#[tokio::test]
async fn stop_escalates_to_sigkill_and_empties_the_group() {
    // The leader ignores SIGTERM and has a child of its own in the group.
    let process = ServerProcess::spawn(&sh(
        "trap '' TERM; sleep 60 & echo started; while :; do sleep 0.05; done",
    ))
    .unwrap();
    wait_for_line(&process, "started").await;
    let pgid = process.pid();
    assert!(
        group_members(pgid).len() >= 2,
        "leader and its child share the group"
    );

    let started = Instant::now();
    let exited = process
        .stop(StopPolicy::new(Duration::from_millis(300)))
        .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(exited.to_string().contains("signal: 9"), "{exited}");
    assert!(group_members(pgid).is_empty(), "group emptied");
    assert!(!process.is_running());

    let again = process
        .stop(StopPolicy::new(Duration::from_millis(300)))
        .await;
    assert_eq!(again, exited, "stop is idempotent");
}

#[tokio::test]
async fn a_cooperative_engine_stops_on_sigterm_well_before_the_grace_period() {
    let process = ServerProcess::spawn(&sh("sleep 60")).unwrap();
    let started = Instant::now();
    process.stop(StopPolicy::new(Duration::from_secs(10))).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_second_sigterm_is_sent_when_the_policy_asks() {
    // Exits only on the second SIGTERM, like llama-server with a request in flight.
    let script = "n=0; trap 'n=$((n+1)); [ $n -ge 2 ] && exit 0' TERM; echo up; while :; do sleep 0.02; done";
    let process = ServerProcess::spawn(&sh(script)).unwrap();
    wait_for_line(&process, "up").await;
    let started = Instant::now();
    let policy = StopPolicy {
        grace: Duration::from_secs(10),
        repeat_term_after: Some(Duration::from_millis(100)),
    };
    let exited = process.stop(policy).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(exited.status.unwrap().success(), "{exited}");
}

#[tokio::test]
async fn dropping_without_stop_kills_the_whole_group() {
    let process = ServerProcess::spawn(&sh("sleep 60 & echo started; wait")).unwrap();
    wait_for_line(&process, "started").await;
    let pgid = process.pid();
    let members = group_members(pgid);
    assert!(!members.is_empty());
    drop(process);
    let deadline = Instant::now() + Duration::from_secs(2);
    while members.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        members.iter().all(|&pid| !alive(pid)),
        "every member is gone"
    );
}

#[tokio::test]
async fn exit_error_reports_an_engine_that_died_while_serving() {
    let process = ServerProcess::spawn(&sh("echo serving; sleep 60")).unwrap();
    assert!(
        process
            .exit_error(Duration::from_millis(50))
            .await
            .is_none()
    );
    sigkill(process.pid());
    let err = process
        .exit_error(Duration::from_secs(2))
        .await
        .expect("engine died");
    assert!(matches!(err, Error::EngineExited { .. }));
    assert!(!process.is_running());
}

fn sigkill(pid: u32) {
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
}

/// The leader's pid (and so its group id) stays taken until the group is
/// swept: a number that could be reused is never signalled.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_exited_leader_stays_a_zombie_until_its_group_is_swept() {
    let process = ServerProcess::spawn(&sh("sleep 30 & exit 0")).unwrap();
    let pid = process.pid() as i32;
    process
        .wait_for_exit(Duration::from_secs(5))
        .await
        .expect("the leader exits");
    let straggler: Vec<i32> = group_members(process.pid())
        .into_iter()
        .filter(|p| *p != pid)
        .collect();
    assert_eq!(
        straggler.len(),
        1,
        "the background sleep is left in the group"
    );
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok() && !alive(pid),
        "the leader is kept as a zombie"
    );
    process.stop(StopPolicy::new(Duration::from_secs(1))).await;
    assert!(
        group_members(process.pid()).is_empty(),
        "the straggler was killed"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the zombie is reaped after the sweep"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The listening socket of a port is attributed to the engine's group, and a
/// port held by anyone else is not.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_port_counts_as_the_engines_only_if_its_group_listens_on_it() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let process = ServerProcess::spawn(&sh("exec python3 -c 'import socket,time; s=socket.socket(); s.bind((\"127.0.0.1\",0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)'")).unwrap();
    let log = process.log().clone();
    process
        .wait_until_ready(Duration::from_secs(10), || {
            let log = log.clone();
            async move { !log.lines().is_empty() }
        })
        .await
        .unwrap();
    let own: u16 = process.log().lines()[0].trim().parse().unwrap();
    assert_eq!(process.listens_on(own), Some(true));
    assert_eq!(process.listens_on(taken), Some(false));
    process.stop(StopPolicy::new(Duration::from_secs(1))).await;
}
