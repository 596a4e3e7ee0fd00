//! Files given by operators: a device, a FIFO or an oversized file is refused at once with an
//! error naming it (never read without limit, never a hang), and `rna certs --force` does not
//! write through a symbolic link.

use std::path::Path;

use crate::common::*;

/// Runs `rna` to completion (bounded by [`WAIT`]) and returns (exit code, stderr).
async fn run(args: &[&str]) -> (i32, String) {
    let out = Rna::new(args).run_async().await;
    (out.code(), out.stderr)
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_fifos_and_huge_files_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |f: &str| tmp.path().join(f).display().to_string();
    let certs = p("certs");
    assert_eq!(
        run(&["certs", "init", "--dir", &certs, "--hub-name", "127.0.0.1"])
            .await
            .0,
        0
    );
    assert_eq!(run(&["certs", "agent", "--dir", &certs, "a1"]).await.0, 0);
    let fifo = p("fifo");
    mkfifo(Path::new(&fifo));
    let huge = p("huge.txt");
    std::fs::write(&huge, "x".repeat(64 * 1024 + 1)).unwrap();
    let ca = format!("{certs}/ca.pem");
    let agent = |token_file: &str, cert: &str| -> Vec<String> {
        [
            "agent",
            "--hub",
            "127.0.0.1:9",
            "--name",
            "a1",
            "--ca",
            &ca,
            "--cert",
            cert,
            "--key",
            &format!("{certs}/agent-a1-key.pem"),
            "--token-file",
            token_file,
            "--metrics",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let agent_cert = format!("{certs}/agent-a1.pem");
    let hub = |tokens: &str, cert: &str| -> Vec<String> {
        [
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--socks",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--ca",
            &ca,
            "--cert",
            cert,
            "--key",
            &format!("{certs}/hub-key.pem"),
            "--tokens",
            tokens,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let hub_cert = format!("{certs}/hub.pem");
    let store = p("tokens.toml");
    std::fs::write(&store, "").unwrap();
    let mut hub_config = hub(&store, &hub_cert);
    hub_config.extend(["--config".to_string(), fifo.clone()]);
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            agent("/dev/zero", &agent_cert),
            "/dev/zero",
            "character device",
        ),
        (agent(&fifo, &agent_cert), &fifo, "FIFO"),
        (agent(&huge, &agent_cert), &huge, "larger than 65536 bytes"),
        (agent(&huge, "/dev/zero"), "/dev/zero", "character device"),
        (hub(&fifo, &hub_cert), &fifo, "FIFO"),
        (hub(&store, &fifo), &fifo, "FIFO"),
        (hub_config, &fifo, "FIFO"),
        (
            vec![
                "kube".into(),
                "--token-file".into(),
                fifo.clone(),
                "--agent".into(),
                "a1".into(),
                "get".into(),
                "pods/x".into(),
            ],
            &fifo,
            "FIFO",
        ),
    ];
    for (args, file, what) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = run(&args).await;
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(
            stderr.contains(file) && stderr.contains(what),
            "{args:?}: expected an error naming {file} ({what}), got: {stderr}"
        );
    }
    // A manifest that is a FIFO is refused too, before any request is made.
    let token = p("token.txt");
    std::fs::write(&token, "rna_000000000000_x\n").unwrap();
    let (code, stderr) = run(&[
        "kube",
        "--api",
        "http://127.0.0.1:9",
        "--token-file",
        &token,
        "--agent",
        "a1",
        "apply",
        "-f",
        &fifo,
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&fifo) && stderr.contains("FIFO"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_force_does_not_write_through_a_symbolic_link() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let dir = certs.display().to_string();
    let init = ["certs", "init", "--dir", &dir, "--hub-name", "127.0.0.1"];
    assert_eq!(run(&init).await.0, 0);
    assert_eq!(run(&["certs", "agent", "--dir", &dir, "a1"]).await.0, 0);
    // Someone who can write the folder points the key files at a file of their choice.
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    for file in ["hub-key.pem", "agent-a1-key.pem"] {
        std::fs::remove_file(certs.join(file)).unwrap();
        std::os::unix::fs::symlink(&victim, certs.join(file)).unwrap();
    }
    let mut forced = init.to_vec();
    forced.push("--force");
    for args in [
        forced,
        vec!["certs", "agent", "--dir", &dir, "a1", "--force"],
    ] {
        let (code, stderr) = run(&args).await;
        assert_ne!(code, 0, "{args:?}: {stderr}");
        assert!(stderr.contains("symbolic link"), "{args:?}: {stderr}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
    // Without links, --force replaces the files (by rename: a new inode, mode 0600 kept).
    use std::os::unix::fs::MetadataExt;
    let key = certs.join("agent-a1-key.pem");
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, "old").unwrap();
    let before = std::fs::metadata(&key).unwrap().ino();
    let (code, stderr) = run(&["certs", "agent", "--dir", &dir, "a1", "--force"]).await;
    assert_eq!(code, 0, "{stderr}");
    let after = std::fs::metadata(&key).unwrap();
    assert_ne!(after.ino(), before);
    assert_eq!(after.mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("PRIVATE KEY"));
}
