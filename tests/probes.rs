//! What bottle observes in a guest, end to end: drift made from inside the
//! guest (as root or as the agent user, through `smolvm-double machine
//! exec`) or through the runtime (`smolvm-double machine update`) must show
//! in `check`, and `apply` must converge it or fail, never record it as
//! applied. Uses the `e2e` fixture (see tests/e2e.rs).

mod support;

use support::Double;
use support::project::Project;

const CODER: &str = "bottle_e2e_coder";
const SECRET: &str = "not-a-real-secret-e2e-4711";

fn project() -> Project {
    Project::with_double("e2e", Double::new().with_env("BOTTLE_E2E_SECRET", SECRET))
}

/// `sh -c SCRIPT` as the agent user `node` in the coder machine.
fn as_agent(p: &Project, script: &str) -> String {
    p.double
        .sh(CODER, &format!("runuser -u node -- sh -c '{script}'"))
}

// --- ca: applied only when the certificate is trusted -----------------------

#[test]
fn a_ca_that_does_not_reach_the_trust_bundle_is_never_recorded() {
    let p = project();
    p.bottle(&["apply"]).success();
    let cert = "/usr/local/share/ca-certificates/bottle-dev.crt";
    // An image whose update-ca-certificates does nothing (here: one that
    // shadows the real tool), and the certificate gone from the store.
    p.double.sh(
        CODER,
        &format!(
            "printf '#!/bin/sh\\nexit 0\\n' > /usr/local/sbin/update-ca-certificates && \
             chmod 755 /usr/local/sbin/update-ca-certificates && rm {cert} && \
             /usr/sbin/update-ca-certificates --fresh >/dev/null 2>&1"
        ),
    );
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check.stdout.contains("coder: ca (apply needed)"),
        "{}",
        check.stdout
    );
    // The upload works, the trust store does not take it: a failure.
    let apply = p.bottle(&["apply"]);
    apply.code(1);
    assert!(
        apply
            .all()
            .contains("is not in the trust bundle after update-ca-certificates"),
        "{}",
        apply.all()
    );
    p.double.sh(CODER, &format!("test -f {cert}"));
    // Still drift, not "in sync".
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(check.stdout.contains("coder: ca"), "{}", check.stdout);
    // A working tool again: apply converges.
    p.double
        .sh(CODER, "rm /usr/local/sbin/update-ca-certificates");
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
    assert_eq!(
        p.double.sh(
            CODER,
            "grep -c \"$(sed -n 2p /usr/local/share/ca-certificates/bottle-dev.crt)\" \
             /etc/ssl/certs/ca-certificates.crt"
        ),
        "1\n"
    );
}

// --- skills: permission bits ------------------------------------------------

#[test]
fn a_skill_file_mode_change_on_the_host_reaches_the_guest() {
    let p = project();
    let file = "/home/node/.claude/skills/style/SKILL.md";
    std::fs::set_permissions(
        p.path("skills/style/SKILL.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    p.bottle(&["apply"]).success();
    assert_eq!(p.double.sh(CODER, &format!("stat -c %a {file}")), "644\n");
    std::fs::set_permissions(
        p.path("skills/style/SKILL.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("coder: skills (apply needed): skills changed in manifest"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    assert_eq!(p.double.sh(CODER, &format!("stat -c %a {file}")), "600\n");
    // A mode the agent's umask would have cut (group-writable) lands too.
    std::fs::set_permissions(
        p.path("skills/style/SKILL.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o664),
    )
    .unwrap();
    p.bottle(&["apply"]).success();
    assert_eq!(p.double.sh(CODER, &format!("stat -c %a {file}")), "664\n");
    p.bottle(&["check"]).success();
    // A set-id bit too (the recorded copy is chowned, which clears it).
    std::fs::set_permissions(
        p.path("skills/style/SKILL.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    p.bottle(&["apply"]).success();
    assert_eq!(p.double.sh(CODER, &format!("stat -c %a {file}")), "4755\n");
    p.bottle(&["check"]).success();
    // And a chmod in the guest is drift.
    as_agent(&p, &format!("chmod 600 {file}"));
    p.bottle(&["check"]).code(3);
}

// --- nested links -----------------------------------------------------------

#[test]
fn a_nested_link_out_of_the_manifests_directory_is_refused_before_any_machine() {
    let p = project();
    std::os::unix::fs::symlink("/etc/shadow", p.path("skills/review/notes/shadow")).unwrap();
    for command in ["validate", "plan", "apply"] {
        let run = p.bottle(&[command]);
        run.code(1);
        assert!(
            run.stderr.contains("bottle::path-escapes")
                && run.stderr.contains("`notes/shadow` -> `/etc/shadow`"),
            "{command}: {}",
            run.stderr
        );
    }
    assert_eq!(p.double.mutating_calls(), 0);
}

// --- git: what git will use, as the agent user -------------------------------

/// What `git ls-remote --get-url` resolves an upstream to, as the agent.
fn resolved(p: &Project, upstream: &str) -> String {
    as_agent(p, &format!("cd / && git ls-remote --get-url {upstream}"))
}

#[test]
fn a_rewrite_of_a_declared_upstream_anywhere_git_reads_is_drift_that_apply_removes() {
    let p = project();
    p.bottle(&["apply"]).success();
    let docs = "https://github.com/acme/docs.git";
    assert_eq!(resolved(&p, docs), "http://10.8.0.2:9418/docs.git\n");
    // The agent's own rewrite, in the file git reads before ~/.gitconfig.
    as_agent(
        &p,
        &format!(
            "mkdir -p ~/.config/git && git config --file ~/.config/git/config \
             url.http://evil.example/docs.insteadOf {docs}"
        ),
    );
    assert_eq!(resolved(&p, docs), "http://evil.example/docs\n");
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("coder: git (apply needed): git configuration changed in guest"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    assert_eq!(resolved(&p, docs), "http://10.8.0.2:9418/docs.git\n");
    p.bottle(&["check"]).success();

    // One in a file ~/.gitconfig includes, and another identity.
    as_agent(
        &p,
        "printf \"[url \\\"http://evil.example/app\\\"]\\n\\tinsteadOf = git@github.com:acme/app.git\\n[user]\\n\\tname = Mallory\\n\" > ~/evil.inc && \
             git config --global include.path ~/evil.inc",
    );
    assert_eq!(
        resolved(&p, "git@github.com:acme/app.git"),
        "http://10.8.0.2:9418/app.git\n",
        "bottle's line comes first in ~/.gitconfig: its rewrite still wins"
    );
    assert_eq!(as_agent(&p, "cd / && git config user.name"), "Mallory\n");
    p.bottle(&["check"]).code(3);
    p.bottle(&["apply"]).success();
    assert_eq!(as_agent(&p, "cd / && git config user.name"), "E2E Bot\n");
    assert!(!as_agent(&p, "cat ~/evil.inc").contains("acme"));
    p.bottle(&["check"]).success();
}

// --- probe cost and output: the agent's to inflate, never bottle's ----------

#[test]
fn huge_sparse_files_the_agent_plants_are_drift_that_apply_replaces_not_errors() {
    let p = project();
    p.bottle(&["apply"]).success();
    // A 2 TiB sparse file among the skills, the prompt made one, and
    // ~/.claude.json inflated to 300 MB.
    as_agent(
        &p,
        "truncate -s 2T ~/.claude/skills/style/blob && \
         truncate -s 2T ~/.bottle/prompt.md.big && mv ~/.bottle/prompt.md.big ~/.bottle/prompt.md && \
         truncate -s 300M ~/.claude.json",
    );
    // Drift, not "could not probe" (which the old probe's 120 s of
    // hashing ended in).
    let check = p.bottle(&["check"]);
    check.code(3);
    for step in ["skills", "prompt", "supervise"] {
        assert!(
            check
                .stdout
                .contains(&format!("coder: {step} (apply needed)")),
            "{step}: {}",
            check.stdout
        );
    }
    // The skills and the prompt are bottle's: replaced. ~/.claude.json is
    // Claude Code's: bottle says what to do and reads no more of it.
    let apply = p.bottle(&["apply"]);
    apply.code(1);
    assert!(
        apply
            .all()
            .contains("/home/node/.claude.json in machine bottle_e2e_coder is larger than 1 MiB"),
        "{}",
        apply.all()
    );
    assert_eq!(
        p.double.sh(
            CODER,
            "ls /home/node/.claude/skills/style; stat -c %s /home/node/.bottle/prompt.md"
        ),
        format!(
            "SKILL.md\n{}\n",
            std::fs::metadata(p.path("prompts/coder.md")).unwrap().len()
        )
    );
    as_agent(&p, "rm ~/.claude.json");
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
}

/// Past the entry budget the probe lists nothing (the old probe listed and
/// hashed every entry: this many still finished, a few million did not);
/// the skill is replaced whole.
#[test]
fn more_entries_than_a_probe_lists_are_drift_that_apply_replaces() {
    let p = project();
    p.bottle(&["apply"]).success();
    // More entries than a probe lists (100 000), made cheaply.
    as_agent(
        &p,
        "cd ~/.claude/skills/style && mkdir many && cd many && \
         seq 1 100001 | xargs touch",
    );
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check.stdout.contains("coder: skills (apply needed)"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
    assert_eq!(
        p.double.sh(CODER, "ls /home/node/.claude/skills/style"),
        "SKILL.md\n"
    );
}

// --- env and volumes changed outside bottle ----------------------------------

/// `smolvm machine update` of the coder machine, outside bottle (stop,
/// update, start, as a user would).
fn update_outside(p: &Project, args: &[&str]) {
    for (verb, extra) in [("stop", &[][..]), ("update", args), ("start", &[][..])] {
        let mut argv = vec!["machine", verb, "--name", CODER];
        argv.extend_from_slice(extra);
        let out = p.double.run(&argv);
        assert!(out.status.success(), "{verb}: {}", support::stderr(&out));
    }
}

#[test]
fn env_and_volumes_changed_through_the_runtime_are_drift() {
    let p = project();
    p.bottle(&["apply"]).success();
    // Nothing differs: the guest's view matches the manifest.
    p.bottle(&["check"]).success();

    update_outside(&p, &["-e", "E2E_MODE=evil"]);
    assert_eq!(p.double.sh(CODER, "printenv E2E_MODE"), "evil\n");
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("coder: machine (restart needed): env changed in guest: E2E_MODE"),
        "{}",
        check.stdout
    );
    assert!(!check.all().contains("evil"), "values are never shown");
    p.bottle(&["apply"]).success();
    assert_eq!(p.double.sh(CODER, "printenv E2E_MODE"), "dev\n");
    p.bottle(&["check"]).success();

    // The read-only volume made writable.
    let workspace = p.dir().canonicalize().unwrap().join("workspace");
    let ws = format!("{}:/workspace", workspace.display());
    update_outside(&p, &["--remove-volume", &ws, "-v", &ws]);
    p.double
        .sh(CODER, "touch /workspace/written && rm /workspace/written");
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("volume /workspace changed in guest: rw"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    let out = p.double.exec(CODER, &["touch", "/workspace/written"]);
    assert!(!out.status.success(), "read-only again");
    p.bottle(&["check"]).success();

    // A writable mount of another host directory at the same guest path:
    // drift, whatever the runtime lets apply do about it.
    let other = tempfile::tempdir().unwrap();
    let other_ws = format!("{}:/workspace", other.path().display());
    update_outside(&p, &["--remove-volume", &ws, "-v", &other_ws]);
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("volume /workspace changed in guest: rw"),
        "{}",
        check.stdout
    );
    // Removed: no longer mounted at all.
    update_outside(&p, &["--remove-volume", &other_ws]);
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("volume /workspace changed in guest: absent"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
    assert!(!p.double.sh(CODER, "cat /workspace/README.md").is_empty());

    // Another host directory, read-only like the declared one: the mount's
    // source differs from what the machine step recorded.
    let other_ro = format!("{other_ws}:ro");
    update_outside(&p, &["--remove-volume", &ws, "-v", &other_ro]);
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("volume /workspace changed in guest: another source is mounted"),
        "{}",
        check.stdout
    );
    update_outside(&p, &["--remove-volume", &other_ws]);
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
}

// --- the ledger is not the only judge of what the host knows ------------------

/// Root in the guest rewrites a step's ledger digest to that of what
/// `probe` (the step's probe fragment, as the guest runs it) prints now.
fn forge_ledger_digest(p: &Project, step: &str, probe: &str) {
    p.double.sh(
        CODER,
        &format!(
            "d=$( ( {probe} ) 2>/dev/null | sha256sum | cut -c1-64 ) && \
             sed -i \"s/\\\"digest\\\":\\\"[0-9a-f]*\\\"/\\\"digest\\\":\\\"$d\\\"/\" \
             /var/lib/bottle/ledger/{step}.json && grep -q \"$d\" /var/lib/bottle/ledger/{step}.json"
        ),
    );
}

#[test]
fn a_ledger_edited_in_the_guest_cannot_hide_a_changed_prompt() {
    let p = project();
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
    let prompt = "/home/node/.bottle/prompt.md";
    let skill = "/home/node/.claude/skills/style";
    p.double.sh(
        CODER,
        &format!("echo injected >> {prompt} && echo injected >> {skill}/SKILL.md"),
    );
    forge_ledger_digest(
        &p,
        "prompt",
        &format!("stat -c '%a %u %g' {prompt}; sha256sum < {prompt}"),
    );
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check.stdout.contains("coder: prompt (apply needed)"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
    assert!(
        !p.double
            .sh(CODER, &format!("cat {prompt} {skill}/SKILL.md"))
            .contains("injected")
    );
}

// --- owners, links and what the agent puts in the way ------------------------

/// Item b: a skill file given to another owner in the guest is drift, and
/// apply gives it back to the agent user.
#[test]
fn a_chown_of_a_skill_file_in_the_guest_is_drift() {
    let p = project();
    p.bottle(&["apply"]).success();
    let file = "/home/node/.claude/skills/style/SKILL.md";
    p.double.sh(CODER, &format!("chown 0:0 {file}"));
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("coder: skills (apply needed): skills changed in guest"),
        "{}",
        check.stdout
    );
    p.bottle(&["apply"]).success();
    assert_eq!(
        p.double.sh(CODER, &format!("stat -c '%U %G' {file}")),
        "node node\n"
    );
    p.bottle(&["check"]).success();
}

/// Item c: a skill, or the skills' parent, that is a link is drift, found
/// without following it (a copy the link points to shows exactly what
/// bottle installed, and was "in sync"), and apply puts a directory back.
#[test]
fn a_skill_reached_through_a_link_is_drift_that_apply_replaces() {
    let p = project();
    p.bottle(&["apply"]).success();
    let skills = "/home/node/.claude/skills";
    for (setup, link) in [
        // The skill is a link to an identical copy the agent keeps.
        (
            "cp -a ~/.claude/skills/style ~/style-copy && rm -rf ~/.claude/skills/style && \
             ln -s ~/style-copy ~/.claude/skills/style",
            "/home/node/.claude/skills/style",
        ),
        // ~/.claude is a link to an identical copy.
        (
            "cp -a ~/.claude ~/claude-copy && rm -rf ~/.claude && ln -s ~/claude-copy ~/.claude",
            "/home/node/.claude",
        ),
        // A skill that is a link to `/`.
        (
            "rm -rf ~/.claude/skills/review && ln -s / ~/.claude/skills/review",
            "/home/node/.claude/skills/review",
        ),
    ] {
        as_agent(&p, setup);
        let check = p.bottle(&["check"]);
        check.code(3);
        assert!(
            check.stdout.contains("coder: skills (apply needed)"),
            "{setup}: {}",
            check.stdout
        );
        p.bottle(&["apply"]).success();
        p.bottle(&["check"]).success();
        assert_eq!(
            p.double.sh(
                CODER,
                &format!(
                    "[ -L {link} ] && echo link; ls {skills}; stat -c %U {skills}/review/SKILL.md"
                )
            ),
            "review\nstyle\nnode\n",
            "{setup}"
        );
        as_agent(&p, "rm -rf ~/style-copy ~/claude-copy");
    }
}

/// Item d: what the agent puts in the way of bottle's writes in its home
/// (links out of it, read-only directories, a directory or a FIFO where a
/// file goes) is its own, and goes: apply converges, as the agent user,
/// and root never writes through the agent's links.
#[test]
fn what_the_agent_puts_in_the_way_in_its_home_is_replaced() {
    let p = project();
    p.bottle(&["apply"]).success();
    let passwd = p.double.sh(CODER, "sha256sum /etc/passwd");
    for setup in [
        "chmod 0555 ~/.claude/skills/style ~/.claude/skills",
        "rm -rf ~/.bottle && ln -s /etc ~/.bottle",
        "rm -rf ~/.claude && ln -s /etc ~/.claude",
        "rm -f ~/.claude.json && ln -s /etc/passwd ~/.claude.json",
        "rm ~/.bottle/prompt.md && mkdir -p ~/.bottle/prompt.md/sub && chmod 0555 ~/.bottle/prompt.md/sub",
        "rm ~/.bottle/prompt.md && mkfifo ~/.bottle/prompt.md",
        "chmod 0555 ~/.bottle ~",
    ] {
        as_agent(&p, setup);
        // A host edit too, so each step has something to write.
        p.write("prompts/coder.md", &format!("After `{setup}`.\n"));
        p.write("skills/style/SKILL.md", &format!("After `{setup}`.\n"));
        let apply = p.bottle(&["apply"]);
        apply.success();
        p.bottle(&["check"]).success();
        assert_eq!(
            p.double.sh(
                CODER,
                "cd /home/node && for f in .bottle .claude .claude/skills .claude/skills/style; do \
                 [ -d $f ] && [ ! -L $f ] || echo \"$f is not a directory\"; done; \
                 [ -f .claude.json ] && [ ! -L .claude.json ] || echo '.claude.json is not a file'; \
                 cat .bottle/prompt.md .claude/skills/style/SKILL.md; \
                 grep -c supervise .claude.json; ls /etc/skills /etc/prompt.md 2>&1 | grep -vc 'No such' || true"
            ),
            format!("After `{setup}`.\nAfter `{setup}`.\n1\n0\n"),
            "{setup}"
        );
        assert_eq!(p.double.sh(CODER, "sha256sum /etc/passwd"), passwd);
    }
}

/// Item d: what the agent user cannot repair (a directory root made in its
/// home) fails naming the path, its owner and what to do.
#[test]
fn what_the_agent_user_cannot_repair_is_named_with_what_to_do() {
    let p = project();
    p.bottle(&["apply"]).success();
    p.double.sh(
        CODER,
        "rm -rf /home/node/.claude && mkdir /home/node/.claude && chmod 755 /home/node/.claude",
    );
    let apply = p.bottle(&["apply"]);
    apply.code(1);
    let all = apply.all();
    assert!(
        all.contains(
            "/home/node/.claude belongs to root, not to node: the agent user cannot repair it"
        ),
        "{all}"
    );
    assert!(
        all.contains("bottle exec --root coder -- rm -rf PATH"),
        "{all}"
    );
    assert!(!all.contains("tar") && !all.contains("mktemp"), "{all}");
    p.double.sh(CODER, "rm -rf /home/node/.claude");
    p.bottle(&["apply"]).success();
    p.bottle(&["check"]).success();
}
