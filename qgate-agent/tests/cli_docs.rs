//! The README's usage block against `--help`: every flag the README shows
//! exists on the command it shows it for.
use std::process::Command;

fn help(words: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
        .args(words)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{words:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_flag_in_the_readme_is_in_the_help_of_its_command() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let usage = readme
        .split("## Using it")
        .nth(1)
        .and_then(|rest| rest.split("```sh").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("a usage block under `## Using it`");
    let mut checked = 0;
    for line in usage.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("qgate-agent ") else {
            // A continuation line belongs to the command above it.
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let command = words[0];
        // The subcommands: `requests list|show ID|approve ID…` names several.
        let subcommands: Vec<Vec<&str>> = match words.get(1) {
            Some(w) if w.chars().next().is_some_and(|c| c.is_ascii_lowercase()) => {
                let alternatives = rest[command.len()..]
                    .trim()
                    .split(" [")
                    .next()
                    .unwrap_or_default()
                    .split('|')
                    .filter_map(|a| a.split_whitespace().next())
                    .filter(|a| a.chars().all(|c| c.is_ascii_lowercase()))
                    .map(|a| vec![command, a])
                    .collect::<Vec<_>>();
                alternatives
            }
            _ => vec![vec![command]],
        };
        let helps: String = subcommands.iter().map(|s| help(s)).collect();
        // The flags of this line and of its continuation lines.
        let block: String = usage
            .split(line)
            .nth(1)
            .map(|after| {
                let more: Vec<&str> = after
                    .lines()
                    .skip(1)
                    .take_while(|l| !l.trim_start().starts_with("qgate-agent "))
                    .collect();
                format!("{line} {}", more.join(" "))
            })
            .unwrap_or_else(|| line.to_owned());
        for flag in block
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
        {
            assert!(
                helps.contains(flag),
                "README shows `{flag}` for `qgate-agent {}`, which does not take it",
                subcommands[0].join(" ")
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} flags found in the README");
}
