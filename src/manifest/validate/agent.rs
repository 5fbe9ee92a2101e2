//! An agent: its bottle, prompt and skills.

use std::collections::{BTreeMap, BTreeSet};

use super::paths::{Expect, resolve_inside};
use super::{diag, list};
use crate::manifest::diagnostic::suggest;
use crate::manifest::load::{Cx, Decl, Kind};
use crate::manifest::model::AgentSpec;
use crate::manifest::source::Want;
use crate::manifest::{Agent, Prompt};

pub(super) fn agent(cx: &mut Cx, d: &Decl<AgentSpec>, bottles: &BTreeSet<&str>) -> Option<Agent> {
    let spec = d.spec.as_ref()?;
    let file = d.file;
    let base = d.path(Kind::Agent);
    let what = Kind::Agent.describe(&d.name);
    let before = cx.found.len();

    if !bottles.contains(spec.bottle.as_str()) {
        let help = match suggest(&spec.bottle, bottles.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None if bottles.is_empty() => format!(
                "declare it: `[bottle.{}]` in any manifest of the directory",
                spec.bottle
            ),
            None => format!("declared bottles: {}", list(bottles.iter().copied())),
        };
        cx.report(
            file,
            &base.clone().key("bottle"),
            Want::Value,
            diag(
                "bottle::unknown-bottle",
                format!(
                    "{what} runs in bottle `{}`, which is not declared",
                    spec.bottle
                ),
                help,
            ),
            "no such bottle",
        );
    }

    // The file is checked even beside `prompt_text`: whichever is kept, a
    // prompt file that is not there is a problem of its own.
    let prompt_file = spec.prompt.as_ref().map(|path| {
        let looks_like_text = path.contains('\n') || path.split_whitespace().count() > 3;
        let help = looks_like_text.then(|| {
            "`prompt` names a file; to give the prompt inline (as the old `prompt` did), \
             write `prompt_text = \"...\"`"
                .to_owned()
        });
        resolve_inside(
            cx,
            file,
            &base.clone().key("prompt"),
            path,
            "prompt file",
            Expect::File,
            help,
        )
    });
    let prompt = match (prompt_file, &spec.prompt_text) {
        (Some(_), Some(_)) => {
            let text_span = cx.span(file, &base.clone().key("prompt_text"), Want::Key);
            let d = diag(
                "bottle::prompt-conflict",
                format!("{what} has both `prompt` and `prompt_text`"),
                "keep one: `prompt` names a file, `prompt_text` gives the text inline",
            )
            .span(cx.sources, file, text_span, "and prompt_text");
            cx.report(
                file,
                &base.clone().key("prompt"),
                Want::Key,
                d,
                "prompt file",
            );
            None
        }
        (Some(resolved), None) => resolved.map(Prompt::File),
        (None, Some(text)) => Some(Prompt::Text(text.clone())),
        (None, None) => Some(Prompt::None),
    };

    let mut skills = Vec::new();
    let mut skill_names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, skill) in spec.skills.iter().enumerate() {
        let path = base.clone().key("skills").index(i);
        let Some(dir) = resolve_inside(
            cx,
            file,
            &path,
            skill,
            "skill directory",
            Expect::Dir,
            Some(
                "skills are directories relative to this file, each holding a SKILL.md, \
                 e.g. `skills = [\"skills/rust-review\"]`"
                    .to_owned(),
            ),
        ) else {
            continue;
        };
        if cx.stat(&dir.join("SKILL.md")).is_none_or(|i| !i.is_file) {
            cx.report(
                file,
                &path,
                Want::Value,
                diag(
                    "bottle::skill-without-skill-md",
                    format!("skill directory `{skill}` of {what} has no SKILL.md"),
                    "Claude Code loads a skill from its SKILL.md: add one with YAML front matter \
                     (`name`, `description`) followed by the instructions",
                ),
                "no SKILL.md here",
            );
            continue;
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The first skill of that name stays the one others are compared to.
        let first = *skill_names.entry(name.clone()).or_insert(i);
        if first != i {
            let first_span = cx.span(file, &base.clone().key("skills").index(first), Want::Value);
            let d = diag(
                "bottle::duplicate-skill",
                format!("{what} has two skills named `{name}`"),
                "each skill is copied to ~/.claude/skills/<directory name>/: \
                 rename one of the directories or remove one",
            )
            .span(cx.sources, file, first_span, "first skill");
            cx.report(file, &path, Want::Value, d, "same directory name");
            continue;
        }
        skills.push(dir);
    }

    let prompt = prompt?;
    (cx.found.len() == before).then(|| Agent {
        name: d.name.clone(),
        spec: spec.clone(),
        file,
        prompt,
        skills,
    })
}
