//! A volume re-pointed outside bottle (`smolvm machine update
//! --remove-volume DECLARED -v OTHER:GUEST`) on smolvm (the double, which
//! removes and refuses volumes as smolvm 1.9.2 does): drift that only a new
//! machine repairs, because smolvm reports no volumes and removes one only
//! by its exact `HOST:GUEST`: an update adding the declared mount beside the
//! other one is refused (`duplicate mount target`).

mod support;

use support::Double;
use support::project::Project;

const CODER: &str = "bottle_e2e_coder";

fn update_outside(p: &Project, args: &[&str]) {
    for (verb, extra) in [("stop", &[][..]), ("update", args), ("start", &[][..])] {
        let mut argv = vec!["machine", verb, "--name", CODER];
        argv.extend_from_slice(extra);
        let out = p.double.run(&argv);
        assert!(out.status.success(), "{verb}: {}", support::stderr(&out));
    }
}

#[test]
fn a_volume_repointed_outside_bottle_is_repaired_by_a_replacement() {
    let p = Project::with_double(
        "e2e",
        Double::new().with_env("BOTTLE_E2E_SECRET", "not-a-real-secret-vol-1"),
    );
    p.bottle(&["apply"]).success();
    let workspace = p.dir().canonicalize().unwrap().join("workspace");
    let declared = format!("{}:/workspace", workspace.display());
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("planted"), "not the workspace").unwrap();
    let other_ro = format!("{}:/workspace:ro", other.path().display());
    update_outside(&p, &["--remove-volume", &declared, "-v", &other_ro]);
    assert_eq!(
        p.double.sh(CODER, "cat /workspace/planted"),
        "not the workspace"
    );

    // Drift, and the plan says it needs a new machine, not an update the
    // runtime would refuse.
    let check = p.bottle(&["check"]);
    check.code(3);
    assert!(
        check
            .stdout
            .contains("volume /workspace changed in guest: another source is mounted"),
        "{}",
        check.stdout
    );
    assert!(check.all().contains("--allow-replace"), "{}", check.all());
    let plan = p.bottle(&["plan"]);
    assert!(plan.stdout.contains("replace"), "{}", plan.stdout);
    assert!(!plan.stdout.contains("restart"), "{}", plan.stdout);

    // Without the flag apply changes nothing it cannot finish and says why.
    let apply = p.bottle(&["apply"]);
    assert!(
        !apply.all().contains("duplicate mount target"),
        "{}",
        apply.all()
    );
    assert_eq!(
        p.double.sh(CODER, "cat /workspace/planted"),
        "not the workspace"
    );

    // With it, the machine is replaced with the declared mount.
    p.bottle(&["apply", "--allow-replace"]).success();
    let listing = p.double.sh(CODER, "ls /workspace");
    assert!(!listing.contains("planted"), "{listing}");
    assert!(!p.double.sh(CODER, "cat /workspace/README.md").is_empty());
    p.bottle(&["check"]).success();
}
